"""Cost of TopKIndex's reliability checks (#19): add with explicit ids (uniqueness, the largest norm),
load(mmap=True) (crc32 of the ids, the ids' order) and search (the score-range check), on random data.

    python benchmarks/bench_index_checks.py --label new   # run the same file on an older checkout to compare
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench_topk import best_time  # noqa: E402
from uae_fast import TopKIndex  # noqa: E402


def best(fn):
    return best_time(fn, 5)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--batch", type=int, default=10_000)
    p.add_argument("--label", default="")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.n, args.dim)).astype(np.float32)
    q = rng.standard_normal((64, args.dim)).astype(np.float32)

    def build():
        index = TopKIndex(args.dim, threads=1)
        for i in range(0, args.n, args.batch):
            index.add(x[i : i + args.batch], ids=np.arange(i, min(args.n, i + args.batch)))
        return index

    index = build()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "ix.uae")
        index.save(path)
        out = dict(label=args.label, n=args.n, dim=args.dim, batch=args.batch,
                   add_s=best(build), load_mmap_s=best(lambda: TopKIndex.load(path)),
                   search_64q_k10_s=best(lambda: index.search(q, 10)))
    print(json.dumps(out))
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
