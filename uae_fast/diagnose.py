"""``uae diagnose``: how often a teacher's (or a weak label's) top candidate is gold evidence.

Gold labels are read here only, to judge a utilities table: for every question of the table with gold
evidence, is the paragraph the teacher rates highest a gold one? Among every paragraph the table scored
(``--candidates all`` tables: every paragraph of the paper) and among each candidate policy given
(``top:M`` / ``student:M``, with ``--no-gold`` the answer-only sets), where ``coverage`` is the share of
questions whose candidates hold any gold paragraph at all. The weak positives of ``uae train --positive``
(BM25 of the question, BM25 of question + answers) are judged on the same candidates for comparison.

``teacher_gold_mass`` is the mean probability the training target ``softmax(utility / T)`` puts on gold
paragraphs (0 where the candidates hold none). A one-hot label's gold mass is its top-1 rate, so the column
compares the soft target with the weak labels directly; on QASPER it tracks the trained student's dev
Success@1 better than the top-1 rate does (docs/answer-only.md).

``lexical_teacher="bm25-answer"`` judges the target ``uae train --no-gold`` trains on by default: the table's
utilities ensembled with BM25(question + answers) (:mod:`uae_fast.lexical_teacher`).
"""
from __future__ import annotations

import json
import math
from typing import Dict, List, Optional, Sequence


def hit_rates(table: str, ds, candidates: Sequence[str] = (), *, no_gold: bool = False,
              weak: Sequence[str] = ("bm25", "bm25-answer"), teacher_temperature: Optional[float] = None,
              lexical_teacher: str = "none", candidate_student=None, progress: bool = False,
              policies: Optional[dict] = None, data_path: Optional[str] = None) -> dict:
    """Top-1-is-gold rates of ``table``'s teacher (and of ``weak`` labels) per candidate set, and the gold mass
    of its ``softmax(utility / teacher_temperature)`` target (default: ``uae train``'s); see the module doc.
    ``candidate_student``: the encoder of ``student:M`` policies (default all-MiniLM-L6-v2); ``progress``: a bar
    while it embeds the papers; ``policies``: a dict that keeps the policies across calls (several tables on
    the same data embed the corpus once)."""
    from .scoring import CandidatePolicy
    from .training import TrainConfig, weak_positives

    if teacher_temperature is None:
        teacher_temperature = TrainConfig.teacher_temperature
    if not (teacher_temperature > 0 and math.isfinite(teacher_temperature)):
        raise ValueError(f"teacher_temperature must be a finite number > 0, got {teacher_temperature}")
    from .utilities import check_utilities, load_utilities

    utils, header = load_utilities(table)
    check_utilities(utils, ds, path=table, data_path=data_path, header=header)  # data_path: the file ds came from
    raw_header, ensemble = header, None
    if lexical_teacher != "none":
        from .lexical_teacher import LEXICAL_TEACHERS, LEXICAL_TEACHER_NAME, with_lexical_teacher

        if lexical_teacher not in LEXICAL_TEACHERS:
            raise ValueError(f"lexical_teacher must be one of {', '.join(LEXICAL_TEACHERS)}, got {lexical_teacher!r}")

        def ensemble(cut):  # standardised over each candidate set, as training on that set's table would
            return with_lexical_teacher(cut, ds, raw_header, path=table)

        header = dict(header, teacher=f"ensemble({header.get('teacher', '?')}+{LEXICAL_TEACHER_NAME})")
    queries = [q for q in ds.queries if q.id in utils and q.gold]
    if not queries:
        raise ValueError(f"{table}: none of its questions has gold evidence in the data; nothing to diagnose")
    policies = {} if policies is None else policies
    sets: Dict[str, Dict[str, List[str]]] = {"scored rows (" + str(header.get("candidates", "?")) + ")":
                                             {q.id: list(utils[q.id]) for q in queries}}
    for c in candidates:
        key = (id(ds), c, no_gold, candidate_student)
        if key not in policies:
            policies[key] = CandidatePolicy(ds, c, student=candidate_student, no_gold=no_gold)
        pol = policies[key]
        pol.prepare(queries, progress=progress)  # embeds only what an earlier table's call did not
        full = {q.id: pol(q) for q in queries}
        cs = {qid: [p for p in ps if p in utils[qid]] for qid, ps in full.items()}
        lacking = [qid for qid in cs if len(cs[qid]) < len(full[qid])]
        if lacking:
            raise ValueError(f"{table} lacks utilities for some {c} candidates (e.g. question {lacking[0]}): "
                             f"diagnose a policy on a table that scored it, or on a --candidates all table")
        sets[c + (" no-gold" if no_gold else "")] = cs
    out = {"table": table, "teacher": header.get("teacher"), "n_questions": len(queries),
           "teacher_temperature": teacher_temperature, "sets": {}}
    gold = {q.id: set(q.gold) for q in queries}
    for name, cs in sets.items():
        su = utils if ensemble is None else ensemble({qid: {p: utils[qid][p] for p in c} for qid, c in cs.items()})
        teacher = weak_positives(ds, queries, cs, "teacher-top1", su)
        row = {"coverage": _rate([any(p in gold[qid] for p in c) for qid, c in cs.items()]),
               "mean_candidates": sum(len(c) for c in cs.values()) / len(cs),
               "teacher_top1_gold": _rate([teacher[qid] in gold[qid] for qid in cs]),
               "teacher_gold_mass": _rate([_gold_mass([su[qid][p] for p in c], [p in gold[qid] for p in c],
                                                     teacher_temperature) for qid, c in cs.items()])}
        for kind in weak:
            pos = weak_positives(ds, queries, cs, kind, utils)
            row[f"{kind}_top1_gold"] = _rate([pos[qid] in gold[qid] for qid in cs])
        out["sets"][name] = row
    return out


def _gold_mass(u: Sequence[float], is_gold: Sequence[bool], temperature: float) -> float:
    """Probability ``softmax(u / temperature)`` puts on the gold entries (stable: shifted by the max)."""
    if not u:
        return 0.0
    m = max(u)
    w = [math.exp((x - m) / temperature) for x in u]
    return sum(x for x, g in zip(w, is_gold) if g) / sum(w)


def _rate(flags: Sequence[float]) -> float:
    return sum(flags) / len(flags) if flags else float("nan")


def format_report(res: dict) -> str:
    cols = [k for k in next(iter(res["sets"].values()))]
    lines = [f"{res['table']}: teacher {res['teacher']}, {res['n_questions']} questions with gold evidence "
             f"(gold mass at teacher temperature {res['teacher_temperature']:g})",
             "| candidates | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for name, row in res["sets"].items():
        lines.append(f"| {name} | " + " | ".join(f"{row[c]:.3f}" if c != "mean_candidates" else f"{row[c]:.1f}"
                                               for c in cols) + " |")
    return "\n".join(lines)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("diagnose", help="how often a teacher's top candidate is gold evidence (uses gold labels)",
                              description=__doc__)
    p.add_argument("--utilities", required=True, nargs="+", help="utilities table(s) from `uae score`, one report each")
    p.add_argument("--data", default=None, help="the data the tables were scored on (default: the full QASPER train split, as `uae score`)")
    p.add_argument("--candidates", nargs="*", default=[],
                   help="candidate policies to judge too (top:M / answer:M / student:M; the table must hold their rows; default none)")
    p.add_argument("--no-gold", action="store_true", help="the --candidates policies without gold added (default off)")
    p.add_argument("--candidate-student", default=None,
                   help="encoder folder for 'student:M' (default: all-MiniLM-L6-v2), e.g. a trained run's, as `uae score`")
    p.add_argument("--no-progress", action="store_true", help="no progress bar while student:M embeds the papers")
    p.add_argument("--teacher-temperature", type=float, default=None,
                   help="T of the target softmax(utility / T) whose gold mass is reported (default: uae train's)")
    p.add_argument("--lexical-teacher", choices=("none", "bm25-answer"), default="none",
                   help="judge the table ensembled with BM25(question + answers), the target `uae train --no-gold` "
                        "trains on by default (default none: the table as is)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file (default: none)")
    p.set_defaults(func=_main)


def _main(args) -> int:
    from .cli import check_output_path
    from .data import default_qasper_path, load_dataset

    check_output_path(args.json, "--json")
    data = args.data or default_qasper_path("train")
    ds = load_dataset(data)
    results, policies = [], {}
    for t in args.utilities:
        res = hit_rates(t, ds, args.candidates, no_gold=args.no_gold, teacher_temperature=args.teacher_temperature,
                        lexical_teacher=args.lexical_teacher, candidate_student=args.candidate_student,
                        progress=not args.no_progress, policies=policies, data_path=data)
        print(format_report(res))
        results.append(res)
    if args.json:
        from .data import atomic_write

        with atomic_write(args.json) as f:  # a kill never leaves half a report
            json.dump(results, f, indent=2)
    return 0

