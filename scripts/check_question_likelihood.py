"""Would the question's likelihood help the answer-only target? UPR (Sachan et al., 2022, "Improving Passage
Retrieval with Zero-Shot Question Generation") ranks a passage by ``log p(question | passage)`` under an LM;
here the default teacher scores it as a utility (``log p(q | passage) - log p(q)``, the same ranking), alone
and ensembled (per-question z-scores, :func:`uae_fast.utilities.ensemble_utilities`) with the default LLM
table and BM25(q + a). It needs no answer, so it could label the questions whose answer says nothing about
the evidence: yes/no answers, where the default target is close to random (``check_target_confidence.py``).

    python scripts/check_question_likelihood.py --per-kind 120 --cache upr.json \\
        --json benchmarks/results/question-likelihood-check.json

Gold labels are read only to judge (as ``uae diagnose``). A sample: the first ``--per-kind`` questions with
yes/no answers and as many others (SHA-1 order of their ids) among the shipped table's ``answer:12``
candidates; ~20 min on 2 cores for 120 + 120 (2,880 scored rows). ``--cache`` keeps the scored utilities, so a
rerun only judges.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from check_dense_teacher import judge, load_table, table_args  # noqa: E402
from check_target_confidence import answer_kind  # noqa: E402
from uae_fast.data import open_text, write_json  # noqa: E402
from uae_fast.lexical_teacher import lexical_utilities  # noqa: E402
from uae_fast.teacher import UtilityScorer  # noqa: E402
from uae_fast.training import TrainConfig  # noqa: E402
from uae_fast.utilities import ensemble_utilities  # noqa: E402

# The question is the scored "answer"; the instruction stands in the question slot (the scorer needs one).
INSTRUCTION = "Please write a question based on this passage."
PROMPT_WITH, PROMPT_WITHOUT = "Passage: {passage}\n{question}\nQuestion:", "{question}\nQuestion:"


def cache_key(teacher) -> dict:
    """What a cached score depends on besides its (question, passage): reuse needs the same."""
    return {"teacher": teacher or "default", "instruction": INSTRUCTION, "prompt_with": PROMPT_WITH,
            "prompt_without": PROMPT_WITHOUT}


def question_scorer(teacher=None, **kw) -> UtilityScorer:
    """The teacher with the question-generation prompts (``UtilityScorer.from_pretrained``'s keywords)."""
    return UtilityScorer.from_pretrained(teacher, prompt_with=PROMPT_WITH, prompt_without=PROMPT_WITHOUT, **kw)


def question_likelihood(sc: UtilityScorer, ds, qs, cands, group=8):
    """``{qid: {pid: log p(q | passage) - log p(q)}}`` over each question's candidates (mean over its tokens)."""
    out = {}
    for i in range(0, len(qs), group):
        chunk = qs[i:i + group]
        res = sc.score_many([(INSTRUCTION, q.question, [ds.passages[p].text for p in cands[q.id]]) for q in chunk])
        out.update({q.id: dict(zip(cands[q.id], r.utility.tolist())) for q, r in zip(chunk, res)})
        print(f"{i + len(chunk)}/{len(qs)} questions scored", file=sys.stderr, flush=True)
    return out


def main(argv=None):
    ap = table_args(__doc__)
    ap.add_argument("--teacher", default=None, help="LM for the question likelihood (default: the default teacher)")
    ap.add_argument("--per-kind", type=int, default=120, help="N: N questions with yes/no answers and N others")
    ap.add_argument("--cache", default=None, help="JSON of scored question likelihoods: read if present, else written")
    args = ap.parse_args(argv)
    ds, utils = load_table(args)
    qs = sorted((q for q in ds.queries if q.gold and utils.get(q.id)), key=lambda q: hashlib.sha1(q.id.encode()).hexdigest())
    kinds = {"yes/no answers": [q for q in qs if answer_kind(q) == "yes/no"][:args.per_kind],
             "other answers": [q for q in qs if answer_kind(q) != "yes/no"][:args.per_kind]}
    sample = [q for v in kinds.values() for q in v]
    cands = {q.id: list(utils[q.id]) for q in sample}
    key = cache_key(args.teacher)
    if args.cache and os.path.exists(args.cache):
        with open_text(args.cache) as f:
            cached = json.load(f)
        if cached.get("key") != key:
            sys.exit(f"--cache {args.cache}: scored with other settings ({cached.get('key')}); delete it to rescore")
        upr = cached["utilities"]
        if missing := [q.id for q in sample if set(upr.get(q.id, {})) != set(cands[q.id])]:
            sys.exit(f"--cache {args.cache}: {len(missing)} sampled questions are not in it with their candidates; "
                     "delete it to rescore")
    else:
        upr = question_likelihood(question_scorer(args.teacher), ds, sample, cands)
        if args.cache:
            write_json({"key": key, "utilities": upr}, args.cache)
    llm, lex, E, T = {q.id: dict(utils[q.id]) for q in sample}, lexical_utilities(ds, cands), ensemble_utilities, TrainConfig.teacher_temperature
    out = {"teacher_temperature": T, "kinds": {}}
    print("| answers | target | top-1 gold | gold mass |\n|---|---|---:|---:|")
    rows = {"llm (SmolLM2 table)": llm, "bm25(q+a)": lex, "question likelihood": upr,  # once, judged per kind
            "llm+bm25(q+a) (the --no-gold default)": E([llm, lex]), "llm+bm25(q+a)+question likelihood": E([llm, lex, upr]),
            "bm25(q+a)+question likelihood": E([lex, upr])}
    for kind, sub in kinds.items():
        if not sub:  # e.g. a corpus without yes/no answers
            continue
        c = {q.id: cands[q.id] for q in sub}
        out["kinds"][kind] = {"n_questions": len(sub), "rows": {k: judge(u, sub, c, T) for k, u in rows.items()}}
        for k, r in out["kinds"][kind]["rows"].items():
            print(f"| {kind} ({len(sub)}) | {k} | {r['top1_gold']:.3f} | {r['gold_mass']:.3f} |")
    if args.json:
        write_json(out, args.json)


if __name__ == "__main__":
    main()
