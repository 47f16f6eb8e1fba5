"""Okapi BM25 as sparse matrix products: the project's one lexical scorer (baseline, candidate generator,
and the lexical side of :class:`uae_fast.hybrid.HybridIndex` through :class:`uae_fast.lexical.LexicalIndex`).

    score(q, d) = sum_{t in q} idf(t) * tf(t, d) * (k1 + 1) / (tf(t, d) + k1 * (1 - b + b * |d| / avgdl))
    idf(t)      = ln(1 + (N - n_t + 0.5) / (n_t + 0.5))          (Lucene's non-negative idf)

Tokenisation is deliberately simple: ``\\w+`` runs (Unicode letters/digits/underscore) of NFKC-normalised,
case-folded text, with combining marks kept inside words (``unicode=True``, the default: the "fi" ligature of
PDF-extracted text, full-width forms, composed and decomposed accents, "ß" and "ss" match, and Devanagari or Thai
words are not split at their vowel signs); ``unicode=False`` is the tokeniser before 2026-12 (lowercased ``\\w+``
runs only). No stemming; optional English stopword removal. A repeated query term counts once per occurrence
(as in Lucene).

Everything except ``qtf`` is fixed per (term, passage), so it is precomputed into a term-major CSR matrix
``W [V, N]`` (bm25s's approach): a batch of queries is a sparse count matrix ``Q [B, V]`` and its scores are
the sparse product ``Q @ W`` ``[B, N]``, whose work is the query terms' posting lists - no loop over
passages or query terms in Python.

Example::

    bm = BM25(["the cat sat", "dogs bark loudly", "a cat and a dog"])
    bm.scores("cat dog")                    # np.ndarray [3], float64
    bm.topk("cat dog", k=2)                 # (scores, rows), best first
    bm.search(["cat", "dog bark"], k=2)     # batched: (scores [2, 2], rows [2, 2])
"""
from __future__ import annotations

import math
import numbers
import re
import unicodedata
from typing import Dict, List, Sequence, Tuple

import numpy as np

_TOKEN = re.compile(r"\w+")


def _marks_pattern():
    """``\\w`` plus every combining mark (categories Mn, Mc, Me) as code point ranges: ``re`` has no ``\\p{M}``,
    and without them ``\\w+`` cuts Indic and Thai words at each vowel sign."""
    import sys

    cps = [c for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)) in ("Mn", "Mc", "Me")]
    ranges, start = [], cps[0]
    for prev, c in zip(cps, cps[1:] + [-1]):
        if c != prev + 1:
            ranges.append(re.escape(chr(start)) + ("" if prev == start else "-" + re.escape(chr(prev))))
            start = c
    return re.compile("[\\w" + "".join(ranges) + "]+")


_TOKEN_MARKS = None  # built on first non-ASCII text (a scan of the code points, ~0.3 s once per process)

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
_DTYPES = ("float64", "float32")


def fold(text: str, unicode: bool = True) -> str:
    """The text tokens are cut from: NFKC-normalised and case-folded (``unicode=False``: lowercased)."""
    if not unicode or text.isascii():  # ASCII: NFKC is the identity and casefold() is lower()
        return text.lower()
    if not unicodedata.is_normalized("NFKC", text):
        text = unicodedata.normalize("NFKC", text)
    return text.casefold()


def tokenize(text: str, stopwords: bool = False, unicode: bool = True) -> List[str]:
    """Word tokens of :func:`fold` ``(text, unicode)`` (see the module docstring), optionally without English
    stopwords."""
    global _TOKEN_MARKS
    text = fold(text, unicode)
    if unicode and not text.isascii():  # ASCII text (most English corpora) keeps the faster plain pattern
        if _TOKEN_MARKS is None:
            _TOKEN_MARKS = _marks_pattern()
        toks = _TOKEN_MARKS.findall(text)
    else:
        toks = _TOKEN.findall(text)
    return [t for t in toks if t not in ENGLISH_STOPWORDS] if stopwords else toks


def _check_texts(texts, name: str = "texts") -> List[str]:
    if isinstance(texts, str):
        raise TypeError(f"{name} must be a sequence of str, not one str")
    if not hasattr(texts, "__iter__"):
        raise TypeError(f"{name} must be a sequence of str, got {type(texts).__name__}")
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"{name}[{i}] must be a str, got {type(t).__name__}")
    return texts


def count_matrix(texts: Sequence[str], vocab: Dict[str, int], *, stopwords: bool, grow: bool, unicode: bool = True):
    """Term counts of ``texts`` as a CSR matrix ``[len(texts), len(vocab)]`` (float64).

    ``grow=True`` adds unseen terms to ``vocab`` (passages); ``grow=False`` drops them (queries: a term
    no passage holds scores nothing).
    """
    import scipy.sparse as sp

    cols: List[int] = []
    indptr = [0]
    for t in texts:
        toks = tokenize(t, stopwords, unicode)
        if grow:
            cols.extend(vocab.setdefault(w, len(vocab)) for w in toks)
        else:
            cols.extend(c for c in map(vocab.get, toks) if c is not None)
        indptr.append(len(cols))
    c = np.asarray(cols, dtype=np.int64)
    rows = np.repeat(np.arange(len(texts), dtype=np.int64), np.diff(np.asarray(indptr, dtype=np.int64)))
    m = sp.coo_matrix((np.ones(c.size), (rows, c)), shape=(len(texts), max(len(vocab), 1))).tocsr()
    m.sum_duplicates()  # one entry per (text, term), holding its count
    return m


def topk_sparse_rows(mat, k: int, n: int) -> Tuple[np.ndarray, np.ndarray]:
    """Per row of the CSR score matrix ``mat [B, n]``: the ``k`` best ``(scores, columns)``, best first.

    Ties: lower column first; stored entries are > 0, so when a row has fewer than ``k`` of them the
    rest are the lowest columns scoring 0 (exactly what a full sort of the dense row returns).
    """
    scores = np.zeros((mat.shape[0], k), dtype=np.float64)
    cols = np.zeros((mat.shape[0], k), dtype=np.int64)
    for r in range(mat.shape[0]):  # one vectorised selection per query
        s, e = mat.indptr[r], mat.indptr[r + 1]
        d, c = mat.data[s:e], mat.indices[s:e]
        if d.size > k:
            thr = np.partition(d, d.size - k)[d.size - k]
            keep = d >= thr  # every entry tied with the k-th best, so the tie order below is exact
            d, c = d[keep], c[keep]
        order = np.lexsort((c, -d))[:k]
        m = order.size
        scores[r, :m], cols[r, :m] = d[order], c[order]
        if m < k:  # pad with the lowest-numbered zero-score columns
            need = k - m
            cols[r, m:] = np.setdiff1d(np.arange(need + m, dtype=np.int64), c, assume_unique=False)[:need]
    return scores, cols


class BM25:
    """Okapi BM25 over ``texts`` (k1=1.2, b=0.75 by default).

    Args:
        texts: the passage pool; ``scores`` returns one value per text, in this order.
        k1: term-frequency saturation (>= 0).
        b: length normalisation in [0, 1].
        stopwords: drop English stopwords from passages and queries.
        unicode: NFKC-normalise and case-fold passages and queries and keep combining marks inside words
            (default True; False: lowercased ``\\w+`` runs, the tokeniser before 2026-12).
        dtype: ``"float64"`` (default) or ``"float32"`` (half the memory of the weight matrix;
            scores to ~1e-7 relative).
    """

    def __init__(self, texts: Sequence[str], *, k1: float = 1.2, b: float = 0.75, stopwords: bool = False,
                 dtype: str = "float64", unicode: bool = True):
        texts = _check_texts(texts)
        if not texts:
            raise ValueError("texts is empty: BM25 needs at least one passage")
        vocab: Dict[str, int] = {}
        tf = count_matrix(texts, vocab, stopwords=bool(stopwords), grow=True, unicode=bool(unicode))
        self._setup(tf, vocab, k1=k1, b=b, stopwords=stopwords, dtype=dtype, unicode=unicode)

    @classmethod
    def from_counts(cls, tf, vocab: Dict[str, int], *, k1: float = 1.2, b: float = 0.75, stopwords: bool = False,
                    dtype: str = "float64", unicode: bool = True) -> "BM25":
        """BM25 from a term-count CSR matrix ``[N, len(vocab)]`` (what :func:`count_matrix` builds; ``unicode``
        must be what it tokenised with, since queries are tokenised the same way)."""
        self = cls.__new__(cls)
        self._setup(tf, vocab, k1=k1, b=b, stopwords=stopwords, dtype=dtype, unicode=unicode)
        return self

    def _setup(self, tf, vocab, *, k1, b, stopwords, dtype, unicode):
        import scipy.sparse as sp

        for name, v in (("k1", k1), ("b", b)):
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
        if not (k1 >= 0):
            raise ValueError(f"k1 must be >= 0, got {k1}")
        if not (0.0 <= b <= 1.0):
            raise ValueError(f"b must be in [0, 1], got {b}")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
        if tf.shape[0] < 1:
            raise ValueError("texts is empty: BM25 needs at least one passage")
        self.k1, self.b, self.stopwords, self.dtype, self.unicode = float(k1), float(b), bool(stopwords), dtype, bool(unicode)
        self.vocab = vocab
        self.n_docs = int(tf.shape[0])
        tf = sp.csr_matrix(tf, dtype=np.float64)
        dl = np.asarray(tf.sum(axis=1), dtype=np.float64).ravel()
        self.avgdl = float(dl.mean()) if dl.sum() > 0 else 1.0
        df = np.bincount(tf.indices, minlength=tf.shape[1]).astype(np.float64)
        self._idf = np.log(1.0 + (self.n_docs - df + 0.5) / (df + 0.5))
        # The query-independent part of every (passage, term) score, idf included.
        norm = self.k1 * (1.0 - self.b + self.b * dl / self.avgdl)
        rows = np.repeat(np.arange(self.n_docs), np.diff(tf.indptr))
        w = self._idf[tf.indices] * tf.data * (self.k1 + 1.0) / (tf.data + norm[rows])
        self._w = sp.csr_matrix((w.astype(dtype), tf.indices, tf.indptr), shape=tf.shape).T.tocsr()  # [V, N]

    def __len__(self) -> int:
        return self.n_docs

    @property
    def nbytes(self) -> int:
        """Bytes of the weight matrix and idf vector (the vocabulary dict not counted)."""
        w = self._w
        return int(w.data.nbytes + w.indices.nbytes + w.indptr.nbytes + self._idf.nbytes)

    def idf(self, term: str) -> float:
        """idf of a (tokenised) term; 0 for a term no passage contains."""
        c = self.vocab.get(term)
        return float(self._idf[c]) if c is not None and c < self._idf.size else 0.0

    def score_matrix(self, queries: Sequence[str]):
        """BM25 scores of every passage for each query: CSR ``[len(queries), N]`` (absent = 0)."""
        queries = _check_texts(queries, "queries")
        q = count_matrix(queries, self.vocab, stopwords=self.stopwords, grow=False, unicode=self.unicode)
        q = q[:, : self._w.shape[0]] if q.shape[1] != self._w.shape[0] else q
        return (q.astype(self._w.dtype) @ self._w).tocsr()

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every passage for ``query``: float64 array [len(texts)]."""
        if not isinstance(query, str):
            raise TypeError(f"query must be a str, got {type(query).__name__}")
        return self.score_matrix([query]).toarray()[0].astype(np.float64)

    def search(self, queries: Sequence[str], k: int) -> Tuple[np.ndarray, np.ndarray]:
        """``(scores [B, k] float64, rows [B, k] int64)`` of the ``k`` best passages per query, best first
        (ties: lower row first; passages sharing no term with a query score 0)."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        return topk_sparse_rows(self.score_matrix(queries), min(int(k), self.n_docs), self.n_docs)

    def topk(self, query: str, k: int) -> Tuple[np.ndarray, np.ndarray]:
        """``(scores, ids)`` of the ``k`` best passages, best first (ties: lower id first)."""
        if not isinstance(query, str):
            raise TypeError(f"query must be a str, got {type(query).__name__}")
        s, i = self.search([query], k)
        return s[0], i[0]
