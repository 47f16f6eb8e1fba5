"""How right is the answer-only training target where it is confident? For the ``uae train --no-gold`` default
target (the LLM table z-averaged with BM25(question + answers), ``softmax(u / T)`` over each question's
``answer:12`` candidates), questions are split into quartiles of the target's largest probability; per
quartile: the probability it puts on gold (``gold_mass``), how often its top candidate is gold, and how often
the ``bm25-answer`` weak label is, and the mean loss weight ``--confidence-weight`` gives those questions
(the largest probability over its mean). Also how often the LLM teacher and BM25(q + a) pick the same top
candidate, and the target's gold mass and top-1 gold rate when the ensemble weights the lexical side's z-scores
by w instead of 0.5 (``(1 - w) z_llm + w z_lex``), and all of it by the kind of answer (yes/no or by length).
Last, the lexical side's query text: BM25 over the answers alone, or with the answers counted twice.

    python scripts/check_target_confidence.py --json benchmarks/results/target-confidence-check.json

Gold labels are read only to judge (as ``uae diagnose``). A few seconds (no model runs). The question it
informs: would training only on (or weighting by) confident targets help, as confident learning does?
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from uae_fast.data import default_qasper_path, load_dataset, shipped_file, write_json  # noqa: E402
from uae_fast.lexical_teacher import lexical_utilities  # noqa: E402
from uae_fast.training import DEFAULT_NOGOLD_UTILITIES, TrainConfig  # noqa: E402
from uae_fast.utilities import ensemble_utilities, load_utilities  # noqa: E402


def per_question(llm, lex, ens, gold, T):
    """(rows, qids): per question with gold, (max prob, gold mass, target top-1 gold, bm25-answer top-1 gold,
    LLM top-1 gold, teachers agree)."""
    rows, qids = [], []
    for qid, d in ens.items():
        if not gold.get(qid):
            continue
        pids = list(d)
        z = np.array([d[p] for p in pids], dtype=np.float64) / T
        pr = np.exp(z - z.max())
        pr /= pr.sum()
        lex_top, llm_top = max(pids, key=lambda p: lex[qid][p]), max(pids, key=lambda p: llm[qid][p])
        rows.append((pr.max(), sum(pr[i] for i, p in enumerate(pids) if p in gold[qid]),
                     pids[int(np.argmax(pr))] in gold[qid], lex_top in gold[qid], llm_top in gold[qid], lex_top == llm_top))
        qids.append(qid)
    return np.array(rows, dtype=np.float64), qids


KINDS = ("yes/no", "short (mean <= 5 words)", "mid (mean 5-15 words)", "long (mean > 15 words)")


def answer_kind(q) -> str:
    """yes/no (every answer is "Yes" or "No": it says nothing about the evidence), else by the answers' mean
    length in words: short (<= 5), mid (5-15], long (> 15)."""
    if q.answers and all(a.strip().lower() in ("yes", "no") for a in q.answers):
        return "yes/no"
    n = np.mean([len(a.split()) for a in q.answers]) if q.answers else 0.0
    return KINDS[1] if n <= 5 else KINDS[2] if n <= 15 else KINDS[3]


def _z(v):
    sd = v.std()
    return (v - v.mean()) / sd if sd > 0 else v * 0.0


def lexical_weight_sweep(llm, lex, gold, T, weights):
    """{w: (gold mass, top-1 gold)} of softmax(((1 - w) z_llm + w z_lex) / T) over each question's candidates."""
    rows = []
    for qid, d in llm.items():
        if gold.get(qid):
            pids = list(d)
            rows.append((_z(np.array([d[p] for p in pids], dtype=np.float64)),
                         _z(np.array([lex[qid][p] for p in pids], dtype=np.float64)),
                         np.array([p in gold[qid] for p in pids], dtype=np.float64)))
    out = {}
    for w in weights:
        mass = top = 0.0
        for a, b, g in rows:
            s = ((1 - w) * a + w * b) / T
            pr = np.exp(s - s.max())
            pr /= pr.sum()
            mass, top = mass + float(pr @ g), top + float(g[int(np.argmax(s))])
        out[w] = (mass / len(rows), top / len(rows))
    return out


# The lexical side's query text: the default (question + answers), the answers alone, and the answers counted twice.
LEXICAL_TEXTS = {"question + answers": lambda q: q.with_answers(),
                 "answers": lambda q: " ".join(q.answers),
                 "question + answers x2": lambda q: q.with_answers() + " " + " ".join(q.answers)}


def lexical_text_variants(ds, llm, gold, T):
    """{variant: (its one-hot top-1 gold, ensemble gold mass, ensemble top-1 gold)} with BM25 over each
    ``LEXICAL_TEXTS`` query in place of BM25(question + answers), the ensemble weights 0.5 / 0.5."""
    from uae_fast.lexical_teacher import PoolBM25

    scorer, by_id = PoolBM25(ds), {q.id: q for q in ds.queries}
    acc = {k: [0.0, 0.0, 0.0] for k in LEXICAL_TEXTS}
    n = 0
    for qid, d in llm.items():
        if not gold.get(qid):
            continue
        pids, n = list(d), n + 1
        g = np.array([p in gold[qid] for p in pids], dtype=np.float64)
        zl = _z(np.array([d[p] for p in pids], dtype=np.float64))
        for k, text in LEXICAL_TEXTS.items():
            s = scorer(by_id[qid], text(by_id[qid]))
            zx = _z(np.array([s[p] for p in pids], dtype=np.float64))
            e = 0.5 * (zl + zx) / T
            pr = np.exp(e - e.max())
            pr /= pr.sum()
            acc[k][0] += g[int(np.argmax(zx))]
            acc[k][1] += float(pr @ g)
            acc[k][2] += g[int(np.argmax(e))]
    if not n:
        raise SystemExit("lexical_text_variants: no question of the table has a gold paragraph to judge by")
    return {k: tuple(v / n for v in vals) for k, vals in acc.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--utilities", default=None, help="the LLM table (default: the shipped answer:12 table)")
    ap.add_argument("--data", default=None, help="QASPER train (default: as uae score)")
    ap.add_argument("--teacher-temperature", type=float, default=TrainConfig.teacher_temperature)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    table = args.utilities or shipped_file(DEFAULT_NOGOLD_UTILITIES)
    ds = load_dataset(args.data or default_qasper_path("train"))
    llm, _ = load_utilities(table)
    lex = lexical_utilities(ds, {q: list(d) for q, d in llm.items()})
    ens = ensemble_utilities([llm, lex])
    gold = {q.id: set(q.gold) for q in ds.queries}
    a, qids = per_question(llm, lex, ens, gold, args.teacher_temperature)
    cols = ("gold_mass", "target_top1_gold", "bm25_answer_top1_gold", "llm_top1_gold")
    out = {"table": os.path.basename(table), "teacher_temperature": args.teacher_temperature, "n_questions": len(a),
           "all": {c: round(float(a[:, i + 1].mean()), 3) for i, c in enumerate(cols)}, "quartiles": []}
    edges = [0.0, *np.quantile(a[:, 0], [0.25, 0.5, 0.75]).tolist(), 1.0 + 1e-9]
    print(f"| max prob | questions | {' | '.join(cols)} |\n|---|---:|{'---:|' * len(cols)}")
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (a[:, 0] >= lo) & (a[:, 0] < hi)
        q = {"max_prob": [round(lo, 3), round(min(hi, 1.0), 3)], "n": int(m.sum()),
             **{c: round(float(a[m, i + 1].mean()), 3) for i, c in enumerate(cols)},
             "confidence_weight": round(float(a[m, 0].mean() / a[:, 0].mean()), 3)}
        out["quartiles"].append(q)
        print(f"| [{lo:.2f}, {min(hi, 1.0):.2f}) | {q['n']} | " + " | ".join(f"{q[c]:.3f}" for c in cols) + " |")
    agree = a[:, 5] == 1
    out["teachers_agree"] = {"share": round(float(agree.mean()), 3),
                             "top1_gold_when_agree": round(float(a[agree, 3].mean()), 3),
                             "when_not": {c: round(float(a[~agree, i + 1].mean()), 3) for i, c in enumerate(cols)}}
    print(f"LLM and BM25(q + a) agree on the top candidate for {out['teachers_agree']['share']:.3f} of the questions "
          f"(gold there {out['teachers_agree']['top1_gold_when_agree']:.3f}); elsewhere {out['teachers_agree']['when_not']}")
    by_id = {q.id: q for q in ds.queries}
    kinds = np.array([answer_kind(by_id[qid]) for qid in qids])
    out["answer_kinds"] = []
    for k in KINDS:
        m = kinds == k
        out["answer_kinds"].append({"kind": k, "n": int(m.sum()), **{c: round(float(a[m, i + 1].mean()), 3) for i, c in enumerate(cols)}})
    print("by answer: " + "; ".join(f"{r['kind']} ({r['n']}): mass {r['gold_mass']:.3f}, top-1 {r['target_top1_gold']:.3f}, "
                                    f"bm25-answer {r['bm25_answer_top1_gold']:.3f}" for r in out["answer_kinds"]))
    sweep = lexical_weight_sweep(llm, lex, gold, args.teacher_temperature, (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0))
    out["lexical_weight"] = [{"w": w, "gold_mass": round(m, 3), "target_top1_gold": round(t, 3)} for w, (m, t) in sweep.items()]
    print("lexical side's weight w: " + ", ".join(f"{w}: mass {m:.3f} top-1 {t:.3f}" for w, (m, t) in sweep.items()))
    texts = lexical_text_variants(ds, llm, gold, args.teacher_temperature)
    out["lexical_text"] = [{"text": k, "one_hot_top1_gold": round(o, 3), "gold_mass": round(m, 3), "target_top1_gold": round(t, 3)}
                           for k, (o, m, t) in texts.items()]
    print("lexical query text: " + "; ".join(f"{k}: one-hot top-1 {o:.3f}, ensemble mass {m:.3f} top-1 {t:.3f}"
                                             for k, (o, m, t) in texts.items()))
    if args.json:
        write_json(out, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
