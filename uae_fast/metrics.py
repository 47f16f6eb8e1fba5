"""Retrieval and reading metrics: Success@k, Recall@k, MAP, MRR over a ranking; SQuAD Token F1 over answers.

Conventions (trec_eval's, so that ``ir-measures``/``ranx`` on the runs ``uae eval --save-runs`` writes give
the same numbers; ``tests/test_trec.py`` checks it):

- a ranking is the full ordered list of a query's candidate ids; gold is a set of ids (relevance 1);
- ``Success@k`` (a.k.a. Hit@k) is 1 when *any* gold id is in the top ``k`` (Success@1 = "the top passage
  is gold"); earlier versions printed it as "Recall@k";
- ``Recall@k`` is the fraction of the gold ids in the top ``k`` (TREC ``recall_k``, ir-measures ``R@k``);
  it equals Success@k on queries with one gold id and is lower when a query has several;
- ``MAP`` is the mean of average precision over the full ranking, with every gold id counted in the
  denominator (a gold id missing from the ranking contributes precision 0);
- ``MRR`` is the mean reciprocal rank of the first gold id (0 when none is ranked);
- ``token_f1`` is SQuAD's: lower-case, strip punctuation and articles, split on whitespace,
  bag-of-tokens F1, maximised over the gold answers; an empty prediction scores 1 against an empty gold
  answer (SQuAD 2.0's rule; v1.1's script gives 0), 0 against any other.

Queries without gold ids have no defined retrieval metric: :func:`retrieval_metrics` rejects them
(filter them out first, as ``RetrievalDataset.subset(with_gold=True)`` does).
"""
from __future__ import annotations

import collections
import math
import numbers
import re
import string
from typing import Dict, Iterable, List, Optional, Sequence

__all__ = ["success_at_k", "recall_at_k", "average_precision", "reciprocal_rank", "retrieval_metrics", "per_query_metrics",
           "paired_bootstrap", "paired_bootstrap_seeds", "paired_bootstrap_by_seed", "upgrade_metric_names", "normalize_answer", "token_f1"]


_PLAIN = (str, int, float, bytes, tuple)


def _plain_ids(items, what: str) -> list:
    """Ids as hashable Python values: numpy and torch ids by value (a torch tensor hashes by identity, so ids
    straight from ``TopKIndex.search`` on torch queries would never match a gold id). One ``tolist`` for an
    array; element by element only for a list that holds numpy or torch scalars."""
    if isinstance(items, (str, bytes)):
        raise TypeError(f"{what} must be a sequence of ids, not one string")
    if hasattr(items, "tolist") and hasattr(items, "ndim"):
        if items.ndim == 0:
            raise TypeError(f"{what} must be a collection of ids, got a single {type(items).__name__} value")
        items = items.tolist()
    else:
        try:
            items = list(items)
        except TypeError:
            raise TypeError(f"{what} must be a collection of ids, got {type(items).__name__}") from None
    if all(isinstance(x, _PLAIN) for x in items):
        return items
    out = []
    for x in items:
        ndim = getattr(x, "ndim", None)
        if isinstance(x, list) or ndim:
            shape = tuple(getattr(x, "shape", (len(x),)))
            raise TypeError(f"{what} must hold one id per position, got an array of shape {shape} "
                            f"(pass one query's ranking, not a batch)")
        out.append(x.item() if ndim == 0 and hasattr(x, "item") else x)
    return out


def _as_gold(gold) -> set:
    return set(_plain_ids(gold, "gold"))


def _check_ranking(ranking) -> list:
    ranking = _plain_ids(ranking, "ranking")
    if len(set(ranking)) != len(ranking):
        raise ValueError("ranking contains an id twice; a ranking is an ordering of distinct candidates")
    return ranking


def _check_k(k) -> int:
    if not isinstance(k, numbers.Integral) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    return int(k)


def _check_ks(ks) -> list:
    if isinstance(ks, (str, bytes)) or not isinstance(ks, Iterable):
        raise TypeError(f"ks must be a sequence of cut-offs such as (1, 5), got {ks!r}")
    return [_check_k(k) for k in ks]


def success_at_k(ranking: Sequence, gold: Iterable, k: int) -> float:
    """1.0 when any gold id is among the first ``k`` of ``ranking``, else 0.0 (Success@k, Hit@k)."""
    k = _check_k(k)
    gold = _as_gold(gold)
    return float(any(r in gold for r in _check_ranking(ranking)[:k]))


def recall_at_k(ranking: Sequence, gold: Iterable, k: int) -> float:
    """The fraction of the gold ids among the first ``k`` of ``ranking`` (TREC Recall@k)."""
    k = _check_k(k)
    gold = _as_gold(gold)
    if not gold:
        raise ValueError("gold is empty: recall is undefined without a relevant id")
    return sum(r in gold for r in _check_ranking(ranking)[:k]) / len(gold)


def average_precision(ranking: Sequence, gold: Iterable) -> float:
    """Average precision of the full ``ranking``: mean over gold ids of precision at their rank."""
    gold = _as_gold(gold)
    if not gold:
        raise ValueError("gold is empty: average precision is undefined without a relevant id")
    return _average_precision(_check_ranking(ranking), gold)


def _average_precision(ranking: list, gold: set) -> float:
    hits, total = 0, 0.0
    for rank, r in enumerate(ranking, 1):
        if r in gold:
            hits += 1
            total += hits / rank
    return total / len(gold)


def reciprocal_rank(ranking: Sequence, gold: Iterable) -> float:
    """1 / rank of the first gold id in ``ranking`` (0.0 when no gold id is ranked)."""
    gold = _as_gold(gold)
    for rank, r in enumerate(_check_ranking(ranking), 1):
        if r in gold:
            return 1.0 / rank
    return 0.0


def retrieval_metrics(rankings: Sequence[Sequence], golds: Sequence[Iterable], ks: Sequence[int] = (1, 5)) -> Dict[str, float]:
    """Mean ``Success@k`` and ``Recall@k`` for each k, ``MAP`` and ``MRR`` over queries, plus ``n`` (the query count).

    Example::

        >>> retrieval_metrics([["b", "a", "c"]], [{"a", "d"}], ks=(1, 2))
        {'n': 1, 'Success@1': 0.0, 'Success@2': 1.0, 'Recall@1': 0.0, 'Recall@2': 0.5, 'MAP': 0.25, 'MRR': 0.5}
    """
    rankings, golds = list(rankings), list(golds)
    if len(rankings) != len(golds):
        raise ValueError(f"rankings has {len(rankings)} queries but golds has {len(golds)}")
    if not rankings:
        raise ValueError("rankings is empty: no queries to evaluate")
    out: Dict[str, float] = {"n": len(rankings)}
    out.update({k: sum(v) / len(v) for k, v in per_query_metrics(rankings, golds, ks).items()})
    return out


def per_query_metrics(rankings: Sequence[Sequence], golds: Sequence[Iterable], ks: Sequence[int] = (1, 5)) -> Dict[str, List[float]]:
    """The per-query values whose means :func:`retrieval_metrics` reports (for paired comparisons)."""
    rankings, golds, ks = list(rankings), list(golds), _check_ks(ks)
    if len(rankings) != len(golds):
        raise ValueError(f"rankings has {len(rankings)} queries but golds has {len(golds)}")
    pairs = [(_check_ranking(r), _as_gold(g)) for r, g in zip(rankings, golds)]  # checked once, not per metric
    for i, (_, g) in enumerate(pairs):
        if not g:
            raise ValueError(f"golds[{i}] is empty: drop queries without gold passages before scoring retrieval")
    out: Dict[str, List[float]] = {f"Success@{k}": [float(any(x in g for x in r[:k])) for r, g in pairs] for k in ks}
    out.update({f"Recall@{k}": [sum(x in g for x in r[:k]) / len(g) for r, g in pairs] for k in ks})
    out["MAP"] = [_average_precision(r, g) for r, g in pairs]
    out["MRR"] = [next((1.0 / rank for rank, x in enumerate(r, 1) if x in g), 0.0) for r, g in pairs]
    return out


def upgrade_metric_names(metrics: Dict[str, object]) -> Dict[str, object]:
    """``metrics`` with the keys written before Success@k existed renamed: an old ``"Recall@k"`` (which was
    Success@k) becomes ``"Success@k"``. Dicts that already have a ``Success@`` key are returned unchanged, so
    old and new result files (``--json``, ``scripts/sweep_dev.py`` records) can be read alike."""
    if any(str(k).startswith("Success@") for k in metrics):
        return dict(metrics)
    return {("Success@" + k[len("Recall@"):] if str(k).startswith("Recall@") else k): v for k, v in metrics.items()}


def paired_bootstrap(a: Sequence[float], b: Sequence[float], *, resamples: int = 10000, seed: int = 0,
                     groups: Optional[Sequence] = None, _means: bool = False) -> Dict[str, float]:
    """Mean of ``a - b`` over paired queries, its 95% bootstrap interval and a two-sided bootstrap p-value.

    Queries are resampled with replacement ``resamples`` times; ``p`` is twice the smaller share of
    resampled means on either side of 0 (capped at 1); 0.0 means below ``2 / resamples``. When fewer than
    ``SIGN_FLIP_BELOW`` pairs differ (ties count for nothing), the bootstrap cannot see the few values it
    resamples as a sample (5 wins and 883 ties gave p 0.014), so ``p`` is then the two-sided sign-flip
    (paired randomisation) test over the differing pairs, exact up to 16 of them (5 wins: 0.0625; 3 positive
    differences: 0.25), else over ``resamples`` random sign patterns, and ``small_n`` is set. ``groups`` (one
    label per query, e.g. its paper): resample whole groups instead (a cluster bootstrap: questions on one paper
    are not independent), the mean over the queries drawn; ``small_n`` and the sign-flip test then count groups
    whose differences do not sum to 0. Example::

        >>> paired_bootstrap([1, 1, 0, 1], [0, 1, 0, 0])["diff"]
        0.5
    """
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape or a.size < 2:  # one pair resamples to itself: p would read 0.0
        raise ValueError(f"a and b must be paired, at least 2 values each, got {a.size} and {b.size} values")
    d = a - b
    if not np.isfinite(d).all():  # a NaN would make every resampled mean NaN and p read 0.0, "significant"
        raise ValueError(f"a and b must be finite; {int((~np.isfinite(d)).sum())} pair(s) are NaN or infinite")
    if not isinstance(resamples, numbers.Integral) or isinstance(resamples, bool) or resamples < 1:
        raise ValueError(f"resamples must be a positive int, got {resamples!r}")
    if groups is None:
        sums, counts = d, np.ones_like(d)
    else:
        if len(groups) != d.size:
            raise ValueError(f"groups must label every query: {len(groups)} labels for {d.size} queries")
        labels = [x.item() if isinstance(x, np.generic) else x for x in groups]  # np.int64(1) is 1
        if any(x is None or x != x for x in labels):  # None / NaN would pool every unlabelled query into one group
            raise ValueError("groups must label every query: some labels are None or NaN")
        _, g = np.unique(np.asarray([f"{type(x).__name__}:{x}" for x in labels]), return_inverse=True)
        sums, counts = np.bincount(g, weights=d), np.bincount(g).astype(np.float64)
        if sums.size < 2:
            raise ValueError("a cluster bootstrap needs at least 2 groups")
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for lo in range(0, resamples, 1000):  # 1000 resamples at a time: bounded memory for large query sets
        n = min(1000, resamples - lo)
        pick = rng.integers(0, sums.size, size=(n, sums.size))
        means[lo:lo + n] = sums[pick].sum(1) / counts[pick].sum(1)
    p = min(1.0, 2 * min(float((means <= 0).mean()), float((means >= 0).mean())))
    out = {"diff": float(d.mean()), "ci95_low": float(np.quantile(means, 0.025)),
           "ci95_high": float(np.quantile(means, 0.975)), "p": p, "n": int(d.size)}
    if _means:  # paired_bootstrap_seeds: the resampled means' sd (the question-level standard error)
        out["se"] = float(means.std(ddof=1))
    units = sums[sums != 0]  # a zero flips to itself: only the differing pairs (or groups) carry the test
    if units.size < SIGN_FLIP_BELOW:
        k, observed = units.size, abs(units.sum()) - 1e-12 * max(1.0, float(np.abs(units).sum()))
        if k <= 16:  # every sign pattern (2**16 at most)
            signs = 1 - 2 * ((np.arange(2 ** k)[:, None] >> np.arange(k)) & 1)
            p = float((np.abs(signs @ units) >= observed).mean()) if k else 1.0
        else:  # random patterns; (b + 1) / (R + 1) keeps a Monte Carlo p from reading 0
            signs = 1 - 2 * rng.integers(0, 2, size=(resamples, k))
            p = (int((np.abs(signs @ units) >= observed).sum()) + 1) / (resamples + 1)
        out.update(p=p, small_n=True)
    if groups is not None:
        out["groups"] = int(sums.size)
    return out


def paired_bootstrap_seeds(a, b, *, resamples: int = 20000, seed: int = 0,
                           groups: Optional[Sequence] = None) -> Dict[str, float]:
    """:func:`paired_bootstrap` with training seeds as a second source of variance: ``a`` and ``b`` are
    [S, N] (seed s of each system, paired by seed; a seedless system repeats its one row). The plain bootstrap
    of seed-averaged values covers only the questions: two recipes whose difference flips sign from seed to
    seed are not told apart by more questions. Here the variance of the mean difference is the bootstrap
    variance over the questions (or ``groups``) of the seed-averaged values plus the seeds' sample variance of
    their mean differences over S (each seed's own question noise is counted twice, a slightly conservative
    total; resampling seeds as well would double it again with 3-4 seeds), and ``p`` and the interval are
    normal ones on it. Needs at least 3 seed pairs."""
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or a.shape != b.shape or a.shape[0] < 3 or a.shape[1] < 2:
        raise ValueError(f"a and b must be [seeds >= 3, queries >= 2] and paired, got {a.shape} and {b.shape}")
    d = a - b
    if not np.isfinite(d).all():
        raise ValueError("a and b must be finite")
    q = paired_bootstrap(a.mean(0), b.mean(0), resamples=resamples, seed=seed, groups=groups, _means=True)
    return _with_seeds(d, q["se"])


def _with_seeds(d, se: float) -> Dict[str, float]:
    """The normal interval and p of the mean of ``d`` [S, N] with variance ``se**2`` + the seeds' variance / S."""
    per_seed = d.mean(1)
    diff, sd = float(d.mean()), math.sqrt(se ** 2 + float(per_seed.var(ddof=1)) / d.shape[0])
    p = math.erfc(abs(diff) / (sd * math.sqrt(2))) if sd > 0 else (1.0 if diff == 0 else 0.0)
    return {"diff": diff, "ci95_low": diff - 1.96 * sd, "ci95_high": diff + 1.96 * sd, "p": min(1.0, p),
            "n": int(d.shape[1]), "seeds": int(d.shape[0]), "per_seed": [float(x) for x in per_seed]}


def paired_bootstrap_by_seed(a, b, *, resamples: int = 20000, seed: int = 0,
                             groups: Optional[Sequence] = None) -> Dict[str, float]:
    """What the reports print for two systems' per-seed values ``a``, ``b`` [S, N] (paired by seed): the
    :func:`paired_bootstrap` of the seed-averaged values and, with 3 or more seeds, ``p_seeds``, the p of
    :func:`paired_bootstrap_seeds` (from the same resamples)."""
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    out = paired_bootstrap(a.mean(0), b.mean(0), resamples=resamples, seed=seed, groups=groups, _means=True)
    se = out.pop("se")
    if a.shape[0] >= 3:
        out["p_seeds"] = _with_seeds(a - b, se)["p"]
    return out


SIGN_FLIP_BELOW = 30  # fewer differing pairs (or groups) than this: p from the sign-flip test, not the bootstrap


# ------------------------------------------------------------------------------------- Token F1
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """SQuAD v1.1 normalisation: lower case, no punctuation, no articles, single spaces."""
    if not isinstance(s, str):
        raise TypeError(f"answer must be a str, got {type(s).__name__}")
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def _f1(pred_tokens: List[str], gold_tokens: List[str]) -> float:
    if not pred_tokens or not gold_tokens:
        # SQuAD 2.0 convention: two empty answers agree, one empty answer scores 0.
        return float(pred_tokens == gold_tokens)
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, answers: Sequence[str]) -> float:
    """SQuAD Token F1 of ``prediction``, maximised over the gold ``answers``."""
    if isinstance(answers, str):
        answers = [answers]
    answers = list(answers)
    if not answers:
        raise ValueError("answers is empty: Token F1 needs at least one gold answer")
    pred = normalize_answer(prediction).split()
    return max(_f1(pred, normalize_answer(a).split()) for a in answers)
