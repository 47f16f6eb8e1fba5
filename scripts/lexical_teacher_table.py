#!/usr/bin/env python3
"""A lexical "teacher" table: BM25(question + answers) scores on the rows of an answer-only utilities table.

Same questions, paragraphs and row order as ``--table``; each row's utility becomes the paragraph's BM25
score for the question followed by its answers (BM25 over the question's whole pool, as ``--positive
bm25-answer`` ranks). Gold is never read. Its purpose is a teacher ensemble with the LLM teacher:

    python scripts/lexical_teacher_table.py --table data/qasper-train-utilities-nogold-top12.jsonl.gz --out bm25a.jsonl.gz
    uae score --merge-teachers data/qasper-train-utilities-nogold-top12.jsonl.gz bm25a.jsonl.gz --out mix.jsonl.gz
    uae train --no-gold --utilities mix.jsonl.gz --lexical-teacher none --out runs/mix

``uae train --no-gold`` builds the same ensemble by itself (``--lexical-teacher bm25-answer``, its default;
:mod:`uae_fast.lexical_teacher`): this table is for ``uae diagnose`` and for ensembles of three or more tables.
(``--merge-teachers`` z-scores each table per question, so BM25's scale does not matter.)
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def lexical_table(table: str, data: str, out: str) -> dict:
    from uae_fast.data import load_dataset
    from uae_fast.lexical_teacher import LEXICAL_TEACHER_NAME, lexical_utilities
    from uae_fast.utilities import read_utilities, write_table

    try:
        header, rows = read_utilities(table)
        cands: dict = {}
        for r in rows:
            cands.setdefault(r["qid"], []).append(r["pid"])
        lex = lexical_utilities(load_dataset(data), cands)
    except (ValueError, OSError, EOFError) as e:
        raise SystemExit(f"{table}: {e} ({data})") from None
    out_rows = [dict(r, utility=lex[r["qid"]][r["pid"]]) for r in rows]
    h = dict(header, teacher=LEXICAL_TEACHER_NAME, n_rows=len(out_rows), lexical_of=os.path.basename(table))
    return write_table(out, h, out_rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--table", required=True, help="an answer-only utilities table (its rows are kept)")
    ap.add_argument("--data", default=None, help="the data it was scored on (default: QASPER train)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    from uae_fast.data import default_qasper_path

    h = lexical_table(args.table, args.data or default_qasper_path("train"), args.out)
    print(f"wrote {args.out}: {h['n_rows']} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
