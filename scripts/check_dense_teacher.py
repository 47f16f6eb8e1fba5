"""Would a third, dense teacher help answer-only training? The untrained student's cosine between the
question followed by its answers and each candidate (``dense(q+a)``), alone and ensembled (per-question
z-scores, :func:`uae_fast.utilities.ensemble_utilities`) with the default LLM table and BM25(q + a).

    python scripts/check_dense_teacher.py --json benchmarks/results/dense-teacher-check.json

Gold labels are read only to judge (as ``uae diagnose``): on the shipped answer-only table's ``answer:12``
candidates of QASPER train, how often each target's top candidate is gold and the probability its
``softmax(u / T)`` puts on gold (``teacher_gold_mass``). ~2 min on 2 cores (embeds ~16k paragraphs).
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from uae_fast.data import default_qasper_path, load_dataset, shipped_file, write_json  # noqa: E402
from uae_fast.diagnose import _gold_mass  # noqa: E402
from uae_fast.lexical_teacher import lexical_utilities  # noqa: E402
from uae_fast.student import BiEncoder  # noqa: E402
from uae_fast.training import DEFAULT_NOGOLD_UTILITIES, TrainConfig  # noqa: E402
from uae_fast.utilities import ensemble_utilities, load_utilities  # noqa: E402


def cosines(enc, ds, qs, cands, text, max_length):
    """``{qid: {pid: cos(embed(text(q)), embed(passage))}}`` over each question's candidates."""
    pids = sorted({p for c in cands.values() for p in c})
    row = {p: i for i, p in enumerate(pids)}
    with torch.no_grad():
        P = torch.nn.functional.normalize(enc.encode([ds.passages[p].text for p in pids], max_length=128, role="document").float(), dim=-1)
        Q = torch.nn.functional.normalize(enc.encode([text(q) for q in qs], max_length=max_length, role="query").float(), dim=-1)
    return {q.id: dict(zip(cands[q.id], (P[[row[p] for p in cands[q.id]]] @ Q[i]).tolist())) for i, q in enumerate(qs)}


def judge(u, qs, cands, T):
    gold = {q.id: set(q.gold) for q in qs}
    top = np.mean([max(u[q.id], key=u[q.id].get) in gold[q.id] for q in qs])
    mass = np.mean([_gold_mass([u[q.id][p] for p in cands[q.id]], [p in gold[q.id] for p in cands[q.id]], T) for q in qs])
    return {"top1_gold": float(top), "gold_mass": float(mass), "temperature": T}


def table_args(doc: str) -> argparse.ArgumentParser:
    """The options these checks share: --data, --utilities, --json."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--data", default=None, help="QASPER train (default: the shipped location)")
    ap.add_argument("--utilities", default=None, help="answer-only table (default: the shipped answer:12 one)")
    ap.add_argument("--json", default=None, help="write the table here")
    return ap


def load_table(args):
    """(train data, answer-only table's utilities) from ``table_args``' options; torch on at most 2 threads."""
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    ds = load_dataset(args.data or default_qasper_path("train"))
    return ds, load_utilities(args.utilities or shipped_file(DEFAULT_NOGOLD_UTILITIES))[0]


def main(argv=None):
    args = table_args(__doc__).parse_args(argv)
    ds, utils = load_table(args)
    by_id = {q.id: q for q in ds.queries}
    qs = [by_id[k] for k in utils if k in by_id and by_id[k].gold]
    cands = {q.id: list(utils[q.id]) for q in qs}
    llm = {q.id: dict(utils[q.id]) for q in qs}
    lex = lexical_utilities(ds, cands)
    enc = BiEncoder()
    dense_a = cosines(enc, ds, qs, cands, lambda q: q.with_answers(), 128)
    dense_q = cosines(enc, ds, qs, cands, lambda q: q.question, 64)
    T, E = TrainConfig.teacher_temperature, ensemble_utilities
    rows = {  # raw cosines are ~10x narrower than z-scores: judge them at T 0.05
        "llm (SmolLM2 table)": judge(llm, qs, cands, T), "bm25(q+a)": judge(lex, qs, cands, T),
        "dense(q+a)": judge(dense_a, qs, cands, 0.05), "dense(q)": judge(dense_q, qs, cands, 0.05),
        "llm+bm25(q+a) (the --no-gold default)": judge(E([llm, lex]), qs, cands, T),
        "llm+dense(q+a)": judge(E([llm, dense_a]), qs, cands, T),
        "bm25(q+a)+dense(q+a)": judge(E([lex, dense_a]), qs, cands, T),
        "llm+bm25(q+a)+dense(q+a)": judge(E([llm, lex, dense_a]), qs, cands, T),
        "llm+bm25(q+a)+dense(q)": judge(E([llm, lex, dense_q]), qs, cands, T),
    }
    print(f"{len(qs)} questions with gold evidence, {np.mean([len(c) for c in cands.values()]):.1f} candidates each")
    print("| target | top-1 gold | gold mass | T |\n|---|---:|---:|---:|")
    for k, r in rows.items():
        print(f"| {k} | {r['top1_gold']:.3f} | {r['gold_mass']:.3f} | {r['temperature']:g} |")
    if args.json:
        write_json({"n_questions": len(qs), "rows": rows}, args.json)


if __name__ == "__main__":
    main()
