"""CPU work under load: OpenMP's default wait policy vs ``OMP_WAIT_POLICY=PASSIVE`` while another process is busy.

torch's OpenMP threads spin-wait between parallel regions by default. When another process wants a core
(a shared machine, a data loader, a second job), a spinning thread holds the core its sibling needs and
each region waits for a time slice: small, many-region workloads get many times slower. Passive threads
sleep instead. ``uae`` sets ``OMP_WAIT_POLICY=PASSIVE`` before torch loads (an explicit setting wins).

Workloads (random-init models, no downloads): ``teacher forward`` (a 4-layer Llama, hidden 256, 8 x 128
tokens, no grad: a teacher scoring batch) and ``train step`` (a 6-layer BERT, hidden 384 like MiniLM,
16 x 64 tokens, forward + backward + AdamW: a student step). Each setting runs in a fresh process (the
policy is read when OpenMP starts), first alone, then with one busy-looping process beside it.

    python benchmarks/bench_load.py                       # ~1-2 min on a 2-core CPU
    python benchmarks/bench_load.py --json benchmarks/results/load-cpu.json --reps 5
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SETTINGS = [("default", None), ("PASSIVE", "PASSIVE")]  # (label, OMP_WAIT_POLICY)


def _workloads():
    import torch
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=4)).eval()
    lm_ids = torch.randint(0, 4096, (8, 128))

    def teacher_forward():
        with torch.no_grad():
            lm(input_ids=lm_ids)

    bert = BertModel(BertConfig(vocab_size=8192, hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
                                num_attention_heads=12))
    opt = torch.optim.AdamW(bert.parameters(), lr=1e-5)
    ids = torch.randint(0, 8192, (16, 64))

    def train_step():
        opt.zero_grad()
        bert(input_ids=ids).last_hidden_state.pow(2).mean().backward()
        opt.step()

    return {"teacher forward": teacher_forward, "train step": train_step}


def _time(fn, reps: int) -> dict:
    fn()  # warm-up
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(ts), "min_s": min(ts), "reps": reps}


def child(threads: int, reps: int) -> dict:
    """Runs inside a fresh process whose OMP_WAIT_POLICY is already set: time alone, then beside a busy process."""
    import torch

    torch.set_num_threads(threads)
    work = _workloads()
    out = {}
    out["alone"] = {name: _time(fn, reps) for name, fn in work.items()}
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        out["busy"] = {name: _time(fn, reps) for name, fn in work.items()}
    finally:
        hog.kill()
        hog.wait()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: every core)")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions per workload (default 5)")
    ap.add_argument("--json", default=os.path.join(HERE, "results", "load-cpu.json"), help="results file")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.threads, args.reps)))
        return
    results = {}
    for label, policy in SETTINGS:
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
        if policy:
            env["OMP_WAIT_POLICY"] = policy
        r = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", "--threads", str(args.threads),
                            "--reps", str(args.reps)], env=env, capture_output=True, text=True, check=True)
        results[label] = json.loads(r.stdout.strip().splitlines()[-1])
    rows = []
    print("| workload | other process | OMP_WAIT_POLICY | threads | median s | min s | vs PASSIVE |")
    print("|---|---|---|---:|---:|---:|---:|")
    for load in ("alone", "busy"):
        for name in results["PASSIVE"][load]:
            ref = results["PASSIVE"][load][name]["median_s"]
            for label, _ in SETTINGS:
                m = results[label][load][name]
                rows.append({"workload": name, "load": load, "policy": label, "threads": args.threads, **m,
                             "vs_passive": m["median_s"] / ref})
                print(f"| {name} | {'busy loop' if load == 'busy' else 'none'} | {label} | {args.threads} | "
                      f"{m['median_s']:.3f} | {m['min_s']:.3f} | {m['median_s'] / ref:.2f}x |")
    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} cores (shared dev machine)",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                     text=True).stdout.strip(),
            "command": " ".join(["python", "benchmarks/bench_load.py"] + sys.argv[1:])}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    print(f"\nwritten to {args.json}")


if __name__ == "__main__":
    main()
