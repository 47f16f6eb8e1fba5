"""Cut the QASPER slices that ``uae quickstart`` reads from the official train/dev files (deterministic).

    python scripts/make_qasper_slices.py --source ../shared/data/qasper --out data

Writes ``qasper-train-v0.3-quickstart.json.gz`` and ``qasper-dev-v0.3-quickstart.json.gz``: whole papers in the
official schema (every field of a kept paper, in the source order), gzipped without a timestamp so reruns
give the same bytes.

- dev: the papers holding the first ``--dev-queries`` questions with text evidence, i.e. exactly what the
  quickstart evaluates (``--dev-queries`` 200), so its dev numbers equal those on the full dev split;
- train: the first ``--train-papers`` papers met walking the scorer's hash order of questions
  (``uae_fast.scoring.select_queries``), so the questions the quickstart scores (the first 12 of that
  order) are in it and their rows are the shipped utilities table's; 200 papers hold 660 questions of
  that table, two epochs of the quickstart's 80 steps x 16 questions.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from uae_fast.data import QUICKSTART_SLICE, load_dataset, write_json  # noqa: E402
from uae_fast.scoring import select_queries  # noqa: E402


def _papers_in_order(queries, n_papers: int) -> list:
    papers: list = []
    for q in queries:
        if q.doc_id not in papers:
            if len(papers) == n_papers:
                break
            papers.append(q.doc_id)
    return papers


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--source", required=True, help="folder with the official qasper-{train,dev}-v0.3.json (or .json.gz)")
    ap.add_argument("--out", default="data", help="output folder")
    ap.add_argument("--train-papers", type=int, default=200, help="train papers kept")
    ap.add_argument("--dev-queries", type=int, default=200, help="dev questions with text evidence covered")
    args = ap.parse_args(argv)
    sources = {}
    for split in ("train", "dev"):
        src = os.path.join(args.source, f"qasper-{split}-v0.3.json.gz")
        if not os.path.exists(src) and os.path.exists(src[:-3]):  # the release tarball unpacks plain .json
            src = src[:-3]
        if not os.path.exists(src):
            ap.error(f"--source {args.source}: no qasper-{split}-v0.3.json(.gz) there")
        sources[split] = src
    os.makedirs(args.out, exist_ok=True)
    for split, src in sources.items():
        try:
            ds = load_dataset(src)  # checks the file: one clear line for a truncated or corrupt release
            with (gzip.open if src.endswith(".gz") else open)(src, "rt", encoding="utf-8") as f:
                raw = json.load(f)
        except (ValueError, OSError, EOFError) as e:
            raise SystemExit(f"make_qasper_slices: {src}: {e}")
        if split == "train":
            keep = set(_papers_in_order(select_queries(ds), args.train_papers))
        else:
            keep = set(_papers_in_order([q for q in ds.queries if q.gold][: args.dev_queries], len(raw)))
        out = os.path.join(args.out, QUICKSTART_SLICE.format(split=split))
        write_json({pid: paper for pid, paper in raw.items() if pid in keep}, out)
        sl = load_dataset(out)
        print(f"{out}: {len(keep)} papers, {len(sl.queries)} questions, {len(sl.passages)} paragraphs, "
              f"{os.path.getsize(out) / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
