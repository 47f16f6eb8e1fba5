"""Hybrid retrieval: :class:`HybridIndex`, a dense :class:`uae_fast.TopKIndex` and a BM25
:class:`uae_fast.lexical.LexicalIndex` over the same passage ids, searched together and fused
(:mod:`uae_fast.fusion`: min-max / z-score convex combination or RRF; weight from
``uae calibrate-fusion`` or the QASPER-dev default).

Example::

    index = HybridIndex(384)                                   # fusion=None: the default
    index.add(passage_embeddings, passage_texts)               # ids 0..N-1 (or ids=...)
    scores, ids = index.search(query_embeddings, query_texts, 10)   # [Q, 10] each, best first
    index.save("passages.hybrid")                              # a folder: manifest + dense + lexical files
    index = HybridIndex.load("passages.hybrid", fusion="fusion.json")

Folder layout (``FORMAT``): ``hybrid.json`` (format, dim, ntotal, fusion, each file's size, user ``meta``),
``dense.uae`` (TopKIndex file) and ``lexical.uae`` (LexicalIndex file); both files carry a crc32 per
section. ``load`` checks the manifest against the files and that both sides hold the same ids.
"""
from __future__ import annotations

import json
import os
import threading
from typing import Optional, Sequence

import numpy as np

from .fusion import fuse, read_json, resolve_fusion
from .index import TopKIndex, _is_torch, _wrap
from .bm25 import _check_texts
from .lexical import LexicalIndex

FORMAT = "uae-hybrid/1"
MANIFEST = "hybrid.json"
_FILES = {"dense": "dense.uae", "lexical": "lexical.uae"}


def write_manifest(folder: str, manifest: dict) -> None:
    """Write ``folder``'s manifest atomically, each ``files`` entry (kind -> file name) given its byte size."""
    from .data import atomic_write

    files = {k: {"path": v, "bytes": os.path.getsize(os.path.join(folder, v))} for k, v in manifest["files"].items()}
    with atomic_write(os.path.join(folder, MANIFEST)) as f:
        json.dump(dict(manifest, files=files), f, indent=2, sort_keys=True)


class HybridIndex:
    """Dense + BM25 search over one set of passages, fused per query.

    Args:
        dim: embedding dimension.
        fusion: a fusion config dict, the path of a JSON file written by ``uae calibrate-fusion``, or
            ``None`` for :data:`uae_fast.fusion.DEFAULT_FUSION`.
        dtype, metric, threads: the dense side's :class:`uae_fast.TopKIndex` options
            (``"float32"``/``"bfloat16"``/``"int8"``; ``"ip"``/``"cosine"``; search threads).
        k1, b, stopwords, unicode: the lexical side's BM25 options.

    ``search`` may be called from several threads at once; ``add`` may run concurrently with searches.
    """

    def __init__(self, dim: int, fusion=None, *, dtype: str = "float32", metric: str = "ip",
                 threads: Optional[int] = None, k1: float = 1.2, b: float = 0.75, stopwords: bool = False,
                 unicode: bool = True):
        self.dense = TopKIndex(dim, dtype=dtype, metric=metric, threads=threads)
        self.lexical = LexicalIndex(k1=k1, b=b, stopwords=stopwords, unicode=unicode)
        self.fusion = resolve_fusion(fusion)
        self.meta: dict = {}  # saved with the index (e.g. the encoder's path)
        self._lock = threading.Lock()  # add() keeps the two sides in step

    @classmethod
    def from_parts(cls, dense: TopKIndex, lexical: LexicalIndex, fusion=None) -> "HybridIndex":
        """Wrap existing indexes that hold the same ids in the same order."""
        if len(dense) != len(lexical) or not np.array_equal(dense.ids, lexical.ids):
            raise ValueError(f"dense ({len(dense)}) and lexical ({len(lexical)}) indexes must hold the same ids in the same order")
        self = cls.__new__(cls)
        self.dense, self.lexical, self.fusion, self.meta = dense, lexical, resolve_fusion(fusion), {}
        self._lock = threading.Lock()
        return self

    @property
    def dim(self) -> int:
        return self.dense.dim

    def __len__(self) -> int:
        return len(self.lexical)  # the side that publishes last: what a search covers while an add runs

    @property
    def ntotal(self) -> int:
        return len(self)

    @property
    def nbytes(self) -> int:
        return self.dense.nbytes + self.lexical.nbytes

    def __repr__(self) -> str:
        return (f"HybridIndex(dim={self.dim}, n={len(self)}, dtype={self.dense.dtype!r}, "
                f"fusion={self.fusion['method']}:{self.fusion['weight']:g})")

    def add(self, passage_emb, passage_texts: Sequence[str], ids=None) -> None:
        """Add passages: embeddings ``[n, dim]`` and their ``n`` texts, optional int64 ``ids``."""
        if not hasattr(passage_emb, "shape"):  # counted below: a list would read as one embedding
            raise TypeError(f"passage_emb must be a numpy array or a torch tensor, got {type(passage_emb).__name__}")
        passage_texts = _check_texts(passage_texts, "passage_texts")
        n = int(passage_emb.shape[0]) if getattr(passage_emb, "ndim", 0) == 2 else 1
        if len(passage_texts) != n:
            raise ValueError(f"passage_texts has {len(passage_texts)} texts for {n} embeddings")
        passage_emb = self.dense._prepare("passage_emb", passage_emb)  # bad embeddings fail before the tokenising
        with self._lock, self.lexical._add_lock:
            if ids is None:  # the dense side's rule: continue after the largest id ever stored
                ids = np.arange(self.dense._next_id, self.dense._next_id + n, dtype=np.int64)
            # The sides stay in step: the lexical side is tokenised first with nothing stored, so a failure or an
            # interrupt there (or in the dense add, which checks before it stores) leaves both as they were; the
            # lexical side publishes last, which search() relies on, and if even that fails the dense rows go.
            lexical = self.lexical._prepare(passage_texts, ids)
            n0, next0 = len(self.dense), self.dense._next_id
            self.dense.add(passage_emb, ids)
            try:
                self.lexical._commit(lexical)
            except BaseException:
                if self.dense._rollback is not None:
                    self.dense._rollback(n0, next0)
                raise

    def search(self, query_emb, query_texts: Sequence[str], k: int, *, fusion=None):
        """Top-``k`` fused results per query: ``(scores [Q, k] float32, ids [Q, k] int64)``, best first.

        ``query_emb`` ``[Q, dim]`` and ``query_texts`` (``Q`` strings) describe the same queries.
        ``fusion`` overrides the index's config for this call. Rows with fewer than ``k`` candidates
        (both sides together) end in score -inf, id -1.
        """
        like_torch = _is_torch(query_emb)
        if isinstance(query_texts, str):
            query_texts = [query_texts]
        if query_texts is None or not hasattr(query_texts, "__iter__"):
            raise TypeError(f"query_texts must be a list of str (one per query), got {type(query_texts).__name__}")
        query_texts = _check_texts(query_texts, "query_texts")
        q = self.dense._prepare("query_emb", query_emb)
        if len(query_texts) != q.shape[0]:
            raise ValueError(f"query_texts has {len(query_texts)} texts for {q.shape[0]} query embeddings")
        cfg = self.fusion if fusion is None else resolve_fusion(fusion)
        # One state for both sides while an add() runs: the lexical side's (it publishes after the dense side),
        # whose passages are the dense side's first n rows, the only ones the dense side searches.
        snapshot = self.lexical._scorer()
        n = len(snapshot[1])
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not (1 <= k <= max(n, 1)) or n == 0:
            if n == 0:
                raise ValueError("the index is empty: add passages before searching")
            raise ValueError(f"k must be an int in [1, {n}] (the number of stored passages), got {k!r}")
        each = min(max(cfg["k_each"], int(k)), n)
        dense = self.dense._search(q, each, rows=n)  # the rows an add in flight put beyond n are not searched
        if n and len(self.dense) >= n and self.dense.ids[n - 1] != snapshot[1][-1]:
            raise RuntimeError("the index's sides hold different passages (an add to one side alone); rebuild it")
        lexical = LexicalIndex._search(snapshot, query_texts, each)
        scores, ids = fuse(dense, lexical, int(k), cfg)
        return _wrap(like_torch, scores, ids)

    # -- persistence -----------------------------------------------------------------------------
    def save(self, folder) -> None:
        """Write the index into ``folder`` (created if needed): manifest, dense and lexical files.

        The old manifest goes first and the new one lands last, so a crash or a refused save leaves a folder
        that does not open ("no hybrid.json"), never an old manifest over new files; keep the last good index by
        saving to a new folder. ``meta`` must be JSON-serialisable (checked before any file is touched)."""
        folder = os.fspath(folder)
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise NotADirectoryError(f"cannot save the hybrid index to {folder}: it is a file; give a folder")
        try:
            json.dumps({"meta": self.meta, "fusion": self.fusion}, sort_keys=True)  # as write_manifest will
        except (TypeError, ValueError) as e:
            raise TypeError(f"HybridIndex.meta must be JSON-serialisable (str, numbers, lists, dicts): {e}") from None
        os.makedirs(folder, exist_ok=True)
        with self._lock:
            if len(self.dense) != len(self.lexical) or not np.array_equal(self.dense.ids, self.lexical.ids):
                raise RuntimeError(f"the index's sides hold different passages (dense {len(self.dense)}, lexical "
                                   f"{len(self.lexical)}): an add to one side alone; rebuild the index")
            mpath = os.path.join(folder, MANIFEST)
            if os.path.exists(mpath):
                os.remove(mpath)
            self.dense.save(os.path.join(folder, _FILES["dense"]))
            self.lexical.save(os.path.join(folder, _FILES["lexical"]))
            write_manifest(folder, {"format": FORMAT, "dim": self.dim, "ntotal": len(self), "fusion": self.fusion,
                                    "meta": self.meta, "files": dict(_FILES)})

    @classmethod
    def load(cls, folder, fusion=None, *, mmap: bool = True, verify: bool = True,
             threads: Optional[int] = None) -> "HybridIndex":
        """Open a folder written by :meth:`save`. ``fusion`` (dict or JSON path) replaces the saved
        config; ``verify=False`` skips the crc32 of the dense vectors (the lexical file is read whole, so its
        sections are always checked); ``mmap`` maps the dense vectors."""
        from .index import _check_threads

        folder = os.fspath(folder)
        _check_threads(threads)
        mpath = os.path.join(folder, MANIFEST)
        if not os.path.exists(folder):
            raise FileNotFoundError(f"hybrid index folder not found: {folder}")
        if not os.path.isdir(folder):
            raise NotADirectoryError(f"{folder} is a file: HybridIndex.load takes the folder HybridIndex.save wrote")
        if not os.path.exists(mpath):
            raise ValueError(f"{folder} is not a hybrid index (no {MANIFEST})")

        def corrupt(why):
            return ValueError(f"{folder} is not a valid hybrid index ({why})")

        manifest = read_json(mpath, "hybrid index manifest")
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise corrupt(f"format is {manifest.get('format') if isinstance(manifest, dict) else None!r}, expected {FORMAT!r}")
        if isinstance(manifest.get("files"), dict) and "dense" in manifest["files"] and "lexical" not in manifest["files"]:
            raise ValueError(f"{folder} is a dense-only index (built without --lexical): open it with "
                             f"uae_fast.search.open_index or TopKIndex.load")
        try:
            files, ntotal, dim = manifest["files"], int(manifest["ntotal"]), int(manifest["dim"])
            paths = {k: os.path.join(folder, files[k]["path"]) for k in _FILES}
            sizes = {k: int(files[k]["bytes"]) for k in _FILES}
        except (KeyError, TypeError, ValueError) as e:
            raise corrupt(f"manifest field {e}") from None
        for k, p in paths.items():
            name = files[k]["path"]
            # a file of this folder, by its plain name: never a path elsewhere (an index made by someone else)
            if not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", ".."):
                raise corrupt(f"the manifest names {name!r} for {k}: expected a file name inside the index folder")
            if not os.path.exists(p):
                raise corrupt(f"{name} is missing")
            if not os.path.isfile(p):
                raise corrupt(f"{name} is not a regular file")
            if os.path.getsize(p) != sizes[k]:
                raise corrupt(f"{name} has {os.path.getsize(p)} bytes, the manifest says {sizes[k]}")
        if manifest.get("fusion") is not None and not isinstance(manifest["fusion"], dict):
            raise corrupt("its fusion must be an object (a config), not a path")
        dense = TopKIndex.load(paths["dense"], mmap=mmap, verify=verify, threads=threads)
        lexical = LexicalIndex.load(paths["lexical"], verify=verify)
        if dense.dim != dim or len(dense) != ntotal or len(lexical) != ntotal:
            raise corrupt("dim/ntotal of the files differ from the manifest")
        if not np.array_equal(dense.ids, lexical.ids):
            raise corrupt("dense and lexical files hold different ids")
        out = cls.from_parts(dense, lexical, manifest.get("fusion") if fusion is None else fusion)
        out.meta = dict(manifest.get("meta") or {})
        return out
