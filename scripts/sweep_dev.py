#!/usr/bin/env python3
"""Seeded sweep of `uae train` settings, each trained model scored on QASPER dev (Success@1/5, Recall@1/5, MAP, MRR).

Meant for a lent GPU, where a training run of the defaults takes about a minute (six at once on an H200)
rather than the 25 min of 2 CPU cores: it tells which settings are worth a CPU run, and how large the
seed-to-seed spread is.
Each job trains with :func:`uae_fast.training.train` (same code as `uae train`) and ranks every dev
question's paper paragraphs by exact cosine (the same metric code as `uae eval`). Jobs run in
``--workers`` processes sharing the device; results are appended to ``OUT/sweep.jsonl`` as they finish
(per-question Success@1 and AP included, for paired comparisons), and a table is printed at the end.

    python scripts/sweep_dev.py --out OUT [--grid main] [--workers 6] [--budget-s 400] [--student DIR]
    python scripts/sweep_dev.py --report OUT/sweep.jsonl [MORE.jsonl]   # the table again, from finished sweeps

Jobs that would start after ``--budget-s`` are skipped (listed as such), so a lease is never overrun; jobs
already in ``OUT/sweep.jsonl`` (same group, loss, seed) are not run again, so a sweep split over several
calls continues where the last one stopped.

``--grid answeronly`` (#16): answer-only UAE per teacher table (``--nogold-utilities``, the default
teacher's shipped table; ``--gemma-utilities``; ``--ensemble-utilities``; ``--teachers-utilities``, the two LLM
teachers merged; each LLM table also under ``uae train --no-gold``'s BM25(question + answers) ensemble), the weak-supervision baselines on
the default teacher's batches (``--positive bm25 | bm25-answer | teacher-top1``), gold-label InfoNCE and UAE
(and UAE on ``--gemma-gold-utilities``), the untrained student and BM25; its report adds each row's paired
difference vs gold-label InfoNCE and vs the best weak baseline (pooled over the shared seeds).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import shutil
import sys
import tempfile
import time
from collections import defaultdict

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)

# name -> (loss, TrainConfig overrides, utilities file or None for the shipped table)
GROUPS = {
    "base": {},
    "ep3": {"epochs": 3.0},
    "ep4": {"epochs": 4.0},
    "lr1e-4": {"lr": 1e-4},
    "lr2e-5": {"lr": 2e-5},
    "bs32": {"batch_size": 32},
    "temp0.1": {"temperature": 0.1},
    "pp4": {"passages_per_query": 4},
    "gate0": {"teacher_gate": 0.0},
}
UAE_ONLY = {  # settings that only exist for the uae loss (compared with the base infonce of the same seed)
    "lm0.25": {"label_mix": 0.25},
    "lm0.75": {"label_mix": 0.75},
    "tau1": {"teacher_temperature": 1.0},
    "tau0.25": {"teacher_temperature": 0.25},
}


# --grid answeronly: group -> (loss, TrainConfig overrides, table key or None for the gold default table)
NO_GOLD = {"no_gold": True, "label_mix": 0.0, "passages_per_query": 16}  # --no-gold's defaults, the LLM teacher alone
NO_GOLD_DEFAULTS = {**NO_GOLD, "lexical_teacher": "bm25-answer"}  # `uae train --no-gold` as shipped: + BM25(q + a)
ANSWER_ONLY = {
    "ao-smollm": ("uae", NO_GOLD, "nogold"),
    "ao-gemma": ("uae", NO_GOLD, "gemma"),
    "ao-ensemble": ("uae", NO_GOLD, "ensemble"),
    # `uae train --no-gold`'s defaults: the same ensemble computed at train time (identical utilities and weights)
    "ao-default": ("uae", NO_GOLD_DEFAULTS, "nogold"),
    # the same defaults with another LLM teacher: Gemma-3-270M, and the SmolLM2 + Gemma ensemble (--merge-teachers)
    "ao-default-gemma": ("uae", NO_GOLD_DEFAULTS, "gemma"),
    "ao-default-teachers": ("uae", NO_GOLD_DEFAULTS, "teachers"),
    # a second round (Atlas, REPLUG-LSR): candidates mined by a trained answer-only student, rescored, trained again
    "ao-default-round2": ("uae", NO_GOLD_DEFAULTS, "round2"),
    # the defaults without the LLM: the ensemble of a constant table with BM25(q + a) (--lexical-only-utilities),
    # i.e. the soft lexical target alone on the defaults' scale; is the LLM teacher worth its scoring?
    "ao-lexical-only": ("uae", NO_GOLD, "lexical_only"),
    # the teacher's target mixed half and half with the bm25-answer one-hot (--positive bm25-answer --label-mix 0.5)
    "ao-mix-bm25a": ("uae", {**NO_GOLD, "positive": "bm25-answer", "label_mix": 0.5}, "nogold"),
    "weak-bm25": ("infonce", {**NO_GOLD, "positive": "bm25"}, "nogold"),
    "weak-bm25-answer": ("infonce", {**NO_GOLD, "positive": "bm25-answer"}, "nogold"),
    "weak-teacher-top1": ("infonce", {**NO_GOLD, "positive": "teacher-top1"}, "nogold"),
    "gold-infonce": ("infonce", {}, None),
    "gold-uae": ("uae", {}, None),
    "gold-uae-gemma": ("uae", {}, "gemma_gold"),
}


def answer_only_grid(seeds, tables, tiny_cfg=None):
    """The #16 results grid; groups whose table is not given are left out (and named on stderr)."""
    jobs = [{"group": "untrained", "loss": "none", "seed": 0, "cfg": {}}, {"group": "bm25", "loss": "none", "seed": 0, "cfg": {}}]
    for g, (loss, cfg, key) in ANSWER_ONLY.items():
        if key is not None and not tables.get(key):
            print(f"grid answeronly: no {key} table given, leaving out {g}", file=sys.stderr)
            continue
        for s in seeds:
            jobs.append({"group": g, "loss": loss, "seed": s, "cfg": {**cfg, **(tiny_cfg or {})},
                         **({"utilities": tables[key]} if key else {})})
    # seed-major: a sweep cut short (CPU, small lease) has every group at its first seeds
    return jobs[:2] + sorted(jobs[2:], key=lambda j: j["seed"])


def grid(name: str, seeds, extra_utilities=None, tables=None):
    jobs = []
    if name == "answeronly":
        return answer_only_grid(seeds[:3], tables or {})
    if name == "answeronly-tiny":  # a CPU smoke test of the grid
        return answer_only_grid(seeds[:1], tables or {}, {"max_steps": 2, "batch_size": 4})
    if name == "main":
        order = [("base", seeds), ("ep3", seeds[:3]), ("lr1e-4", seeds[:3]), ("bs32", seeds[:3]), ("ep4", seeds[:3]),
                 ("temp0.1", seeds[:3]), ("lr2e-5", seeds[:3])]
        for g, ss in order:
            for s in ss:
                for loss in ("uae", "infonce"):
                    jobs.append({"group": g, "loss": loss, "seed": s, "cfg": GROUPS[g]})
            if g == "base" and extra_utilities:
                for s in seeds[:3]:
                    jobs.append({"group": "nogold", "loss": "uae", "seed": s, "cfg": {}, "utilities": extra_utilities})
            if g == "ep3":
                for u in ("lm0.25", "lm0.75", "tau1"):
                    for s in seeds[:3]:
                        jobs.append({"group": u, "loss": "uae", "seed": s, "cfg": UAE_ONLY[u]})
    elif name == "gate":  # teacher-gated negatives vs the plain losses, seeds paired
        for g, loss in (("base", "infonce"), ("gate0", "infonce"), ("gate0", "uae"), ("base", "uae")):
            for s in seeds[:3]:
                jobs.append({"group": g, "loss": loss, "seed": s, "cfg": GROUPS[g]})
    elif name == "tiny":  # a CPU smoke test of this script
        for loss in ("uae", "infonce"):
            jobs.append({"group": "base", "loss": loss, "seed": 0, "cfg": {"max_steps": 2, "batch_size": 4}})
    else:
        raise SystemExit(f"unknown grid {name!r}")
    return jobs


_STATE = {}


def _exit_with_parent(poll_s: float = 5.0) -> None:
    """Exit this worker once its parent is gone. A SIGTERM or kill of the sweep leaves spawn-pool workers
    running (they are not in its job control), each holding cores and ~10 GiB for a run nobody will record."""
    import threading

    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _init(args):
    _exit_with_parent()
    import torch

    torch.set_num_threads(max(1, args.threads))
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    from uae_fast.data import load_dataset, load_train_dataset

    _STATE["args"] = args
    _STATE["train"] = load_train_dataset(args.train)
    dev = load_dataset(args.dev)
    _STATE["dev"] = dev
    _STATE["dev_q"] = [q for q in dev.queries if q.gold][: args.dev_limit]
    _STATE["dev_questions"] = _digest([q.id for q in _STATE["dev_q"]])


def _digest(ids) -> str:
    """A short digest of the dev question ids a record's per-question lists follow (checked before pairing)."""
    import hashlib

    return hashlib.sha1("\n".join(ids).encode()).hexdigest()[:16]


def _rank_dev(model_dir, device):
    """Per-question metrics of ``model_dir`` on dev: exact cosine over each question's paper."""
    import torch
    from uae_fast.metrics import per_query_metrics
    from uae_fast.student import BiEncoder

    dev, queries = _STATE["dev"], _STATE["dev_q"]
    enc = BiEncoder(model_dir, device=device)
    enc.eval()
    pids = sorted({p for q in queries for p in dev.pool(q)})
    row = {p: i for i, p in enumerate(pids)}
    amp = bool(getattr(_STATE["args"], "eval_amp", False))  # bf16 encoding: ~1.8x faster on CPUs with AVX512-BF16 (checked against fp32)
    with torch.no_grad(), torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=amp):
        P = enc.encode([dev.passages[p].text for p in pids], batch_size=128, role="document").float().cpu()
        Q = enc.encode([q.question for q in queries], batch_size=128, role="query").float().cpu()
    rankings = []
    for i, q in enumerate(queries):
        pool = dev.pool(q)
        s = P[[row[p] for p in pool]] @ Q[i]
        order = torch.sort(s, descending=True, stable=True).indices.tolist()
        rankings.append([pool[j] for j in order])
    return per_query_metrics(rankings, [set(q.gold) for q in queries])


def _rank_bm25():
    """Per-question metrics of BM25 on dev (each question's paper, as `uae eval`'s bm25 baseline)."""
    from uae_fast.bm25 import BM25
    from uae_fast.metrics import per_query_metrics

    dev, queries = _STATE["dev"], _STATE["dev_q"]
    rankings = []
    for q in queries:
        pool = dev.pool(q)
        _, ids = BM25([dev.passages[p].text for p in pool]).topk(q.question, len(pool))
        rankings.append([pool[int(i)] for i in ids])
    return per_query_metrics(rankings, [set(q.gold) for q in queries])


def _untrained(job):
    """The untrained student or BM25: no training, the same dev ranking and record shape."""
    import torch

    args = _STATE["args"]
    t0 = time.time()
    if job["group"] == "bm25":
        pq = _rank_bm25()
    elif job.get("model"):  # --eval-model: a trained folder, ranked as the sweep's own models are
        pq = _rank_dev(job["model"], args.device)
    else:
        from uae_fast.student import default_student_path

        pq = _rank_dev(args.student or default_student_path(), args.device)
    return {**job, "metrics": {k: sum(v) / len(v) for k, v in pq.items()},
            "per_query": {k: [round(x, 4) for x in pq[k]] for k in ("Success@1", "Recall@1", "MAP")},
            "dev_questions": _STATE["dev_questions"], "steps": 0, "train_queries": 0,
            "final_loss": None, "train_s": 0.0, "total_s": round(time.time() - t0, 1),
            "device": torch.cuda.get_device_name() if str(args.device).startswith("cuda") else "cpu",
            # the untrained row depends on these too (a rerun with another student must not reuse it)
            **({} if job["group"] == "bm25" else {"eval_amp": bool(args.eval_amp)}),
            **({} if job["group"] == "bm25" or job.get("model") else {"student": _digest_model(args.student)})}


def _run(job):
    import torch
    from uae_fast.training import TrainConfig, train

    args = _STATE["args"]
    if time.time() > args.deadline:
        return {**job, "skipped": True}
    if job["loss"] == "none":
        return _untrained(job)
    t0 = time.time()
    cfg = TrainConfig(data=args.train, utilities=job.get("utilities") or args.utilities, student=args.student,
                      loss=job["loss"], seed=job["seed"], **job["cfg"])
    keep = args.keep_models
    tmp = os.path.join(keep, f"{job['group']}-{job['loss']}-s{job['seed']}") if keep else tempfile.mkdtemp(prefix="sweep_", dir=args.tmp)
    try:
        # --keep-models: the model stays (for held-out evaluation) and a killed job resumes from its checkpoint
        summ = train(cfg, tmp, device=args.device, amp=args.amp, save_every=25 if keep else 10**9, keep_checkpoints=1,
                     progress=False, ds=_STATE["train"], resume=bool(keep) and os.path.isdir(tmp))
        t_train = time.time() - t0
        pq = _rank_dev(tmp, args.device)
    except Exception as e:  # one failing setting must not cost the lease the other jobs
        return {**job, "error": f"{type(e).__name__}: {e}"}
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)
    means = {k: sum(v) / len(v) for k, v in pq.items()}
    table_digest = _digest_file(cfg.utilities) if cfg.utilities else None  # cached, never raises
    student_digest = _digest_model(args.student)
    return {**job, "metrics": means, "per_query": {k: [round(x, 4) for x in pq[k]] for k in ("Success@1", "Recall@1", "MAP")},
            "dev_questions": _STATE["dev_questions"],
            "steps": summ["steps"], "train_queries": summ["train_queries"], "final_loss": summ["final_loss"],
            "train_s": round(t_train, 1), "total_s": round(time.time() - t0, 1), "eval_amp": bool(args.eval_amp),
            "device": torch.cuda.get_device_name() if str(args.device).startswith("cuda") else "cpu",
            # what else decides the numbers, so a report can say when a row's seeds differ in it
            # by content, not path: the same setting run from another checkout or machine agrees
            "table": table_digest, "student": student_digest,
            "amp": bool(args.amp), "tf32": bool(args.tf32), "commit": _commit()}


_DIGESTS: dict = {}


def _digest_file(path):
    """The table's data_fingerprint (sha1 of its bytes), once per path per worker; None when it cannot be read."""
    if path not in _DIGESTS:
        from uae_fast.data import data_fingerprint

        try:
            _DIGESTS[path] = data_fingerprint(path)
        except (OSError, ValueError):
            _DIGESTS[path] = None
    return _DIGESTS[path]


def _digest_model(path):
    """A model folder by content (uae_fast.embcache.model_fingerprint; None: the default student's folder)."""
    if ("model", path) not in _DIGESTS:
        from uae_fast.embcache import model_fingerprint

        try:
            _DIGESTS[("model", path)] = model_fingerprint(path)
        except OSError:
            _DIGESTS[("model", path)] = None
    return _DIGESTS[("model", path)]


def _commit():
    import subprocess

    try:
        return subprocess.run(["git", "-C", os.path.dirname(os.path.abspath(__file__)), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _job_key(r) -> tuple:
    """A job's identity across sweeps: a record for the same key is the same job."""
    return r["group"], r["loss"], r["seed"]


def _settings(r) -> dict:
    """What a job trained with beyond its key: the TrainConfig overrides and its utilities table."""
    u = r.get("utilities")
    return {"cfg": r.get("cfg", {}), "utilities": os.path.realpath(u) if u else None}


def _read_records(paths):
    """The records of one or more sweep files, in order. A job (group, loss, seed) finished in two files must
    be the same run (equal metrics; e.g. a reference copied into a later sweep's folder), else it is an error."""
    from uae_fast.data import open_text

    recs, seen = [], {}
    for path in paths:
        with open_text(path, "sweep results") as f:
            for line in f:
                if not line.strip():
                    continue
                r = json.loads(line)
                if "metrics" in r and not r.get("skipped"):
                    key = _job_key(r)
                    if key in seen:
                        if seen[key][1] != r["metrics"]:
                            raise ValueError(f"job {'/'.join(map(str, key))} has different results in {seen[key][0]} and {path}")
                        continue
                    seen[key] = (path, r["metrics"])
                recs.append(r)
    return recs


def _sd(xs):
    """Sample sd over seeds (ddof 1), as the README's tables; 0 for one seed."""
    import numpy as np

    return float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0


def report(*paths):
    """Mean over seeds per (group, loss), and UAE minus InfoNCE paired by seed (same batches). Several files
    (e.g. a sweep and the sweep that ran the gold reference's seeds) are read as one."""
    import numpy as np
    from uae_fast.metrics import upgrade_metric_names

    recs = _read_records(paths)
    for r in recs:  # records written before Success@k existed call it "Recall@k"
        for k in ("metrics", "per_query"):
            if k in r:
                r[k] = upgrade_metric_names(r[k])
    done = [r for r in recs if not r.get("skipped") and "metrics" in r]
    by = defaultdict(dict)
    for r in done:
        by[(r["group"], r["loss"])][r["seed"]] = r
    base_inf = by.get(("base", "infonce"), {})
    lines = ["| group | loss | seeds | S@1 | S@5 | R@1 | MAP | MRR | UAE - InfoNCE S@1 (paired, pooled) | MAP | "
             "vs the defaults, same loss: S@1 | MAP | train s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (g, loss), runs in sorted(by.items(), key=lambda kv: (list(GROUPS).index(kv[0][0]) if kv[0][0] in GROUPS else 99, kv[0])):
        seeds = sorted(runs)
        m = {k: np.mean([runs[s]["metrics"].get(k, np.nan) for s in seeds]) for k in ("Success@1", "Success@5", "Recall@1", "MAP", "MRR")}
        sd = _sd([runs[s]["metrics"]["Success@1"] for s in seeds])
        diff = ["", ""]
        if loss == "uae":
            ref = by.get((g, "infonce"), base_inf)
            if any(s in ref for s in seeds):
                diff = [_cell(_paired(runs, ref, k), 2) + ("" if (g, "infonce") in by else " vs base")
                        for k in ("Success@1", "MAP")]
        # what a setting does to its own loss: against the base group's runs of the same loss, on shared seeds
        # (a UAE-only setting's cost to UAE is this column, not its difference to base InfoNCE)
        own = ["", ""]
        base_same = by.get(("base", loss), {})
        if g != "base" and any(s in base_same for s in seeds):
            own = [_cell(_paired(runs, base_same, k), 3) for k in ("Success@1", "MAP")]
        ts = np.mean([runs[s]["train_s"] for s in seeds])
        r1 = "-" if np.isnan(m["Recall@1"]) else f"{m['Recall@1']:.4f}"  # not in records from before Recall@k
        lines.append(f"| {g} | {loss} | {len(seeds)} | {m['Success@1']:.4f} (sd {sd:.4f}) | {m['Success@5']:.4f} | {r1} | {m['MAP']:.4f} | "
                     f"{m['MRR']:.4f} | {diff[0]} | {diff[1]} | {own[0]} | {own[1]} | {ts:.0f} |")
    mixed = []  # a row whose seeds trained or were scored differently: say so rather than pool silently
    for (g, loss), runs in by.items():
        # records from before the table digest name their table by path only (and a few by a path in "table")
        # (None: a digest that could not be read, compared as such)
        digested = all(runs[x].get("table") is None and "table" in runs[x]
                       or re.fullmatch(r"[0-9a-f]{16}", str(runs[x].get("table"))) for x in runs)
        paths = () if digested else ("utilities",)
        for field in ("cfg", "eval_amp", *paths, *(("table", "student") if digested else ()), "amp", "tf32"):
            vals = {json.dumps(runs[x].get(field), sort_keys=True) for x in runs if field in runs[x]}
            if len(vals) > 1:
                mixed.append(f"{g}/{loss}: seeds differ in {field} ({'; '.join(sorted(vals))[:200]})")
    if mixed:
        lines += ["", "Note, rows pooled over seeds that differ in a setting:"] + [f"- {m}" for m in mixed]
    if any(g in ANSWER_ONLY for g, _ in by):
        lines += ["", answer_only_table(by)]
    ran = {_job_key(r) for r in done}  # a later sweep may have run what an earlier one skipped
    failed = [r for r in recs if r.get("error") and _job_key(r) not in ran]
    if failed:
        lines.append(f"\n{len(failed)} job(s) failed: " + "; ".join(f"{r['group']}/{r['loss']}/{r['seed']}: {r['error']}" for r in failed))
    skipped = [r for r in recs if r.get("skipped") and _job_key(r) not in ran]
    if skipped:
        lines.append(f"\n{len(skipped)} job(s) skipped at the budget: "
                     + ", ".join(sorted({f"{r['group']}/{r['loss']}/{r['seed']}" for r in skipped})))
    return "\n".join(lines)


RESAMPLES = 20000  # with 2,000 a p near 0.05 moved by +-0.005 from one resample seed to another


def _short_cell(pb, digits: int = 4) -> str:
    """diff (p=..., seeds p=... with 3+ seeds): the summary tables' cell."""
    seeds = f", seeds p={pb['p_seeds']:.3f}" if "p_seeds" in pb else ""
    return f"{pb['diff']:+.{digits}f} (p={pb['p']:.3f}{seeds})"


def _cell(pb, p_digits) -> str:
    """A paired difference as the report prints it: mean [95% interval] p, and with 3 or more seeds the p that
    also counts the spread between seeds ("seeds p=", :func:`uae_fast.metrics.paired_bootstrap_seeds`)."""
    seeds = f" (seeds p={pb['p_seeds']:.{p_digits}f})" if "p_seeds" in pb else ""
    return f"{pb['diff']:+.4f} [{pb['ci95_low']:+.4f}, {pb['ci95_high']:+.4f}] p={pb['p']:.{p_digits}f}{seeds}"


def _seedless(runs) -> bool:
    """A row without training (untrained student, BM25, --eval-model): its one record pairs with every seed."""
    return all(r.get("loss") == "none" for r in runs.values())


def _paired(runs, ref, k, mask=None):
    """Paired bootstrap of runs minus ref on metric k over the questions, each question's value averaged over
    the seeds the two rows share (a seedless reference such as BM25 pairs with every seed). Averaging, not
    concatenating the seeds' lists: a question's seeds are not independent samples, and counting each
    question once per seed would narrow the interval (as scripts/runs_report.py does it)."""
    import numpy as np
    from uae_fast.metrics import paired_bootstrap_by_seed

    seeds = sorted(runs)
    if _seedless(ref):
        pairs = [(s, next(iter(ref))) for s in seeds]
    elif _seedless(runs):  # an untrained row against a trained one: against all of its seeds
        pairs = [(next(iter(runs)), s) for s in sorted(ref)]
    else:
        pairs = [(s, s) for s in seeds if s in ref]
    if not pairs:
        return None
    for x, y in pairs:
        _check_same_questions(runs[x], ref[y], k)
    a_seeds = np.asarray([runs[x]["per_query"][k] for x, _ in pairs], dtype=np.float64)
    b_seeds = np.asarray([ref[y]["per_query"][k] for _, y in pairs], dtype=np.float64)
    groups = None
    if _GROUPS:  # --by-paper: resample papers (the records must hold those questions, in that order)
        first = runs[pairs[0][0]]
        if a_seeds.shape[1] != len(_GROUPS["papers"]) or first.get("dev_questions", _GROUPS["digest"]) != _GROUPS["digest"]:
            raise ValueError(f"{first['group']}: not evaluated on the --dev questions that --by-paper groups")
        groups = np.asarray(_GROUPS["papers"])
    if mask is not None:  # a subset of the questions (one kind of answer, say)
        a_seeds, b_seeds = a_seeds[:, mask], b_seeds[:, mask]
        groups = groups[mask] if groups is not None else None
    # with 3 or more seed pairs also the p that counts the seeds' spread
    return paired_bootstrap_by_seed(a_seeds, b_seeds, resamples=RESAMPLES, groups=groups)


_GROUPS: dict = {}  # --by-paper: {"digest": the dev questions' digest, "papers": each question's paper}


def _check_same_questions(r1, r2, k) -> None:
    """Two records pair only over the same dev questions: equal lengths, and equal question-id digests where
    both records carry one (records written before the digest existed carry none)."""
    n1, n2 = len(r1["per_query"][k]), len(r2["per_query"][k])
    d1, d2 = r1.get("dev_questions"), r2.get("dev_questions")
    if n1 != n2 or (d1 and d2 and d1 != d2):
        raise ValueError(f"{r1['group']}/{r1['loss']}/{r1['seed']} and {r2['group']}/{r2['loss']}/{r2['seed']} were "
                         f"evaluated on different dev questions ({n1} vs {n2}{', other ids' if n1 == n2 else ''}): not paired")


def answer_only_table(by) -> str:
    """The table of the answer-only grid in docs/answer-only.md: mean (sd) over seeds, ratio to gold InfoNCE, paired
    differences vs gold-label InfoNCE and vs the best weak baseline (highest mean S@1)."""
    import numpy as np

    groups = {g: runs for (g, _), runs in by.items() if g in ANSWER_ONLY or g in ("untrained", "bm25")}
    mean = {g: {k: float(np.mean([r["metrics"][k] for r in runs.values()])) for k in ("Success@1", "MAP")}
            for g, runs in groups.items()}
    gold = groups.get("gold-infonce")
    weak = [g for g in groups if g.startswith("weak-")]
    best_weak = max(weak, key=lambda g: mean[g]["Success@1"]) if weak else None
    lines = [f"| system | seeds | S@1 mean (sample sd) | MAP mean (sample sd) | S@1 / gold InfoNCE | vs gold InfoNCE: S@1, MAP (paired) | "
             f"vs best weak ({best_weak or '-'}): S@1, MAP |", "|---|---:|---:|---:|---:|---|---|"]
    order = ["untrained", "bm25"] + list(ANSWER_ONLY)
    for g in sorted(groups, key=order.index):
        runs = groups[g]
        r1 = [r["metrics"]["Success@1"] for r in runs.values()]
        ap = [r["metrics"]["MAP"] for r in runs.values()]
        cells = []
        for ref in (gold, groups.get(best_weak) if best_weak else None):
            if ref is None or ref is runs:
                cells.append("")
                continue
            out = []
            for k in ("Success@1", "MAP"):
                pb = _paired(runs, ref, k)
                out.append("" if pb is None else _short_cell(pb))
            cells.append(", ".join(out))
        ratio = f"{mean[g]['Success@1'] / mean['gold-infonce']['Success@1']:.2f}x" if gold else ""
        lines.append(f"| {g} | {len(runs)} | {np.mean(r1):.4f} ({_sd(r1):.4f}) | {np.mean(ap):.4f} ({_sd(ap):.4f}) | "
                     f"{ratio} | {cells[0]} | {cells[1]} |")
    # the issue's target is a margin over every weak baseline, not only the best one
    for g in sorted(x for x in groups if x.startswith("ao-default")):
        parts = []
        for w in sorted(weak):
            pb = [_paired(groups[g], groups[w], k) for k in ("Success@1", "MAP")]
            if pb[0] is not None:
                parts.append(f"{w} {_short_cell(pb[0])}, {_short_cell(pb[1])}")
        if parts:
            lines.append(f"\n{g} vs every weak baseline (S@1, MAP; paired over shared seeds): " + "; ".join(parts))
    return "\n".join(lines)


def answer_kind_table(paths, dev_path) -> str:
    """S@1 by kind of answer (yes/no, short, mid, long: scripts/check_target_confidence.py), mean over seeds, for
    the defaults and the weak baselines, and the defaults minus each weak baseline (paired over the questions
    of that kind and the shared seeds). Tells where the defaults' edge comes from."""
    import numpy as np
    from check_target_confidence import KINDS, answer_kind
    from uae_fast.data import load_dataset
    from uae_fast.metrics import upgrade_metric_names

    qs = [q for q in load_dataset(dev_path).queries if q.gold]
    kinds = np.array([answer_kind(q) for q in qs])
    digest = _digest([q.id for q in qs])
    by = defaultdict(dict)
    for r in _read_records(paths):
        if "per_query" in r and (r["group"].startswith("ao-default") or r["group"].startswith("weak-")):
            r["per_query"] = upgrade_metric_names(r["per_query"])
            if len(r["per_query"]["Success@1"]) != len(qs) or r.get("dev_questions", digest) != digest:
                raise ValueError(f"{r['group']}/{r['seed']} was not evaluated on the questions of {dev_path}")
            by[r["group"]][r["seed"]] = r
    defaults = sorted(g for g in by if g.startswith("ao-default"))
    weak = sorted(g for g in by if g.startswith("weak-"))
    if not defaults:
        raise ValueError("no ao-default rows to break down")
    groups = defaults + weak
    head = [f"{g} ({len(by[g])})" for g in groups] + [f"{d} - {w}" for d in defaults for w in weak]
    lines = ["| answer kind | questions | " + " | ".join(head) + " |", "|---|---:|" + "---:|" * len(head)]
    for kind in (*KINDS, "all"):
        mask = np.ones(len(qs), bool) if kind == "all" else kinds == kind
        if not mask.any():  # a small dev set may hold no question of a kind
            continue
        cells = [f"{np.mean([np.asarray(r['per_query']['Success@1'])[mask].mean() for r in by[g].values()]):.3f}"
                 for g in groups]
        for d in defaults:
            for w in weak:
                pb = _paired(by[d], by[w], "Success@1", mask) if mask.sum() >= 2 else None  # one question: no bootstrap
                cells.append("" if pb is None else _short_cell(pb, 3))
        lines.append(f"| {kind} | {int(mask.sum())} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="folder for sweep.jsonl")
    ap.add_argument("--report", nargs="+", metavar="SWEEP_JSONL",
                    help="print the table of finished sweep.jsonl files (read as one) and exit")
    ap.add_argument("--grid", default="main")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--first-seed", type=int, default=0,
                    help="seeds start here: FIRST_SEED .. FIRST_SEED + SEEDS - 1 (grids that cap their seeds take the "
                         "first of those); to add seeds to a finished grid")
    ap.add_argument("--train", default=None)
    ap.add_argument("--dev", default=None)
    ap.add_argument("--by-answer-kind", action="store_true",
                    help="with --report: S@1 of the defaults and the weak baselines by kind of answer (needs --dev's "
                         "questions, default QASPER dev)")
    ap.add_argument("--by-paper", action="store_true",
                    help="with --report: paired tests resample papers, not questions (a cluster bootstrap: the "
                         "questions of one paper are not independent; needs --dev's questions, default QASPER dev)")
    ap.add_argument("--dev-limit", type=int, default=None)
    ap.add_argument("--utilities", default=None, help="default: the shipped data/qasper-train-utilities.jsonl.gz")
    ap.add_argument("--extra-utilities", default=None,
                    help="a table that adds teacher rows for questions without text evidence (group 'nogold')")
    ap.add_argument("--nogold-utilities", default=None,
                    help="grid answeronly: the default teacher's answer-only table (default: the shipped nogold-answer12)")
    ap.add_argument("--gemma-utilities", default=None, help="grid answeronly: gemma3-270m's answer-only table (default: none)")
    ap.add_argument("--ensemble-utilities", default=None, help="grid answeronly: the teacher ensemble table (default: none)")
    ap.add_argument("--teachers-utilities", default=None,
                    help="grid answeronly: SmolLM2 + Gemma merged (uae score --merge-teachers), for the defaults on it")
    ap.add_argument("--lexical-only-utilities", default=None,
                    help="grid answeronly: `uae score --merge-teachers CONSTANT BM25A` (a table of zeros and "
                         "scripts/lexical_teacher_table.py's), for the defaults without the LLM teacher")
    ap.add_argument("--round2-utilities", default=None,
                    help="grid answeronly: a table whose candidates a trained student mined (student:M), for the second round")
    ap.add_argument("--gemma-gold-utilities", default=None,
                    help="grid answeronly: gemma3-270m's gold-added table, for gold-label UAE with it (default: none)")
    ap.add_argument("--student", default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--amp", action="store_true", help="bf16 autocast (default off: fp32 like the CPU runs)")
    ap.add_argument("--tf32", action="store_true", help="allow TF32 matmuls on CUDA")
    ap.add_argument("--eval-amp", action="store_true", help="bf16 autocast when encoding dev (default fp32)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads per worker")
    ap.add_argument("--budget-s", type=float, default=1e9, help="start no job after this many seconds")
    ap.add_argument("--tmp", default=None)
    ap.add_argument("--eval-model", action="append", default=[], metavar="NAME=DIR",
                    help="no training: rank DIR's model on dev as row NAME (repeatable)")
    ap.add_argument("--groups", default=None, help="comma-separated groups to run (default: the whole grid)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="TrainConfig override for every training job, e.g. epochs=1 (a smaller CPU budget); recorded "
                         "in sweep.jsonl")
    ap.add_argument("--keep-models", default=None, metavar="DIR",
                    help="train into DIR/GROUP-LOSS-sSEED and keep the models (checkpointed: a killed sweep resumes)")
    args = ap.parse_args(argv)
    if args.report and args.by_answer_kind:
        from uae_fast.data import default_qasper_path

        print(answer_kind_table(args.report, args.dev or default_qasper_path("dev")))
        return 0
    if args.report:
        if args.by_paper:
            from uae_fast.data import default_qasper_path, load_dataset

            qs = [q for q in load_dataset(args.dev or default_qasper_path("dev")).queries if q.gold]
            _GROUPS["digest"] = _digest([q.id for q in qs])
            _GROUPS["papers"] = [q.doc_id if q.doc_id is not None else q.id for q in qs]  # no paper: its own group
        print(report(*args.report))
        return 0
    if not args.out:
        ap.error("--out is required")
    if args.first_seed < 0 or args.seeds < 1:
        ap.error("--first-seed must be >= 0 and --seeds >= 1")
    bad = [x for x in args.eval_model or () if not x.partition("=")[0] or not os.path.isdir(x.partition("=")[2])]
    if bad:  # before the data defaults are looked up: a mistyped folder is named first
        ap.error(f"--eval-model wants NAME=DIR with an existing DIR, got {bad[0]!r}")
    from uae_fast.data import default_qasper_path
    from uae_fast.training import _default_utilities

    args.train = args.train or default_qasper_path("train")
    args.dev = args.dev or default_qasper_path("dev")
    args.utilities = args.utilities or _default_utilities()
    tables = {"nogold": args.nogold_utilities or _default_utilities(no_gold=True), "gemma": args.gemma_utilities,
              "ensemble": args.ensemble_utilities, "gemma_gold": args.gemma_gold_utilities,
              "teachers": args.teachers_utilities, "round2": args.round2_utilities,
              "lexical_only": args.lexical_only_utilities}
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.deadline = time.time() + args.budget_s
    jobs = grid(args.grid, list(range(args.first_seed, args.first_seed + args.seeds)), args.extra_utilities, tables)
    if args.eval_model:  # only rank the given folders
        jobs = [{"group": n, "loss": "none", "seed": 0, "cfg": {}, "model": d}
                for n, _, d in (x.partition("=") for x in args.eval_model)]
    if args.groups:
        want = set(args.groups.split(","))
        jobs = [j for j in jobs if j["group"] in want]
    from dataclasses import fields
    from uae_fast.training import TrainConfig

    settable = {f.name for f in fields(TrainConfig)} - {"seed", "loss", "data", "utilities", "student"}
    overrides = {}
    for kv in args.set:
        k, _, v = kv.partition("=")
        if not v or k not in settable:
            ap.error(f"--set wants KEY=VALUE with KEY a TrainConfig field other than the job's own "
                     f"(seed, loss, data, utilities, student), got {kv!r}")
        try:  # numbers, true/false/null as JSON; anything else (top:3) as a string
            overrides[k] = json.loads(v)
        except ValueError:
            overrides[k] = v
    for j in jobs:
        if j["loss"] != "none" and overrides:
            j["cfg"] = {**j["cfg"], **overrides}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "sweep.jsonl")
    if os.path.exists(path):  # a sweep continued over several calls: run only what is missing
        with open(path) as f:
            done = {_job_key(r): r for r in map(json.loads, filter(str.strip, f)) if "metrics" in r}
        # a finished job is only skipped when it ran the same settings: else two settings would share one row
        # (the run-wide ones too, where the record has them: precision and the student's contents)
        now = {"amp": bool(args.amp), "tf32": bool(args.tf32), "eval_amp": bool(args.eval_amp)}
        if any("student" in r for r in done.values()):
            now["student"] = _digest_model(args.student)

        def differs(r, j):
            ran = {k: r[k] for k in now if k in r and not (k == "student" and r[k] is None)}
            return _settings(r) != _settings(j) or ran != {k: now[k] for k in ran}

        clash = [j for j in jobs if _job_key(j) in done and differs(done[_job_key(j)], j)]
        if clash:
            r = done[_job_key(clash[0])]
            was = {**_settings(r), **{k: r.get(k) for k in now}}
            ap.error(f"{path} already has {'/'.join(map(str, _job_key(clash[0])))} with other settings "
                     f"({was} vs {({**_settings(clash[0]), **now})}): give another --out")
        jobs = [j for j in jobs if _job_key(j) not in done]
    print(f"{len(jobs)} jobs, {args.workers} workers, device {args.device}, budget {args.budget_s:.0f}s", flush=True)
    t0 = time.time()
    ctx = mp.get_context("spawn")  # CUDA in forked children is not allowed
    with ctx.Pool(args.workers, initializer=_init, initargs=(args,)) as pool, open(path, "a") as f:
        for r in pool.imap_unordered(_run, jobs):
            f.write(json.dumps(r) + "\n")
            f.flush()
            if r.get("error"):
                print(f"[{time.time() - t0:6.0f}s] {r['group']:>8} {r['loss']:>7} seed {r['seed']}: FAILED {r['error']}", flush=True)
            elif not r.get("skipped"):
                m = r["metrics"]
                print(f"[{time.time() - t0:6.0f}s] {r['group']:>8} {r['loss']:>7} seed {r['seed']}: S@1 {m['Success@1']:.4f} "
                      f"MAP {m['MAP']:.4f} ({r['steps']} steps, {r['train_s']:.0f}s train)", flush=True)
    print(report(path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
