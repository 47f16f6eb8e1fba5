"""Seed-aware report of a ``uae eval --save-runs`` folder: mean and sd over seeds, paired bootstrap vs references.

    python scripts/runs_report.py RUNS_DIR [--ref bm25 --ref base] [--json OUT.json]

Runs named ``NAME-sN.run`` (``N`` a seed) are one system ``NAME`` with one ranking per seed; any other run is a
system with one seed. Per system and metric (Success@1/5, Recall@1/5, MAP, MRR over the queries of
``qrels.txt``): the mean over seeds and its sample sd. Paired tests use each query's metric averaged over the
seeds both systems ran (same seed, same batches; a single-seed system such as BM25 pairs with every seed of
the other): every system against every ``--ref`` system (default: the single-seed runs), 20,000 bootstrap
resamples, two-sided p; with 3 or more seeds also a "seeds p" that adds the spread of the
seeds' mean differences to the bootstrap variance (``uae_fast.metrics.paired_bootstrap_seeds``). ``--by-document`` resamples documents instead of queries (a cluster
bootstrap: questions on one article are not independent); a query's document is the part of its relevant
passages' ids before the last ":" (QASPER, SQuAD and the JSONL schema's ``DOC:i`` ids).

A run that lacks some of the qrels' queries (``rerank.run`` of ``uae eval --rerank-limit``) is left out with a
note, as scoring its missing queries 0 would bias it: report it on its own queries with
``--qrels qrels-rerank-subset.txt`` (every run then is scored on that subset).
"""
from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import re
import sys
from collections import defaultdict

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from uae_fast.metrics import paired_bootstrap_by_seed, per_query_metrics  # noqa: E402
from uae_fast.trec import read_qrels, read_run  # noqa: E402

METRICS = ("Success@1", "Success@5", "Recall@1", "Recall@5", "MAP", "MRR")
RESAMPLES = 20000


def documents(folder: str, qids, qrels_name: str = "qrels.txt"):
    """Each query's document, from its relevant passages' ids (``DOC:i``); ValueError when they do not say."""
    qrels = read_qrels(os.path.join(folder, qrels_name))
    out = []
    for q in qids:
        docs = {d.rsplit(":", 1)[0] for d, r in qrels[q].items() if r > 0 and ":" in d}
        if len(docs) != 1:
            raise ValueError(f"--by-document: query {q!r}'s relevant passages do not name one document "
                             f"(ids DOC:i expected, got {sorted(d for d, r in qrels[q].items() if r > 0)[:3]})")
        out.append(docs.pop())
    return out


def load(folder: str, qrels_name: str = "qrels.txt"):
    """{system: {seed: {metric: per-query list}}} over the queries of the qrels with a relevant passage; runs
    that lack some of those queries are left out (named on stderr)."""
    qrels = read_qrels(os.path.join(folder, qrels_name))
    qids = sorted(q for q, docs in qrels.items() if any(r > 0 for r in docs.values()))
    if not qids:
        raise ValueError(f"{folder}/{qrels_name} has no query with a relevant passage")
    golds = [{d for d, r in qrels[q].items() if r > 0} for q in qids]
    systems = defaultdict(dict)
    runs = sorted(glob.glob(os.path.join(folder, "*.run")))
    if not runs:
        raise ValueError(f"{folder} has no .run files (write them with uae eval --save-runs)")
    for path in runs:
        name = os.path.basename(path)[:-4]
        m = re.fullmatch(r"(.+)-s(\d+)", name)
        system, seed = (m.group(1), int(m.group(2))) if m else (name, None)  # None: not seeded (BM25, ...)
        run = read_run(path)
        lacking = [q for q in qids if q not in run]
        if lacking:
            print(f"runs_report: {name}.run lacks {len(lacking)} of the {len(qids)} queries of {qrels_name}; left out "
                  f"(report it with the qrels of its own queries, e.g. --qrels qrels-rerank-subset.txt)", file=sys.stderr)
            continue
        pq = per_query_metrics([run[q] for q in qids], golds)
        systems[system][seed] = {k: pq[k] for k in METRICS}
    if not systems:
        raise ValueError(f"no run in {folder} covers every query of {qrels_name}")
    return qids, dict(systems)


def _seed_order(seed):
    """Sort key: an unseeded run (None) before seeds 0, 1, ..."""
    return -1 if seed is None else seed


def _pair_seeds(a: dict, b: dict) -> tuple:
    """The seeds two systems are compared on: the ones both ran (same seed = same batches), or every seed of
    one against a run without a seed in its name (BM25, an untrained model: nothing seeded)."""
    if list(b) == [None]:
        return list(a), [None] * len(a)
    if list(a) == [None]:
        return [None] * len(b), list(b)
    shared = sorted(set(a) & set(b), key=_seed_order)
    return shared, shared


def report(systems, refs, groups=None):
    out = {"systems": {}, "paired": {}}
    for s, seeds in systems.items():
        order = sorted(seeds, key=_seed_order)
        per_seed = {k: [float(np.mean(seeds[x][k])) for x in order] for k in METRICS}
        out["systems"][s] = {"seeds": ["unseeded" if x is None else x for x in order], **{k: {"mean": float(np.mean(v)),
                             "sd": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, "per_seed": v}
                             for k, v in per_seed.items()}}
    n = len(next(iter(next(iter(systems.values())).values()))["MAP"]) if systems else 0
    for s in systems if n >= 2 else ():  # a bootstrap needs 2 queries
        for r in refs:
            if r != s and f"{r} - {s}" not in out["paired"]:  # each pair once
                xs, ys = _pair_seeds(systems[s], systems[r])
                if not xs:
                    out["paired"][f"{s} - {r}"] = {"skipped": "no seed in common"}
                    continue
                out["paired"][f"{s} - {r}"] = {
                    **{k: paired_bootstrap_by_seed([systems[s][x][k] for x in xs], [systems[r][y][k] for y in ys],
                                                   resamples=RESAMPLES, groups=groups) for k in ("Success@1", "MAP")},
                    "seeds": [sorted({x for x in xs if x is not None}) or "unseeded",
                              sorted({y for y in ys if y is not None}) or "unseeded"]}
    return out


def table(out, n_queries: int) -> str:
    lines = [f"{n_queries} queries; mean (sd) over seeds", "",
             "| system | seeds | " + " | ".join(METRICS) + " |", "|---|---|" + "---:|" * len(METRICS)]
    for s, r in out["systems"].items():
        cells = [f"{r[k]['mean']:.3f}" + (f" ({r[k]['sd']:.3f})" if len(r["seeds"]) > 1 else "") for k in METRICS]
        lines.append(f"| {s} | {len(r['seeds'])} | " + " | ".join(cells) + " |")
    if out["paired"]:
        lines += ["", "Paired bootstrap on seed-averaged per-query metrics: diff [95% CI] p", ""]
        for pair, d in out["paired"].items():
            if "skipped" in d:
                lines.append(f"- {pair}: {d['skipped']}")
                continue
            lines.append(f"- {pair}: " + "; ".join(f"{k} {v['diff']:+.3f} [{v['ci95_low']:+.3f}, {v['ci95_high']:+.3f}] "
                                                     f"p {v['p']:.3f}" + (f" (seeds p {v['p_seeds']:.3f})" if "p_seeds" in v else "")
                                                     for k, v in d.items() if k != "seeds")
                         + f" (seeds {d['seeds'][0]} vs {d['seeds'][1]})")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", help="a uae eval --save-runs folder (qrels.txt and NAME.run files)")
    ap.add_argument("--qrels", default="qrels.txt", help="the qrels file in the folder (default qrels.txt; "
                    "qrels-rerank-subset.txt for the re-ranker's queries)")
    ap.add_argument("--ref", action="append", default=None, help="reference system(s) for the paired tests "
                    "(repeatable; default: every single-seed system)")
    ap.add_argument("--json", default=None, help="also write the report here (.json or .json.gz)")
    ap.add_argument("--by-document", action="store_true", help="resample documents, not queries (a cluster "
                    "bootstrap; a query's document is its relevant passages' id prefix DOC of DOC:i)")
    ap.add_argument("--per-query", action="store_true", help="the JSON also holds each run's per-query Success@1 and "
                    "average precision (4 digits), in the order of its 'queries' list, for later paired tests")
    args = ap.parse_args(argv)
    try:
        qids, systems = load(args.runs, args.qrels)
        groups = documents(args.runs, qids, args.qrels) if args.by_document else None
    except (ValueError, OSError) as e:
        print(f"runs_report: {e}", file=sys.stderr)
        return 2
    refs = args.ref or [s for s, seeds in systems.items() if len(seeds) == 1]
    missing = [r for r in refs if r not in systems]
    if missing:
        print(f"runs_report: no run for reference {missing[0]!r} (have: {', '.join(systems)})", file=sys.stderr)
        return 2
    out = report(systems, refs, groups)
    if groups is not None:
        out["paired_by"] = f"document ({len(set(groups))} documents)"
    print(table(out, len(qids)) + (f"\n(resampled by document: {len(set(groups))} documents)" if groups else ""))
    if args.json:
        doc = {"n_queries": len(qids), **out}
        if args.per_query:
            doc["queries"] = qids
            doc["per_query"] = {s if seed is None else f"{s}-s{seed}": {k: [round(float(x), 4) for x in m[k]]
                                for k in ("Success@1", "MAP")} for s, seeds in systems.items() for seed, m in seeds.items()}
        opener = gzip.open if args.json.endswith(".gz") else open
        with opener(args.json, "wt") as f:
            json.dump(doc, f, indent=None if args.per_query else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
