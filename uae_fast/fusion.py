"""Score fusion for hybrid (dense + lexical) retrieval: one config dict, three methods, one function.

A fusion config (what ``uae calibrate-fusion`` writes as JSON; besides the keys below, ``calibration`` (its
record) and ``name`` (a label: ``uae eval``'s row name ``hybrid:NAME``) are kept, any other key refused)::

    {"method": "minmax", "weight": 0.9, "k_each": 100, "rrf_k": 60}

- ``method``: ``"minmax"`` or ``"zscore"`` (convex combination of per-query normalised scores) or
  ``"rrf"`` (weighted reciprocal-rank fusion, Cormack et al., 2009);
- ``weight``: the dense side's weight ``w`` in [0, 1]; fused = ``w * dense + (1 - w) * lexical``
  (``w = 1``: dense order; ``w = 0``: BM25 order, except that BM25's weakest returned hit ties with the
  passages it did not return, a tie broken by dense rank: the missing-score convention below);
- ``k_each``: candidates taken from each side (their union is re-ranked; at least ``k`` are taken);
- ``rrf_k``: RRF's rank offset: a side contributes ``1 / (rrf_k + rank)``.

Normalisation is per query over the scores that side returned: min-max to [0, 1], or z-score. A
candidate one side did not return gets that side's lowest returned value (normalised 0 for min-max, the
lowest z for z-score, no RRF term): it is at most as good there as the worst one returned. A side whose
returned scores are all equal gives each of them 1 and the others 0, as OpenSearch's min-max normaliser does
(a lone BM25 hit, e.g. an exact identifier, got no credit at all before), provided the side returned fewer hits
than it was asked for: a full list of equal scores is a tie cut at ``k_each`` whose other members are unknown,
so it gets 0 like them (else the earliest-added of the tied passages would win). Lexical hits scoring 0 (no
shared term) are not candidates.
Ties: higher fused score, then better dense rank, then better lexical rank, then lower id.
"""
from __future__ import annotations

import json
import math
import numbers
import os
from typing import Optional, Tuple, Union

import numpy as np

METHODS = ("minmax", "zscore", "rrf")
# Chosen on QASPER dev (README, "Hybrid retrieval"): the best config that loses to dense alone with
# neither encoder (R@1: UAE 0.447 -> 0.456, untrained 0.221 -> 0.230); a high dense weight keeps a strong
# model's ranking and lets BM25 break its near-ties. Other corpora: calibrate (uae calibrate-fusion).
DEFAULT_FUSION = {"method": "minmax", "weight": 0.9, "k_each": 100, "rrf_k": 60}


def read_json(path: str, what: str):
    """The JSON value in ``path``; FileNotFoundError / one-line ValueError naming the file otherwise."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    if os.path.isdir(path):
        raise ValueError(f"{path} is a folder; give a {what}")
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a {what} ({getattr(e, 'msg', e)})") from None


def resolve_fusion(fusion: Union[None, str, os.PathLike, dict]) -> dict:
    """A checked fusion config from ``None`` (the default), a dict, or the path of a JSON file."""
    src = "fusion"
    if fusion is None:
        return dict(DEFAULT_FUSION)
    if isinstance(fusion, (str, os.PathLike)):
        src = os.fspath(fusion)
        fusion = read_json(src, "fusion JSON file")
    if not isinstance(fusion, dict):
        raise TypeError(f"{src} must be a dict (method, weight, k_each, rrf_k), got {type(fusion).__name__}")
    # a misspelt key would otherwise leave its default in force without a word ("calibration": calibrate-fusion's record)
    unknown = sorted(set(fusion) - set(DEFAULT_FUSION) - {"calibration", "name"})
    if "name" in fusion and not (isinstance(fusion["name"], str) and fusion["name"].strip()):
        raise ValueError(f"{src}: name must be a non-empty string (a label for the config), got {fusion['name']!r}")
    if unknown:
        raise ValueError(f"{src}: unknown fusion key(s) {unknown}; the keys are {', '.join(DEFAULT_FUSION)}")
    out = dict(DEFAULT_FUSION)
    out.update(fusion)
    if out["method"] not in METHODS:
        raise ValueError(f"{src}: method must be one of {METHODS}, got {out['method']!r}")
    w = out["weight"]
    if isinstance(w, bool) or not isinstance(w, numbers.Real) or not (0.0 <= w <= 1.0):
        raise ValueError(f"{src}: weight must be a number in [0, 1] (the dense side's weight), got {w!r}")
    for key in ("k_each", "rrf_k"):
        v = out[key]
        if (isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v != int(v)
                or v < (1 if key == "k_each" else 0)):
            raise ValueError(f"{src}: {key} must be a {'positive' if key == 'k_each' else 'non-negative'} int, got {v!r}")
        out[key] = int(v)
    out["weight"] = float(w)
    return out


def normalise(scores: np.ndarray, method: str, *, complete: bool = True) -> np.ndarray:
    """Per-query normalised scores (float64) of one side's returned ``scores`` (1-D, best first for rrf).

    All equal (one score, or ties): ones if ``complete`` (the side returned every hit it has, so they beat the
    passages it did not return, at 0), else zeros (a tie cut off at the list's length).
    """
    s = np.asarray(scores, dtype=np.float64)
    if method == "rrf" or s.size == 0:
        return s
    lo, hi = s.min(), s.max()
    sd = (hi - lo) if method == "minmax" else s.std()
    if not sd > 0:
        return np.ones_like(s) if complete else np.zeros_like(s)
    return (s - (lo if method == "minmax" else s.mean())) / sd


def _int_ids(ids, name: str) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.size and not np.issubdtype(ids.dtype, np.integer):  # 5.7 would silently become id 5
        raise TypeError(f"fusion: {name} must be integers, got {ids.dtype}")
    return ids.astype(np.int64, copy=False)


def fuse_one(dense_scores, dense_ids, lex_scores, lex_ids, k: int, fusion: dict) -> Tuple[np.ndarray, np.ndarray]:
    """Fuse one query's two ranked lists (best first; id -1 = missing) into its top ``k``.

    Returns ``(fused scores float64 [<= k], ids int64 [<= k])``, best first.
    """
    method, w, rrf_k = fusion["method"], fusion["weight"], fusion["rrf_k"]
    dense_ids, lex_ids = _int_ids(dense_ids, "dense_ids"), _int_ids(lex_ids, "lex_ids")
    dense_scores, lex_scores = np.asarray(dense_scores, np.float64), np.asarray(lex_scores, np.float64)
    dk = dense_ids >= 0
    lk = (lex_ids >= 0) & (lex_scores > 0)
    complete = (dk.sum() < dk.size, lk.sum() < lk.size)  # fewer hits than asked for: each side's ties are whole
    dense_ids, dense_scores = dense_ids[dk], dense_scores[dk]
    if not (np.isfinite(dense_scores).all() and np.isfinite(lex_scores[lex_ids >= 0]).all()):
        raise ValueError("fusion: a returned score is NaN or infinite (it would silently zero its whole side)")
    lex_ids, lex_scores = lex_ids[lk], lex_scores[lk]
    union = np.union1d(dense_ids, lex_ids)
    big = np.iinfo(np.int64).max
    parts, ranks = [], []
    for ids, scores, whole in ((dense_ids, dense_scores, complete[0]), (lex_ids, lex_scores, complete[1])):
        order = np.argsort(ids, kind="stable")
        at = np.searchsorted(ids[order], union)
        hit = at < ids.size
        hit[hit] &= ids[order][at[hit]] == union[hit]
        pos = np.where(hit, order[np.minimum(at, max(ids.size - 1, 0))] if ids.size else 0, -1)
        if method == "rrf":
            val = np.where(hit, 1.0 / (rrf_k + pos + 1.0), 0.0)
        else:
            n = normalise(scores, method, complete=whole)
            # a missing candidate: the lowest returned value, which is 0 for min-max; 0 below an all-equal side's 1s
            val = np.where(hit, n[np.maximum(pos, 0)] if n.size else 0.0, min(n.min(), 0.0) if n.size else 0.0)
        parts.append(val)
        ranks.append(np.where(hit, pos, big))
    fused = w * parts[0] + (1.0 - w) * parts[1]
    order = np.lexsort((union, ranks[1], ranks[0], -fused))[:k]
    return fused[order], union[order]


def fuse(dense: Tuple[np.ndarray, np.ndarray], lexical: Tuple[np.ndarray, np.ndarray], k: int,
         fusion: Optional[dict] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Fuse batched ``(scores [Q, a], ids [Q, a])`` lists of each side into ``(scores [Q, k] float32, ids [Q, k])``.

    Rows with fewer than ``k`` fused candidates are padded with score -inf, id -1.
    """
    fusion = resolve_fusion(fusion)  # always checked: a dict with a bad weight would fuse silently
    (ds, di), (ls, li) = dense, lexical
    q = di.shape[0]
    out_s = np.full((q, k), -math.inf, dtype=np.float32)
    out_i = np.full((q, k), -1, dtype=np.int64)
    for r in range(q):  # one vectorised fusion per query
        s, i = fuse_one(ds[r], di[r], ls[r], li[r], k, fusion)
        out_s[r, : s.size], out_i[r, : i.size] = s, i
    return out_s, out_i
