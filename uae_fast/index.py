"""Top-k retrieval over stored embeddings: :class:`TopKIndex`.

Two backends behind one interface:

- ``backend="native"`` (default): exact inner-product search in the C++ extension ``uae_fast._topk``
  (blocked scoring, per-thread bounded heaps, GIL released, AVX-512/AVX2/portable kernels picked at
  runtime). Storage ``dtype``: ``"float32"`` (exact), ``"bfloat16"`` (half the memory) or ``"int8"``
  (a quarter, one float32 scale per vector; the fastest path on CPUs with AVX-512 VNNI; add
  ``refine=True`` for float32-level recall at int8 scan speed, half float32's memory). The compact
  dtypes scan with a rounded query, keep ``candidates`` per query and rescore those exactly against
  the stored vectors, so returned scores are exact for what is stored.
- ``backend="faiss"``: the same interface over a FAISS ``index_factory`` string (``"Flat"``,
  ``"IVF1024,Flat"``, ``"HNSW32"``, ...) for corpora where approximate search pays; faiss-gpu is used
  when it is installed and a GPU is visible.

Results are always ``(scores [Q, k] float32, ids [Q, k] int64)``, best first. Native tie order:
higher score first, then the vector added earlier (= lower id with the default ids 0..N-1); results
do not depend on the thread count. ``search`` is safe to call from several threads at once; ``add``
and ``save`` may run concurrently with searches, which do not wait for them (each search sees the vectors
present when it started). FAISS: searches run one at a time, ties in FAISS's own order.

Example::

    index = TopKIndex(384, metric="cosine")          # or dtype="int8"
    index.add(passage_embeddings)                     # numpy or torch, [N, 384]
    scores, ids = index.search(query_embeddings, 10)  # [Q, 10] each
    index.save("passages.uae")
    index = TopKIndex.load("passages.uae")            # memory-mapped, ready at once
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import struct
import threading
import zlib
from typing import Optional, Tuple

import numpy as np

_MAGIC = b"UAETOPK1"
_FORMAT = 1
_PREFIX = struct.Struct("<8sQI4x")  # magic, header length, header crc32
_ALIGN = 64
_DTYPES = {"float32": 0, "bfloat16": 1, "int8": 2}
_DTYPE_ALIASES = {"fp32": "float32", "f32": "float32", "bf16": "bfloat16", "i8": "int8"}
_METRICS = ("ip", "cosine")
# Scores are float32. |q . x| <= |q| |x| bounds every score and partial sum, so below this product no
# score can overflow (with room for the rounding of compact storage); above it search raises instead of
# ranking infs and NaNs.
_SCORE_BOUND = 1e38
_BF16_MAX = 3.3895313892515355e38  # largest finite bfloat16: anything larger is stored as inf
_BACKENDS = ("native", "faiss")


def _ext():
    """The C++ extension. It links OpenMP (libgomp.so.1): torch is imported first where it is installed, so both
    share torch's copy (torch's wheels ship one) rather than a host libgomp loaded by whichever came first."""
    global _TOPK
    if _TOPK is None:
        import importlib.util

        if importlib.util.find_spec("torch") is not None:
            import torch  # noqa: F401
        try:
            from . import _topk
        except ImportError as e:
            if "libgomp" not in str(e):
                raise
            raise ImportError(f"uae_fast's top-k extension needs the OpenMP runtime libgomp.so.1 ({e}): install torch "
                              f"whose wheel ships it under that name (2.7.1 or later), or the system's (apt install libgomp1)") from None
        _TOPK = _topk
    return _TOPK


_TOPK = None


# ---- input checks (shared by both backends) ----------------------------------------------------


def _is_torch(x) -> bool:
    t = type(x)
    return t.__module__.startswith("torch") and t.__name__ in ("Tensor", "Parameter")


def _check_torch_storage(name: str, x) -> None:
    """Tensors whose values cannot be read as a dense array get one clear line, not a torch internals error."""
    import torch

    if x.device.type == "meta":
        raise ValueError(f"{name} is a meta tensor (shape only, no data): pass a CPU or CUDA tensor")
    if x.layout != torch.strided:
        raise TypeError(f"{name} is a {str(x.layout).replace('torch.', '')} tensor: pass a dense tensor (x.to_dense())")


def _as_f32_2d(name: str, x, dim: int) -> np.ndarray:
    """Any numpy array / torch tensor of floats, any contiguity -> C-contiguous float32 [m, dim], finite."""
    if _is_torch(x):
        import torch

        _check_torch_storage(name, x)
        if not x.is_floating_point():
            raise TypeError(f"{name} must hold floating-point values, got torch dtype {str(x.dtype).replace('torch.', '')}")
        arr = x.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
    elif isinstance(x, np.ndarray):
        if x.dtype.kind != "f":
            raise TypeError(f"{name} must hold floating-point values, got numpy dtype {x.dtype}")
        with np.errstate(over="ignore"):  # out-of-range float64 becomes inf: rejected just below
            arr = np.ascontiguousarray(x, dtype=np.float32)
    else:
        raise TypeError(f"{name} must be a numpy array or a torch tensor, got {type(x).__name__}")
    if arr.ndim == 1:
        arr = arr.reshape(1, -1)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be [n, {dim}] (or a single [{dim}] vector), got shape {tuple(arr.shape)}")
    if arr.shape[1] != dim:
        raise ValueError(f"{name} has dimension {arr.shape[1]}, but the index holds {dim}-dimensional vectors")
    bad = arr.size - int(np.count_nonzero(np.isfinite(arr)))
    if bad:
        raise ValueError(f"{name} contains {bad} NaN or inf value(s) (after conversion to float32)")
    return arr


def _max_norm(x: np.ndarray) -> float:
    if not x.size:
        return 0.0
    sq = float(np.einsum("ij,ij->i", x, x).max())  # float32: 10x faster than float64, overflows past |x| ~ 1.8e19
    if not math.isfinite(sq):
        sq = float(np.einsum("ij,ij->i", x, x, dtype=np.float64).max())
    return math.sqrt(sq)


def _normalize(name: str, x: np.ndarray) -> np.ndarray:
    norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))
    zero = np.flatnonzero(norms == 0)
    if zero.size:
        raise ValueError(f"{name} row {int(zero[0])} has zero norm: cosine similarity is undefined for it")
    inv = 1.0 / norms
    if float(inv.max()) > 1e38:  # a norm below float32's range of inverses: divide in float64 (rare)
        return (x / norms[:, None]).astype(np.float32, copy=False)
    # float32 product: a float64 quotient would hold twice the input's size at its peak
    return x * inv.astype(np.float32)[:, None]


def _as_ids(ids, m: int) -> np.ndarray:
    """Explicit ids -> int64 [m], each >= 0 and unique within the batch (uniqueness against the index: _take_ids)."""
    if _is_torch(ids):
        _check_torch_storage("ids", ids)
        ids = ids.detach().cpu().numpy()
    if isinstance(ids, (list, tuple, range)):  # plain Python ints, as in add(x, ids=[3, 4, 5])
        ids = np.asarray(ids) if len(ids) else np.zeros(0, np.int64)
    if not isinstance(ids, np.ndarray):
        raise TypeError(f"ids must be a list, numpy array or torch tensor of integers, got {type(ids).__name__}")
    if ids.dtype.kind not in "iu":
        raise TypeError(f"ids must hold integers, got dtype {ids.dtype}")
    if ids.shape != (m,):
        raise ValueError(f"ids must have shape ({m},) to match x, got {tuple(ids.shape)}")
    if ids.dtype.kind == "u" and ids.size and int(ids.max()) > np.iinfo(np.int64).max:
        raise ValueError("ids do not fit in int64")
    out = ids.astype(np.int64)
    if out.size and int(out.min()) < 0:
        raise ValueError("ids must be >= 0 (-1 marks a missing result)")
    dup = _first_duplicate(out)
    if dup is not None:
        raise ValueError(f"ids holds {dup} more than once: every stored vector needs its own id")
    return out


def _first_duplicate(ids: np.ndarray) -> Optional[int]:
    """A value occurring twice in ``ids``, or None. O(n) for increasing ids (the usual case), else a sort."""
    if ids.size < 2 or bool(np.all(ids[1:] > ids[:-1])):
        return None
    s = np.sort(ids)
    same = np.flatnonzero(s[1:] == s[:-1])
    return int(s[same[0]]) if same.size else None


def _check_k(k, ntotal: int, what: str = "vectors") -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    k = int(k)
    if ntotal == 0:
        raise ValueError(f"the index is empty: add {what} before searching")
    if k < 1 or k > ntotal:
        raise ValueError(f"k must be in [1, {ntotal}] (the number of stored {what}), got {k}")
    return k


def _check_candidates(candidates) -> Optional[int]:
    if candidates is None:
        return None
    if isinstance(candidates, bool) or not isinstance(candidates, (int, np.integer)) or candidates < 1:
        raise ValueError(f"candidates must be a positive int or None, got {candidates!r}")
    return int(candidates)  # no upper bound: search keeps min(candidates, ntotal)


def _check_span(start, stop, n: int) -> Tuple[int, int]:
    stop = n if stop is None else stop
    ints = all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in (start, stop))
    if not ints or not 0 <= start <= stop <= n:
        raise ValueError(f"need integers 0 <= start <= stop <= {n}, got start={start!r}, stop={stop!r}")
    return int(start), int(stop)


def _check_threads(threads) -> Optional[int]:
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or not 1 <= threads <= 65536:
        raise ValueError(f"threads must be a positive int (<= 65536) or None (all cores), got {threads!r}")
    return int(threads)


def _why(e: BaseException) -> str:
    """Last line of a (FAISS C++) exception message: the reason, without the C++ stack context."""
    lines = str(e).strip().splitlines()
    return lines[-1] if lines else type(e).__name__


def _aligned_zeros(nbytes: int, dtype=np.uint8) -> np.ndarray:
    # 64-byte aligned so panels start on cache lines (numpy only promises 16).
    itemsize = np.dtype(dtype).itemsize
    raw = np.zeros(nbytes + _ALIGN, dtype=np.uint8)
    off = (-raw.ctypes.data) % _ALIGN
    return raw[off : off + nbytes].view(dtype)


def _wrap(like_torch: bool, scores: np.ndarray, ids: np.ndarray):
    if like_torch:
        import torch

        return torch.from_numpy(scores), torch.from_numpy(ids)
    return scores, ids


# ---- file format ---------------------------------------------------------------------------------
# magic "UAETOPK1" | u64 header length | u32 crc32(header) | 4 pad | header JSON | sections, each
# 64-byte aligned. The header lists every section's offset, size, dtype, shape and crc32.


def _write_file(path: str, meta: dict, sections: dict) -> None:
    if os.path.isdir(path):
        raise IsADirectoryError(f"cannot save the index to {path}: it is a directory; give a file path")
    layout, offset = {}, 0
    for name, arr in sections.items():
        arr = np.ascontiguousarray(arr)
        layout[name] = {
            "offset": offset,
            "nbytes": int(arr.nbytes),
            "dtype": arr.dtype.str,
            "shape": list(arr.shape),
            "crc32": zlib.crc32(memoryview(arr.reshape(-1).view(np.uint8))) & 0xFFFFFFFF,
        }
        offset += -(-arr.nbytes // _ALIGN) * _ALIGN
    header = dict(meta, format=_FORMAT, sections=layout)
    body = json.dumps(header, sort_keys=True).encode()
    start = -(-(_PREFIX.size + len(body)) // _ALIGN) * _ALIGN
    body = body.ljust(start - _PREFIX.size, b" ")
    from .data import atomic_write

    with atomic_write(path, "wb") as f:  # a crash mid-save never leaves a truncated file at `path`
        f.write(_PREFIX.pack(_MAGIC, len(body), zlib.crc32(body) & 0xFFFFFFFF))
        f.write(body)
        for name, arr in sections.items():
            f.seek(start + layout[name]["offset"])
            f.write(memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8)))
        f.truncate(start + offset)


def _read_file(path: str, mmap: bool, verify: Optional[bool], body: Tuple[str, ...] = ()):
    """(header dict, {section name: array}). Every section's crc32 is checked, except those named in
    ``body`` (the bulk vector data, memory-mapped), which are checked only when ``verify`` (default:
    ``not mmap``, since that reads the whole file). Anything malformed raises one ValueError."""

    def corrupt(why):
        return ValueError(f"{path} is not a valid uae_fast index file ({why})")

    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(_PREFIX.size)
        if len(prefix) < _PREFIX.size:
            raise corrupt("file too short")
        magic, hlen, hcrc = _PREFIX.unpack(prefix)
        if magic != _MAGIC:
            raise corrupt("bad magic bytes")
        if hlen > min(size, 1 << 24):
            raise corrupt("header length out of range")
        raw = f.read(hlen)
    if len(raw) != hlen:
        raise corrupt("truncated header")
    if zlib.crc32(raw) & 0xFFFFFFFF != hcrc:
        raise corrupt("header checksum mismatch")
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as e:  # RecursionError: crafted deep nesting
        raise corrupt(f"unreadable header: {type(e).__name__}: {e}") from None
    if not isinstance(header, dict) or header.get("format") != _FORMAT:
        raise corrupt(f"unsupported format version {header.get('format') if isinstance(header, dict) else None!r}")
    start = _PREFIX.size + hlen
    verify_body = (not mmap) if verify is None else bool(verify)
    arrays = {}
    secs = header.get("sections")
    if not isinstance(secs, dict):
        raise corrupt("no section table")
    for name, s in secs.items():
        off, nbytes, shape, dt, crc = _section_entry(name, s, corrupt)
        if start + off + nbytes > size:
            raise corrupt(f"truncated: section {name!r} ends at byte {start + off + nbytes}, file has {size}")
        if nbytes == 0:
            arr = np.zeros(shape, dt)
        elif mmap:
            arr = np.memmap(path, dtype=dt, mode="r", offset=start + off, shape=shape)
        else:
            arr = np.fromfile(path, dtype=dt, count=nbytes // dt.itemsize, offset=start + off).reshape(shape)
        if (verify_body or name not in body) and zlib.crc32(memoryview(arr.reshape(-1).view(np.uint8))) & 0xFFFFFFFF != crc:
            raise corrupt(f"section {name!r} checksum mismatch")
        arrays[name] = arr
    return header, arrays


def _section_entry(name, s, corrupt):
    """(offset, nbytes, shape, dtype, crc32) of one section-table entry, all in range, or ValueError."""
    try:
        off, nbytes, crc = (_json_int(s[key]) for key in ("offset", "nbytes", "crc32"))
        shape = tuple(_json_int(v) for v in s["shape"])
        dt = np.dtype(s["dtype"]) if isinstance(s["dtype"], str) else None
    except (KeyError, TypeError, ValueError) as e:
        raise corrupt(f"section {name!r}: {type(e).__name__}: {e}") from None
    # Only the plain numeric dtypes the writer produces: no objects, records, strings or odd sizes.
    if dt is None or dt.kind not in "iuf" or dt.itemsize not in (1, 2, 4, 8):
        raise corrupt(f"section {name!r} has an unsupported dtype {s['dtype']!r}")
    if off < 0 or nbytes < 0 or not 0 <= crc <= 0xFFFFFFFF or any(v < 0 for v in shape) or len(shape) > 8:
        raise corrupt(f"section {name!r} has a negative size or offset, or a bad shape or checksum")
    if math.prod(shape) * dt.itemsize != nbytes:  # Python ints: no int64 wrap-around for crafted shapes
        raise corrupt(f"section {name!r}: shape {shape} x {dt} != {nbytes} bytes")
    return off, nbytes, shape, dt, crc


def _json_int(v) -> int:
    """A header integer: a JSON int (not a bool, float or string), so crafted values fail as TypeError."""
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"expected an integer, got {v!r}"[:200])
    return v


# ---- the index -----------------------------------------------------------------------------------


class TopKIndex:
    """Top-k inner-product (or cosine) search over stored embeddings.

    Args:
        dim: vector dimension.
        dtype: storage of the native backend: ``"float32"`` (exact), ``"bfloat16"`` or ``"int8"``
            (per-vector scale). Compact dtypes rescore their ``candidates`` exactly.
        metric: ``"ip"`` (inner product) or ``"cosine"`` (vectors and queries are L2-normalised;
            zero vectors are rejected).
        backend: ``"native"`` (C++ exact search) or ``"faiss"``.
        factory: FAISS ``index_factory`` string (faiss backend only), e.g. ``"Flat"``,
            ``"IVF1024,Flat"``, ``"HNSW32"``.
        threads: search threads (``None`` = all cores, OpenMP's default).
        candidates: compact dtypes only: candidates kept per query by the compact score and rescored
            exactly (default ``max(2 * k, k + 32)``).
        refine: ``dtype="int8"`` only: also store the int8-coded rounding residual of every vector
            (one more byte per value, read only for the candidates, never scanned), so candidates are
            rescored at ~15-bit precision: float32-level recall at int8 scan speed, half float32's memory.

    Inputs are numpy arrays or torch tensors of any float dtype and contiguity; ``search`` returns
    numpy arrays for numpy queries and CPU torch tensors for torch queries.
    """

    def __new__(cls, dim=None, *args, backend: str = "native", **kwargs):
        if cls is TopKIndex and backend == "faiss":
            cls = FaissTopKIndex
        return super().__new__(cls)

    def __init__(
        self,
        dim: int,
        *,
        dtype: str = "float32",
        metric: str = "ip",
        backend: str = "native",
        threads: Optional[int] = None,
        candidates: Optional[int] = None,
        refine: bool = False,
        factory: Optional[str] = None,
    ):
        if backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
        if factory is not None:
            raise ValueError("factory= is a FAISS index_factory string: pass backend='faiss' with it")
        self._init_common(dim, metric, backend, threads)
        if not isinstance(dtype, str) or _DTYPE_ALIASES.get(dtype, dtype) not in _DTYPES:
            raise ValueError(f"dtype must be one of {tuple(_DTYPES)}, got {dtype!r}")
        self.dtype = _DTYPE_ALIASES.get(dtype, dtype)
        self._code = _DTYPES[self.dtype]
        if self.dtype == "int8" and self.dim > _ext().max_dim_int8:  # the extension's int32 sums would overflow
            raise ValueError(f"dim must be <= {_ext().max_dim_int8} for dtype='int8', got {self.dim}; "
                             f"use float32 or bfloat16")
        self.candidates = _check_candidates(candidates)
        if refine and self.dtype != "int8":
            raise ValueError(f"refine=True is for dtype='int8' (got dtype={self.dtype!r})")
        self.refine = bool(refine)
        self._dpad, self._panel_bytes = _ext().layout(self._code, self.dim)
        self._n = 0
        self._data = np.zeros(0, np.uint8)
        self._scales = np.zeros(0, np.float32)
        self._rowsums = np.zeros(0, np.int32)
        self._resid = np.zeros((0, self.dim), np.int8) if self.refine else None
        self._rscales = np.zeros(0, np.float32) if self.refine else None
        self._ids = np.zeros(0, np.int64)

    def _init_common(self, dim, metric, backend, threads):
        max_dim = _ext().max_dim
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or not 1 <= dim <= max_dim:
            raise ValueError(f"dim must be a positive int <= {max_dim}, got {dim!r}")
        if metric not in _METRICS:
            raise ValueError(f"metric must be one of {_METRICS}, got {metric!r}")
        self.dim = int(dim)
        self.metric = metric
        self.backend = backend
        self._threads = _check_threads(threads)
        # search() snapshots under _lock and runs without it (concurrent searches); add() and save() take
        # _add_lock (one at a time) and hold _lock only to publish new rows, so a search never waits for them.
        self._lock = threading.Lock()
        self._add_lock = threading.Lock()
        self._force_threads = False  # tests: use exactly `threads` even for tiny searches
        self._next_id = 0  # 1 + the largest id ever stored: default ids start here, so they never repeat one
        self._max_norm: Optional[float] = 0.0  # largest stored |x| (None: unknown, a file from before it was saved)

    # -- common API ------------------------------------------------------------------------------

    @property
    def threads(self) -> Optional[int]:
        """Search threads (None = all cores)."""
        return self._threads

    @threads.setter
    def threads(self, value: Optional[int]) -> None:
        self._threads = _check_threads(value)

    def __len__(self) -> int:
        return self._n

    @property
    def ntotal(self) -> int:
        return self._n

    @property
    def ids(self) -> np.ndarray:
        """Ids of the stored vectors in insertion order (read-only view)."""
        v = self._ids[: self._n].view()
        v.flags.writeable = False
        return v

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(dim={self.dim}, n={len(self)}, dtype={self.dtype!r}, "
                f"metric={self.metric!r}, backend={self.backend!r})")

    def _prepare(self, name: str, x) -> np.ndarray:
        arr = _as_f32_2d(name, x, self.dim)
        if self.dtype == "bfloat16" and arr.size and float(np.abs(arr).max()) > _BF16_MAX:
            raise ValueError(f"{name} holds values beyond bfloat16's range (|v| <= {_BF16_MAX:.4g}): rescale, or use dtype='float32'")
        return _normalize(name, arr) if self.metric == "cosine" else arr

    def _norm_of(self, arr: np.ndarray) -> float:
        return 1.0 if self.metric == "cosine" else _max_norm(arr)

    def _grow_max_norm(self, norm: float) -> None:
        """With the lock held, after storing rows whose largest norm is ``norm`` (:meth:`_norm_of`)."""
        if self._max_norm is not None:  # None: unknown until a search measures every row
            self._max_norm = max(self._max_norm, norm)

    def _check_score_range(self, q: np.ndarray, max_norm: Optional[float]) -> None:
        bound = self._norm_of(q) * (max_norm or 0.0)
        if bound > _SCORE_BOUND:
            raise ValueError(f"scores could overflow float32: |query| x |stored vector| reaches {bound:.3g} "
                             f"(> {_SCORE_BOUND:.0e}); rescale the embeddings (or use metric='cosine')")

    @staticmethod
    def _check_scores(scores: np.ndarray, bounded: bool) -> None:
        # Backstop: never return an overflowed ranking. With ``bounded`` (the largest stored norm is known),
        # _check_score_range has kept |q| x |x| below 1e38, so an inf or NaN means stored data that is not what
        # was added (a damaged file opened without its data checksum), not embeddings that are too large.
        if not bool(np.isfinite(scores).all()):
            if bounded:
                raise ValueError("scores are inf or NaN although |query| x |stored vector| is within float32: the "
                                 "stored vectors may be damaged (open the file with load(..., verify=True))")
            raise ValueError("scores overflowed float32 (inf or NaN inner products): rescale the embeddings")

    @contextlib.contextmanager
    def _taking_ids(self, ids: Optional[np.ndarray], m: int):
        """:meth:`_take_ids` for an add that stores its rows inside the block: if storing fails (a MemoryError, an
        interrupt, a FAISS error), the ids are given back, so default ids never skip rows that were not stored."""
        first_free = self._next_id
        try:
            yield self._take_ids(ids, m)
        except BaseException:
            self._next_id = first_free
            raise

    def _take_ids(self, ids: Optional[np.ndarray], m: int) -> np.ndarray:
        """Ids for ``m`` new vectors (``ids``: checked explicit ids, or None for defaults). Call with the
        lock held: it reads and advances the id counter, so concurrent adds never share an id."""
        if ids is None:
            if self._next_id + m - 1 > np.iinfo(np.int64).max:
                raise ValueError(f"no default ids left after id {self._next_id - 1}: pass explicit ids")
            ids = np.arange(self._next_id, self._next_id + m, dtype=np.int64)
        elif m and int(ids.min()) < self._next_id and self._n:  # could repeat a stored id: check them
            taken = np.isin(ids, self._ids[: self._n])
            if taken.any():
                raise ValueError(f"id {int(ids[np.argmax(taken)])} is already in the index: ids must be unique")
        if m:
            self._next_id = max(self._next_id, int(ids.max()) + 1)
        return ids

    # -- native backend --------------------------------------------------------------------------

    @property
    def nbytes(self) -> int:
        """Bytes of vector storage in use (panels + scales + ids), excluding spare capacity."""
        panels = -(-self._n // 16)
        extra = panels * 16 * 8 if self._code == 2 else 0
        if self.refine:
            extra += self._n * (self.dim + 4)
        return panels * self._panel_bytes + extra + self._n * 8

    def _reserve(self, n_new: int) -> None:
        need_panels = -(-n_new // 16)
        cap_panels = self._data.size // self._panel_bytes if self._panel_bytes else 0
        # Every array must have room: a loaded index's ids (and residuals) hold exactly ntotal rows while its
        # last panel may have free rows.
        rows = [self._data, self._ids] + ([self._resid, self._rscales] if self.refine else [])
        if (need_panels <= cap_panels and self._ids.size >= n_new and self._scales.size >= need_panels * 16
                and self._rowsums.size >= need_panels * 16 and (not self.refine or self._resid.shape[0] >= n_new)
                and all(a.flags.writeable for a in rows)):
            return
        # Geometric growth keeps add() amortised O(rows); read-only (memory-mapped) storage is
        # copied into owned arrays on the first add.
        cap = max(need_panels, cap_panels + cap_panels // 2 if self._data.flags.writeable else need_panels, 4)
        data = _aligned_zeros(cap * self._panel_bytes)
        data[: self._data.size] = self._data
        scales = _aligned_zeros(cap * 16 * 4, np.float32)
        scales[: self._scales.size] = self._scales
        rowsums = _aligned_zeros(cap * 16 * 4, np.int32)
        rowsums[: self._rowsums.size] = self._rowsums
        ids = np.zeros(cap * 16, np.int64)
        ids[: self._n] = self._ids[: self._n]
        if self.refine:
            resid = _aligned_zeros(cap * 16 * self.dim, np.int8).reshape(cap * 16, self.dim)
            resid[: self._n] = self._resid[: self._n]
            rscales = np.zeros(cap * 16, np.float32)
            rscales[: self._n] = self._rscales[: self._n]
            with self._lock:
                self._resid, self._rscales = resid, rscales
        with self._lock:  # rows < n are the same in the old and new arrays: a search may snapshot either
            self._data, self._scales, self._rowsums, self._ids = data, scales, rowsums, ids

    def add(self, x, ids=None) -> None:
        """Add vectors ``x`` [n, dim] (or one [dim] vector) with optional int64 ``ids``.

        Ids are unique: default ids continue after the largest id stored so far (0, 1, ... for an index
        built with default ids only); explicit ids must be >= 0 and new, else ValueError (checking them
        costs O(n) only when they are not all larger than every stored id).
        """
        arr = self._prepare("x", x)
        m = arr.shape[0]
        ids = None if ids is None else _as_ids(ids, m)
        if m == 0:
            return
        with self._add_lock:
            with self._taking_ids(ids, m) as new_ids:  # nothing is published until the pack has succeeded
                self._reserve(self._n + m)
                n = self._n  # rows >= n are written below while searches read only rows < n
                _ext().pack(self._code, arr, self._data, self._scales, self._rowsums, n, self._resid, self._rscales,
                            threads=self._threads or 0)
            self._ids[n : n + m] = new_ids
            norm = self._norm_of(arr)
            with self._lock:  # publish: searches from here on see the new rows
                self._grow_max_norm(norm)
                self._n = n + m

    def _rollback(self, n: int, next_id: int) -> None:
        """Forget the rows added after there were ``n`` (HybridIndex, when its lexical side failed to publish):
        searches stop seeing them and default ids continue from ``next_id``. The largest norm stays an upper bound."""
        with self._add_lock, self._lock:
            self._n, self._next_id = min(self._n, n), next_id

    def search(self, queries, k: int) -> Tuple:
        """Top-``k`` stored vectors per query: ``(scores [Q, k] float32, ids [Q, k] int64)``, best first.

        Ties: higher score first, then the earlier-added vector. Compact dtypes return exact scores of
        the stored (rounded) vectors for their ``candidates`` best compact scores.
        """
        return self._search(queries, k)

    def _search(self, queries, k: int, rows: Optional[int] = None) -> Tuple:
        """:meth:`search` over the first ``rows`` stored vectors (default all): HybridIndex searches the rows its
        lexical side also holds while an add is in flight."""
        like_torch = _is_torch(queries)
        q = self._prepare("queries", queries)
        with self._lock:  # snapshot: a concurrent add() never changes what this search reads
            n, data, scales, rowsums, ids = self._n, self._data, self._scales, self._rowsums, self._ids
            resid, rscales, max_norm = self._resid, self._rscales, self._max_norm
        n = n if rows is None else min(n, rows)
        k = _check_k(k, n)
        if max_norm is None:  # a file from before max_norm was saved: measure it once (one pass, like a search)
            max_norm = max((_max_norm(self._unpack(i, min(n, i + 65536))) for i in range(0, n, 65536)), default=0.0)
            with self._lock:
                if self._max_norm is None:
                    self._max_norm = max_norm
        self._check_score_range(q, max_norm)
        cand = min(n, self.candidates if self.candidates is not None else max(2 * k, k + 32))
        threads = self._threads or _ext().max_threads()
        scores, pos = _ext().search(self._code, self.dim, data, scales, rowsums, n, q, k, int(cand), threads,
                                    resid=resid, rscales=rscales, force_threads=self._force_threads)
        self._check_scores(scores, True)  # k <= n: a -1 (score -inf) only ever comes from a NaN score
        out_ids = np.where(pos >= 0, ids[np.maximum(pos, 0)], -1) if n else pos
        return _wrap(like_torch, scores, out_ids.astype(np.int64, copy=False))

    def reconstruct(self, start: int = 0, stop: Optional[int] = None) -> np.ndarray:
        """Stored vectors ``[start, stop)`` in insertion order as float32 (dequantised for compact dtypes)."""
        start, stop = _check_span(start, stop, self._n)
        return self._unpack(start, stop)

    def _unpack(self, start: int, stop: int) -> np.ndarray:
        # Only the panels holding [start, stop): storage is 16-row panels, per-row arrays alongside.
        r0 = start - start % 16
        resid = None if self._resid is None else self._resid[r0:]
        rscales = None if self._rscales is None else self._rscales[r0:]
        rows = _ext().unpack(self._code, self.dim, self._data[(r0 // 16) * self._panel_bytes :], self._scales[r0:],
                             self._rowsums[r0:], stop - r0, resid, rscales)
        return rows[start - r0 :]

    def _meta(self) -> dict:
        return {"backend": self.backend, "dim": self.dim, "metric": self.metric, "dtype": self.dtype, "ntotal": self._n,
                "max_norm": self._max_norm}

    def save(self, path) -> None:
        """Write the index to ``path`` (atomically: a temporary file renamed over it)."""
        path = os.fspath(path)
        with self._add_lock:  # no add() writes meanwhile; searches go on
            n = self._n
            panels = -(-n // 16)
            sections = {"ids": self._ids[:n], "data": self._data[: panels * self._panel_bytes]}
            if self._code == 2:
                sections["scales"] = self._scales[: panels * 16]
                sections["rowsums"] = self._rowsums[: panels * 16]
            if self.refine:
                sections["resid"] = self._resid[:n]
                sections["rscales"] = self._rscales[:n]
            meta = dict(self._meta(), dpad=self._dpad, panel_bytes=self._panel_bytes, candidates=self.candidates,
                        refine=self.refine)
            _write_file(path, meta, sections)

    @classmethod
    def load(
        cls, path, mmap: bool = True, *, verify: Optional[bool] = None, threads: Optional[int] = None
    ) -> "TopKIndex":
        """Open an index written by :meth:`save`.

        ``mmap=True`` maps the vectors read-only (opens instantly, pages load on first search; the
        first ``add`` copies them into memory). The header, the ids and every other small section
        (int8 scales, the FAISS blob) are always checked against their crc32; ``verify`` also checks
        the vector data (default: only when ``mmap=False``, since that reads the whole file). A
        corrupt or truncated file raises ValueError ("... is not a valid uae_fast index file ...").
        """
        path = os.fspath(path)
        _check_threads(threads)  # the caller's argument, not the file: checked before reading it
        header, arrays = _read_file(path, mmap, verify, body=("data", "resid"))

        def corrupt(why):
            return ValueError(f"{path} is not a valid uae_fast index file ({why})")

        try:
            backend, metric = header["backend"], header["metric"]
            dim, ntotal = _json_int(header["dim"]), _json_int(header["ntotal"])
        except (KeyError, TypeError) as e:
            raise corrupt(f"missing or bad field {e}") from None
        if backend not in _BACKENDS or metric not in _METRICS or dim < 1 or ntotal < 0:
            raise corrupt("bad backend, metric, dim or ntotal")
        # the small sections live in memory, not in the mapping: a file rewritten in place after load
        # cannot change the ids (or int8 scales) an open index returns
        arrays.update({k: np.array(v) for k, v in arrays.items() if k in ("ids", "scales", "rowsums", "rscales")})
        ids = arrays.get("ids")
        if ids is None or ids.shape != (ntotal,) or ids.dtype != np.int64:
            raise corrupt("ids section does not match ntotal")
        if ntotal and int(ids.min()) < 0:
            raise corrupt("ids section holds a negative id")
        max_norm = header.get("max_norm")  # absent in files from before it was saved: unknown
        if max_norm is not None and (isinstance(max_norm, bool) or not isinstance(max_norm, (int, float))
                                     or not 0 <= max_norm < math.inf):
            raise corrupt(f"bad max_norm {max_norm!r}")
        dup = _first_duplicate(ids)
        if dup is not None:
            raise corrupt(f"ids section holds id {dup} more than once")
        if backend == "faiss":
            out = FaissTopKIndex._from_file(header, arrays, threads, corrupt)
            out._max_norm = max_norm
            return out
        dtype = header.get("dtype")
        if dtype not in _DTYPES:
            raise corrupt(f"unknown dtype {dtype!r}")
        try:
            index = TopKIndex(dim, dtype=dtype, metric=metric, threads=threads, candidates=header.get("candidates"),
                              refine=header.get("refine", False) is True)
        except (TypeError, ValueError) as e:
            raise corrupt(str(e)) from None
        # the panel layout this build scans: a file written by a build with another padding or panel size
        # (same byte count by chance) would be read with the wrong strides, so it must match exactly
        for key, want in (("dpad", index._dpad), ("panel_bytes", index._panel_bytes)):
            if key in header and header[key] != want:
                raise corrupt(f"its {key} {header[key]!r} is not this build's {want} for {dtype} dim {dim} "
                              f"(written by another version of uae_fast?)")
        panels = -(-ntotal // 16)
        data = arrays.get("data")
        if data is None or data.dtype != np.uint8 or data.shape != (panels * index._panel_bytes,):
            raise corrupt(f"data section does not hold {ntotal} {dtype} vectors of dim {dim}")
        if index._code == 2:
            sc, rs = arrays.get("scales"), arrays.get("rowsums")
            if (sc is None or rs is None or sc.shape != (panels * 16,) or rs.shape != (panels * 16,)
                    or sc.dtype != np.float32 or rs.dtype != np.int32):
                raise corrupt("int8 scales/rowsums sections missing or mis-sized")
            index._scales, index._rowsums = sc, rs
        if index.refine:
            re, rsc = arrays.get("resid"), arrays.get("rscales")
            if (re is None or rsc is None or re.shape != (ntotal, dim) or rsc.shape != (ntotal,)
                    or re.dtype != np.int8 or rsc.dtype != np.float32):
                raise corrupt("int8 refine sections missing or mis-sized")
            index._resid, index._rscales = re, rsc
        index._data, index._ids, index._n = data, ids, ntotal
        index._next_id = int(ids.max()) + 1 if ntotal else 0
        index._max_norm = max_norm
        return index


class FaissTopKIndex(TopKIndex):
    """``TopKIndex(dim, backend="faiss", factory=...)``: the same interface over a FAISS index.

    ``factory`` is any FAISS ``index_factory`` string; the metric is inner product (cosine normalises
    first). IVF indexes train on the first ``add`` (or call :meth:`train`); ``nprobe`` (IVF) and
    ``ef_search`` (HNSW) trade recall for speed. Uses faiss-gpu when installed and a GPU is visible
    (``gpu=False`` to stay on CPU). Approximate indexes may return fewer than k hits: missing ones are
    id -1, score -inf. ``threads`` sets FAISS's process-wide OpenMP thread count. ``load(mmap=...)``
    reads the FAISS part into memory (FAISS deserialises it).
    """

    def __init__(
        self,
        dim: int,
        *,
        dtype: str = "float32",
        metric: str = "ip",
        backend: str = "faiss",
        factory: str = "Flat",
        threads: Optional[int] = None,
        nprobe: Optional[int] = 32,
        ef_search: Optional[int] = 128,
        gpu: Optional[bool] = None,
        _index=None,
    ):
        try:
            import faiss
        except ImportError as e:  # pragma: no cover - faiss is a test dependency
            raise ImportError("backend='faiss' needs faiss: pip install faiss-cpu (or faiss-gpu-cu12)") from e
        self._init_common(dim, metric, "faiss", threads)
        if _DTYPE_ALIASES.get(dtype, dtype) != "float32":
            raise ValueError(
                f"backend='faiss' stores what the factory string says: use dtype='float32' and e.g. "
                f"factory='SQ8' instead of dtype={dtype!r}"
            )
        if not isinstance(factory, str) or not factory:
            raise ValueError(f"factory must be a FAISS index_factory string, got {factory!r}")
        if factory.strip().upper().startswith("IDMAP"):  # FAISS's IDMap takes add_with_ids only
            raise ValueError(f"factory {factory!r}: TopKIndex keeps the ids itself; drop the IDMap prefix")
        self.dtype = "float32"
        self.factory = factory
        self._faiss = faiss
        if _index is None:
            try:
                _index = faiss.index_factory(self.dim, factory, faiss.METRIC_INNER_PRODUCT)
            except RuntimeError as e:
                raise ValueError(f"FAISS rejected factory {factory!r}: {_why(e)}") from None
        self._cpu_index = _index
        self._index = self._maybe_gpu(_index, gpu)
        self._n = int(_index.ntotal)
        self._ids = np.zeros(0, np.int64)
        for name, value in (("nprobe", nprobe), ("ef_search", ef_search)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))
                                      or not 1 <= value < 2**31):
                raise ValueError(f"{name} must be a positive int (< 2**31) or None, got {value!r}")
        self.nprobe, self.ef_search = nprobe, ef_search
        self._apply_params()

    def _maybe_gpu(self, index, gpu):
        faiss = self._faiss
        have = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
        if gpu and not have:
            raise ValueError("gpu=True but this faiss build sees no GPU (install faiss-gpu and check CUDA_VISIBLE_DEVICES)")
        if gpu is False or not have:
            return index
        try:
            self._gpu_res = faiss.StandardGpuResources()
            return faiss.index_cpu_to_gpu(self._gpu_res, 0, index)
        except RuntimeError:
            if gpu:
                raise
            return index  # e.g. HNSW has no GPU version: stay on CPU

    def _apply_params(self):
        ps = self._faiss.ParameterSpace() if not self._on_gpu else self._faiss.GpuParameterSpace()
        for name, value in (("nprobe", self.nprobe), ("efSearch", self.ef_search)):
            if value is not None:
                try:
                    ps.set_index_parameter(self._index, name, int(value))
                except RuntimeError:
                    pass  # parameter does not apply to this index type

    @property
    def _on_gpu(self) -> bool:
        return self._index is not self._cpu_index

    @property
    def faiss_index(self):
        """The wrapped FAISS index (for FAISS-specific tuning)."""
        return self._index

    @property
    def nbytes(self) -> int:
        return int(self._faiss.serialize_index(self._cpu_index_synced()).nbytes) + self._n * 8

    def _cpu_index_synced(self):
        return self._faiss.index_gpu_to_cpu(self._index) if self._on_gpu else self._cpu_index

    def _set_threads(self):
        if self._threads is not None:
            self._faiss.omp_set_num_threads(self._threads)

    def train(self, x) -> None:
        """Train the FAISS index (IVF/PQ) on representative vectors ``x``."""
        arr = self._prepare("x", x)
        self._set_threads()
        with self._lock:
            self._train_locked(arr)

    def _train_locked(self, arr) -> None:
        try:
            self._index.train(arr)
        except RuntimeError as e:
            why = _why(e)
            raise ValueError(f"FAISS training failed for {self.factory!r} on {arr.shape[0]} vectors: {why}") from None

    def add(self, x, ids=None) -> None:
        arr = self._prepare("x", x)
        m = arr.shape[0]
        ids = None if ids is None else _as_ids(ids, m)
        if m == 0:
            return
        self._set_threads()
        with self._lock:
            if not self._index.is_trained:  # checked under the lock: two first adds must not both train
                self._train_locked(arr)
            with self._taking_ids(ids, m) as new_ids:
                try:
                    self._index.add(arr)
                except RuntimeError as e:
                    raise ValueError(f"FAISS could not add to {self.factory!r}: {_why(e)}") from None
            self._ids = np.concatenate([self._ids[: self._n], new_ids])
            self._grow_max_norm(self._norm_of(arr))
            self._n += m

    _rollback = None  # FAISS cannot forget the last vectors added: HybridIndex leaves such a failure to its checks

    def search(self, queries, k: int) -> Tuple:
        return self._search(queries, k)

    def _search(self, queries, k: int, rows: Optional[int] = None) -> Tuple:
        like_torch = _is_torch(queries)
        q = self._prepare("queries", queries)
        self._set_threads()
        with self._lock:  # one hold: FAISS indexes are not safe to search while add() grows them, and the ids
            n, ids, max_norm = self._n, self._ids, self._max_norm  # must be those of the vectors searched
            rows = n if rows is None else min(n, rows)
            k = _check_k(k, rows)
            self._check_score_range(q, max_norm)
            # FAISS numbers vectors by position (no IDMap): rows beyond `rows` are searched, then dropped
            scores, pos = self._index.search(q, min(n, k + n - rows))
        scores = np.ascontiguousarray(scores, dtype=np.float32)
        miss = (pos < 0) | (pos >= rows)
        if rows < n:  # keep each query's first k others
            keep = np.argsort(miss, axis=1, kind="stable")[:, :k]
            scores, pos, miss = (np.take_along_axis(a, keep, axis=1) for a in (scores, pos, miss))
        self._check_scores(scores[~miss], max_norm is not None)
        out_ids = np.where(miss, -1, ids[np.where(miss, 0, pos)]).astype(np.int64)
        scores[miss] = -np.inf
        return _wrap(like_torch, scores, out_ids)

    def reconstruct(self, start: int = 0, stop: Optional[int] = None) -> np.ndarray:
        start, stop = _check_span(start, stop, self._n)
        try:
            return self._cpu_index_synced().reconstruct_n(start, stop - start)
        except RuntimeError as e:
            raise ValueError(f"FAISS index {self.factory!r} cannot reconstruct vectors: {_why(e)}") from None

    def save(self, path) -> None:
        path = os.fspath(path)
        with self._lock:
            blob = self._faiss.serialize_index(self._cpu_index_synced())
            meta = dict(self._meta(), factory=self.factory, nprobe=self.nprobe, ef_search=self.ef_search)
            _write_file(path, meta, {"ids": self._ids[: self._n], "faiss": blob})

    @classmethod
    def _from_file(cls, header, arrays, threads, corrupt):
        import faiss

        blob = arrays.get("faiss")
        if blob is None or blob.dtype != np.uint8 or blob.ndim != 1:
            raise corrupt("faiss section missing")
        try:  # the blob passed its crc32: only a crafted file (or a FAISS version change) gets here
            index = faiss.deserialize_index(np.ascontiguousarray(blob))
        except (RuntimeError, MemoryError, ValueError) as e:
            raise corrupt(f"FAISS could not read its section: {_why(e)}") from None
        if index.d != int(header["dim"]) or index.ntotal != int(header["ntotal"]):
            raise corrupt("FAISS section does not match the header's dim/ntotal")
        try:
            out = cls(
                int(header["dim"]), metric=header["metric"], factory=str(header.get("factory", "Flat")), threads=threads,
                nprobe=header.get("nprobe"), ef_search=header.get("ef_search"), _index=index,
            )
        except (TypeError, ValueError) as e:
            raise corrupt(str(e)) from None
        out._ids = np.array(arrays["ids"], dtype=np.int64)
        out._next_id = int(out._ids.max()) + 1 if out._n else 0
        return out
