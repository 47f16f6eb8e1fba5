"""uae train's batch sampler on corpus-wide pools (BEIR: every question ranks the whole corpus): seconds per
16-question micro-batch, the current sampler against the list-based draw it replaced (the same draws, checked
here), on a synthetic corpus of N passages with one gold each.

    python benchmarks/bench_sampler.py --json benchmarks/results/sampler-cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
from _meta import run_meta  # noqa: E402
import uae_fast.training as T  # noqa: E402
from uae_fast.data import Passage, Query, RetrievalDataset  # noqa: E402


def _list_draw(self, cands, chosen, n, rng, q_id=None):
    """The draw before 2026-12-07: list the pool minus the chosen passages, then rng.choice over it."""
    rest = [p for p in cands if p not in chosen]
    n = min(n, len(rest))
    return [rest[int(i)] for i in rng.choice(len(rest), size=n, replace=False)] if n > 0 else []


def time_batches(ds, cfg, micro: int, draw=None):
    if draw is not None:
        T.BatchSampler._draw, real = draw, T.BatchSampler._draw
    try:
        s = T.BatchSampler(ds, cfg, None)
        out = [s.batch(0).passages]  # untimed: the epoch's order and, for a large pool, its position map
        t0 = time.perf_counter()
        out += [s.batch(m).passages for m in range(1, micro + 1)]
        return (time.perf_counter() - t0) / micro, out
    finally:
        if draw is not None:
            T.BatchSampler._draw = real


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="5000,57638,500000", help="corpus sizes (FiQA has 57,638 passages)")
    p.add_argument("--micro", type=int, default=8, help="micro-batches timed per row")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    cfg = T.TrainConfig(loss="infonce", batch_size=16, passages_per_query=8, seed=0)
    rows = []
    print("| passages | ms / micro-batch | list draw | speedup |\n|---:|---:|---:|---:|", flush=True)
    for n in (int(x) for x in args.sizes.split(",")):
        ps = {f"d{i}": Passage(f"d{i}", f"d{i}", f"text {i}") for i in range(n)}
        qs = [Query(f"q{i}", f"question {i}", ["a"], [f"d{(i * 7919) % n}"]) for i in range(16 * (args.micro + 1))]
        ds = RetrievalDataset(ps, qs, name="synthetic")
        new_s, new = time_batches(ds, cfg, args.micro)
        old_s, old = time_batches(ds, cfg, args.micro, _list_draw)
        assert new == old, "the two samplers drew different passages"
        rows.append({"passages": n, "ms_per_micro_batch": round(new_s * 1e3, 2),
                     "ms_per_micro_batch_list_draw": round(old_s * 1e3, 2), "speedup": round(old_s / new_s, 1)})
        r = rows[-1]
        print(f"| {n:>9,} | {r['ms_per_micro_batch']:8.2f} | {r['ms_per_micro_batch_list_draw']:9.2f} | {r['speedup']:6.1f}x |",
              flush=True)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"run": run_meta(), "benchmark": "sampler", "batch_size": 16, "passages_per_query": 8,
                       "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
