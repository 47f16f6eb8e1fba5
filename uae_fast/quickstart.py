"""``uae quickstart``: the whole UAE pipeline on embedded defaults, end to end, in minutes on a CPU.

1. **score**: the default teacher (SmolLM2-135M-Instruct) scores the candidates of a slice of QASPER train
   questions (the first ``--score-queries`` in the scorer's default paper order);
2. **train**: the default student (all-MiniLM-L6-v2) is distilled with utility-modulated InfoNCE. It trains
   on the utilities shipped with the package (``qasper-train-utilities.jsonl.gz``, the same scorer on
   the train split) when they exist, else on the slice just scored; the slice's rows are checked against
   the shipped ones, so the quickstart also shows the scorer reproduces the artifact;
3. **evaluate**: on a QASPER dev slice, the trained model against BM25, the untrained student and the LLM
   re-ranker (the teacher re-scoring the untrained student's top-20, UPR-style), with per-query latency.

Data: the QASPER slices shipped with the package (200 train papers; the papers of the first 200 dev questions
with evidence), or the full splits in ``$UAE_DATA_DIR``, or ``--train-data``/``--dev-data``.
Writes ``OUT/model`` (sentence-transformers folder), ``OUT/report.json`` and ``OUT/report.png`` (with the
``plot`` extra). ``--full`` runs the whole train and dev splits (GPU recommended) after printing an estimate.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from typing import Optional

from .data import (RetrievalDataset, data_fingerprint, default_qasper_path, load_dataset, load_train_dataset,
                   quickstart_qasper_path, write_text_atomic)

# Quick defaults: sized for <= 15 minutes on 2 CPU cores (see README "Quick start").
QUICK = {"score_queries": 12, "train_steps": 80, "dev_queries": 200, "rerank_queries": 20}
# 4 passages per question (not the trainer's 8) keeps the quick run's training under 4 minutes on 2 cores.
QUICK_PASSAGES_PER_QUERY = 4


def _shipped_utilities() -> Optional[str]:
    from .training import _default_utilities

    try:
        return _default_utilities()
    except FileNotFoundError:
        return None


def _shipped_for(ds: RetrievalDataset, shipped: str, out: str) -> str:
    """The shipped table, cut to the questions of ``ds`` when it holds others (the train slice holds 660 of
    its 2,095; the trainer rejects rows of questions its data lacks), written as a utilities file in ``out``."""
    from .utilities import read_utilities, write_table

    header, rows = read_utilities(shipped)
    ids = {q.id for q in ds.queries}
    keep = [r for r in rows if r["qid"] in ids]
    if len(keep) == len(rows):
        return shipped
    path = os.path.join(out, "shipped-utilities.jsonl.gz")
    if os.path.exists(path):  # a rerun writes the same cut again
        os.remove(path)
    write_table(path, dict(header, n_queries=len({r["qid"] for r in keep}), n_rows=len(keep), data=ds.name,
                           subset_of=os.path.basename(shipped)), keep)  # atomic, gzipped, as uae score publishes
    return path


def _say(msg: str) -> None:
    print(f"[quickstart] {msg}", file=sys.stderr, flush=True)


def _compare_with_shipped(slice_path: str, shipped: str) -> dict:
    """Rows of the fresh slice vs the same (qid, pid) rows of the shipped artifact."""
    from .training import load_utilities

    fresh, _ = load_utilities(slice_path)
    ref, ref_header = load_utilities(shipped)
    diffs = [abs(u - ref[q][p]) for q, d in fresh.items() for p, u in d.items() if q in ref and p in ref[q]]
    return {"rows_compared": len(diffs), "max_abs_diff": max(diffs) if diffs else None,
            "shipped_teacher": ref_header.get("teacher")}


def _quality_bars(a, names, systems, title, top) -> None:
    x = range(len(names))
    w = 0.38
    r1 = [systems[n]["Success@1"] for n in names]
    mp = [systems[n]["MAP"] for n in names]
    a.bar([i - w / 2 for i in x], r1, w, label="Success@1", color="#4c72b0")
    a.bar([i + w / 2 for i in x], mp, w, label="MAP", color="#dd8452")
    for i, (u, v) in enumerate(zip(r1, mp)):
        a.text(i - w / 2, u + 0.01, f"{u:.2f}", ha="center", fontsize=8)
        a.text(i + w / 2, v + 0.01, f"{v:.2f}", ha="center", fontsize=8)
    a.set_xticks(list(x), names)
    a.set_ylim(0, top)
    a.set_title(title, fontsize=10)
    a.legend()


def plot_report(report: dict, path: str) -> bool:
    """Two panels: retrieval quality per system (Success@1, MAP), and per-query latency (log scale).

    Returns False (and says so) without matplotlib, an optional dependency (the ``plot`` extra)."""
    try:
        import matplotlib
    except ImportError:
        _say(f"{os.path.basename(path)} not written: matplotlib is not installed (pip install 'uae_fast[plot]')")
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ev = report["eval"]
    sub = ev.get("rerank_subset", {})
    names = list(ev["systems"])
    full = ev["systems"]
    data = ev.get("data") or "dev"
    # Like with like: the re-ranker runs on the first n questions only, so its bars sit in a panel where every
    # system is measured on those same questions; the full set's panel leaves it out. Latency: the subset too,
    # so the bars' ratio is the title's speedup.
    split = bool(sub) and sub["n"] < ev["n_queries"]
    panels = ([(f"{data}, all {ev['n_queries']} questions", [n for n in names if n != "rerank"], full)] if split else [])
    panels.append((f"{data}, first {sub['n']} questions (the re-ranker's)" if split else f"{data} ({ev['n_queries']} questions)",
                   names, sub.get("systems", full) if split else full))
    timed = sub.get("systems", full)
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(5.5 * (len(panels) + 1), 4.2))
    top = max([s[n][m] for _, ns, s in panels for n in ns for m in ("Success@1", "MAP")] + [0.1]) * 1.25
    for a, (title, ns, systems) in zip(axes, panels):
        _quality_bars(a, ns, systems, title, top)
    b = axes[-1]
    x = range(len(names))
    lat = [timed.get(n, full[n]).get("latency_ms_mean", float("nan")) for n in names]
    b.bar(list(x), lat, color=["#c44e52" if n == "rerank" else "#55a868" for n in names])
    b.set_yscale("log")
    b.set_xticks(list(x), names)
    b.set_ylabel("ms per query (log)" + (f", first {sub['n']} q" if sub else ""))
    for i, v in enumerate(lat):
        b.text(i, v, f"{v:.3g} ms", ha="center", va="bottom", fontsize=8)
    sp = ev.get("speedup_vs_rerank", {})
    best = max(sp.values()) if sp else None
    b.set_title("Latency per query" + (f" (UAE {sp.get('uae', best):.0f}x faster than re-ranker)" if sp else ""))
    fig.tight_layout()
    from .data import atomic_write

    with atomic_write(path, "wb") as f:  # a kill never leaves half a PNG
        fig.savefig(f, dpi=110, format="png")
    plt.close(fig)
    return True


def resolve_data(full: bool = False, train_data: Optional[str] = None, dev_data: Optional[str] = None):
    """(train, dev) paths: the flags, else the full splits (``--full``) or the quickstart slices."""
    if full:
        return (train_data or default_qasper_path("train", flag="--train-data"),
                dev_data or default_qasper_path("dev", flag="--dev-data"))
    return train_data or quickstart_qasper_path("train"), dev_data or quickstart_qasper_path("dev")


def _uses_shipped(full: bool, utilities, train_data, teacher) -> bool:
    """The shipped table stands in for the slice's scores only where it is the same teacher on the same data."""
    from .teacher import DEFAULT_TEACHER_KEY

    return not (full or utilities or train_data or teacher not in (None, DEFAULT_TEACHER_KEY))


def check_disjoint(train_ds, dev_ds) -> None:
    """Train and dev must share no paper (doc_id) and no question id: dev numbers would be contaminated."""
    docs = {q.doc_id for q in train_ds.queries if q.doc_id} & {q.doc_id for q in dev_ds.queries if q.doc_id}
    qids = {q.id for q in train_ds.queries} & {q.id for q in dev_ds.queries}
    if docs or qids:
        what = f"{len(docs)} papers (e.g. {sorted(docs)[0]!r})" if docs else f"{len(qids)} question ids (e.g. {sorted(qids)[0]!r})"
        raise ValueError(f"the train data ({train_ds.name}) and the dev data ({dev_ds.name}) share {what}: "
                         f"evaluate on held-out papers")


def check(full: bool = False, train_data: Optional[str] = None, dev_data: Optional[str] = None,
          utilities: Optional[str] = None, teacher: Optional[str] = None) -> dict:
    """What the quickstart would read, loaded and counted, without running a model (``--dry-run``)."""
    train_path, dev_path = resolve_data(full, train_data, dev_data)
    train_ds, dev_ds = load_train_dataset(train_path), load_dataset(dev_path)
    check_disjoint(train_ds, dev_ds)
    if utilities and not os.path.exists(utilities):
        raise FileNotFoundError(f"utilities file not found: {utilities}")
    shipped = _shipped_utilities() if _uses_shipped(full, utilities, train_data, teacher) else None
    if utilities:  # through the trainer's own checks, as stage 2 would
        from .training import check_utilities, load_utilities

        table, _ = load_utilities(utilities)
        check_utilities(table, train_ds, path=utilities, data_path=train_path)
    info = {"train_data": train_path, "train_questions": len(train_ds), "dev_data": dev_path,
            "dev_questions_with_gold": sum(1 for q in dev_ds.queries if q.gold),
            "utilities": utilities or shipped or "(the questions scored in stage 1)"}
    if shipped:  # the table as stage 2 hands it to the trainer, through the trainer's own checks
        import tempfile

        from .training import check_utilities, load_utilities

        with tempfile.TemporaryDirectory() as tmp:
            cut = _shipped_for(train_ds, shipped, tmp)
            table, _ = load_utilities(cut)
            check_utilities(table, train_ds, path=cut, data_path=train_path)
    if shipped or utilities:
        info["train_questions_with_utilities"] = len(table)
    else:  # stage 1 scores: it needs questions with an answer and gold evidence (a BEIR folder has no answers)
        from .scoring import select_queries

        n = len(select_queries(train_ds))
        if n == 0:
            raise ValueError(f"{train_path}: no train question has both an answer and gold evidence for the teacher to "
                             f"score (BEIR data has no answers): give --utilities")
        info["train_questions_to_score"] = n
    return info


def _check_options(args) -> None:
    """The options a run would trip on only after its first stages (minutes in): checked up front, also by --dry-run."""
    from .cli import set_threads

    set_threads(args.threads)
    for k in ("score_queries", "train_steps", "dev_queries", "rerank_queries"):
        v = getattr(args, k)
        if v is not None and v < 1:
            raise ValueError(f"--{k.replace('_', '-')} must be a positive int, got {v}")
    sized = [k for k in ("score_queries", "train_steps", "dev_queries", "rerank_queries") if getattr(args, k) is not None]
    if args.full and sized:  # --full runs the whole splits: a size flag would be silently ignored
        raise ValueError(f"--{sized[0].replace('_', '-')} sets the quick run's size; --full runs the whole splits: "
                         f"drop one of them")
    from .cli import check_output_path, check_teacher_path

    check_output_path(args.out, "--out", folder=True)  # a file there fails now, also in --dry-run
    check_teacher_path(args.teacher or None, "--teacher")
    if args.student and not os.path.isdir(args.student):
        raise FileNotFoundError(f"--student {args.student!r}: model folder not found")


@contextlib.contextmanager
def _same_options(out: str):
    """A rerun resumes each stage; with other sizes or models the stage refuses (its message names flags of
    `uae score` / `uae train`, which quickstart lacks): say it in quickstart's terms."""
    try:
        yield
    except ValueError as e:
        if not any(w in str(e) for w in ("different", "settings", "changed since")):
            raise
        raise ValueError(f"--out {out} holds a quickstart run made with other options ({e}); rerun with the same "
                         f"options, or choose another --out") from None


def quickstart(out: str = "uae-quickstart", *, full: bool = False, train_data: Optional[str] = None,
               dev_data: Optional[str] = None, teacher: Optional[str] = None, student: Optional[str] = None,
               utilities: Optional[str] = None, score_queries: Optional[int] = None, train_steps: Optional[int] = None,
               dev_queries: Optional[int] = None, rerank_queries: Optional[int] = None, progress: bool = True) -> dict:
    """Run the pipeline; returns the report dict (also written to ``OUT/report.json``)."""
    from .evaluation import evaluate, format_table
    from .scoring import score_dataset, select_queries
    from .teacher import UtilityScorer
    from .training import TrainConfig, load_utilities, train

    t_all = time.time()
    train_path, dev_path = resolve_data(full, train_data, dev_data)
    os.makedirs(out, exist_ok=True)
    train_ds, dev_ds = load_train_dataset(train_path), load_dataset(dev_path)
    check_disjoint(train_ds, dev_ds)
    q = dict(QUICK)
    for k, v in (("score_queries", score_queries), ("train_steps", train_steps), ("dev_queries", dev_queries),
                 ("rerank_queries", rerank_queries)):
        if v is not None:
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{k} must be a positive int, got {v!r}")
            q[k] = v
    report = {"out": os.path.abspath(out), "full": full, "train_data": train_path, "dev_data": dev_path, "stages": {}}

    # 1. teacher scoring (skipped with --utilities: stage 2 trains on that table, and the data may hold nothing
    # to score, e.g. a BEIR folder without answers)
    header = {}
    if utilities:
        _say(f"1/3 teacher scoring: skipped, training on --utilities {utilities}")
        report["stages"]["score"] = {"skipped": "--utilities given", "file": utilities}
    else:
        _say("1/3 teacher scoring" + (" (whole train split)" if full else f" ({q['score_queries']} train questions)"))
        t0 = time.time()
        scorer = UtilityScorer.from_pretrained(teacher)
        slice_path = os.path.join(out, "utilities.jsonl.gz")
        n_score = None if full else q["score_queries"]
        if full:
            n_q = len(select_queries(train_ds))
            t_cal = time.time()
            calib = os.path.join(out, "calibration.jsonl")
            for p in (calib, calib + ".partial"):
                if os.path.exists(p):
                    os.remove(p)
            h = score_dataset(scorer, train_ds, calib, limit=2, progress=False, data_name=os.path.basename(train_path))
            per_row = (time.time() - t_cal) / max(1, h["n_rows"])
            est = per_row * h["n_rows"] / 2 * n_q
            _say(f"--full: {n_q} questions; estimated scoring time {est / 3600:.1f} h on this machine "
                 f"(+ training and evaluation); interrupt any time and rerun to resume")
            os.remove(calib)
        with _same_options(out):  # data_sha1: an edited --train-data is not mixed into a resumed table
            header = score_dataset(scorer, train_ds, slice_path, limit=n_score, resume=True, progress=progress,
                                   data_name=os.path.basename(train_path), data_sha1=data_fingerprint(train_path))
        report["stages"]["score"] = {"seconds": round(time.time() - t0, 1), "queries": header["n_queries"],
                                     "passages": header["n_rows"], "teacher": header.get("teacher"), "file": slice_path}
        del scorer

    # 2. distillation
    # The shipped utilities were scored on QASPER train (the slice or the full split) by the default teacher:
    # not for other --train-data or another --teacher (stage 2 then trains on what stage 1 scored).
    shipped = _shipped_utilities() if _uses_shipped(full, utilities, train_data, teacher) else None
    if shipped and os.path.basename(train_path) == header.get("data"):
        report["stages"]["score"]["vs_shipped"] = _compare_with_shipped(slice_path, shipped)
    train_utils = utilities or (shipped and _shipped_for(train_ds, shipped, out)) or slice_path
    _say(f"2/3 training the student on {train_utils}")
    t0 = time.time()
    model_dir = os.path.join(out, "model")
    cfg = TrainConfig(data=train_path, utilities=train_utils, student=student, loss="uae",
                      max_steps=None if full else q["train_steps"],
                      **({} if full else {"passages_per_query": QUICK_PASSAGES_PER_QUERY}))
    # Train on the scored questions only: the trainer would fill unscored ones with gold one-hot targets,
    # which makes a supervised model, not a distilled one.
    scored, _ = load_utilities(train_utils)
    train_on = RetrievalDataset(train_ds.passages, [x for x in train_ds.queries if x.id in scored], train_ds.name)
    started = os.path.isdir(model_dir) and bool(os.listdir(model_dir))  # a rerun resumes; a first run just starts
    with _same_options(out):  # the quick run's 80 steps: a checkpoint every 20, so a kill loses little
        summary = train(cfg, model_dir, resume=started, progress=progress, ds=train_on,
                        **({} if full else {"save_every": 20}))
    report["stages"]["train"] = {"seconds": round(time.time() - t0, 1), "utilities": train_utils,
                                 **{k: summary[k] for k in ("steps", "final_loss", "train_queries")}}

    # 3. evaluation against the baselines
    _say(f"3/3 evaluating on {dev_ds.name or 'the dev data'}" + ("" if full else f" (first {q['dev_queries']} questions)"))
    t0 = time.time()
    # the embedding cache (keyed by encoder) spares a rerun after an interrupted evaluation the encoding
    ev = evaluate(dev_ds, [model_dir], names=["uae"], baselines=("bm25", "base", "rerank"), student=student,
                  teacher=teacher, limit=None if full else q["dev_queries"],
                  rerank_limit=10**9 if full else q["rerank_queries"], progress=progress,
                  embedding_cache=os.path.join(out, "emb-cache"))
    report["stages"]["eval"] = {"seconds": round(time.time() - t0, 1)}
    report["eval"] = ev
    report["seconds_total"] = round(time.time() - t_all, 1)
    write_text_atomic(os.path.join(out, "report.json"), json.dumps(report, indent=2))
    png = os.path.join(out, "report.png")
    wrote_png = plot_report(report, png)
    print(format_table(ev))
    sp = ev.get("speedup_vs_rerank", {}).get("uae")
    if sp:
        print(f"UAE retrieval is {sp:.0f}x faster per query than the LLM re-ranker on this machine.")
    print(f"done in {report['seconds_total'] / 60:.1f} min: {model_dir} (SentenceTransformer loads it), "
          f"{os.path.join(out, 'report.json')}" + (f", {png}" if wrote_png else ""))
    return report


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("quickstart", help="score, train and evaluate end to end on the embedded defaults",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="uae-quickstart", help="output folder (model/, report.json, report.png)")
    p.add_argument("--full", action="store_true", help="the whole train and dev splits (GPU recommended); prints an estimate first")
    p.add_argument("--train-data", default=None,
                   help="QASPER/SQuAD/JSONL train data (questions with answers), or a BEIR folder with --utilities (default: the full split in $UAE_DATA_DIR if set, "
                        "else the shipped QASPER train slice; --full: $UAE_DATA_DIR, else ../shared/data/qasper or data/qasper by the checkout)")
    p.add_argument("--dev-data", default=None,
                   help="QASPER/SQuAD/JSONL dev data or a BEIR folder (default: as --train-data, for dev)")
    p.add_argument("--teacher", default=None, help="teacher causal-LM folder (default: SmolLM2-135M-Instruct)")
    p.add_argument("--student", default=None, help="student encoder folder (default: all-MiniLM-L6-v2)")
    p.add_argument("--utilities", default=None,
                   help="train on this utilities file (default: the shipped QASPER train table; with --full or "
                        "--train-data, the questions scored in stage 1)")
    p.add_argument("--score-queries", type=int, default=None, help=f"train questions to score (default {QUICK['score_queries']})")
    p.add_argument("--train-steps", type=int, default=None, help=f"optimizer steps (default {QUICK['train_steps']})")
    p.add_argument("--dev-queries", type=int, default=None, help=f"dev questions evaluated (default {QUICK['dev_queries']})")
    p.add_argument("--rerank-queries", type=int, default=None, help=f"dev questions the LLM re-ranker runs on (default {QUICK['rerank_queries']})")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--dry-run", action="store_true",
                   help="only resolve and load the data and the utilities table, print what would be used, and exit")
    p.set_defaults(func=_main)


def _main(args) -> int:
    _check_options(args)
    if args.dry_run:
        for k, v in check(args.full, args.train_data, args.dev_data, args.utilities, args.teacher).items():
            print(f"{k}: {v}")
        return 0
    # the data and the table, through the trainer's own checks (NaN, unreadable, other questions, nothing to
    # score): before stage 1, not minutes into the run
    check(args.full, args.train_data, args.dev_data, args.utilities, args.teacher)
    quickstart(args.out, full=args.full, train_data=args.train_data, dev_data=args.dev_data, teacher=args.teacher,
               student=args.student, utilities=args.utilities, score_queries=args.score_queries,
               train_steps=args.train_steps, dev_queries=args.dev_queries, rerank_queries=args.rerank_queries,
               progress=not args.no_progress)
    return 0
