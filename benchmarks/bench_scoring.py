"""Teacher scoring throughput: UtilityScorer vs a naive Hugging Face loop, same passages, same machine.

Naive baseline: one forward per (passage, answer) through HF with logits only at the answer positions
(``logits_to_keep``), log_softmax, gather; the no-passage baseline once per (query, answer), not once per
passage. Batched HF baseline (what a user batching by hand gets): the rows of each group of queries (``--group``,
as ours) sorted by length and left-padded into batches of ``--hf-batch-rows`` rows (each size timed, the fastest
kept: 16, 32 and 64 by default), position ids from the mask, ``logits_to_keep`` over the longest answer. Ours: UtilityScorer.score_many over groups of 16 queries in the CLI's paper order
(length-bucketed batches, LM head only at answer positions, a passage shared by several rows run once).
All run on identical token ids (the ids the scorer reports); the order of the three rotates per repetition
so load changes on a shared CPU hit them alike. Utilities must agree with the naive loop within 1e-3 in fp32
(0.1 in bf16/fp16, whose rounding moves a utility by ~1e-2): the script exits 1 otherwise.

Workloads (``--workloads``, CANDIDATES/ANSWERS[/QUERIES]): ``top:3/first`` (BM25 top-3 + gold, first gold
answer), ``top:3/all`` (every gold answer: the shipped train utilities' setting) and ``all/all`` (every
paragraph of the paper, every answer: where one passage serves all of its paper's questions). A ``-nogold``
suffix scores the policy's candidates alone, as ``uae score --no-gold`` does: ``answer:12-nogold/all`` is the
answer-only default (BM25 over question + answers, top 12, every answer).

``--compile`` also times ours with the decoder through ``torch.compile`` (the one-time compile is timed
apart and reported, not included).

On CUDA it also reports tokens/s against the forward-pass ceiling (the decoder alone over the naive rows, each
passage's full prompt with no prefix sharing, batched by the same token budget; no LM head, no bookkeeping;
warmed up, best repetition as for ours).

    python benchmarks/bench_scoring.py --quick            # ~3 min on a 2-core CPU
    python benchmarks/bench_scoring.py --json benchmarks/results/scoring.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sibling _meta module, however this is run
from _meta import run_meta  # noqa: E402

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from uae_fast.data import default_qasper_path, load_dataset  # noqa: E402
from uae_fast.scoring import CandidatePolicy, select_queries  # noqa: E402
from uae_fast.teacher import UtilityScorer, rows_hidden_states  # noqa: E402


def naive_utilities(model, prompts, base, answers):
    """One forward per (prompt, answer) through HF's own API at its cheapest: logits only at the answer
    positions (``logits_to_keep``), no KV cache; the baseline once per answer."""
    def logp(prompt, ans):
        ids = torch.tensor([prompt + ans], device=model.device)
        # the last len(ans) + 1 positions: n - 1 .. n + len(ans) - 1; the first len(ans) predict the answer
        logits = model(input_ids=ids, logits_to_keep=len(ans) + 1, use_cache=False).logits[0]
        a = torch.tensor(ans, device=model.device)
        return torch.log_softmax(logits[: len(ans)], -1, dtype=torch.float32).gather(1, a[:, None])[:, 0]

    per_answer = []
    for ans in answers:
        lp0 = logp(base, ans)
        per_answer.append(torch.stack([(logp(p, ans) - lp0).mean() for p in prompts]))
    return torch.stack(per_answer).mean(0)


def batched_utilities(model, queries, batch_rows=16):
    """Plain HF, batched as a user would: every (prompt, answer) row of ``queries`` (a group of ``(prompts, base,
    answers)``, the no-passage baseline rows included) sorted by length and left-padded into batches of
    ``batch_rows``, position ids from the mask, logits only for the last ``max answer + 1`` positions
    (``logits_to_keep``; with left padding every row's answer ends there). Returns each query's utilities."""
    rows = [(qi, ai, pi, p, a) for qi, (prompts, base, answers) in enumerate(queries)
            for ai, a in enumerate(answers) for pi, p in enumerate(prompts + [base])]
    rows.sort(key=lambda r: len(r[3]) + len(r[4]))  # little padding, as a careful user would batch
    lps = {}
    for s in range(0, len(rows), batch_rows):
        chunk = rows[s : s + batch_rows]
        seqs = [p + a for _, _, _, p, a in chunk]
        width, keep = max(map(len, seqs)), max(len(r[4]) for r in chunk) + 1
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        for i, x in enumerate(seqs):
            ids[i, width - len(x):] = torch.tensor(x)
            mask[i, width - len(x):] = 1
        pos = (mask.cumsum(1) - 1).clamp_min(0)
        logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                       position_ids=pos.to(model.device), logits_to_keep=keep, use_cache=False).logits
        lp = torch.log_softmax(logits, -1, dtype=torch.float32)  # [rows, keep, V]: position j predicts token j + 1
        for i, (qi, ai, pi, _, a) in enumerate(chunk):
            at = torch.arange(keep - 1 - len(a), keep - 1, device=lp.device)
            lps[qi, ai, pi] = lp[i, at].gather(1, torch.tensor(a, device=lp.device)[:, None])[:, 0]
    out = []
    for qi, (prompts, base, answers) in enumerate(queries):
        n = len(prompts)
        per_answer = [torch.stack([(lps[qi, ai, pi] - lps[qi, ai, n]).mean() for pi in range(n)])
                      for ai in range(len(answers))]
        out.append(torch.stack(per_answer).mean(0))
    return out


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_workload(scorer, ds, candidates, answers, n_queries, reps, group, compiled=None, hf_batch_rows=(16, 32, 64)):
    """Times ours (and ``compiled``, the same scorer with the decoder through torch.compile) against naive."""
    model, dev = scorer.model, scorer.device
    qs = select_queries(ds, order="paper")[:n_queries]
    # "-nogold": the policy's top-M alone, as `uae score --no-gold` picks them (no gold paragraph added)
    policy, no_gold = (candidates[:-len("-nogold")], True) if candidates.endswith("-nogold") else (candidates, False)
    pol = CandidatePolicy(ds, policy, no_gold=no_gold)
    items = [(q.question, list(q.answers) if answers == "all" else list(q.answers[:1]), [ds.passages[p].text for p in pol(q)])
             for q in qs]
    n_pass = sum(len(it[2]) for it in items)
    ids = [([scorer.prompt_ids(q, p)[0] for p in ps], scorer.prompt_ids(q)[0], [scorer.answer_ids(a) for a in ans])
           for q, ans, ps in items]

    def ours(sc):
        sync(dev)
        t = time.perf_counter()
        res = []
        for g in range(0, len(items), group):
            res += sc.score_many(items[g : g + group])
        sync(dev)
        return time.perf_counter() - t, res

    t_ours, t_naive, t_comp = [], [], []
    t_batched = {r: [] for r in hf_batch_rows}
    out = {}

    def run_ours():
        dt, out["res"] = ours(scorer)
        t_ours.append(dt)

    def run_naive():
        t = time.perf_counter()
        out["naive"] = [naive_utilities(model, *x) for x in ids]
        sync(dev)
        t_naive.append(time.perf_counter() - t)

    def run_batched():
        for rows in hf_batch_rows:
            t = time.perf_counter()
            out[("batched", rows)] = [u for g in range(0, len(ids), group)
                                      for u in batched_utilities(model, ids[g : g + group], rows)]
            sync(dev)
            t_batched[rows].append(time.perf_counter() - t)

    steps = [run_ours, run_naive, run_batched]
    for r in range(reps):
        for f in steps[r % 3:] + steps[:r % 3]:  # rotated: no method always runs first (or last) on a busy CPU
            f()
        if compiled is not None:
            dt, res_c = ours(compiled)
            t_comp.append(dt)
    # Tokens the naive loop runs (what a passage-at-a-time scorer has to compute).
    n_tok = sum(sum(len(p) + len(a) for p in prompts + [base] for a in ans) for prompts, base, ans in ids)

    res, naive = out["res"], out["naive"]
    best_rows = min(hf_batch_rows, key=lambda r: min(t_batched[r]))
    batched = out[("batched", best_rows)]

    def diff(got):
        return max((a.utility.float() - b.float()).abs().max().item() for a, b in zip(got, naive))

    ceiling = None
    if dev.type == "cuda":  # decoder-only forward over the same rows, one row each: the unshared scoring ceiling
        rows = [(p, a) for prompts, base, ans in ids for a in ans for p in prompts + [base]]
        rows_hidden_states(model, rows, token_budget=scorer.token_budget)  # warm-up, as ours gets
        best = math.inf
        for _ in range(reps):
            sync(dev)
            t = time.perf_counter()
            rows_hidden_states(model, rows, token_budget=scorer.token_budget)
            sync(dev)
            best = min(best, time.perf_counter() - t)
        ceiling = n_tok / best
    ours_s, nv, bt = min(t_ours), min(t_naive), min(t_batched[best_rows])
    row = {"workload": f"{candidates}/{answers}", "candidates": candidates, "answers": answers, "queries": len(items),
           "papers": len({q.doc_id for q in qs}), "passages": n_pass,
           "rows": sum(len(it[2]) * len(it[1]) for it in items), "tokens": n_tok,
           "naive_s": nv, "ours_s": ours_s, "naive_passages_per_s": n_pass / nv, "ours_passages_per_s": n_pass / ours_s,
           "speedup": nv / ours_s, "ours_tokens_per_s": n_tok / ours_s, "forward_ceiling_tokens_per_s": ceiling,
           "max_abs_utility_diff": diff(res), "batched_s": bt, "speedup_vs_batched": bt / ours_s,
           "batched_rows": best_rows, "batched_s_by_rows": {str(r): min(t) for r, t in t_batched.items()},
           "max_abs_utility_diff_batched": max((a.float() - b.float()).abs().max().item() for a, b in zip(batched, naive))}
    if compiled is not None:
        c = min(t_comp)
        row.update({"compiled_s": c, "compiled_passages_per_s": n_pass / c, "speedup_compiled": nv / c,
                    "max_abs_utility_diff_compiled": diff(res_c)})
    return row


def parse_workload(text, default_queries):
    parts = text.split("/")
    if len(parts) not in (2, 3) or parts[1] not in ("first", "all"):
        raise SystemExit(f"--workloads entries look like top:3/first, all/all, all/all/8 or answer:12-nogold/all; got {text!r}")
    return parts[0], parts[1], int(parts[2]) if len(parts) == 3 else default_queries


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small run (~3 min on a 2-core CPU)")
    ap.add_argument("--data", default=None, help="QASPER file (default: bundled dev split)")
    ap.add_argument("--workloads", nargs="+", default=None,
                    help="CANDIDATES/ANSWERS[/QUERIES] (default: top:3/first top:3/all all/all/8)")
    ap.add_argument("--queries", type=int, default=16, help="queries per workload without its own count")
    ap.add_argument("--max-passage-tokens", type=int, default=128)
    ap.add_argument("--group", type=int, default=16, help="queries per score_many call (the CLI's default)")
    ap.add_argument("--reps", type=int, default=None, help="repetitions, best kept (default 2; 1 with --quick)")
    ap.add_argument("--no-share-prefix", action="store_true", help="ours without shared passage prefixes")
    ap.add_argument("--compile", action="store_true",
                    help="also time ours with the decoder through torch.compile (compile time reported apart)")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--hf-batch-rows", default="16,32,64",
                    help="row counts per batch tried for the batched HF baseline; the fastest is kept (default 16,32,64)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "scoring.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.queries = 8
    if args.reps is None:  # an explicit --reps wins over --quick's single repetition
        args.reps = 1 if args.quick else 2
    workloads = [parse_workload(w, args.queries) for w in (args.workloads or
                 ["top:3/first", "top:3/all", "all/all/8" if args.quick else "all/all/16"])]
    if args.threads:
        torch.set_num_threads(args.threads)

    ds = load_dataset(args.data or default_qasper_path("dev"))
    scorer = UtilityScorer.from_pretrained(dtype=args.dtype, max_passage_tokens=args.max_passage_tokens,
                                           share_prefix=not args.no_share_prefix)
    model, dev = scorer.model, scorer.device
    compiled, compile_s = None, None
    if args.compile:
        compiled = UtilityScorer(model, scorer.tokenizer, max_passage_tokens=args.max_passage_tokens,
                                 share_prefix=not args.no_share_prefix, compile=True, name=scorer.name)
    with torch.no_grad():
        q = select_queries(ds)[0]
        ps = [ds.passages[p].text for p in ds.pool(q)[:2]]
        warm = [[(q.question, q.answers[:1], ps)],  # rows on their own (the plain path)
                [(q.question, q.answers[:1], ps[:1]), ("Why? " + q.question, q.answers[:1], ps[:1])]]  # a shared passage
        for w in warm:
            scorer.score_many(w)
        naive_utilities(model, [scorer.prompt_ids(q.question, "warm up")[0]], scorer.prompt_ids(q.question)[0],
                        [scorer.answer_ids(q.answers[0])])
        if compiled is not None:  # the one-time compile of both graphs, timed apart
            t = time.perf_counter()
            for w in warm:
                compiled.score_many(w)
            compile_s = time.perf_counter() - t
        hf_rows = tuple(int(x) for x in args.hf_batch_rows.split(","))
        rows = [run_workload(scorer, ds, c, a, n, args.reps, args.group, compiled, hf_rows) for c, a, n in workloads]

    out = {
        "bench": "scoring", "device": str(dev), "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "dtype": str(next(model.parameters()).dtype), "teacher": scorer.name,
        "max_passage_tokens": args.max_passage_tokens, "reps": args.reps, "share_prefix": scorer.share_prefix,
        "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None, "compile_s": compile_s,
        "run": run_meta(), "workloads": rows,
    }
    print(f"\nteacher scoring, {out['device']}, {out['dtype']}, {out['threads']} threads (best of {args.reps}), "
          f"load average {out['loadavg_1m']}")
    ceil = any(r["forward_ceiling_tokens_per_s"] for r in rows)
    comp = compiled is not None
    print("| workload | queries | passages | naive s | batched HF s | ours s | naive passages/s | ours passages/s | speedup | "
          "vs batched HF | max abs utility diff |"
          + (" compiled s | compiled speedup | compiled diff |" if comp else "")
          + (" ours tokens/s | ceiling tokens/s |" if ceil else ""))
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|---:|" if comp else "") + ("---:|---:|" if ceil else ""))
    for r in rows:
        line = (f"| {r['workload']} | {r['queries']} | {r['passages']} | {r['naive_s']:.2f} | {r['batched_s']:.2f} ({r['batched_rows']} rows) | "
                f"{r['ours_s']:.2f} | {r['naive_passages_per_s']:.2f} | {r['ours_passages_per_s']:.2f} | "
                f"**{r['speedup']:.2f}x** | **{r['speedup_vs_batched']:.2f}x** | {r['max_abs_utility_diff']:.1e} |")
        if comp:
            line += f" {r['compiled_s']:.2f} | **{r['speedup_compiled']:.2f}x** | {r['max_abs_utility_diff_compiled']:.1e} |"
        if ceil:
            line += f" {r['ours_tokens_per_s']:.0f} | {r['forward_ceiling_tokens_per_s'] or 0:.0f} |"
        print(line)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=2)
    if comp:
        print(f"compiled: one-time torch.compile of the decoder (both graphs) took {compile_s:.0f} s, not in the timings")
    print(f"wrote {args.json}")
    tol = 1e-3 if out["dtype"] == "torch.float32" else 0.1
    bad = [(r["workload"], k, r[k]) for r in rows for k in ("max_abs_utility_diff", "max_abs_utility_diff_batched",
                                                              "max_abs_utility_diff_compiled") if not r.get(k, 0) <= tol]
    if bad:
        print(f"FAILED: utilities disagree with the naive loop beyond {tol:g} ({out['dtype']}): {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
