"""``uae`` command line: ``uae score | train | export | eval | diagnose | quickstart | calibrate-fusion | index | search`` (and ``uae --version``).

Each subcommand lives in the module that owns the concept; this file only wires argparse.
A module registers its subcommand with ``add_parser(subparsers)`` and the parser's
``func`` default is called with the parsed arguments.

Errors: bad input (a malformed file, a bad option value, a missing GPU, an unwritable path) is one line
``uae CMD: error: ...`` on stderr and exit status 1; a command-line syntax error (unknown option, a
non-number where a number belongs) is one line and status 2; Ctrl-C is status 130. Any other exception
is a bug: one ``internal error`` line (status 1), and ``UAE_DEBUG=1`` re-raises every error with its
traceback.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import zlib
from importlib import import_module
from typing import Optional

# Before torch is imported (the subcommand modules import it; uae_fast/__init__ imports nothing): with
# OpenMP's default spin-waiting, torch's threads burn their time slices while another process needs the
# core, which made a teacher forward ~10x slower on a busy 2-core machine. Passive threads sleep when
# idle and cost ~nothing when the machine is free (benchmarks/bench_load.py). An explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# transformers' own "Loading weights" / "Writing model shards" bars would surround every message (and every
# error line) with noise; uae's progress bars (--no-progress turns them off) say what is running.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

# Modules that contribute a subcommand, in the order shown by --help.
_SUBCOMMANDS = ["uae_fast.scoring", "uae_fast.training", "uae_fast.export", "uae_fast.evaluation", "uae_fast.diagnose",
               "uae_fast.quickstart", "uae_fast.calibration", "uae_fast.search"]

# Exceptions that mean bad input or a bad environment, not a bug: ValueError (incl. JSON and Unicode
# decoding), TypeError, OSError (missing/unreadable/unwritable paths, corrupt gzip), EOFError (truncated
# gzip), zlib.error (a damaged gzip block), FloatingPointError (a diverging run), MemoryError. Modules
# convert what they can at the source.
_USER_ERRORS = (ValueError, TypeError, OSError, EOFError, zlib.error, FloatingPointError, MemoryError)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (``uae train: error: ... (see uae train --help)``, status 2)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {_one_line(message)} (see {self.prog} --help)\n")

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

    parser = _Parser(prog="uae", description="Utility-Aligned Embeddings: score, train, evaluate.",
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


def set_threads(n: Optional[int]) -> None:
    """``--threads N``: torch's CPU threads (None keeps torch's default)."""
    if n is None:
        return
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"--threads must be a positive int, got {n!r}")
    import torch

    torch.set_num_threads(n)


def check_output_path(path: Optional[str], flag: str, *, folder: bool = False) -> None:
    """Fail before the work, not after it: ``path`` (a file, or a folder with ``folder=True``) must be creatable."""
    if not path:
        return
    if not folder and os.path.isdir(path):
        raise ValueError(f"{flag} {path} is a directory; give a file path")
    if folder and os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag} {path} is a file; give a folder")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"{flag} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK):
        raise ValueError(f"{flag} {path}: cannot write in {parent}")


def check_encoder_folder(path, flag: str) -> None:
    """An encoder is a folder: say so now for a missing path or a file, before other models load."""
    if path is None:
        return
    path = os.fspath(path)
    if os.path.isfile(path):
        raise ValueError(f"{flag} {path!r} is a file; an encoder is a folder (config.json, weights, tokenizer)")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{flag} {path!r}: no such encoder folder")


def check_teacher_path(path, flag: str) -> None:
    """A teacher is a named one (``TEACHERS``) or a folder: say so now, before other models load."""
    if path is None:
        return
    from .teacher import TEACHERS

    if os.fspath(path) not in TEACHERS and not os.path.isdir(path):
        raise FileNotFoundError(f"{flag} {os.fspath(path)!r} is not a folder with an HF causal LM, nor a named teacher "
                                f"({', '.join(TEACHERS)})")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _describe(e: BaseException) -> str:
    msg = _one_line(e)
    if isinstance(e, _USER_ERRORS) or type(e).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError
        return msg or type(e).__name__
    return f"internal error ({type(e).__name__}: {msg}); please report it (UAE_DEBUG=1 shows the traceback)"


def _clear_progress_bars() -> None:
    """Erase open tqdm bars, so an error or interrupt message stands on its own line."""
    if "tqdm" not in sys.modules:
        return
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.leave = False
        bar.close()


def _quiet_hf_bars() -> None:
    """The env var above only acts on a huggingface_hub / transformers imported after it: a process that
    imported them first (a script, a notebook, a test run) gets their bars switched off here."""
    if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") != "1":
        return  # the user's own setting
    try:  # best effort: never a reason for main() to fail
        if "huggingface_hub" in sys.modules:
            from huggingface_hub.utils import disable_progress_bars  # a bare `import huggingface_hub` is lazy

            disable_progress_bars()
        if "transformers" in sys.modules:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
    except Exception:
        pass


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models come from packages or paths, never a hub
    command = None
    try:
        _quiet_hf_bars()
        parser = build_parser()  # imports torch: a Ctrl-C here is an interrupt too, not a traceback
        args = parser.parse_args(argv)
        command = args.command
        if getattr(args, "index_command", None):  # "uae index build: error: ...", not "uae index: ..."
            command = f"{command} {args.index_command}"
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        return int(args.func(args) or 0)
    except KeyboardInterrupt as e:
        if os.environ.get("UAE_DEBUG") == "1":
            raise
        _clear_progress_bars()
        if getattr(e, "signum", None) is not None:  # training.Stopped: a SIGTERM, its step checkpointed
            again = "rerun with --resume" if command == "train" else "rerun the same command"  # quickstart resumes itself
            print(f"uae {command}: stopped by SIGTERM after checkpointing step {e.step}; {again} to continue", file=sys.stderr)
            return 128 + e.signum
        hint = {"train": "; rerun with --resume to continue where it stopped",
                "score": "; rerun with --resume to continue where it stopped",
                "quickstart": "; rerun the same command to continue where it stopped",
                "index build": "; --embedding-cache DIR keeps the passages encoded so far for the next run"}.get(command, "")
        print(f"uae{' ' + command if command else ''}: interrupted{hint}", file=sys.stderr)
        return 130
    except Exception as e:
        if os.environ.get("UAE_DEBUG") == "1":
            raise
        _clear_progress_bars()
        print(f"uae {command}: error: {_describe(e)}", file=sys.stderr)
        return 1


def entry() -> None:
    """The ``uae`` executable: ``main()``, then exit with its status, deaf to a late Ctrl-C.

    Once ``main`` returns, every file is committed; a Ctrl-C during the interpreter's teardown (torch's can take
    a moment) would otherwise kill the process by the default SIGINT action (status -2, no message) after
    Python has dropped its handler, and misreport a finished run. An ignored signal stays ignored there.
    """
    import signal

    status = 130  # stays so only for a Ctrl-C landing in the instant between main's return and the assignment
    try:
        status = main()
    except KeyboardInterrupt:
        if os.environ.get("UAE_DEBUG") == "1":
            raise
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(status)


if __name__ == "__main__":
    entry()
