from .cli import entry

entry()  # as the `uae` executable: deaf to a Ctrl-C after main returned
