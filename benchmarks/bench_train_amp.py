"""Student training step on a CPU: fp32 vs bf16 autocast (``uae train --amp on``), side by side.

One step as ``uae train`` runs it: a 6-layer BERT with MiniLM's shape (hidden 384, random init, no
download), queries [B, 64] and passages [B * P, 128] tokens through the encoder, mean pooling, the
``utility_infonce`` loss, backward and AdamW. The two settings alternate for ``--reps`` rounds (so load on
a shared machine hits both alike); the table gives median seconds per step, the speedup, and how far the
bf16 loss is from the fp32 one on the same inputs and weights (in eval mode: the timed steps draw new dropout
masks). bf16 pays on CPUs with AVX512-BF16 or AMX; elsewhere
PyTorch emulates it and it can be slower (``torch.backends.cpu.get_cpu_capability()`` is printed).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_train_amp.py        # ~2 min on 2 cores at the defaults
    python benchmarks/bench_train_amp.py --batch 16 --passages 16 --json benchmarks/results/train-amp-cpu.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sibling _meta module, however this is run
from _meta import run_meta  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8, help="questions per step (uae train: 16)")
    ap.add_argument("--passages", type=int, default=8, help="passages per question (--no-gold: 16)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    import torch
    from transformers import BertConfig, BertModel

    from uae_fast.ops.infonce import utility_infonce

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=30522, hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
                                 num_attention_heads=12), add_pooling_layer=False)
    opt = torch.optim.AdamW(model.parameters(), lr=0.0)  # lr 0: every round sees the same weights
    B, P = args.batch, args.passages
    q_ids = torch.randint(1000, 30000, (B, 64))
    p_ids = torch.randint(1000, 30000, (B * P, 128))
    t_idx = torch.arange(B * P).view(B, P)
    t_u = torch.randn(B, P)

    def forward(amp: bool):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            q = model(input_ids=q_ids).last_hidden_state.mean(1)
            p = model(input_ids=p_ids).last_hidden_state.mean(1)
        q = torch.nn.functional.normalize(q.float(), dim=-1)
        p = torch.nn.functional.normalize(p.float(), dim=-1)
        return utility_infonce(q, p, t_idx, t_u, temperature=0.05, teacher_temperature=0.5)

    def step(amp: bool) -> None:
        opt.zero_grad(set_to_none=True)
        forward(amp).backward()
        opt.step()

    def loss_without_dropout(amp: bool) -> float:
        # the timed steps train with dropout, a new mask each: their losses differ by the masks, not by bf16
        model.eval()
        with torch.no_grad():
            out = float(forward(amp))
        model.train()
        return out

    step(False), step(True)  # warm-up (oneDNN primitive creation)
    times = {False: [], True: []}
    for _ in range(args.reps):
        for amp in (False, True):
            t0 = time.perf_counter()
            step(amp)
            times[amp].append(time.perf_counter() - t0)
    losses = {amp: loss_without_dropout(amp) for amp in (False, True)}
    f32, b16 = statistics.median(times[False]), statistics.median(times[True])
    cap = torch.backends.cpu.get_cpu_capability()
    rows = [{"setting": "fp32", "s_per_step": round(f32, 3), "speedup": 1.0, "loss": losses[False]},
            {"setting": "bf16 autocast", "s_per_step": round(b16, 3), "speedup": round(f32 / b16, 2), "loss": losses[True]}]
    print(f"student step, B={B} questions x P={P} passages (128 tokens), {torch.get_num_threads()} threads, "
          f"CPU capability {cap}, median of {args.reps}")
    print("| setting | s / step | speedup | loss (eval mode) |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['setting']} | {r['s_per_step']:.3f} | {r['speedup']:.2f}x | {r['loss']:.5f} |")
    print(f"|loss bf16 - fp32| = {abs(losses[True] - losses[False]):.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"benchmark": "train_amp_cpu", "date": datetime.date.today().isoformat(),
                       "machine": platform.processor() or platform.machine(), "cpu_capability": cap,
                       "threads": torch.get_num_threads(), "batch": B, "passages": P, "reps": args.reps,
                       "run": run_meta(), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
