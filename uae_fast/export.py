"""``uae export``: a utilities table as a sentence-transformers training set (a ``datasets`` parquet folder).

One row per query that has gold evidence, in the column shape :class:`uae_fast.losses.UtilityInfoNCELoss`
reads::

    query | passage_0 | passage_1 | ... | passage_{K-1} | label ([K] float32 utilities, NaN = none)

(``label``: the label column every sentence-transformers version since 3.0 takes out of the inputs and
passes to the loss as ``labels``; 6.x also knows ``labels``, which exports before 0.2.0 used.)

The passages of a row are drawn as ``uae train`` draws them (its ``BatchSampler``): **passage_0 is a gold
passage** (the positive the loss's ``label_mix`` mixes in), then the passages the teacher scored for the
query, then other paragraphs of its paper (no utility: NaN), ``K = --passages-per-query`` in all (default 8,
``uae train``'s). A paper with fewer than K paragraphs is topped up with paragraphs of other papers (NaN).
Unlike ``uae train``, which redraws the unscored paragraphs every step, they are drawn once (``--seed``).
Queries without a gold passage are left out (``label_mix`` needs one); the count is printed.

Load with ``datasets.load_dataset(OUT, split="train")`` (``OUT/train.parquet``; ``OUT/README.md`` is the
dataset card).
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
from typing import Dict, Optional

import numpy as np

from .data import RetrievalDataset, atomic_write, default_qasper_path, load_dataset, load_train_dataset, write_text_atomic
from .training import BatchSampler, TrainConfig
from .utilities import check_utilities, load_utilities

PARQUET_FILE = "train.parquet"
# An export folder holds the parquet file, its card, and the temporary files a killed export leaves:
# NAME.tmpPID.TID (uae_fast.data.atomic_write's) or NAME.tmp (versions before it).
_OURS = re.compile(rf"({re.escape(PARQUET_FILE)}|README\.md)(\.tmp(\d+\.\d+)?)?")


def _ours(name: str) -> bool:
    return _OURS.fullmatch(name) is not None


def export_rows(ds: RetrievalDataset, utilities: Dict[str, Dict[str, float]], *, passages_per_query: int = 8,
                seed: int = 0) -> tuple:
    """``(columns, skipped)``: the dataset's columns as lists, and the number of queries left out (no gold)."""
    k = passages_per_query
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"passages_per_query must be a positive int, got {k!r}")
    # uae train's passage choice (gold first, then scored candidates, then the rest of the paper).
    sampler = BatchSampler(ds, TrainConfig(loss="uae", passages_per_query=k, seed=seed), utilities)
    all_pids = list(ds.passages)
    cols: Dict[str, list] = {"query": [], **{f"passage_{c}": [] for c in range(k)}, "label": []}
    skipped = 0
    for n, q in enumerate(ds.queries):
        u = utilities.get(q.id) or {}  # unscored: its gold passages at utility 0 (below), as uae train does
        if not q.gold:
            skipped += 1
            continue
        rng = np.random.default_rng([seed, n])
        chosen = sampler._pick_passages(q, rng)
        if len(chosen) < k:  # a short paper: other papers' paragraphs are true negatives
            chosen += _top_up(ds, q, chosen, k - len(chosen), all_pids, rng)
        if len(chosen) < k:
            raise ValueError(f"the data has {len(ds.passages)} passages in all, fewer than --passages-per-query {k}")
        cols["query"].append(q.question)
        for c, pid in enumerate(chosen):
            cols[f"passage_{c}"].append(ds.passages[pid].text)
        if u:
            cols["label"].append([float(u[pid]) if pid in u else math.nan for pid in chosen])
        else:  # unscored: every gold passage of the row at utility 0, a uniform target over them, as uae train has it
            cols["label"].append([0.0 if pid in q.gold else math.nan for pid in chosen])
    return cols, skipped


def _top_up(ds: RetrievalDataset, q, chosen, need: int, all_pids, rng) -> list:
    """``need`` passages from outside the query's pool (its paper or candidates) and its gold: negatives a
    label-free column can hold. Rejection sampling (a large corpus is not permuted per query), then a scan."""
    banned = set(chosen) | set(q.gold) | (set(ds.pool(q)) if q.doc_id is not None or q.candidates is not None else set())
    out, seen = [], set()
    for i in rng.integers(0, len(all_pids), size=8 * need + 32):
        pid = all_pids[int(i)]
        if pid not in banned and pid not in seen:
            out.append(pid)
            seen.add(pid)
            if len(out) == need:
                return out
    for i in rng.permutation(len(all_pids)):  # a corpus mostly banned: every remaining passage, in random order
        pid = all_pids[int(i)]
        if pid not in banned and pid not in seen:
            out.append(pid)
            seen.add(pid)
            if len(out) == need:
                break
    return out


def export_dataset(utilities_path: str, out_dir: str, *, data: Optional[str] = None, passages_per_query: int = 8,
                   seed: int = 0) -> dict:
    """Write ``out_dir/train.parquet`` and a dataset card; return a summary dict."""
    try:
        import datasets
    except ImportError:
        raise ValueError("uae export needs the `datasets` package: pip install 'uae_fast[st]'") from None
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"--seed must be an int >= 0, got {seed!r}")
    from .cli import check_output_path

    check_output_path(out_dir, "--out", folder=True)
    other = sorted(f for f in os.listdir(out_dir) if not _ours(f)) if os.path.isdir(out_dir) else []
    if other:  # e.g. a model folder, whose README.md (its card) this would replace
        raise ValueError(f"--out {out_dir} holds files that are not an export ({', '.join(other[:3])}); choose an empty "
                         f"or new folder")
    data = data or default_qasper_path("train")
    utilities, header = load_utilities(utilities_path)
    ds = load_train_dataset(data)
    check_utilities(utilities, ds, path=utilities_path, data_path=data, header=header)
    cols, skipped = export_rows(ds, utilities, passages_per_query=passages_per_query, seed=seed)
    if not cols["query"]:
        raise ValueError(f"no query of {utilities_path} has a gold passage in {data}: nothing to export")
    k = passages_per_query
    features = datasets.Features({"query": datasets.Value("string"),
                                  **{f"passage_{c}": datasets.Value("string") for c in range(k)},
                                  "label": datasets.Sequence(datasets.Value("float32"), length=k)})
    table = datasets.Dataset.from_dict(cols, features=features)
    os.makedirs(out_dir, exist_ok=True)
    for f in os.listdir(out_dir):  # a killed export's temporary files
        if _ours(f) and ".tmp" in f:
            os.remove(os.path.join(out_dir, f))
    with atomic_write(os.path.join(out_dir, PARQUET_FILE), "wb") as f:  # a kill never leaves half a parquet file
        table.to_parquet(f)
    labels = np.asarray(cols["label"], dtype=np.float32)
    # rows in export_rows' order; an unscored query's gold labels are export_rows' zeros, not the teacher's
    scored = np.array([bool(utilities.get(q.id)) for q in ds.queries if q.gold], dtype=bool)
    summary = {"rows": len(cols["query"]), "passages_per_query": k, "skipped_no_gold": skipped,
               "scored_fraction": round(float(np.isfinite(labels[scored]).sum() / labels.size), 4), "seed": seed,
               "unscored_queries": int((~scored).sum()),
               "utilities": os.path.basename(utilities_path), "data": os.path.basename(os.path.normpath(data)),
               "teacher": header.get("teacher")}
    _write_card(out_dir, summary)
    return summary


def _write_card(out_dir: str, s: dict) -> None:
    k = s["passages_per_query"]
    text = f"""---
configs:
- config_name: default
  data_files:
  - split: train
    path: {PARQUET_FILE}
tags:
- sentence-transformers
- uae_fast
---
# UAE training set (`uae export`)

{s['rows']} queries x {k} passages from `{s['utilities']}` (teacher: {s['teacher']}) over `{s['data']}`.
Columns: `query`, `passage_0` ... `passage_{k - 1}` (text), `label` ([{k}] float32 teacher utilities, NaN = not
scored: an in-batch negative with no target weight). `passage_0` is a gold passage. {s['scored_fraction']:.0%} of
the passages carry a teacher utility; {s['unscored_queries']} queries have none (their gold passages are labelled 0 and
the rest NaN: a uniform target over their gold, as `uae train` has it). {s['skipped_no_gold']} queries without gold evidence are left out. Seed {s['seed']}.

```python
from datasets import load_dataset
from uae_fast.losses import UtilityInfoNCELoss   # or CachedUtilityInfoNCELoss for large batches
train = load_dataset("{os.path.abspath(out_dir)}", split="train")  # this folder
```

Summary: `{json.dumps(s)}`
"""
    write_text_atomic(os.path.join(out_dir, "README.md"), text)


# ------------------------------------------------------------------------------------- CLI
def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="a utilities table as a sentence-transformers dataset (parquet)",
        description="Write a `uae score` utilities table as a `datasets` parquet folder with the columns "
                    "(query, passage_0..passage_K-1, label) that uae_fast.losses.UtilityInfoNCELoss trains on "
                    "with SentenceTransformerTrainer. passage_0 is a gold passage; label holds the teacher "
                    "utilities (NaN = not scored).")
    p.add_argument("--utilities", required=True, help="utilities JSONL(.gz) from `uae score`")
    p.add_argument("--data", default=None, help="the data the table was scored on (default: QASPER train)")
    p.add_argument("--out", required=True, help="output folder (train.parquet + README.md)")
    p.add_argument("--passages-per-query", type=int, default=TrainConfig.passages_per_query,
                   help=f"K passage columns per row (default {TrainConfig.passages_per_query}, as uae train)")
    p.add_argument("--seed", type=int, default=0, help="draw of the unscored paragraphs (default 0)")
    p.set_defaults(func=_main)


def _main(args) -> int:
    try:  # one summary line, not the per-step bars of datasets
        import datasets

        datasets.disable_progress_bars()
    except ImportError:
        pass
    s = export_dataset(args.utilities, args.out, data=args.data, passages_per_query=args.passages_per_query,
                       seed=args.seed)
    print(f"wrote {s['rows']} rows x {s['passages_per_query']} passages ({s['scored_fraction']:.0%} with a utility) "
          f"to {args.out}; {s['skipped_no_gold']} queries without gold evidence left out. "
          f"Load: datasets.load_dataset({args.out!r}, split='train')")
    if s["unscored_queries"]:  # as uae train says it: such rows target their gold passages alone
        print(f"uae export: {s['unscored_queries']} of {s['rows']} rows' questions have no rows in the utilities "
              f"table; their label targets their gold passages alone (0 there, NaN elsewhere)", file=sys.stderr)
    return 0
