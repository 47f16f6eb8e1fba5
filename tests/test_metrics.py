"""Retrieval metrics on hand-made rankings, scikit-learn as an oracle for AP, and SQuAD Token F1.
(ir-measures is the oracle for every metric on real `uae eval` runs: tests/test_trec.py.)"""
import random

import pytest

from uae_fast.metrics import (average_precision, normalize_answer, paired_bootstrap, per_query_metrics, recall_at_k,
                              reciprocal_rank, retrieval_metrics, success_at_k, token_f1, upgrade_metric_names)


def test_hand_made_rankings():
    r = ["d", "a", "c", "b", "e"]
    gold = {"a", "b"}
    assert success_at_k(r, gold, 1) == 0.0
    assert success_at_k(r, gold, 2) == 1.0  # any gold in the top 2 ...
    assert recall_at_k(r, gold, 2) == 0.5  # ... but only half of the gold
    assert success_at_k(r, gold, 5) == 1.0
    assert recall_at_k(r, gold, 1) == 0.0 and recall_at_k(r, gold, 3) == 0.5
    assert recall_at_k(r, gold, 4) == recall_at_k(r, gold, 5) == 1.0
    # gold at ranks 2 and 4: AP = (1/2 + 2/4) / 2
    assert average_precision(r, gold) == pytest.approx(0.5)
    assert reciprocal_rank(r, gold) == pytest.approx(0.5)
    # a perfect ranking
    assert average_precision(["a", "b", "c"], {"a", "b"}) == 1.0
    # gold never ranked: AP counts it in the denominator, RR = 0
    assert average_precision(["a", "c"], {"a", "z"}) == pytest.approx(0.5)
    assert reciprocal_rank(["c", "d"], {"z"}) == 0.0
    assert success_at_k(["c"], {"c"}, 5) == recall_at_k(["c"], {"c"}, 5) == 1.0  # k beyond the ranking
    assert recall_at_k(["c", "d"], {"c", "z"}, 5) == 0.5  # an unranked gold id still counts in the denominator


def test_retrieval_metrics_means():
    rankings = [["a", "b", "c"], ["x", "y", "z"], ["p", "q", "r"]]
    golds = [{"a"}, {"z"}, {"q", "r"}]
    m = retrieval_metrics(rankings, golds, ks=(1, 2))
    assert m["n"] == 3
    assert m["Success@1"] == pytest.approx(1 / 3)
    assert m["Success@2"] == pytest.approx(2 / 3)
    assert m["Recall@1"] == pytest.approx(1 / 3)
    assert m["Recall@2"] == pytest.approx((1 + 0 + 1 / 2) / 3)
    assert m["MAP"] == pytest.approx((1 + 1 / 3 + (1 / 2 + 2 / 3) / 2) / 3)
    assert m["MRR"] == pytest.approx((1 + 1 / 3 + 1 / 2) / 3)


def test_average_precision_matches_sklearn():
    sk = pytest.importorskip("sklearn.metrics")
    rng = random.Random(7)
    for _ in range(50):
        n = rng.randint(2, 37)
        ids = list(range(n))
        rng.shuffle(ids)
        gold = set(rng.sample(range(n), rng.randint(1, n)))
        scores = [n - ids.index(i) for i in range(n)]  # strictly decreasing along the ranking
        y = [int(i in gold) for i in range(n)]
        assert average_precision(ids, gold) == pytest.approx(sk.average_precision_score(y, scores))
        ranks = [ids.index(g) + 1 for g in gold]
        assert reciprocal_rank(ids, gold) == pytest.approx(1 / min(ranks))


def test_metric_errors():
    with pytest.raises(ValueError, match="k must be"):
        recall_at_k(["a"], {"a"}, 0)
    with pytest.raises(ValueError, match="k must be"):
        success_at_k(["a"], {"a"}, 1.0)
    with pytest.raises(ValueError, match="gold is empty"):
        recall_at_k(["a"], set(), 1)
    with pytest.raises(ValueError, match="gold is empty"):
        average_precision(["a"], set())
    with pytest.raises(ValueError, match="twice"):
        reciprocal_rank(["a", "a"], {"a"})
    with pytest.raises(TypeError, match="not one string"):
        success_at_k("abc", {"a"}, 1)
    with pytest.raises(ValueError, match="golds\\[1\\] is empty"):
        retrieval_metrics([["a"], ["b"]], [{"a"}, set()])
    with pytest.raises(ValueError, match="rankings has 1"):
        retrieval_metrics([["a"]], [{"a"}, {"b"}])
    with pytest.raises(ValueError, match="empty"):
        retrieval_metrics([], [])


def test_token_f1_squad_normalisation():
    assert normalize_answer("The  Cat, sat!") == "cat sat"
    assert normalize_answer("An apple a day") == "apple day"
    assert token_f1("the cat sat", ["A cat sat."]) == 1.0
    # pred {cat, sat, down} vs gold {cat, sat}: P = 2/3, R = 1 -> F1 = 0.8
    assert token_f1("cat sat down", ["cat sat"]) == pytest.approx(0.8)
    # max over gold answers
    assert token_f1("BERT", ["LSTM", "bert model"]) == pytest.approx(2 * 1 * 0.5 / 1.5)
    assert token_f1("nothing here", ["cat"]) == 0.0
    # repeated tokens count with multiplicity: pred {a1 x2}, gold {a1}: P = 1/2, R = 1
    assert token_f1("yes yes", ["Yes"]) == pytest.approx(2 / 3)
    assert token_f1("", ["the"]) == 1.0  # both normalise to empty
    assert token_f1("", ["cat"]) == 0.0
    assert token_f1("cat", "cat") == 1.0  # a single answer string is accepted
    with pytest.raises(ValueError, match="answers is empty"):
        token_f1("x", [])
    with pytest.raises(TypeError, match="must be a str"):
        token_f1(None, ["x"])


def test_per_query_metrics_and_paired_bootstrap():
    rng = random.Random(0)
    rankings = [rng.sample(list("abcdefgh"), 8) for _ in range(50)]
    golds = [set(rng.sample(list("abcdefgh"), rng.randint(1, 3))) for _ in range(50)]
    pq, means = per_query_metrics(rankings, golds), retrieval_metrics(rankings, golds)
    for k, v in pq.items():
        assert len(v) == 50 and sum(v) / 50 == pytest.approx(means[k])
    # A system that is better on every query: a positive interval and a tiny p.
    better = paired_bootstrap([x + 0.1 + 0.05 * rng.random() for x in pq["MAP"]], pq["MAP"], resamples=2000)
    assert better["ci95_low"] > 0 and better["p"] < 0.01
    # Identical systems: no difference; a symmetric coin flip: an interval around 0, a large p.
    same = paired_bootstrap(pq["MRR"], pq["MRR"])
    assert same["diff"] == 0 and same["ci95_low"] == same["ci95_high"] == 0
    a = [float(i % 2) for i in range(200)]
    flip = paired_bootstrap(a, a[1:] + a[:1], resamples=4000, seed=1)
    assert flip["diff"] == 0 and flip["ci95_low"] < 0 < flip["ci95_high"] and flip["p"] > 0.5
    # The interval matches the normal approximation on a large sample.
    d = [rng.gauss(0.2, 1.0) for _ in range(2000)]
    r = paired_bootstrap(d, [0.0] * 2000, resamples=4000)
    se = (sum((x - r["diff"]) ** 2 for x in d) / 1999 / 2000) ** 0.5
    assert r["ci95_low"] == pytest.approx(r["diff"] - 1.96 * se, abs=0.3 * se)
    assert r["ci95_high"] == pytest.approx(r["diff"] + 1.96 * se, abs=0.3 * se)
    for a, b in (([1.0, 2.0], [1.0]), ([1.0, 2.0, 3.0], [1.0, 2.0]), ([], []), ([1.0], [0.0])):  # 3 vs 2 once met
        with pytest.raises(ValueError, match="must be paired, at least 2 values each"):  # numpy's broadcast error
            paired_bootstrap(a, b)


def test_upgrade_metric_names_reads_old_results():
    old = {"n": 3, "Recall@1": 0.5, "Recall@5": 0.9, "MAP": 0.6}  # written when Recall@k meant Success@k
    assert upgrade_metric_names(old) == {"n": 3, "Success@1": 0.5, "Success@5": 0.9, "MAP": 0.6}
    new = retrieval_metrics([["b", "a"]], [{"a", "c"}], ks=(1, 2))
    assert upgrade_metric_names(new) == new  # new files keep their true Recall@k
    # `uae eval`'s table prints an old --json file's numbers as S@k, and no R@k it never had
    from uae_fast.evaluation import format_table

    table = format_table({"data": "old", "n_queries": 3, "systems": {"a": {**old, "MRR": 0.7, "latency_ms_mean": 1.0}}})
    row = next(line for line in table.splitlines() if line.startswith("a "))
    assert row.split()[1:8] == ["3", "0.500", "0.900", "nan", "nan", "0.600", "0.700"]


def test_ids_from_numpy_and_torch_count_by_value():
    """TopKIndex.search returns torch ids for torch queries; a torch tensor hashes by identity, so without the
    conversion no id would ever match a gold set and every metric would read 0."""
    import numpy as np
    import torch

    from uae_fast import TopKIndex

    idx = TopKIndex(4)
    idx.add(np.eye(4, dtype=np.float32))
    _, ids_t = idx.search(torch.eye(4)[:2], 2)
    _, ids_n = idx.search(np.eye(4, dtype=np.float32)[:2], 2)
    assert isinstance(ids_t, torch.Tensor)
    want = {"n": 2, "Success@1": 1.0, "Success@2": 1.0, "Recall@1": 1.0, "Recall@2": 1.0, "MAP": 1.0, "MRR": 1.0}
    for ids in (ids_t, ids_n, ids_n.tolist()):
        for golds in ([{0}, {1}], [torch.tensor([0]), np.array([1])]):
            assert retrieval_metrics(ids, golds, ks=(1, 2)) == want
    assert success_at_k(ids_n[0], {0}, np.int64(1)) == 1.0  # a numpy k is an int
    with pytest.raises(TypeError, match="one id per position.*shape \\(2,\\)"):
        success_at_k(ids_n, {0}, 1)
    with pytest.raises(TypeError, match="gold must be a collection of ids, got int"):
        success_at_k([0, 1], 0, 1)
    with pytest.raises(TypeError, match="ks must be a sequence"):
        retrieval_metrics([[0]], [{0}], ks=5)
    with pytest.raises(ValueError, match="rankings has 2 queries but golds has 1"):
        per_query_metrics([[0], [1]], [{0}])


def test_paired_bootstrap_refuses_nan_and_bad_resamples():
    with pytest.raises(ValueError, match="must be finite; 1 pair"):
        paired_bootstrap([1, float("nan")], [0, 0])
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="resamples must be a positive int"):
            paired_bootstrap([1, 0], [0, 0], resamples=bad)


def test_paired_bootstrap_p_is_two_sided_and_exact_for_few_pairs():
    import math

    import numpy as np

    # few pairs: every resample of 3 positive differences is positive (bootstrap p 0.0); the exact sign-flip
    # test says 2 of 8 sign patterns are as extreme
    r = paired_bootstrap([1, 1, 1], [0, 0, 0])
    assert r["p"] == 0.25 and r["small_n"]
    assert paired_bootstrap([1, 0, 1, 0], [0, 0, 0, 0])["p"] == 0.5
    # two-sided: symmetric in a and b, and near the normal approximation's 2 * sf(|z|) on a large sample
    rng = np.random.default_rng(3)
    d = rng.normal(0.05, 1.0, 400)
    z = abs(d.mean()) / (d.std(ddof=1) / math.sqrt(d.size))
    want = math.erfc(z / math.sqrt(2))
    got = paired_bootstrap(d, np.zeros_like(d))
    assert "small_n" not in got and abs(got["p"] - want) < 0.05, (got["p"], want)
    assert paired_bootstrap(np.zeros_like(d), d)["p"] == got["p"]


def test_paired_bootstrap_counts_only_differing_pairs_for_its_small_sample_test():
    import math

    # 5 wins among 888 questions, the rest ties: the bootstrap read p 0.014; the exact sign test says 2/32
    r = paired_bootstrap([1] * 5 + [0] * 883, [0] * 888)
    assert r["small_n"] and r["p"] == 0.0625 and r["n"] == 888
    # 4 up, 13 down (17 differ: random sign patterns), near the exact two-sided binomial test's 0.049
    exact = 2 * sum(math.comb(17, i) for i in range(5)) / 2 ** 17
    r = paired_bootstrap([1] * 4 + [0] * 13 + [0] * 871, [0] * 4 + [1] * 13 + [0] * 871, resamples=20000)
    assert r["small_n"] and abs(r["p"] - exact) < 0.01, (r["p"], exact)
    assert paired_bootstrap([0.5] * 6, [0.5] * 6)["p"] == 1.0  # nothing differs
    # clusters: groups whose differences cancel count for nothing
    r = paired_bootstrap([1, 0, 1, 1, 1] + [0] * 40, [0, 1, 0, 0, 0] + [0] * 40,
                         groups=["a", "a", "b", "c", "d"] + [f"g{i}" for i in range(40)])
    assert r["small_n"] and r["p"] == 0.25 and r["groups"] == 44


def test_paired_bootstrap_seeds_adds_the_spread_between_seeds():
    import numpy as np

    from uae_fast.metrics import paired_bootstrap_seeds

    rng = np.random.default_rng(5)
    b = rng.random((4, 600))
    same = b + 0.05 + rng.normal(0, 0.3, (4, 600))  # the same lead on every seed, question noise only
    flip = b + np.array([[0.15], [-0.05], [0.12], [-0.02]]) + rng.normal(0, 0.3, (4, 600))  # the lead varies
    q_same, s_same = paired_bootstrap(same.mean(0), b.mean(0)), paired_bootstrap_seeds(same, b)
    assert s_same["p"] < 0.01 and abs(s_same["ci95_high"] - s_same["ci95_low"]) < 1.5 * (q_same["ci95_high"] - q_same["ci95_low"])
    q_flip, s_flip = paired_bootstrap(flip.mean(0), b.mean(0)), paired_bootstrap_seeds(flip, b)
    assert q_flip["p"] < 0.01 < 0.05 < s_flip["p"] and s_flip["seeds"] == 4
    # the variance: question-level bootstrap variance + the seeds' sample variance / S
    per_seed = (flip - b).mean(1)
    se2 = ((s_flip["ci95_high"] - s_flip["ci95_low"]) / (2 * 1.96)) ** 2
    assert se2 == pytest.approx(((q_flip["ci95_high"] - q_flip["ci95_low"]) / (2 * 1.96)) ** 2 + per_seed.var(ddof=1) / 4, rel=0.1)
    with pytest.raises(ValueError, match="seeds >= 3"):
        paired_bootstrap_seeds(b[:2], b[:2])


def test_paired_bootstrap_by_groups_resamples_whole_clusters():
    import math

    import numpy as np

    # each group's queries move together (one shared effect per paper): the cluster bootstrap's interval is
    # wider than the query bootstrap's, and near the group-level normal approximation
    rng = np.random.default_rng(7)
    effect = rng.normal(0.05, 0.3, 60)
    groups = np.repeat(np.arange(60), 8)
    d = effect[groups] + rng.normal(0, 0.01, groups.size)
    flat = paired_bootstrap(d, np.zeros_like(d))
    clus = paired_bootstrap(d, np.zeros_like(d), groups=[f"paper{g}" for g in groups])
    assert clus["diff"] == pytest.approx(flat["diff"]) and clus["groups"] == 60
    assert clus["ci95_high"] - clus["ci95_low"] > 2 * (flat["ci95_high"] - flat["ci95_low"])
    means = np.bincount(groups, weights=d) / 8
    z = abs(means.mean()) / (means.std(ddof=1) / math.sqrt(60))
    assert abs(clus["p"] - math.erfc(z / math.sqrt(2))) < 0.06
    # one query per group is the query bootstrap itself; few groups: the exact sign flip over group sums
    same = paired_bootstrap(d[:50], np.zeros(50), groups=[f"{i:03d}" for i in range(50)])
    plain = paired_bootstrap(d[:50], np.zeros(50))
    assert {k: same[k] for k in ("diff", "ci95_low", "ci95_high", "p", "n")} == plain and plain["n"] == 50
    r = paired_bootstrap([1, 1, 1, 1], [0, 0, 0, 0], groups=["a", "a", "b", "c"])
    assert r["small_n"] and r["p"] == 0.25 and r["groups"] == 3
    with pytest.raises(ValueError, match="groups must label every query"):
        paired_bootstrap([1, 0], [0, 0], groups=["a"])
    with pytest.raises(ValueError, match="at least 2 groups"):
        paired_bootstrap([1, 0], [0, 0], groups=["a", "a"])
    for missing in (None, float("nan")):
        with pytest.raises(ValueError, match="some labels are None or NaN"):
            paired_bootstrap([1, 0, 1], [0, 0, 0], groups=["a", missing, missing])
    assert paired_bootstrap([1, 0, 1], [0, 0, 0], groups=[1, "1", 2])["groups"] == 3  # 1 and "1" differ
    assert paired_bootstrap([1, 0, 1], [0, 0, 0], groups=[np.int64(1), 1, 2])["groups"] == 2  # numpy scalars as Python
