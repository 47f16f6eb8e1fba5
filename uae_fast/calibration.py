"""Label-free fusion calibration: ``uae calibrate-fusion`` / :func:`calibrate_fusion`.

A corpus decides how much BM25 should count next to a dense model, and question-answer pairs for that
corpus (the input UAE trains from) are enough to find out, with the teacher as the judge. For each
question (answers known; evidence labels are never read):

1. rank its pool (QASPER: the paper's paragraphs) with the dense model and with BM25;
2. take the union of both sides' top ``candidates`` passages;
3. score them with the teacher (:class:`uae_fast.UtilityScorer`: how much each passage helps it predict
   the answer);
4. for every config of a grid (method x dense weight, pure dense ``w = 1`` and pure BM25 ``w = 0``
   included), fuse the two rankings exactly as :class:`uae_fast.hybrid.HybridIndex` does and record the
   reciprocal rank of the teacher's best candidate among the candidates (``teacher_mrr``) and whether it
   is first (``teacher_success@1``).

The config with the highest ``teacher_mrr`` wins (ties: the higher dense weight, then minmax, zscore,
rrf). Its score is measured on the questions it was chosen on; ``calibration.heldout`` reports the choice's
score on documents it did not see (2-fold, split by document), the figure to compare with pure dense or BM25.
Teacher utilities are appended to a cache file as they are computed (default ``OUT.utilities.jsonl``),
so an interrupted run resumes where it stopped and a second model's calibration on the same questions
re-scores only the candidates it adds.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .fusion import DEFAULT_FUSION, METHODS, fuse_one, resolve_fusion

GRID_WEIGHTS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 1.0)
UTILITY_FORMAT = "uae-fusion-utilities/1"


def fusion_grid(methods: Sequence[str] = METHODS, weights: Sequence[float] = GRID_WEIGHTS, *, k_each: int = 100,
                rrf_k: int = 60) -> List[dict]:
    """Every (method, weight) config; ``w = 1`` once (every method ranks in dense order there). ``w = 0`` stays
    per method: only RRF is BM25's order there (min-max and z-score tie BM25's weakest hit with the passages
    it did not return, a tie dense rank breaks)."""
    if not methods or not weights:
        raise ValueError(f"the fusion grid needs at least one method and one weight, got methods {list(methods)} "
                         f"and weights {list(weights)}")
    resolve_fusion({"k_each": k_each, "rrf_k": rrf_k})  # the checks a saved config meets when it is loaded
    out, seen = [], set()
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {m!r}")
        for w in weights:
            if not 0.0 <= w <= 1.0:
                raise ValueError(f"weights must lie in [0, 1], got {w}")
            key = ("dense", w) if w == 1.0 else (m, w)
            if key not in seen:
                seen.add(key)
                out.append({"method": m, "weight": float(w), "k_each": int(k_each), "rrf_k": int(rrf_k)})
    return out


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    """Positions of the ``k`` best scores (ties: lower position first)."""
    return np.lexsort((np.arange(scores.size), -scores))[:k]


def fused_ranking(dense: np.ndarray, lexical: np.ndarray, cfg: dict) -> np.ndarray:
    """Pool positions in fused order, as a :class:`HybridIndex` over this pool returns them (the union of
    both sides' top ``k_each``), followed by any position neither side returned, in dense order."""
    n = dense.size
    each = min(cfg["k_each"], n)
    d, l = _top(dense, each), _top(lexical, each)
    _, ids = fuse_one(dense[d], d, lexical[l], l, n, cfg)
    if ids.size == n:
        return ids
    seen = np.zeros(n, bool)
    seen[ids] = True
    full = _top(dense, n)
    return np.concatenate([ids, full[~seen[full]]])


def teacher_agreement(dense: np.ndarray, lexical: np.ndarray, cand: np.ndarray, util: np.ndarray, cfg: dict) -> Tuple[float, float]:
    """(reciprocal rank, success@1) of the teacher's best candidate among ``cand`` in the fused order."""
    order = fused_ranking(dense, lexical, cfg)
    rank_of = np.empty(dense.size, np.int64)
    rank_of[order] = np.arange(order.size)
    within = cand[np.argsort(rank_of[cand], kind="stable")]
    best = cand[int(np.argmax(util))]  # ties: the first candidate (pool order)
    r = int(np.flatnonzero(within == best)[0])
    return 1.0 / (r + 1), float(r == 0)


def _preference(cfg: dict, mrr: float) -> tuple:
    return round(mrr, 12), cfg["weight"], -METHODS.index(cfg["method"])


def select_config(grid_results: List[dict]) -> dict:
    """Highest teacher_mrr; ties: higher dense weight, then the method order of METHODS."""
    return max(grid_results, key=lambda g: _preference(g, g["teacher_mrr"]))


def crossfit(grid: List[dict], per_q: List[Tuple[np.ndarray, np.ndarray]], groups: Sequence[str],
             folds: int = 2) -> Optional[dict]:
    """The selection's score on questions it did not see: documents go to ``folds`` folds (alternating, in
    first-seen order), the config is chosen on the other folds' questions and scored on this fold's. The
    chosen config's own ``teacher_mrr`` is measured on the questions it was tuned on (optimistic); this one is
    not. ``per_q[c]`` = (reciprocal ranks, success@1) of config ``c`` per question. None below 2 documents."""
    order = list(dict.fromkeys(groups))
    if len(order) < folds:
        return None
    fold_of = {g: i % folds for i, g in enumerate(order)}
    fold = np.array([fold_of[g] for g in groups])
    rr, s1, picks = np.empty(fold.size), np.empty(fold.size), []
    for f in range(folds):
        train, test = fold != f, fold == f
        c = max(range(len(grid)), key=lambda i: _preference(grid[i], float(per_q[i][0][train].mean())))
        rr[test], s1[test] = per_q[c][0][test], per_q[c][1][test]
        picks.append({k: grid[c][k] for k in ("method", "weight")})
    return {"folds": folds, "split": "by question" if len(order) == len(groups) else "by document",
            "teacher_mrr": float(rr.mean()),
            "teacher_success@1": float(s1.mean()), "picks": picks}


# ------------------------------------------------------------------------------------ utility cache
def _row_key(q, pid: str, text: str) -> str:
    """What a cached utility depends on besides the teacher: the question, its answers and the passage's text.
    A cache reused on edited data (same ids, other text) must not hand back stale utilities."""
    blob = "\x00".join([q.id, pid, q.question, "\x01".join(q.answers), text])
    return hashlib.sha1(blob.encode("utf-8")).hexdigest()[:16]


def _cache_header(path: str) -> Optional[dict]:
    """The header of a utility cache (None: no cache yet); a file that is not one is an error (never to be
    deleted on our advice: it may be a utilities table or data given by mistake). Reads the first line only."""
    if not os.path.exists(path):
        return None
    if os.path.isdir(path):
        raise ValueError(f"--utility-cache {path} is a folder; give a file")
    if os.path.getsize(path) == 0:  # created, killed before its header: a cache yet to be written
        return None
    not_ours = f"--utility-cache {path} is not a fusion utility cache (a file calibrate-fusion wrote); pass another path"
    try:
        with open(path, "r", encoding="utf-8") as f:
            first = f.readline()
    except UnicodeDecodeError:  # gzip or other binary
        raise ValueError(not_ours) from None
    try:  # (a blank first line is no header: appending to it would leave the rows unreadable for ever)
        header = json.loads(first)
    except json.JSONDecodeError:
        header = None
    if not isinstance(header, dict) or header.get("format") != UTILITY_FORMAT:
        raise ValueError(not_ours)
    return header


def _read_cache(path: str, settings: dict) -> Dict[str, float]:
    header = _cache_header(path)
    if header is None:
        return {}
    out: Dict[Tuple[str, str], float] = {}
    old = header.get("settings")
    if isinstance(old, dict) and "teacher_sha1" not in old:  # a cache from before the fingerprint: by name
        settings = {k: v for k, v in settings.items() if k != "teacher_sha1"}
    if old != settings:
        raise ValueError(f"{path} was written with other teacher settings; delete it or pass another --utility-cache")
    with open(path, "r", encoding="utf-8") as f:
        lines = f.read().split("\n")
    for line in lines[1:]:
        try:
            r = json.loads(line)
            u = float(r["utility"])
            if not math.isfinite(u):  # a hand-edited or damaged row: rescored, never a NaN in the objective
                continue
            out[r["key"]] = u
        except (KeyError, TypeError, ValueError):  # ValueError covers JSONDecodeError
            continue  # a torn last line of an interrupted run (or a row of a cache without keys: rescored)
    return out


def _append_cache(path: str, settings: dict, rows: List[dict]) -> None:
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torn = False
    if not new:  # a killed run's torn last line: end it, so the first new row is not glued onto it
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"
    with open(path, "a", encoding="utf-8") as f:
        if torn:
            f.write("\n")
        if new:
            f.write(json.dumps({"format": UTILITY_FORMAT, "settings": settings}, sort_keys=True) + "\n")
        f.write("".join(json.dumps(r) + "\n" for r in rows))
        f.flush()
        os.fsync(f.fileno())


# ------------------------------------------------------------------------------------------ main
def calibrate_fusion(data, model: Optional[str] = None, *, teacher=None, limit: Optional[int] = 200, candidates: int = 3,
                     methods: Sequence[str] = METHODS, weights: Sequence[float] = GRID_WEIGHTS,
                     k_each: int = DEFAULT_FUSION["k_each"], rrf_k: int = DEFAULT_FUSION["rrf_k"],
                     utility_cache: Optional[str] = None, embedding_cache: Optional[str] = None, batch_size: int = 64,
                     group: int = 16, device=None, progress: bool = True) -> dict:
    """Pick the fusion config whose rankings agree best with the teacher on ``data``'s question-answer pairs.

    Args:
        data: a dataset path (QASPER JSON or the JSONL schema) or a :class:`uae_fast.data.RetrievalDataset`;
            only questions, answers and passages are read (never gold evidence).
        model: the dense encoder folder (None: the default student) or a :class:`uae_fast.BiEncoder`.
        teacher: a causal-LM folder, a :class:`uae_fast.UtilityScorer`, or None (the default teacher).
        limit: questions used (the first in ``uae score``'s paper order, so a paper's questions stay together).
        candidates: passages per side per question that the teacher scores (their union).
        utility_cache: JSONL file of teacher utilities (resume; reuse across models); None: no file.

    Returns the fusion config dict (``method``, ``weight``, ``k_each``, ``rrf_k``) plus a ``calibration``
    record (data, model, teacher, question count, the whole grid with its scores, seconds).
    """
    import torch

    from .bm25 import BM25
    from .data import RetrievalDataset, load_dataset
    from .embcache import encode_cached
    from .evaluation import _progress
    from .scoring import select_queries
    from .student import BiEncoder
    from .teacher import UtilityScorer

    t0 = time.perf_counter()
    if not isinstance(candidates, int) or candidates < 1:
        raise ValueError(f"candidates must be a positive int, got {candidates!r}")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int, got {limit!r}")
    grid = fusion_grid(methods, weights, k_each=k_each, rrf_k=rrf_k)
    # every input that can be wrong is checked before the encoder and the teacher load
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    from .cli import check_output_path, check_teacher_path

    if isinstance(teacher, (str, os.PathLike)):
        check_teacher_path(teacher, "--teacher")
    if utility_cache:
        _cache_header(utility_cache)
    if embedding_cache is not None:
        check_output_path(embedding_cache, "--embedding-cache", folder=True)
    ds = data if isinstance(data, RetrievalDataset) else load_dataset(data)
    # Questions with an answer; with_gold_only=False: the selection never looks at evidence.
    queries = [q for q in select_queries(ds, with_gold_only=False, order="paper") if ds.pool(q)][:limit]
    if not queries:
        raise ValueError(f"{ds.name or 'data'}: no question has both an answer and a passage pool to calibrate on")
    enc = model if isinstance(model, BiEncoder) else BiEncoder(model, device=device)
    model_path = None if isinstance(model, BiEncoder) else model
    pools = [ds.pool(q) for q in queries]
    pids = sorted({p for pool in pools for p in pool})
    row = {p: i for i, p in enumerate(pids)}
    emb = encode_cached(enc, [ds.passages[p].text for p in pids], cache_dir=embedding_cache, model_path=model_path,
                        batch_size=batch_size, progress=progress)
    qemb = enc.encode([q.question for q in queries], batch_size=batch_size, role="query")
    bm25: Dict[tuple, BM25] = {}
    sides, cands = [], []
    for q, pool, qe in zip(queries, pools, qemb):
        dense = (emb[torch.tensor([row[p] for p in pool])] @ qe).double().numpy()
        key = tuple(pool)
        if key not in bm25:  # one index per paper, shared by its questions
            if len(bm25) > 256:
                bm25.clear()
            bm25[key] = BM25([ds.passages[p].text for p in pool])
        lexical = bm25[key].scores(q.question)
        m = min(candidates, len(pool))
        lex_top = [p for p in _top(lexical, m) if lexical[p] > 0]
        cands.append(np.union1d(_top(dense, m), np.asarray(lex_top, np.int64)).astype(np.int64))
        sides.append((dense, lexical))

    scorer = teacher if isinstance(teacher, UtilityScorer) else UtilityScorer.from_pretrained(teacher, device=device)
    settings = scorer.settings()
    cache = _read_cache(utility_cache, settings) if utility_cache else {}
    keys = [[_row_key(q, pool[j], ds.passages[pool[j]].text) for j in c.tolist()] for q, pool, c in zip(queries, pools, cands)]
    todo = [i for i, ks in enumerate(keys) if any(k not in cache for k in ks)]
    n_scored = 0
    bar = _progress(range(0, len(todo), group), "teacher", progress, total=-(-len(todo) // group))
    for s in bar:
        idx = todo[s:s + group]
        # only the candidates the cache lacks (a second model's run re-scores the passages it adds, no more)
        miss = {i: [(j, k) for j, k in zip(cands[i].tolist(), keys[i]) if k not in cache] for i in idx}
        items = [(queries[i].question, queries[i].answers, [ds.passages[pools[i][j]].text for j, _ in miss[i]]) for i in idx]
        res = scorer.score_many(items)
        rows = [{"qid": queries[i].id, "pid": pools[i][j], "key": key, "utility": round(float(u), 6)}
                for i, r in zip(idx, res) for (j, key), u in zip(miss[i], r.utility.tolist())]
        bad = [r for r in rows if not math.isfinite(r["utility"])]
        if bad:  # one NaN would make every config's teacher_mrr NaN: say where, as uae score does
            raise ValueError(f"the teacher's utility for question {bad[0]['qid']!r}, passage {bad[0]['pid']!r} is "
                             f"{bad[0]['utility']} (its log-probabilities overflowed); use a float32 teacher")
        for r in rows:
            cache[r["key"]] = r["utility"]
        n_scored += len(rows)
        if utility_cache:
            _append_cache(utility_cache, settings, rows)
    utils = [np.array([cache[k] for k in ks]) for ks in keys]

    results, per_q = [], []
    for cfg in grid:
        rr, s1 = zip(*(teacher_agreement(d, l, c, u, cfg) for (d, l), c, u in zip(sides, cands, utils)))
        per_q.append((np.asarray(rr), np.asarray(s1)))
        results.append(dict(cfg, teacher_mrr=float(np.mean(rr)), **{"teacher_success@1": float(np.mean(s1))}))
    best = select_config(results)
    heldout = crossfit(grid, per_q, [q.doc_id if q.doc_id is not None else q.id for q in queries])
    out = {k: best[k] for k in ("method", "weight", "k_each", "rrf_k")}
    out["calibration"] = {
        "data": ds.name, "data_path": os.path.abspath(data) if isinstance(data, (str, os.PathLike)) else None,
        "limit": limit, "model": model_path or ("default student" if model is None else "BiEncoder"),
        "teacher": settings["teacher"], "teacher_settings": settings, "n_questions": len(queries),
        "candidates_per_side": candidates,
        "mean_candidates": float(np.mean([c.size for c in cands])), "objective": "teacher_mrr",
        "teacher_mrr": best["teacher_mrr"], "teacher_success@1": best["teacher_success@1"],
        "heldout": heldout, "grid": results, "rows_scored_now": n_scored, "seconds": round(time.perf_counter() - t0, 1),
    }
    return out


# ------------------------------------------------------------------------------------------ CLI
def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "calibrate-fusion", help="pick the hybrid fusion config for a corpus from its question-answer pairs (teacher-judged)",
        description="Ranks each question's pool with the dense model and BM25, scores the union of both top lists with the "
                    "teacher (answers known, evidence never read) and writes the fusion config (method, dense weight) "
                    "whose rankings agree best with the teacher.")
    p.add_argument("--data", required=True, help="question-answer data: QASPER or SQuAD JSON(.gz) or the JSONL schema, with answers (BEIR has "
                                           "none; required)")
    p.add_argument("--model", default=None, help="dense encoder folder (default: the untrained student all-MiniLM-L6-v2)")
    p.add_argument("--out", required=True, help="fusion JSON to write (required)")
    p.add_argument("--teacher", default=None, help="teacher causal-LM folder (default: SmolLM2-135M-Instruct)")
    p.add_argument("--limit", type=int, default=200, help="questions used, in paper order (default: 200)")
    p.add_argument("--candidates", type=int, default=3, help="top passages per side per question scored by the teacher (default: 3)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of fusion methods to try (default: {','.join(METHODS)})")
    p.add_argument("--weights", default=",".join(f"{w:g}" for w in GRID_WEIGHTS),
                   help="comma list of dense weights to try (default: " + ",".join(f"{w:g}" for w in GRID_WEIGHTS) + ")")
    p.add_argument("--k-each", type=int, default=DEFAULT_FUSION["k_each"],
                   help=f"candidates taken from each side at search time (default: {DEFAULT_FUSION['k_each']})")
    p.add_argument("--utility-cache", default=None,
                   help="JSONL file of teacher utilities, resumed and reused across models (default: OUT.utilities.jsonl)")
    p.add_argument("--embedding-cache", default=None, metavar="DIR", help="reuse passage embeddings kept in DIR (default: none)")
    p.add_argument("--batch-size", type=int, default=64, help="encoder batch size (default: 64)")
    p.add_argument("--device", default=None, help="torch device for encoder and teacher (default: cuda if available, else cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (default: shown)")
    p.set_defaults(func=_main)


def _main(args) -> int:
    from .cli import check_output_path, set_threads
    from .data import write_text_atomic

    check_output_path(args.out, "--out")  # before the teacher scoring, not after it
    set_threads(args.threads)
    try:
        weights = [float(w) for w in args.weights.split(",") if w.strip()]
    except ValueError:
        raise ValueError(f"--weights must be a comma list of numbers, got {args.weights!r}") from None
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    res = calibrate_fusion(args.data, args.model, teacher=args.teacher, limit=args.limit, candidates=args.candidates,
                           methods=methods, weights=weights, k_each=args.k_each,
                           utility_cache=args.utility_cache or args.out + ".utilities.jsonl",
                           embedding_cache=args.embedding_cache, batch_size=args.batch_size, device=args.device,
                           progress=not args.no_progress)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write_text_atomic(args.out, json.dumps(res, indent=2))
    c = res["calibration"]
    held = f", {c['heldout']['teacher_mrr']:.3f} on held-out documents" if c.get("heldout") else ""
    print(f"fusion: {res['method']} weight {res['weight']:g} (teacher MRR {c['teacher_mrr']:.3f}{held}, "
          f"success@1 {c['teacher_success@1']:.3f} on {c['n_questions']} questions; pure dense "
          f"{_grid_at(c['grid'], 1.0):.3f}, pure BM25 {_grid_at(c['grid'], 0.0):.3f}) -> {args.out}", file=sys.stderr)
    return 0


def _grid_at(grid: List[dict], w: float) -> float:
    """The objective at dense weight ``w``; at ``w = 0`` RRF's config, the one in BM25's order (if in the grid)."""
    at = [g for g in grid if g["weight"] == w and (w != 0.0 or g["method"] == "rrf")]  # no rrf: no pure BM25 row
    return at[0]["teacher_mrr"] if at else float("nan")
