"""Teacher scoring throughput: UtilityScorer vs a naive Hugging Face loop, same passages, same machine.

Naive baseline (the strongest plain-HF version): one forward per passage with full [L, V] logits, log_softmax,
gather at the answer positions; the no-passage baseline once per query (not once per passage).
Ours: UtilityScorer.score_many over groups of queries (length-bucketed batches, LM head only at answer
positions). Both run on identical token ids (the ids the scorer reports), alternating per repetition so
load changes on a shared CPU hit both alike. Utilities must agree within 1e-3.

On CUDA it also reports tokens/s against the forward-pass ceiling (the decoder alone over the same padded
batches, no LM head, no bookkeeping).

    python benchmarks/bench_scoring.py --quick            # < 2 min on a 2-core CPU
    python benchmarks/bench_scoring.py --queries 24 --json benchmarks/results/scoring.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from uae_fast.data import default_qasper_path, load_dataset  # noqa: E402
from uae_fast.scoring import CandidatePolicy, select_queries  # noqa: E402
from uae_fast.teacher import UtilityScorer, rows_hidden_states  # noqa: E402


def naive_utilities(model, result):
    """One forward per prompt with full logits (HF's standard path); baseline once per query."""
    ans = torch.tensor(result.answer_ids, device=model.device)
    T = len(result.answer_ids)

    def logp(prompt):
        ids = torch.tensor([prompt + result.answer_ids], device=model.device)
        logits = model(input_ids=ids).logits[0].float()
        n = len(prompt)
        return torch.log_softmax(logits[n - 1 : n - 1 + T], -1).gather(1, ans[:, None])[:, 0]

    lp0 = logp(result.input_ids_without)
    return torch.stack([(logp(p) - lp0).mean() for p in result.input_ids_with])


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small run (< 2 min on a 2-core CPU)")
    ap.add_argument("--data", default=None, help="QASPER file (default: bundled dev split)")
    ap.add_argument("--queries", type=int, default=16)
    ap.add_argument("--candidates", default="top:3")
    ap.add_argument("--max-passage-tokens", type=int, default=128)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "scoring.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.queries, args.reps = 4, 1
    if args.threads:
        torch.set_num_threads(args.threads)

    ds = load_dataset(args.data or default_qasper_path("dev"))
    qs = select_queries(ds)[: args.queries]
    pol = CandidatePolicy(ds, args.candidates)
    items = [(q.question, q.answers[0], [ds.passages[p].text for p in pol(q)]) for q in qs]
    n_pass = sum(len(it[2]) for it in items)
    scorer = UtilityScorer.from_pretrained(dtype=args.dtype, max_passage_tokens=args.max_passage_tokens)
    model, dev = scorer.model, scorer.device

    with torch.no_grad():
        ref = scorer.score_many(items[:1])  # warm-up both paths
        naive_utilities(model, ref[0])
        n_tok = 0
        t_ours, t_naive = [], []
        for _ in range(args.reps):
            sync(dev)
            t = time.perf_counter()
            res = []
            for g in range(0, len(items), args.group):
                res += scorer.score_many(items[g : g + args.group])
            sync(dev)
            t_ours.append(time.perf_counter() - t)
            t = time.perf_counter()
            naive = [naive_utilities(model, r) for r in res]
            sync(dev)
            t_naive.append(time.perf_counter() - t)
        n_tok = sum(sum(len(p) + len(r.answer_ids) for p in r.input_ids_with) + len(r.input_ids_without) + len(r.answer_ids)
                    for r in res)
        max_diff = max((a.utility.float() - b.float()).abs().max().item() for a, b in zip(res, naive))
        ceiling = None
        if dev.type == "cuda":  # decoder-only forward over the same rows: the scoring ceiling
            rows = [(p, r.answer_ids) for r in res for p in r.input_ids_with + [r.input_ids_without]]
            sync(dev)
            t = time.perf_counter()
            for _ in range(args.reps):
                rows_hidden_states(model, rows, token_budget=scorer.token_budget)
            sync(dev)
            ceiling = n_tok / ((time.perf_counter() - t) / args.reps)

    ours, nv = min(t_ours), min(t_naive)
    out = {
        "bench": "scoring", "device": str(dev), "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "dtype": str(next(model.parameters()).dtype), "teacher": scorer.name,
        "queries": len(items), "passages": n_pass, "tokens": n_tok, "candidates": args.candidates,
        "max_passage_tokens": args.max_passage_tokens, "reps": args.reps,
        "naive_s": nv, "ours_s": ours, "naive_passages_per_s": n_pass / nv, "ours_passages_per_s": n_pass / ours,
        "speedup": nv / ours, "ours_tokens_per_s": n_tok / ours, "forward_ceiling_tokens_per_s": ceiling,
        "max_abs_utility_diff": max_diff, "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    print(f"\nteacher scoring, {len(items)} queries / {n_pass} passages / {n_tok} tokens, {out['device']}, {out['dtype']}, "
          f"{out['threads']} threads (best of {args.reps}), load average {out['loadavg_1m']}")
    print("| method | seconds | passages/s | tokens/s | speedup | max abs utility diff |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| naive HF loop (full logits) | {nv:.2f} | {n_pass / nv:.2f} | {n_tok / nv:.0f} | 1.00 | - |")
    print(f"| UtilityScorer (uae_fast) | {ours:.2f} | {n_pass / ours:.2f} | {n_tok / ours:.0f} | {nv / ours:.2f} | {max_diff:.1e} |")
    if ceiling:
        print(f"| decoder forward only (ceiling) | | | {ceiling:.0f} | | |")
    print(f"speedup {nv / ours:.2f}x, max |utility diff| {max_diff:.2e}")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=2)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
