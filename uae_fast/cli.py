"""``uae`` command line: ``uae score | train | eval | quickstart | calibrate-fusion | index | search``.

Each subcommand lives in the module that owns the concept; this file only wires argparse.
A module registers its subcommand with ``add_parser(subparsers)`` and the parser's
``func`` default is called with the parsed arguments.
"""
from __future__ import annotations

import argparse
import os
import sys
from importlib import import_module

# Modules that contribute a subcommand, in the order shown by --help.
_SUBCOMMANDS = ["uae_fast.scoring", "uae_fast.training", "uae_fast.evaluation", "uae_fast.quickstart", "uae_fast.calibration",
                "uae_fast.search"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="uae", description="Utility-Aligned Embeddings: score, train, evaluate.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in _SUBCOMMANDS:
        try:
            module = import_module(mod)
        except ModuleNotFoundError as e:
            if e.name == mod:  # subcommand not part of this build
                continue
            raise
        module.add_parser(sub)
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
