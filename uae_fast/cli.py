"""``uae`` command line: ``uae score | train | eval | quickstart`` (and ``uae --version``).

Each subcommand lives in the module that owns the concept; this file only wires argparse.
A module registers its subcommand with ``add_parser(subparsers)`` and the parser's
``func`` default is called with the parsed arguments.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from importlib import import_module

# Modules that contribute a subcommand, in the order shown by --help.
_SUBCOMMANDS = ["uae_fast.scoring", "uae_fast.training", "uae_fast.evaluation", "uae_fast.quickstart"]

# reST roles and literals of the docstrings that modules reuse as descriptions (plain text in a terminal).
_REST_ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|obj|exc|ref):`~?([^`]+)`")
_REST_LITERAL = re.compile(r"``(.+?)``", re.S)
_REST_BLOCK = re.compile(r"::$", re.M)  # "Example::" introducing a literal block


def plain(text: str) -> str:
    """``literal`` -> literal, :class:`X` -> X, "Example::" -> "Example:"."""
    return _REST_BLOCK.sub(":", _REST_LITERAL.sub(r"\1", _REST_ROLE.sub(r"\1", text)))


class HelpFormatter(argparse.HelpFormatter):
    """Every subcommand's formatter: plain text (reST stripped) and each option's default shown.

    The default is appended as ``(default: X)`` unless the help already says what the default is, and not
    for flags (default False) or unset options (default None), whose help says what happens without them.
    """

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (action.option_strings and "default" not in text and "%(default)" not in text
                and default is not None and default is not False and default is not argparse.SUPPRESS):
            text += " (default: %(default)s)"
        return text

    def _expand_help(self, action):
        return plain(super()._expand_help(action))

    def _format_text(self, text):
        return super()._format_text(plain(text))


class RawDescriptionHelpFormatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The same, keeping the description's line breaks (for subcommands that asked for raw descriptions)."""


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="uae", description="Utility-Aligned Embeddings: score, train, evaluate.",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in _SUBCOMMANDS:
        try:
            module = import_module(mod)
        except ModuleNotFoundError as e:
            if e.name == mod:  # subcommand not part of this build
                continue
            raise
        module.add_parser(sub)
    for p in sub.choices.values():  # one formatter for all; a raw description stays raw
        raw = issubclass(p.formatter_class, argparse.RawDescriptionHelpFormatter)
        p.formatter_class = RawDescriptionHelpFormatter if raw else HelpFormatter
    return parser


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models come from packages or paths, never a hub
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("\ninterrupted; rerun with --resume to continue where it stopped", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"uae {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
