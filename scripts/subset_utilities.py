"""Cut a utilities table down to another candidate policy without running the teacher again.

A table scored with ``--candidates all`` holds every (question, paragraph) utility, so the rows of any
narrower policy (``top:M``, ``student:M``, with ``--no-gold`` the answer-only sets without gold added) are a
subset of it: the same numbers ``uae score`` would write with that policy and the same teacher settings.
The output is a normal utilities file (header + rows, ``cand``/``n_cand`` renumbered) whose header records
the source table (:func:`uae_fast.utilities.subset` does the work).

    python scripts/subset_utilities.py --table data/qasper-train-utilities-all.jsonl.gz \\
        --candidates answer:12 --no-gold --out data/qasper-train-utilities-nogold-answer12.jsonl.gz
"""
import argparse
import sys

from uae_fast.data import default_qasper_path, load_dataset
from uae_fast.utilities import subset


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--table", required=True, help="a utilities file scored with --candidates all")
    ap.add_argument("--candidates", required=True, help="top:M, answer:M or student:M")
    ap.add_argument("--no-gold", action="store_true", help="answer-only: the policy's top-M alone, no gold added (default off)")
    ap.add_argument("--candidate-student", default=None, help="encoder for student:M (default all-MiniLM-L6-v2)")
    ap.add_argument("--data", default=None, help="the data the table was scored on (default: the full QASPER train split in $UAE_DATA_DIR)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    try:
        ds = load_dataset(args.data or default_qasper_path("train"))
        h = subset(args.table, ds, args.candidates, args.out, no_gold=args.no_gold, candidate_student=args.candidate_student,
                   progress=True)
    except (ValueError, OSError, EOFError) as e:
        raise SystemExit(f"subset_utilities: error: {e}")
    print(f"{args.out}: {h['n_rows']} rows for {h['n_queries']} questions ({args.candidates}"
          f"{', no gold' if args.no_gold else ''})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
