"""Okapi BM25 over a fixed passage pool: a cheap lexical candidate generator and retrieval baseline.

    score(q, d) = sum_{t in q} idf(t) * tf(t, d) * (k1 + 1) / (tf(t, d) + k1 * (1 - b + b * |d| / avgdl))
    idf(t)      = ln(1 + (N - n_t + 0.5) / (n_t + 0.5))          (Lucene's non-negative idf)

Tokenisation is deliberately simple: lowercase, ``\\w+`` runs (Unicode letters/digits/underscore),
optional English stopword removal. A repeated query term counts once per occurrence (as in Lucene).

Example::

    bm = BM25(["the cat sat", "dogs bark loudly", "a cat and a dog"])
    bm.scores("cat dog")        # np.ndarray [3], float64
    bm.topk("cat dog", k=2)     # (scores, ids), best first
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Dict, List, Sequence, Tuple

import numpy as np

_TOKEN = re.compile(r"\w+")

# A short English stopword list (NLTK's core function words); enough to stop "the"/"of" from
# dominating long queries without a dependency.
ENGLISH_STOPWORDS = frozenset(
    """a about above after again against all am an and any are as at be because been before being below between
    both but by can could did do does doing down during each few for from further had has have having he her here
    hers herself him himself his how i if in into is it its itself just me more most my myself no nor not now of
    off on once only or other our ours ourselves out over own same she should so some such than that the their
    theirs them themselves then there these they this those through to too under until up very was we were what
    when where which while who whom why will with would you your yours yourself yourselves""".split()
)


def tokenize(text: str, stopwords: bool = False) -> List[str]:
    """Lowercased ``\\w+`` tokens, optionally without English stopwords."""
    toks = _TOKEN.findall(text.lower())
    return [t for t in toks if t not in ENGLISH_STOPWORDS] if stopwords else toks


class BM25:
    """Okapi BM25 index over ``texts`` (k1=1.2, b=0.75 by default).

    Args:
        texts: the passage pool; ``scores`` returns one value per text, in this order.
        k1: term-frequency saturation (>= 0).
        b: length normalisation in [0, 1].
        stopwords: drop English stopwords from passages and queries.
    """

    def __init__(self, texts: Sequence[str], *, k1: float = 1.2, b: float = 0.75, stopwords: bool = False):
        if isinstance(texts, str):
            raise TypeError("texts must be a sequence of str, not one str")
        texts = list(texts)
        if not texts:
            raise ValueError("texts is empty: BM25 needs at least one passage")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"texts[{i}] must be a str, got {type(t).__name__}")
        if not (k1 >= 0):
            raise ValueError(f"k1 must be >= 0, got {k1}")
        if not (0.0 <= b <= 1.0):
            raise ValueError(f"b must be in [0, 1], got {b}")
        self.k1, self.b, self.stopwords = float(k1), float(b), bool(stopwords)
        self.n_docs = len(texts)
        docs = [Counter(tokenize(t, self.stopwords)) for t in texts]
        dl = np.array([sum(c.values()) for c in docs], dtype=np.float64)
        self.avgdl = float(dl.mean()) if dl.sum() > 0 else 1.0
        # Postings: term -> (doc ids, precomputed tf part of the score). The tf part does not depend on
        # the query, so a query costs one gather-add per distinct query term.
        norm = self.k1 * (1.0 - self.b + self.b * dl / self.avgdl)
        postings: Dict[str, Tuple[List[int], List[float]]] = {}
        for d, c in enumerate(docs):
            for term, tf in c.items():
                ids, w = postings.setdefault(term, ([], []))
                ids.append(d)
                w.append(tf * (self.k1 + 1.0) / (tf + norm[d]))
        self._postings = {t: (np.asarray(i, dtype=np.int64), np.asarray(w, dtype=np.float64)) for t, (i, w) in postings.items()}
        self._idf = {t: float(np.log(1.0 + (self.n_docs - len(i) + 0.5) / (len(i) + 0.5))) for t, (i, _) in self._postings.items()}

    def __len__(self) -> int:
        return self.n_docs

    def idf(self, term: str) -> float:
        """idf of a (tokenised) term; 0 for a term no passage contains."""
        return self._idf.get(term, 0.0)

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every passage for ``query``: float64 array [len(texts)]."""
        if not isinstance(query, str):
            raise TypeError(f"query must be a str, got {type(query).__name__}")
        out = np.zeros(self.n_docs, dtype=np.float64)
        for term, qtf in Counter(tokenize(query, self.stopwords)).items():
            post = self._postings.get(term)
            if post is not None:
                ids, w = post
                out[ids] += qtf * self._idf[term] * w
        return out

    def topk(self, query: str, k: int) -> Tuple[np.ndarray, np.ndarray]:
        """``(scores, ids)`` of the ``k`` best passages, best first (ties: lower id first)."""
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        s = self.scores(query)
        k = min(int(k), self.n_docs)
        order = np.lexsort((np.arange(self.n_docs), -s))[:k]
        return s[order], order.astype(np.int64)
