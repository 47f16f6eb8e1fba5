#!/usr/bin/env python3
"""A lexical "teacher" table: BM25(question + answers) scores on the rows of an answer-only utilities table.

Same questions, paragraphs and row order as ``--table``; each row's utility becomes the paragraph's BM25
score for the question followed by its answers (BM25 over the question's whole pool, as ``--positive
bm25-answer`` ranks). Gold is never read. Its purpose is a teacher ensemble with the LLM teacher:

    python scripts/lexical_teacher_table.py --table data/qasper-train-utilities-nogold-top12.jsonl.gz --out bm25a.jsonl.gz
    uae score --merge-teachers data/qasper-train-utilities-nogold-top12.jsonl.gz bm25a.jsonl.gz --out mix.jsonl.gz
    uae train --no-gold --utilities mix.jsonl.gz --out runs/mix

(``--merge-teachers`` z-scores each table per question, so BM25's scale does not matter.)
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def lexical_table(table: str, data: str, out: str) -> dict:
    from uae_fast.bm25 import BM25
    from uae_fast.data import load_dataset
    from uae_fast.utilities import read_utilities, write_table

    header, rows = read_utilities(table)
    ds = load_dataset(data)
    by_id = {q.id: q for q in ds.queries}
    missing = sorted({r["qid"] for r in rows} - by_id.keys())
    if missing:
        raise SystemExit(f"{table}: {len(missing)} question ids are not in {data} (e.g. {missing[0]!r})")
    qid, by_pid, index, key = None, {}, None, None  # the current question's scores; BM25 of the current pool
    out_rows = []
    for r in rows:
        if r["qid"] != qid:
            qid, q = r["qid"], by_id[r["qid"]]
            pool = ds.pool(q)
            if tuple(pool) != key:
                key, index = tuple(pool), BM25([ds.passages[p].text for p in pool])
            by_pid = dict(zip(pool, index.scores(q.with_answers()).tolist()))
        if r["pid"] not in by_pid:
            raise SystemExit(f"{table}: paragraph {r['pid']!r} is not in question {r['qid']!r}'s pool in {data}")
        out_rows.append(dict(r, utility=round(by_pid[r["pid"]], 5)))
    h = dict(header, teacher="bm25(question+answers)", n_rows=len(out_rows), lexical_of=os.path.basename(table))
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
