"""The lexical side of a hybrid index: :class:`LexicalIndex`, BM25 over passages with int64 ids, saved and
loaded like :class:`uae_fast.TopKIndex` (same container: versioned header, crc32 per section).

Scoring is :class:`uae_fast.bm25.BM25` (sparse matrix products over a batch of queries). The index keeps
the raw term counts; ``add`` appends passages (BM25's idf and average length change with every passage,
so the weight matrix is rebuilt, vectorised, on the first search after an ``add``).

Example::

    lex = LexicalIndex()
    lex.add(["the cat sat", "dogs bark"], ids=np.array([10, 11]))
    scores, ids = lex.search(["cat"], k=1)     # (float32 [1, 1], int64 [1, 1])
    lex.save("lexical.uae"); lex = LexicalIndex.load("lexical.uae")
"""
from __future__ import annotations

import os
import threading
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from .bm25 import BM25, _check_texts, count_matrix, topk_sparse_rows
from .index import _as_ids, _check_k, _read_file, _write_file

KIND = "lexical-bm25"


def pack_strings(strings: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
    """UTF-8 blob (uint8) and end offsets (int64) of ``strings``: a file section pair."""
    enc = [s.encode("utf-8") for s in strings]
    ends = np.cumsum([len(e) for e in enc], dtype=np.int64) if enc else np.zeros(0, np.int64)
    return np.frombuffer(b"".join(enc), dtype=np.uint8).copy(), ends


def unpack_strings(blob: np.ndarray, ends: np.ndarray) -> list:
    """The strings of a section pair. The end offsets must rise from 0 to the blob's length: a crafted file with
    offsets that go back would decode the whole blob again for every string (memory quadratic in its size)."""
    data = bytes(np.asarray(blob, dtype=np.uint8))
    ends = np.asarray(ends)
    if ends.ndim != 1 or not np.issubdtype(ends.dtype, np.integer):
        raise ValueError("string section: end offsets must be a 1-D integer array")
    # compared as int64 (unsigned offsets would wrap in a difference); none can exceed the text's length
    if len(ends) and (ends.max() > len(data) or ends.min() < 0):
        raise ValueError("string section: end offsets must rise from 0 to the text's length")
    ends = ends.astype(np.int64)
    if len(ends) and not ((ends[1:] >= ends[:-1]).all() and int(ends[-1]) == len(data)):
        raise ValueError("string section: end offsets must rise from 0 to the text's length")
    if not len(ends) and len(data):
        raise ValueError("string section: text without end offsets")
    starts = np.concatenate([[0], ends[:-1]]) if len(ends) else ends
    return [data[s:e].decode("utf-8") for s, e in zip(starts.tolist(), ends.tolist())]


class LexicalIndex:
    """BM25 over added passages, searched in batches; results ``(scores [Q, k] float32, ids [Q, k] int64)``.

    Args:
        k1, b, stopwords, unicode: BM25 parameters (see :class:`uae_fast.bm25.BM25`; defaults 1.2, 0.75, False,
            True). A saved index keeps its tokenisation: files written before ``unicode`` existed load with False.
        dtype: weight-matrix dtype, ``"float32"`` (default: half the memory) or ``"float64"``.

    ``search`` is safe from several threads at once and may run concurrently with ``add`` (a search
    sees the passages present when it started).
    """

    def __init__(self, *, k1: float = 1.2, b: float = 0.75, stopwords: bool = False, dtype: str = "float32",
                 unicode: bool = True):
        BM25.from_counts(_empty_counts(1), {}, k1=k1, b=b, stopwords=stopwords, dtype=dtype)  # validates the options
        self.k1, self.b, self.stopwords, self.dtype, self.unicode = float(k1), float(b), bool(stopwords), dtype, bool(unicode)
        self._vocab: Dict[str, int] = {}
        self._counts = _empty_counts(0)
        self._pending: list = []  # count matrices added since the last consolidation (add stays O(new))
        self._ids = np.zeros(0, np.int64)
        self._next_id = 0  # 1 + the largest id ever stored: default ids start here (TopKIndex's rule)
        self._bm25: Optional[BM25] = None
        self._lock = threading.Lock()  # publishing and reading the state searches use
        self._add_lock = threading.Lock()  # one add at a time; searches go on while it tokenises

    def __len__(self) -> int:
        return int(self._ids.size)

    @property
    def ntotal(self) -> int:
        return len(self)

    @property
    def ids(self) -> np.ndarray:
        v = self._ids.view()
        v.flags.writeable = False
        return v

    @property
    def vocab_size(self) -> int:
        return len(self._vocab)

    @property
    def nbytes(self) -> int:
        """Bytes held: term counts, ids and the BM25 weight matrix (built on the first search)."""
        with self._lock:
            c = self._consolidated()
            bm = self._bm25
        return int(c.data.nbytes + c.indices.nbytes + c.indptr.nbytes + self._ids.nbytes + (bm.nbytes if bm else 0))

    def __repr__(self) -> str:
        return f"LexicalIndex(n={len(self)}, vocab={self.vocab_size}, k1={self.k1}, b={self.b}, stopwords={self.stopwords}, unicode={self.unicode})"

    def add(self, texts: Sequence[str], ids=None) -> None:
        """Add passages ``texts`` with optional int64 ``ids``. As in :class:`uae_fast.TopKIndex`, ids are unique:
        default ids continue after the largest id stored (0, 1, ... with default ids only); a stored id is refused."""
        with self._add_lock:
            self._commit(self._prepare(texts, ids))

    def _prepare(self, texts: Sequence[str], ids=None):
        """What :meth:`add` stores, computed (checks, tokenising) with nothing stored; call with ``_add_lock``
        held and pass the result to :meth:`_commit` (HybridIndex adds its dense side in between)."""
        texts = _check_texts(texts)
        with self._lock:
            start, stored, vocab = self._next_id, self._ids, dict(self._vocab)  # searches keep the old vocabulary
        if ids is None:
            if start + len(texts) - 1 > np.iinfo(np.int64).max:
                raise ValueError(f"no default ids left after id {start - 1}: pass explicit ids")
            new_ids = np.arange(start, start + len(texts), dtype=np.int64)
        else:
            new_ids = _as_ids(ids, len(texts))
        if not texts:
            return None
        if ids is not None and stored.size and int(new_ids.min()) < start:  # could repeat a stored id
            taken = np.isin(new_ids, stored)
            if taken.any():
                raise ValueError(f"id {int(new_ids[np.argmax(taken)])} is already in the index: ids must be unique")
        m = count_matrix(texts, vocab, stopwords=self.stopwords, grow=True, unicode=self.unicode)
        # everything allocated here: the commit only swaps references, so it cannot fail halfway
        return np.concatenate([stored, new_ids]), vocab, m, max(start, int(new_ids.max()) + 1)

    def _commit(self, prepared) -> None:
        if prepared is None:
            return
        ids, vocab, m, next_id = prepared
        with self._lock:  # publish: searches from here on see the new passages
            self._pending.append(m)
            self._vocab, self._ids, self._bm25, self._next_id = vocab, ids, None, next_id

    def _consolidated(self):
        """All term counts as one CSR matrix [N, V] (call with the lock held)."""
        import scipy.sparse as sp

        if self._pending:
            v = max(len(self._vocab), 1)
            parts = [sp.csr_matrix((c.data, c.indices, c.indptr), shape=(c.shape[0], v)) for c in [self._counts] + self._pending]
            self._counts = sp.vstack(parts, format="csr", dtype=np.float32)
            self._pending = []
        return self._counts

    def _scorer(self) -> Tuple[BM25, np.ndarray]:
        with self._lock:
            if self._bm25 is None and len(self):
                self._bm25 = BM25.from_counts(self._consolidated(), self._vocab, k1=self.k1, b=self.b,
                                              stopwords=self.stopwords, dtype=self.dtype, unicode=self.unicode)
            return self._bm25, self._ids

    def score_matrix(self, queries: Sequence[str]):
        """BM25 scores of every passage (insertion order) for each query: CSR ``[Q, N]``."""
        bm, _ = self._scorer()
        if bm is None:
            raise ValueError("the index is empty: add passages before searching")
        return bm.score_matrix(queries)

    def search(self, queries: Sequence[str], k: int):
        """Top-``k`` passages per query: ``(scores [Q, k] float32, ids [Q, k] int64)``, best first.

        Ties: higher score first, then the earlier-added passage; passages sharing no term with a query
        score 0 and fill the list in insertion order.
        """
        return self._search(self._scorer(), queries, k)

    @staticmethod
    def _search(snapshot, queries, k: int):
        """:meth:`search` on a ``_scorer()`` snapshot (HybridIndex searches both sides on one state)."""
        if isinstance(queries, str):
            queries = [queries]
        bm, ids = snapshot
        k = _check_k(k, 0 if bm is None else bm.n_docs, "passages")
        s, rows = topk_sparse_rows(bm.score_matrix(queries), k, bm.n_docs)
        return s.astype(np.float32), ids[rows]

    # -- persistence -----------------------------------------------------------------------------
    def save(self, path) -> None:
        """Write the index to ``path`` (atomic; every section crc32-checked on load)."""
        path = os.fspath(path)
        with self._lock:
            c, vocab = self._consolidated(), self._vocab
            terms = [None] * len(vocab)
            for t, i in vocab.items():
                terms[i] = t
            blob, ends = pack_strings(terms)
            meta = {"kind": KIND, "ntotal": len(self), "vocab_size": len(vocab), "k1": self.k1, "b": self.b,
                    "stopwords": self.stopwords, "dtype": self.dtype, "unicode": self.unicode}
            sections = {"ids": self._ids, "indptr": c.indptr.astype(np.int64), "indices": c.indices.astype(np.int32),
                        "counts": c.data.astype(np.float32), "vocab": blob, "vocab_ends": ends}
            _write_file(path, meta, sections)

    @classmethod
    def load(cls, path, *, verify: bool = True) -> "LexicalIndex":
        """Open an index written by :meth:`save`; corrupt or truncated files raise ValueError."""
        import scipy.sparse as sp

        path = os.fspath(path)
        header, a = _read_file(path, mmap=False, verify=verify)

        def corrupt(why):
            return ValueError(f"{path} is not a valid lexical index file ({why})")

        if header.get("kind") != KIND:
            raise corrupt(f"kind is {header.get('kind')!r}, expected {KIND!r}")
        try:
            n, nv = int(header["ntotal"]), int(header["vocab_size"])
            unicode = header.get("unicode", False)  # files from before the option were built lowercase-only
            if not isinstance(unicode, bool):
                raise TypeError(f"unicode is {unicode!r}")
            out = cls(k1=header["k1"], b=header["b"], stopwords=header["stopwords"], dtype=header["dtype"], unicode=unicode)
        except (KeyError, TypeError, ValueError) as e:
            raise corrupt(f"bad header field: {e}") from None
        need = {"ids": (n,), "indptr": (n + 1,), "vocab_ends": (nv,)}
        for name in ("ids", "indptr", "indices", "counts", "vocab", "vocab_ends"):
            if name not in a or (name in need and a[name].shape != need[name]):
                raise corrupt(f"section {name!r} missing or mis-sized")
        indptr, indices = a["indptr"], a["indices"]
        if not (np.issubdtype(indptr.dtype, np.integer) and np.issubdtype(indices.dtype, np.integer)):
            raise corrupt("term-count matrix is not integer")
        if indptr.size and indptr.max() > indices.size:  # before the int64 view: unsigned values could wrap
            raise corrupt("term-count matrix is inconsistent")
        indptr = indptr.astype(np.int64)
        if (indptr[0] != 0 or indptr[-1] != indices.size or indices.size != a["counts"].size or np.any(np.diff(indptr) < 0)
                or (indices.size and (indices.min() < 0 or indices.max() >= max(nv, 1)))):
            raise corrupt("term-count matrix is inconsistent")
        try:
            terms = unpack_strings(a["vocab"], a["vocab_ends"])
        except UnicodeDecodeError:
            raise corrupt("vocabulary is not UTF-8") from None
        except ValueError as e:
            raise corrupt(f"vocabulary: {e}") from None
        out._vocab = {t: i for i, t in enumerate(terms)}
        if len(out._vocab) != nv:
            raise corrupt("vocabulary has duplicate terms")
        counts, ids = np.array(a["counts"]), a["ids"]
        # as TopKIndex.load: ids are int64, >= 0 and unique (-1 is search's "no result"); counts finite, >= 0
        if ids.dtype != np.int64 or (ids.size and (int(ids.min()) < 0 or np.unique(ids).size != ids.size)):
            raise corrupt("ids section holds non-int64, negative or repeated ids")
        if counts.dtype.kind not in "iuf" or not bool(np.isfinite(counts).all()) or (counts.size and counts.min() < 0):
            raise corrupt("term counts are not finite and >= 0")
        out._counts = sp.csr_matrix((counts, np.array(indices), np.array(indptr)), shape=(n, max(nv, 1)))
        out._ids = np.array(ids, dtype=np.int64)
        out._next_id = int(out._ids.max()) + 1 if out._ids.size else 0
        return out


def _empty_counts(rows: int):
    import scipy.sparse as sp

    return sp.csr_matrix((rows, 1), dtype=np.float32)
