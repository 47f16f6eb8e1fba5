"""The lexical teacher: BM25(question + answers) as a second teacher, ensembled with the LLM's utilities.

Answer-only training (``uae train --no-gold``) has no evidence labels, and the strongest weak label is
lexical: the paragraph that BM25 ranks first for the question followed by its answers (DPR's distant
supervision). The LLM teacher and that lexical score make different mistakes, so their ensemble - each
question's utilities z-scored over its candidates, then averaged with the z-scored BM25(question +
answers) scores of the same candidates (:func:`uae_fast.utilities.merge_teachers`' rule) - beat or tied
both alone in our runs (docs/answer-only.md). ``uae train --no-gold`` applies it by default
(``--lexical-teacher bm25-answer``); gold is never read.

    utilities, header = load_utilities("table.jsonl.gz")
    utilities = with_lexical_teacher(utilities, ds, header)   # {qid: {pid: mean z-score}}
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

from .data import Query, RetrievalDataset
from .utilities import ensemble_utilities

LEXICAL_TEACHERS = ("none", "bm25-answer")
LEXICAL_TEACHER_NAME = "bm25(question+answers)"  # the header's teacher name of a lexical table


class PoolBM25:
    """BM25 scores of a question's text over its pool (the paragraphs of its paper), indexes cached per pool."""

    def __init__(self, ds: RetrievalDataset, max_cached: int = 2048):
        from .bm25 import BM25

        self._bm25, self.ds, self.max_cached = BM25, ds, max_cached
        self._indexes: Dict[Tuple[str, ...], object] = {}

    def __call__(self, q: Query, text: str) -> Dict[str, float]:
        pool = self.ds.pool(q)
        key = tuple(pool)
        if key not in self._indexes:
            if len(self._indexes) >= self.max_cached:
                self._indexes.clear()
            self._indexes[key] = self._bm25([self.ds.passages[p].text for p in pool])
        return dict(zip(pool, self._indexes[key].scores(text).tolist()))


def lexical_utilities(ds: RetrievalDataset, candidates: Dict[str, Sequence[str]]) -> Dict[str, Dict[str, float]]:
    """``{qid: {pid: BM25(question + answers)}}`` for each question's ``candidates`` (in their order, rounded to
    5 decimals as a table stores them). Raises ``ValueError`` for an unknown question or a paragraph outside
    its pool."""
    by_id = {q.id: q for q in ds.queries}
    missing = [qid for qid in candidates if qid not in by_id]
    if missing:
        raise ValueError(f"lexical teacher: {len(missing)} question ids are not in the data (e.g. {missing[0]!r})")
    scorer = PoolBM25(ds)
    out: Dict[str, Dict[str, float]] = {}
    for qid, pids in candidates.items():
        q = by_id[qid]
        scores = scorer(q, q.with_answers())
        bad = [p for p in pids if p not in scores]
        if bad:
            raise ValueError(f"lexical teacher: paragraph {bad[0]!r} is not in question {qid!r}'s pool")
        out[qid] = {p: round(scores[p], 5) for p in pids}
    return out


def with_lexical_teacher(utilities: Dict[str, Dict[str, float]], ds: RetrievalDataset,
                         header: Optional[dict] = None, *, path: str = "utilities") -> Dict[str, Dict[str, float]]:
    """The ensemble of ``utilities`` with the lexical teacher on the same candidates: per question, the mean of
    the two z-scores (rounded as :func:`merge_teachers` writes them, so a merged table trains identically).

    ``header`` (the table's): a table that already holds the lexical teacher is refused, as it would count twice.
    """
    teacher = str((header or {}).get("teacher", ""))
    if LEXICAL_TEACHER_NAME in teacher:
        raise ValueError(f"{path}: its teacher {teacher!r} already includes {LEXICAL_TEACHER_NAME}; "
                         f"train it with --lexical-teacher none")
    return ensemble_utilities([utilities, lexical_utilities(ds, {q: list(u) for q, u in utilities.items()})])
