"""Answer-only training (#16): the utilities module, `uae score --no-gold`, `uae train --no-gold`, weak positives,
teacher ensembles and the diagnostic, on the tiny fixtures."""
import dataclasses
import json
import math
import os
import random

import numpy as np
import pytest
import torch

from test_training import TRAIN, _weights, ds, tiny  # noqa: F401 (the fixtures: the mini train split, a tiny encoder)
from uae_fast.bm25 import BM25
from uae_fast.data import RetrievalDataset
from uae_fast.scoring import CandidatePolicy
from uae_fast.training import BatchSampler, TrainConfig, _default_utilities, train, weak_positives
from uae_fast.utilities import (FORMAT, check_answer_only, load_utilities, merge_teachers, read_utilities, subset,
                                write_table)

HERE = os.path.dirname(__file__)
ROOT = os.path.dirname(HERE)


def all_table(path, ds, *, seed=0, teacher="t", scale=1.0, shift=0.0, gold_bonus=1.5, **extra):
    """A `--candidates all` table in `uae score`'s shape over every answered question of ``ds``."""
    rng = random.Random(seed)
    rows = []
    for q in ds.queries:
        if not q.answers:
            continue
        pool = ds.pool(q)
        for i, p in enumerate(pool):
            u = scale * (rng.gauss(0, 0.5) + (gold_bonus if p in q.gold else 0.0)) + shift
            r = {"qid": q.id, "pid": p, "utility": round(u, 5), "n_answer_tokens": 3, "gold": p in q.gold,
                 "cand": i, "n_cand": len(pool)}
            rows.append(r)
    header = {"type": "header", "format": FORMAT, "teacher": teacher, "candidates": "all", "answers": "all",
              "data": "mini", "shard": [0, 1], "n_queries": len({r["qid"] for r in rows}), "n_rows": len(rows), **extra}
    write_table(str(path), header, rows)
    return str(path)


def no_gold_table(tmp_path, ds, m=3, name="ng.jsonl.gz", **kw):
    src = all_table(tmp_path / ("all-" + name), ds, **kw)
    subset(src, ds, f"top:{m}", str(tmp_path / name), no_gold=True)
    return str(tmp_path / name)


def strip_gold(ds):
    return RetrievalDataset(ds.passages, [dataclasses.replace(q, gold=[]) for q in ds.queries], ds.name)


# ------------------------------------------------------------------------------------------- candidates + tables
def test_no_gold_policy_is_bm25_top_m_alone(ds):
    pol, with_gold = CandidatePolicy(ds, "top:2", no_gold=True), CandidatePolicy(ds, "top:2")
    n_diff = 0
    for q in ds.queries:
        pool = ds.pool(q)
        if len(pool) <= 2:
            continue
        _, ids = BM25([ds.passages[p].text for p in pool]).topk(q.question, 2)
        assert pol(q) == [pool[i] for i in sorted(int(i) for i in ids)]  # paper order, no gold added
        assert pol(dataclasses.replace(q, gold=[])) == pol(q)  # the labels change nothing
        n_diff += pol(q) != with_gold(q)
    assert n_diff > 0


def test_answer_policy_ranks_by_question_and_answers(ds):
    # answer:M is BM25 over the question followed by its answers, no gold read; its top-1 is the weak positive
    # `bm25-answer` picks from the whole pool.
    pol, top = CandidatePolicy(ds, "answer:2", no_gold=True), CandidatePolicy(ds, "top:2", no_gold=True)
    one = CandidatePolicy(ds, "answer:1", no_gold=True)
    n_diff = 0
    qs = [q for q in ds.queries if q.answers and len(ds.pool(q)) > 2]
    assert qs
    for q in qs:
        pool = ds.pool(q)
        _, ids = BM25([ds.passages[p].text for p in pool]).topk(q.question + " " + " ".join(q.answers), 2)
        assert pol(q) == [pool[i] for i in sorted(int(i) for i in ids)]
        assert pol(dataclasses.replace(q, gold=[])) == pol(q)
        n_diff += pol(q) != top(q)
    assert n_diff > 0  # the answers move the candidates
    assert weak_positives(ds, qs, {q.id: ds.pool(q) for q in qs}, "bm25-answer") == {q.id: one(q)[0] for q in qs}
    # a hand-made pool: the question's words point at one paragraph, the answer's at another
    from uae_fast.data import Passage, Query

    psg = {"a": Passage("a", "d", "the model uses attention layers"), "b": Passage("b", "d", "we train on forty thousand tweets"),
           "c": Passage("c", "d", "results are in table two")}
    q = Query("q", "which model layers are used?", ["forty thousand tweets"], [], doc_id="d")
    tiny_ds = RetrievalDataset(psg, [q])
    assert CandidatePolicy(tiny_ds, "top:1", no_gold=True)(q) == ["a"]
    assert CandidatePolicy(tiny_ds, "answer:1", no_gold=True)(q) == ["b"]
    with pytest.raises(ValueError, match="answer:M"):
        CandidatePolicy(ds, "answer:0")


def test_subset_answer_policy_matches_the_policy(tmp_path, ds):
    src = all_table(tmp_path / "all.jsonl.gz", ds)
    h = subset(src, ds, "answer:2", str(tmp_path / "a2.jsonl.gz"), no_gold=True)
    assert h["candidates"] == "answer:2" and h["no_gold"] is True
    check_answer_only(h)
    pol = CandidatePolicy(ds, "answer:2", no_gold=True)
    by_id = {q.id: q for q in ds.queries}
    _, rows = read_utilities(str(tmp_path / "a2.jsonl.gz"))
    for qid in {r["qid"] for r in rows}:
        assert [r["pid"] for r in rows if r["qid"] == qid] == pol(by_id[qid])


def test_subset_of_all_table_and_header(tmp_path, ds):
    src = all_table(tmp_path / "all.jsonl.gz", ds)
    h = subset(src, ds, "top:2", str(tmp_path / "ng.jsonl.gz"), no_gold=True)
    assert h["no_gold"] is True and h["candidates"] == "top:2" and h["subset_of"] == "all.jsonl.gz"
    _, all_rows = read_utilities(src)
    hh, rows = read_utilities(str(tmp_path / "ng.jsonl.gz"))
    assert hh == h and len(rows) == h["n_rows"]
    u = {(r["qid"], r["pid"]): r["utility"] for r in all_rows}
    pol = CandidatePolicy(ds, "top:2", no_gold=True)
    by_q = {}
    for r in rows:
        by_q.setdefault(r["qid"], []).append(r)
        assert r["utility"] == u[(r["qid"], r["pid"])]
    for qid, rs in by_q.items():
        q = next(q for q in ds.queries if q.id == qid)
        assert [r["pid"] for r in rs] == pol(q) and [r["cand"] for r in rs] == list(range(len(rs)))
    check_answer_only(hh)
    # a gold-added subset is not answer-only, and training refuses it
    hg = subset(src, ds, "top:2", str(tmp_path / "g.jsonl.gz"))
    assert "no_gold" not in hg
    with pytest.raises(ValueError, match="scored with gold evidence added.*--candidates top:2"):
        check_answer_only(hg, "g.jsonl.gz")
    with pytest.raises(ValueError, match="not 'all'"):
        subset(str(tmp_path / "g.jsonl.gz"), ds, "top:1", str(tmp_path / "x.jsonl.gz"))
    with pytest.raises(ValueError, match="already exists"):
        subset(src, ds, "top:2", str(tmp_path / "ng.jsonl.gz"), no_gold=True)


def test_merge_teachers_averages_per_query_z_scores(tmp_path, ds, capsys):
    a = all_table(tmp_path / "a.jsonl.gz", ds, seed=1, teacher="A")
    b = all_table(tmp_path / "b.jsonl.gz", ds, seed=2, teacher="B", scale=3.0, shift=-2.0)
    # B lacks one row: the ensemble keeps only the rows both tables have
    hb, rows_b = read_utilities(b)
    dropped = rows_b.pop(0)
    os.remove(b)
    hb = dict(hb, n_rows=len(rows_b))
    write_table(b, hb, rows_b)
    h = merge_teachers([a, b], str(tmp_path / "ens.jsonl.gz"))
    assert h["teacher"] == "ensemble(A+B)" and [s["teacher"] for s in h["sources"]] == ["A", "B"]
    _, rows = read_utilities(str(tmp_path / "ens.jsonl.gz"))
    assert (dropped["qid"], dropped["pid"]) not in {(r["qid"], r["pid"]) for r in rows}
    ua, _ = load_utilities(a)
    ub, _ = load_utilities(b)
    ue, _ = load_utilities(str(tmp_path / "ens.jsonl.gz"))
    for qid, d in ue.items():
        pids = sorted(d)
        za = np.array([ua[qid][p] for p in pids], dtype=np.float64)
        zb = np.array([ub[qid][p] for p in pids], dtype=np.float64)
        z = lambda x: (x - x.mean()) / x.std() if x.std() > 0 else x * 0  # noqa: E731
        np.testing.assert_allclose([d[p] for p in pids], (z(za) + z(zb)) / 2, atol=2e-5)
    with pytest.raises(ValueError, match="at least two"):
        merge_teachers([a], str(tmp_path / "e2.jsonl.gz"))
    # a shard of one teacher would shrink the ensemble to that shard's queries
    write_table(str(tmp_path / "bs.jsonl"), dict(hb, shard=[1, 4]), rows_b)
    with pytest.raises(ValueError, match="bs.jsonl: it is shard 1 of 4; merge the shards first"):
        merge_teachers([a, str(tmp_path / "bs.jsonl")], str(tmp_path / "e4.jsonl.gz"))
    for bad in (3, "2/4", [1, "4"]):  # a hand-edited shard field: named, not a TypeError
        write_table(str(tmp_path / "bx.jsonl"), dict(hb, shard=bad), rows_b)
        with pytest.raises(ValueError, match=r"bx.jsonl: its header's shard .* is not \[I, N\]"):
            merge_teachers([a, str(tmp_path / "bx.jsonl")], str(tmp_path / "e5.jsonl.gz"))
        os.remove(tmp_path / "bx.jsonl")
    # the first teacher's per-token deltas are not the ensemble's; a data fingerprint must agree when both have one
    ha, rows_a = read_utilities(a)
    write_table(str(tmp_path / "ad.jsonl"), dict(ha, data_sha1="aaaa"), [dict(r, deltas=[0.5]) for r in rows_a])
    write_table(str(tmp_path / "bd.jsonl"), dict(hb, data_sha1="aaaa"), rows_b)
    hd = merge_teachers([str(tmp_path / "ad.jsonl"), str(tmp_path / "bd.jsonl")], str(tmp_path / "ensd.jsonl"))
    assert hd["data_sha1"] == "aaaa" and not any("deltas" in r for r in read_utilities(str(tmp_path / "ensd.jsonl"))[1])
    assert all("max_passage_tokens" in s_ and "prompt_with" in s_ for s_ in hd["sources"])
    os.remove(tmp_path / "bd.jsonl")
    write_table(str(tmp_path / "bd.jsonl"), dict(hb, data_sha1="bbbb"), rows_b)
    with pytest.raises(ValueError, match="candidate settings differ.*data_sha1"):
        merge_teachers([str(tmp_path / "ad.jsonl"), str(tmp_path / "bd.jsonl")], str(tmp_path / "ense.jsonl"))
    # a first table without a fingerprint does not let two different ones through
    write_table(str(tmp_path / "a0.jsonl"), dict(ha, teacher="C"), rows_a)
    with pytest.raises(ValueError, match="bd.jsonl: scored on other data contents than .*ad.jsonl"):
        merge_teachers([str(tmp_path / "a0.jsonl"), str(tmp_path / "ad.jsonl"), str(tmp_path / "bd.jsonl")],
                       str(tmp_path / "ensf.jsonl"))
    # an unfinished table (a killed run's .partial, or fewer rows than its header plans) would shrink the ensemble
    with open(tmp_path / "bp.jsonl.partial", "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in [hb] + rows_b[: len(rows_b) // 2]))
    with pytest.raises(ValueError, match=r"bp.jsonl.partial: an unfinished table \(\d+ of \d+ rows\)"):
        merge_teachers([a, str(tmp_path / "bp.jsonl.partial")], str(tmp_path / "e6.jsonl.gz"))
    write_table(str(tmp_path / "bh.jsonl"), dict(hb, n_rows=len(rows_b) + 5), rows_b)
    with pytest.raises(ValueError, match="bh.jsonl: an unfinished table"):
        merge_teachers([a, str(tmp_path / "bh.jsonl")], str(tmp_path / "e7.jsonl.gz"))
    # one teacher twice is not an ensemble
    write_table(str(tmp_path / "a_again.jsonl"), ha, rows_a)
    with pytest.raises(ValueError, match=r"a_again.jsonl: the same teacher \(A, same settings\) as .*a.jsonl.gz"):
        merge_teachers([a, b, str(tmp_path / "a_again.jsonl")], str(tmp_path / "e8.jsonl.gz"))
    write_table(str(tmp_path / "a_prompt.jsonl"), dict(ha, prompt_with="Passage: {passage}\nQ: {question}\nA:"), rows_a)
    merge_teachers([a, str(tmp_path / "a_prompt.jsonl")], str(tmp_path / "e9.jsonl.gz"))  # a prompt ensemble
    from uae_fast.cli import main

    assert main(["score", "--merge-teachers", a, b, "--out", str(tmp_path / "ens2.jsonl.gz")]) == 0
    assert read_utilities(str(tmp_path / "ens2.jsonl.gz"))[1] == rows
    subset(a, ds, "top:2", str(tmp_path / "a2.jsonl.gz"), no_gold=True)
    with pytest.raises(ValueError, match="candidate settings differ.*candidates"):
        merge_teachers([a, str(tmp_path / "a2.jsonl.gz")], str(tmp_path / "e3.jsonl.gz"))
    # a NaN row is one clear error line, not an internal error from the z-scoring
    ha, rows_a = read_utilities(a)
    write_table(str(tmp_path / "nan.jsonl"), ha, [dict(rows_a[0], utility=float("nan"))] + rows_a[1:])
    capsys.readouterr()
    assert main(["score", "--merge-teachers", str(tmp_path / "nan.jsonl"), b, "--out", str(tmp_path / "e4.jsonl")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nan.jsonl: row 1" in err[0] and "utility must be a finite number, got nan" in err[0], err
    assert not os.path.exists(tmp_path / "e4.jsonl") and not os.path.exists(tmp_path / "e4.jsonl.partial")


def test_score_no_gold_header_and_questions(tmp_path, ds):
    from test_teacher import byte_tokenizer, tiny_llama
    from uae_fast.scoring import score_dataset
    from uae_fast.teacher import UtilityScorer

    scorer = UtilityScorer(tiny_llama(), byte_tokenizer(), max_passage_tokens=24, max_answer_tokens=6, name="tiny")
    out = str(tmp_path / "ng.jsonl")
    with pytest.raises(ValueError, match="with_gold_only=False"):
        score_dataset(scorer, ds, out, candidates="top:2", no_gold=True, progress=False)
    h = score_dataset(scorer, ds, out, candidates="top:2", no_gold=True, with_gold_only=False, progress=False, limit=6)
    assert h["no_gold"] is True and h["candidates"] == "top:2"
    hh, rows = read_utilities(out)
    pol = CandidatePolicy(ds, "top:2", no_gold=True)
    by_id = {q.id: q for q in ds.queries}
    for qid in {r["qid"] for r in rows}:
        assert [r["pid"] for r in rows if r["qid"] == qid] == pol(by_id[qid])
    check_answer_only(hh)



def test_score_questions_from_a_table_gives_mergeable_rows(tmp_path, ds):
    # A second teacher scored with questions_from= the first table holds exactly its questions and rows, in the
    # same order, with the same data name, so the two tables merge (a subset data file would not).
    from test_teacher import byte_tokenizer, tiny_llama
    from uae_fast.scoring import score_dataset
    from uae_fast.teacher import UtilityScorer

    first = UtilityScorer(tiny_llama(), byte_tokenizer(), max_passage_tokens=24, max_answer_tokens=6, name="a")
    a = str(tmp_path / "a.jsonl")
    score_dataset(first, ds, a, candidates="top:2", no_gold=True, with_gold_only=False, progress=False, limit=5)
    second = UtilityScorer(tiny_llama(seed=7), byte_tokenizer(), max_passage_tokens=24, max_answer_tokens=6, name="b")
    b = str(tmp_path / "b.jsonl")
    h = score_dataset(second, ds, b, candidates="top:2", no_gold=True, with_gold_only=False, progress=False,
                      questions_from=a)
    assert h["questions_from"] == "a.jsonl" and h["n_queries"] == 5
    rows_a, rows_b = read_utilities(a)[1], read_utilities(b)[1]
    assert [(r["qid"], r["pid"]) for r in rows_a] == [(r["qid"], r["pid"]) for r in rows_b]
    assert [r["utility"] for r in rows_a] != [r["utility"] for r in rows_b]  # another teacher indeed
    hm = merge_teachers([a, b], str(tmp_path / "ens.jsonl"))
    assert hm["n_rows"] == len(rows_a)
    empty = str(tmp_path / "none.jsonl")
    write_table(empty, dict(read_utilities(a)[0]), [dict(rows_a[0], qid="not-in-the-data")])
    with pytest.raises(ValueError, match="none of its questions"):
        score_dataset(second, ds, str(tmp_path / "c.jsonl"), candidates="top:2", no_gold=True, with_gold_only=False,
                      progress=False, questions_from=empty)

# ------------------------------------------------------------------------------------------- training
def test_no_gold_batches_never_use_gold(tmp_path, ds):
    u, _ = load_utilities(no_gold_table(tmp_path, ds, m=3))
    cfg = TrainConfig(loss="uae", no_gold=True, label_mix=0.0, batch_size=3, passages_per_query=5, seed=1)
    a, b = BatchSampler(ds, cfg, u), BatchSampler(strip_gold(ds), cfg, u)
    assert sorted(q.id for q in a.queries) == sorted(u)  # every scored question, gold or not
    for m in range(a.batches_per_epoch + 1):
        x, y = a.batch(m), b.batch(m)
        assert x.qids == y.qids and x.passages == y.passages and torch.equal(x.target_idx, y.target_idx)
        assert (x.gold_idx == -1).all()
        for i, qid in enumerate(x.qids):  # every scored candidate is in the batch and is a target
            text = {x.passages[j] for j in x.target_idx[i].tolist() if j >= 0}
            assert text == {ds.passages[p].text for p in u[qid]}


def test_min_confidence_keeps_the_confident_targets(tmp_path, ds):
    u, _ = load_utilities(no_gold_table(tmp_path, ds, m=3))
    base = dict(loss="uae", no_gold=True, label_mix=0.0, batch_size=3, passages_per_query=5, seed=1)
    conf = {}
    for qid, d in u.items():  # float64 reference of the target's largest probability
        x = np.array(list(d.values()), dtype=np.float64) / 0.5
        conf[qid] = float(np.exp(x - x.max()).max() / np.exp(x - x.max()).sum())
    cut = float(np.median(list(conf.values())))
    s = BatchSampler(ds, TrainConfig(**base, min_confidence=cut), u)
    assert sorted(q.id for q in s.queries) == sorted(q for q, c in conf.items() if c >= cut)
    assert 0 < len(s.queries) < len(u) and s.n_low_confidence == len(u) - len(s.queries)
    assert len(BatchSampler(ds, TrainConfig(**base, min_confidence=1e-9), u).queries) == len(u)
    with pytest.raises(ValueError, match="no question's target is that confident"):
        BatchSampler(ds, TrainConfig(**{**base, "teacher_temperature": 100.0}, min_confidence=0.99), u)
    for bad, msg in ((dict(min_confidence=0.0), "probability in \\(0, 1\\]"), (dict(min_confidence=1.5), "probability"),
                     (dict(min_confidence=0.5, no_gold=False, label_mix=0.5), "needs --no-gold --loss uae")):
        with pytest.raises(ValueError, match=msg):
            TrainConfig(**{**base, **bad}).check()


def test_confidence_weight_scales_each_questions_loss(tmp_path, ds, tiny, monkeypatch):
    import uae_fast.ops.infonce as infonce

    table = no_gold_table(tmp_path, ds, m=3)
    u, _ = load_utilities(table)
    base = dict(loss="uae", no_gold=True, label_mix=0.0, batch_size=3, passages_per_query=5, seed=1)
    conf = {}
    for qid, d in u.items():  # float64 reference: the target's largest probability, over the mean of all questions
        x = np.array(list(d.values()), dtype=np.float64) / 0.5
        conf[qid] = float(np.exp(x - x.max()).max() / np.exp(x - x.max()).sum())
    mean = sum(conf.values()) / len(conf)
    assert max(conf.values()) / min(conf.values()) > 1.2  # the weights differ, so the test can fail
    weighted, plain = (BatchSampler(ds, TrainConfig(**base, confidence_weight=w), u) for w in (True, False))
    for m in range(weighted.batches_per_epoch):  # same batches and targets; only the weights are new
        a, b = weighted.batch(m), plain.batch(m)
        assert a.qids == b.qids and a.passages == b.passages and torch.equal(a.target_idx, b.target_idx)
        assert b.query_weight is None
        np.testing.assert_allclose(a.query_weight.numpy(), [conf[q] / mean for q in a.qids], rtol=1e-6)
    # in training, the step's loss is the weighted mean of the per-question losses
    seen, real = [], infonce.utility_infonce

    def spy(*args, **kw):
        out = real(*args, **kw)
        seen.append((kw.get("reduction", "mean"), out.detach().clone()))
        return out

    monkeypatch.setattr(infonce, "utility_infonce", spy)
    cfg = TrainConfig(**base, data=TRAIN, student=tiny, utilities=table, max_steps=1, max_passage_length=16,
                      confidence_weight=True)
    s = train(cfg, str(tmp_path / "run"), progress=False, ds=ds)
    (reduction, per_query), = seen
    assert reduction == "none" and per_query.shape == (3,)
    w = torch.tensor([conf[q] / mean for q in weighted.batch(0).qids], dtype=torch.float32)
    assert s["final_loss"] == pytest.approx(float((per_query * w).mean()), rel=1e-5)
    assert s["config"]["confidence_weight"] is True
    for bad, msg in ((dict(confidence_weight=1), "must be a bool"),
                     (dict(confidence_weight=True, no_gold=False, label_mix=0.5), "needs --no-gold --loss uae")):
        with pytest.raises(ValueError, match=msg):
            TrainConfig(**{**base, **bad}).check()


@pytest.mark.parametrize("kind", ["bm25", "bm25-answer", "teacher-top1"])
def test_weak_positives_and_same_batches(tmp_path, ds, kind):
    u, _ = load_utilities(no_gold_table(tmp_path, ds, m=3))
    kw = dict(no_gold=True, label_mix=0.0, batch_size=3, passages_per_query=5, seed=2)
    weak = BatchSampler(ds, TrainConfig(loss="infonce", positive=kind, **kw), u)
    uae = BatchSampler(ds, TrainConfig(loss="uae", **kw), u)
    by_id = {q.id: q for q in ds.queries}
    for qid, pos in weak._positive.items():
        q, cands = by_id[qid], list(u[qid])
        if kind == "teacher-top1":
            want = max(cands, key=lambda p: (u[qid][p], -cands.index(p)))
        else:
            pool = ds.pool(q)
            text = q.question if kind == "bm25" else " ".join([q.question] + q.answers)
            s = dict(zip(pool, BM25([ds.passages[p].text for p in pool]).scores(text)))
            want = max(cands, key=lambda p: (s[p], -cands.index(p)))
        assert pos == want
    for m in range(weak.batches_per_epoch):
        a, b = weak.batch(m), uae.batch(m)
        assert a.qids == b.qids and a.passages == b.passages  # same batches as UAE with the seed
        assert ((a.target_idx >= 0).sum(1) == 1).all()
        for i, qid in enumerate(a.qids):
            assert a.passages[int(a.target_idx[i, 0])] == ds.passages[weak._positive[qid]].text
    assert weak_positives(ds, [by_id[q] for q in u], {q: list(u[q]) for q in u}, kind, u) == weak._positive


def test_weak_label_mix_puts_the_weak_positive_where_gold_would_be(tmp_path, ds):
    u, _ = load_utilities(no_gold_table(tmp_path, ds, m=3))
    kw = dict(no_gold=True, batch_size=3, passages_per_query=5, seed=2)
    mix = BatchSampler(ds, TrainConfig(loss="uae", positive="bm25-answer", label_mix=0.5, **kw), u)
    weak = BatchSampler(ds, TrainConfig(loss="infonce", positive="bm25-answer", label_mix=0.0, **kw), u)
    plain = BatchSampler(ds, TrainConfig(loss="uae", label_mix=0.0, **kw), u)
    bare = BatchSampler(strip_gold(ds), TrainConfig(loss="uae", positive="bm25-answer", label_mix=0.5, **kw), u)
    for m in range(mix.batches_per_epoch):
        a, b, c, d = mix.batch(m), weak.batch(m), plain.batch(m), bare.batch(m)
        assert a.passages == b.passages == c.passages and torch.equal(a.target_idx, c.target_idx)  # teacher targets as before
        assert torch.equal(a.gold_idx, b.target_idx[:, 0]) and (c.gold_idx == -1).all()  # weak positive in the gold slot
        assert torch.equal(a.gold_idx, d.gold_idx) and a.passages == d.passages  # never gold


def test_answer_only_training_is_independent_of_gold(tmp_path, ds, tiny):
    # The same data and table with every gold field removed (dataset evidence and the table's `gold` flags)
    # must give bit-identical weights: the sampler, targets and loss never read gold.
    src = all_table(tmp_path / "all.jsonl.gz", ds)
    h, rows = read_utilities(src)
    bare = str(tmp_path / "bare.jsonl.gz")
    write_table(bare, h, [{k: v for k, v in r.items() if k != "gold"} for r in rows])
    subset(src, ds, "top:3", str(tmp_path / "ng.jsonl.gz"), no_gold=True)
    subset(bare, strip_gold(ds), "top:3", str(tmp_path / "ng-bare.jsonl.gz"), no_gold=True)
    assert all("gold" not in r for r in read_utilities(str(tmp_path / "ng-bare.jsonl.gz"))[1])
    base = dict(data=TRAIN, student=tiny, no_gold=True, label_mix=0.0, max_steps=3, batch_size=4, passages_per_query=5,
                max_passage_length=32, lr=1e-3, seed=1)
    # (the last: `uae train --no-gold`'s default, the BM25(question + answers) lexical teacher ensembled in)
    for loss, pos, mix, lex in (("uae", "gold", 0.0, "none"), ("infonce", "bm25-answer", 0.0, "none"),
                                ("uae", "bm25-answer", 0.5, "none"), ("uae", "gold", 0.0, "bm25-answer")):
        runs = []
        for name, data in (("ng", ds), ("ng-bare", strip_gold(ds))):
            cfg = TrainConfig(utilities=str(tmp_path / f"{name}.jsonl.gz"), loss=loss, positive=pos, lexical_teacher=lex,
                              **{**base, "label_mix": mix})
            train(cfg, str(tmp_path / f"{loss}-{pos}-{lex}-{name}"), progress=False, ds=data)
            runs.append(_weights(tmp_path / f"{loss}-{pos}-{lex}-{name}"))
        assert runs[0].keys() == runs[1].keys()
        for k in runs[0]:
            assert torch.equal(runs[0][k], runs[1][k]), (loss, lex, k)
    # and the test can fail: gold-label UAE on the same table trains other weights
    cfg = TrainConfig(**{**base, "no_gold": False, "label_mix": 0.5}, utilities=src, loss="uae")
    train(cfg, str(tmp_path / "gold"), progress=False, ds=ds)
    g = _weights(tmp_path / "gold")
    assert any(not torch.equal(g[k], runs[0][k]) for k in g)


def test_config_errors_and_refused_tables(tmp_path, ds, tiny, capsys):
    with pytest.raises(ValueError, match="--label-mix must be 0"):
        TrainConfig(no_gold=True).check()
    with pytest.raises(ValueError, match="add --no-gold"):
        TrainConfig(loss="infonce", positive="bm25").check()
    with pytest.raises(ValueError, match="with --loss infonce"):
        TrainConfig(loss="uae", positive="bm25", no_gold=True, label_mix=0.0).check()
    with pytest.raises(ValueError, match="with --loss infonce"):
        TrainConfig(loss="uae", positive="bm25", no_gold=False, label_mix=0.5).check()
    TrainConfig(loss="uae", positive="bm25-answer", no_gold=True, label_mix=0.5).check()  # the weak-label mix
    with pytest.raises(ValueError, match="needs a weak --positive"):
        TrainConfig(loss="infonce", no_gold=True, label_mix=0.0).check()
    with pytest.raises(ValueError, match="positive must be one of"):
        TrainConfig(loss="infonce", positive="bm26").check()
    with pytest.raises(ValueError, match="--teacher-gate"):
        TrainConfig(no_gold=True, label_mix=0.0, teacher_gate=0.0).check()
    u, _ = load_utilities(no_gold_table(tmp_path, ds, m=4))
    # a candidate policy the table did not score would make an unscored paragraph the target: refused
    BatchSampler(ds, TrainConfig(loss="uae", no_gold=True, label_mix=0.0, candidates="top:4", passages_per_query=5), u)
    with pytest.raises(ValueError, match="--candidates top:6 with --no-gold: question .* did not score"):
        BatchSampler(ds, TrainConfig(loss="uae", no_gold=True, label_mix=0.0, candidates="top:6", passages_per_query=8), u)
    with pytest.raises(ValueError, match="more than --passages-per-query 3"):
        BatchSampler(ds, TrainConfig(loss="infonce", positive="bm25", no_gold=True, label_mix=0.0, passages_per_query=3), u)
    from uae_fast.cli import main

    src = all_table(tmp_path / "all.jsonl.gz", ds)
    subset(src, ds, "top:2", str(tmp_path / "gold-added.jsonl.gz"))
    rc = main(["train", "--data", TRAIN, "--utilities", str(tmp_path / "gold-added.jsonl.gz"), "--no-gold", "--out",
               str(tmp_path / "o"), "--student", tiny, "--no-progress", "--max-steps", "1"])
    assert rc == 1 and "scored with gold evidence added" in capsys.readouterr().err
    rc = main(["train", "--data", TRAIN, "--no-gold", "--label-mix", "0.5", "--utilities", src, "--out",
               str(tmp_path / "o"), "--student", tiny, "--no-progress", "--max-steps", "1"])
    assert rc == 1 and "--label-mix must be 0" in capsys.readouterr().err


def test_cli_no_gold_defaults(tmp_path, ds, tiny, capsys):
    from uae_fast.cli import main

    src = all_table(tmp_path / "all.jsonl.gz", ds)  # every paragraph: answer-only by construction
    rc = main(["train", "--data", TRAIN, "--no-gold", "--utilities", src, "--out", str(tmp_path / "o"), "--student", tiny,
               "--no-progress", "--max-steps", "1", "--max-passage-length", "16", "--batch-size", "2"])
    assert rc == 0, capsys.readouterr().err
    cfg = json.load(open(tmp_path / "o" / "training_summary.json"))["config"]
    assert cfg["no_gold"] and cfg["label_mix"] == 0.0 and cfg["passages_per_query"] == 16
    assert cfg["lexical_teacher"] == "bm25-answer"  # the teacher + BM25(q + a) ensemble is --no-gold's default
    rc = main(["train", "--data", TRAIN, "--no-gold", "--loss", "infonce", "--positive", "teacher-top1", "--utilities", src,
               "--candidates", "top:2", "--out", str(tmp_path / "w"), "--student", tiny, "--no-progress", "--max-steps", "1",
               "--max-passage-length", "16", "--batch-size", "2"])
    assert rc == 0, capsys.readouterr().err
    assert json.load(open(tmp_path / "w" / "training_summary.json"))["config"]["lexical_teacher"] == "none"
    assert json.load(open(tmp_path / "w" / "training_summary.json"))["config"]["positive"] == "teacher-top1"
    capsys.readouterr()
    rc = main(["train", "--data", TRAIN, "--no-gold", "--loss", "infonce", "--positive", "bm25", "--lexical-teacher",
               "bm25-answer", "--utilities", src, "--out", str(tmp_path / "x"), "--student", tiny, "--no-progress"])
    assert rc == 1 and "--lexical-teacher bm25-answer is ensembled into the uae target" in capsys.readouterr().err
    for flags in (["--confidence-weight"], ["--min-confidence", "0.5"]):  # the flags reach the config's checks
        rc = main(["train", "--data", TRAIN, "--no-gold", "--loss", "infonce", "--positive", "bm25", "--utilities", src,
                   "--out", str(tmp_path / "y"), "--student", tiny, "--no-progress"] + flags)
        assert rc == 1 and f"{flags[0]} " in capsys.readouterr().err and not (tmp_path / "y").exists()


@pytest.mark.parametrize("name,policy", [("qasper-train-utilities-nogold-answer12.jsonl.gz", "answer:12"),
                                         ("qasper-train-utilities-nogold-top12.jsonl.gz", "top:12")])
def test_shipped_answer_only_table_is_an_exact_subset(name, policy):
    from uae_fast.scoring import DEFAULT_NO_GOLD_CANDIDATES

    path = os.path.join(ROOT, "data", name)
    if policy == DEFAULT_NO_GOLD_CANDIDATES:  # the default table is the default policy's
        assert os.path.samefile(_default_utilities(no_gold=True), path)
    h, rows = read_utilities(path)
    assert h["no_gold"] is True and h["candidates"] == policy and h["subset_of"] == "qasper-train-utilities-all.jsonl.gz"
    assert h["teacher"] == "SmolLM2-135M-Instruct" and h["answers"] == "all" and h["n_rows"] == len(rows)
    ha, all_rows = read_utilities(os.path.join(ROOT, "data", "qasper-train-utilities-all.jsonl.gz"))
    u = {(r["qid"], r["pid"]): r["utility"] for r in all_rows}
    assert all(u[(r["qid"], r["pid"])] == r["utility"] for r in rows)
    per_q = {}
    for r in rows:
        per_q[r["qid"]] = r["n_cand"]
    assert len(per_q) == ha["n_queries"] and max(per_q.values()) == 12
    check_answer_only(h)



def test_shipped_gemma_answer_only_table_matches_the_default_rows():
    """The second teacher's table holds exactly the default table's (question, paragraph) rows, so the teacher
    ensemble (rows all tables share) loses none; its header says which teacher and that no gold was added."""
    path = os.path.join(ROOT, "data", "qasper-train-utilities-nogold-top12-gemma3-270m.jsonl.gz")
    h, rows = read_utilities(path)
    assert h["teacher"] == "gemma-3-270m" and h["dtype"] == "float32" and h["candidates"] == "top:12"
    assert h["no_gold"] is True and h["answers"] == "all" and h["n_rows"] == len(rows)
    assert h["data"] == "qasper-train-v0.3.json.gz" and h["questions_from"] == "qasper-train-utilities-nogold-top12.jsonl.gz"
    check_answer_only(h)
    _, ref = read_utilities(os.path.join(ROOT, "data", "qasper-train-utilities-nogold-top12.jsonl.gz"))
    assert sorted((r["qid"], r["pid"], r["cand"], r["n_cand"]) for r in rows) == \
        sorted((r["qid"], r["pid"], r["cand"], r["n_cand"]) for r in ref)
    u = [r["utility"] for r in rows]
    assert all(math.isfinite(x) for x in u) and len(set(u)) > len(u) // 2  # real scores, not a constant



def test_shipped_gemma_gold_table_matches_the_default_gold_rows():
    """Gemma on the default gold-added table's rows (top:3 + gold), for gold-label UAE with the second teacher."""
    h, rows = read_utilities(os.path.join(ROOT, "data", "qasper-train-utilities-gemma3-270m.jsonl.gz"))
    href, ref = read_utilities(os.path.join(ROOT, "data", "qasper-train-utilities.jsonl.gz"))
    assert h["teacher"] == "gemma-3-270m" and h["dtype"] == "float32" and h["candidates"] == href["candidates"] == "top:3"
    assert "no_gold" not in h and h["questions_from"] == "qasper-train-utilities.jsonl.gz" and h["n_rows"] == len(rows)
    assert sorted((r["qid"], r["pid"], r["gold"]) for r in rows) == sorted((r["qid"], r["pid"], r["gold"]) for r in ref)
    u = [r["utility"] for r in rows]
    assert all(math.isfinite(x) for x in u) and len(set(u)) > len(u) // 2


def test_shipped_gemma_answer12_table_matches_the_default_rows_and_reuses_the_other_gemma_tables():
    """Gemma on the default answer-only table's rows (`answer:12`): the same rows, and the rows it shares with the
    other two Gemma tables are theirs exactly (copied by `uae score --reuse`, same teacher and settings)."""
    h, rows = read_utilities(os.path.join(ROOT, "data", "qasper-train-utilities-nogold-answer12-gemma3-270m.jsonl.gz"))
    _, ref = read_utilities(os.path.join(ROOT, "data", "qasper-train-utilities-nogold-answer12.jsonl.gz"))
    assert h["teacher"] == "gemma-3-270m" and h["dtype"] == "float32" and h["candidates"] == "answer:12"
    assert h["no_gold"] is True and h["n_rows"] == len(rows) and h["questions_from"] == "qasper-train-utilities-nogold-answer12.jsonl.gz"
    check_answer_only(h)
    assert sorted((r["qid"], r["pid"], r["cand"], r["n_cand"]) for r in rows) == \
        sorted((r["qid"], r["pid"], r["cand"], r["n_cand"]) for r in ref)
    mine = {(r["qid"], r["pid"]): r["utility"] for r in rows}
    copied = {}  # the first --reuse table holding a row gives its utility
    for other in ("qasper-train-utilities-nogold-top12-gemma3-270m.jsonl.gz", "qasper-train-utilities-gemma3-270m.jsonl.gz"):
        _, o = read_utilities(os.path.join(ROOT, "data", other))
        found = {k: r["utility"] for r in o if (k := (r["qid"], r["pid"])) in mine}
        assert found, other
        copied = {**found, **copied}
    assert all(mine[k] == u for k, u in copied.items())
    assert h["n_reused_rows"] == len(copied) < len(rows)  # every shared row copied, some rows new
    u = list(mine.values())
    assert all(math.isfinite(x) for x in u) and len(set(u)) > len(u) // 2


# ------------------------------------------------------------------------------------------- diagnose, teachers
def test_diagnose_hit_rates(tmp_path, ds, capsys):
    from uae_fast.diagnose import hit_rates

    src = all_table(tmp_path / "all.jsonl.gz", ds, gold_bonus=0.4)
    res = hit_rates(src, ds, ["top:2"], no_gold=True)
    u, _ = load_utilities(src)
    qs = [q for q in ds.queries if q.gold and q.id in u]
    assert res["n_questions"] == len(qs)
    every = res["sets"]["scored rows (all)"]
    want = sum(max(u[q.id], key=lambda p: (u[q.id][p], -ds.pool(q).index(p))) in q.gold for q in qs) / len(qs)
    assert every["teacher_top1_gold"] == pytest.approx(want) and every["coverage"] == 1.0
    pol = CandidatePolicy(ds, "top:2", no_gold=True)
    top2 = res["sets"]["top:2 no-gold"]
    assert top2["coverage"] == pytest.approx(sum(any(p in q.gold for p in pol(q)) for q in qs) / len(qs))
    assert 0 <= top2["teacher_top1_gold"] <= top2["coverage"]
    from uae_fast.cli import main

    js = tmp_path / "diag.json"
    assert main(["diagnose", "--utilities", src, "--data", TRAIN, "--candidates", "top:2", "--no-gold", "--json", str(js)]) == 0
    assert "| top:2 no-gold |" in capsys.readouterr().out
    assert json.loads(js.read_text())[0]["sets"]["top:2 no-gold"] == pytest.approx(top2)
    # a write that dies half-way leaves the previous report, not half a new one
    import uae_fast.diagnose

    def dies(obj, f, **kw):
        f.write('[{"sets": ')
        raise OSError("disk full")

    before = js.read_text()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(uae_fast.diagnose.json, "dump", dies)
        assert main(["diagnose", "--utilities", src, "--data", TRAIN, "--json", str(js)]) == 1
    assert js.read_text() == before and not [f for f in os.listdir(tmp_path) if ".tmp" in f]
    capsys.readouterr()
    # with the lexical teacher, a candidate set is judged as a table cut to that set trains: the ensemble is
    # standardised over the set (it was standardised over the whole table, then cut)
    top2_table = str(tmp_path / "top2.jsonl.gz")
    subset(src, ds, "top:2", top2_table, no_gold=True)
    cut = hit_rates(src, ds, ["top:2"], no_gold=True, lexical_teacher="bm25-answer")["sets"]["top:2 no-gold"]
    own = hit_rates(top2_table, ds, lexical_teacher="bm25-answer")["sets"]["scored rows (top:2)"]
    assert cut["teacher_top1_gold"] == pytest.approx(own["teacher_top1_gold"])
    assert cut["teacher_gold_mass"] == pytest.approx(own["teacher_gold_mass"])
    # and uae train --no-gold --candidates top:2 on the all table trains on the same rows as on the top:2 table
    from uae_fast.training import _cut_to_policy

    cfg = TrainConfig(loss="uae", no_gold=True, label_mix=0.0, candidates="top:2")
    cut_u, cands = _cut_to_policy(u, ds, cfg)
    assert cut_u == load_utilities(top2_table)[0]
    # the sampler reuses those candidate sets instead of computing the policy a second time
    from uae_fast import scoring
    from uae_fast.training import BatchSampler

    calls = []
    real = scoring.CandidatePolicy.prepare
    try:
        scoring.CandidatePolicy.prepare = lambda self, *a, **k: calls.append(1) or real(self, *a, **k)
        reused = BatchSampler(ds, cfg, cut_u, candidates=cands)
        assert calls == []
        fresh = BatchSampler(ds, cfg, cut_u)
        assert calls == [1]
    finally:
        scoring.CandidatePolicy.prepare = real
    assert reused._cands == fresh._cands and set(reused._cands) == set(cut_u)
    with pytest.raises(ValueError, match="candidates has no set for 1 training queries"):
        BatchSampler(ds, cfg, cut_u, candidates={k: v for k, v in cands.items() if k != next(iter(cut_u))})


def test_diagnose_student_policy_uses_the_given_encoder_and_embeds_once(tmp_path, ds, monkeypatch):
    # student:M is judged with --candidate-student's encoder (a trained run's, to judge its mined candidates);
    # several tables share the policy, so the corpus is embedded once
    from test_student import make_tiny_encoder
    from uae_fast.diagnose import hit_rates
    from uae_fast.student import BiEncoder

    enc = str(make_tiny_encoder(tmp_path / "enc"))
    src = all_table(tmp_path / "all.jsonl.gz", ds, gold_bonus=0.4)
    encoded, real = [], BiEncoder.encode
    monkeypatch.setattr(BiEncoder, "encode", lambda self, texts, *a, **k: encoded.append(len(texts)) or real(self, texts, *a, **k))
    policies = {}
    first = hit_rates(src, ds, ["student:2"], no_gold=True, candidate_student=enc, policies=policies)
    n = sum(encoded)
    assert n > 0
    again = hit_rates(src, ds, ["student:2"], no_gold=True, candidate_student=enc, policies=policies)
    assert sum(encoded) == n and again == first
    u, _ = load_utilities(src)
    qs = [q for q in ds.queries if q.gold and q.id in u]
    pol = CandidatePolicy(ds, "student:2", student=enc, no_gold=True)
    pol.prepare(qs)
    want = sum(any(p in q.gold for p in pol(q)) for q in qs) / len(qs)
    assert first["sets"]["student:2 no-gold"]["coverage"] == pytest.approx(want)


def test_diagnose_gold_mass(tmp_path, ds):
    """The target's gold mass against a float64 torch softmax; sharp T gives the top-1 rate; T <= 0 is an error."""
    import torch
    from uae_fast.diagnose import hit_rates

    src = all_table(tmp_path / "all.jsonl.gz", ds, gold_bonus=0.4)
    u, _ = load_utilities(src)
    qs = [q for q in ds.queries if q.gold and q.id in u]
    for t in (2.0, 0.5, 0.1):
        want = []
        for q in qs:
            ps = list(u[q.id])
            w = torch.softmax(torch.tensor([u[q.id][p] for p in ps], dtype=torch.float64) / t, 0)
            want.append(float(sum(w[i] for i, p in enumerate(ps) if p in q.gold)))
        res = hit_rates(src, ds, ["top:2"], no_gold=True, teacher_temperature=t)
        every = res["sets"]["scored rows (all)"]
        assert res["teacher_temperature"] == t and every["teacher_gold_mass"] == pytest.approx(sum(want) / len(qs), rel=1e-9)
        assert 0 <= res["sets"]["top:2 no-gold"]["teacher_gold_mass"] <= res["sets"]["top:2 no-gold"]["coverage"] + 1e-12
    sharp = hit_rates(src, ds, teacher_temperature=1e-6)["sets"]["scored rows (all)"]
    assert sharp["teacher_gold_mass"] == pytest.approx(sharp["teacher_top1_gold"], abs=1e-6)
    for bad in (0.0, float("inf"), float("nan")):  # inf would report a uniform target's gold mass
        with pytest.raises(ValueError, match="teacher_temperature must be a finite number > 0"):
            hit_rates(src, ds, teacher_temperature=bad)
    # --lexical-teacher bm25-answer judges the ensembled target: the same numbers as the merged table's
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "scripts"))
    from lexical_teacher_table import lexical_table

    ng = no_gold_table(tmp_path, ds, m=4, gold_bonus=0.4)
    lexical_table(ng, TRAIN, str(tmp_path / "lex.jsonl.gz"))
    merge_teachers([ng, str(tmp_path / "lex.jsonl.gz")], str(tmp_path / "mix.jsonl.gz"))
    inline = hit_rates(ng, ds, lexical_teacher="bm25-answer")
    merged = hit_rates(str(tmp_path / "mix.jsonl.gz"), ds)
    assert list(inline["sets"].values()) == list(merged["sets"].values())
    assert inline["sets"] != hit_rates(ng, ds)["sets"] and "bm25(question+answers)" in inline["teacher"]


def test_named_teachers():
    from uae_fast.teacher import DEFAULT_TEACHER, TEACHERS, load_causal_lm, teacher_name

    assert teacher_name(None) == teacher_name("smollm2-135m") == DEFAULT_TEACHER
    assert teacher_name("gemma3-270m") == "gemma-3-270m" and teacher_name("/x/y") == "/x/y"
    assert set(TEACHERS) == {"smollm2-135m", "gemma3-270m"}
    with pytest.raises(FileNotFoundError, match="not a folder .*nor a named teacher \\(smollm2-135m, gemma3-270m\\)"):
        load_causal_lm("gemma-9000", device="cpu")


def test_lexical_teacher_table_is_bm25_answer_and_merges(tmp_path, ds):
    """scripts/lexical_teacher_table.py: the table's top-1 per question is --positive bm25-answer's pick
    (an independent code path), its rows are the source's, and it ensembles with an LLM table."""
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "scripts"))
    from lexical_teacher_table import lexical_table

    src = no_gold_table(tmp_path, ds, m=3)
    out = str(tmp_path / "lex.jsonl.gz")
    h = lexical_table(src, TRAIN, out)
    (hs, rs), (hl, rl) = read_utilities(src), read_utilities(out)
    assert [(r["qid"], r["pid"]) for r in rs] == [(r["qid"], r["pid"]) for r in rl]
    assert hl["no_gold"] and hl["teacher"].startswith("bm25") and h["n_rows"] == len(rl)
    u, _ = load_utilities(out)
    by_id = {q.id: q for q in ds.queries}
    cands = {qid: [r["pid"] for r in rl if r["qid"] == qid] for qid in u}
    qs = [by_id[q] for q in u]
    assert weak_positives(ds, qs, cands, "teacher-top1", u) == weak_positives(ds, qs, cands, "bm25-answer")
    merge_teachers([src, out], str(tmp_path / "mix.jsonl.gz"))
    assert read_utilities(str(tmp_path / "mix.jsonl.gz"))[0]["teacher"].startswith("ensemble(")


def test_lexical_teacher_in_training_equals_the_merged_table(tmp_path, ds, tiny):
    """`--lexical-teacher bm25-answer` (computed at train time) gives exactly the utilities of the scripted route
    (lexical_teacher_table.py + --merge-teachers), and so the same model; a merged table is not ensembled twice."""
    import sys

    from uae_fast.lexical_teacher import lexical_utilities, with_lexical_teacher
    from uae_fast.utilities import ensemble_utilities

    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "scripts"))
    from lexical_teacher_table import lexical_table

    src = no_gold_table(tmp_path, ds, m=4)
    lexical_table(src, TRAIN, str(tmp_path / "lex.jsonl.gz"))
    mix = str(tmp_path / "mix.jsonl.gz")
    merge_teachers([src, str(tmp_path / "lex.jsonl.gz")], mix)
    u, h = load_utilities(src)
    merged, hm = load_utilities(mix)
    inline = with_lexical_teacher(u, ds, h)
    assert inline == merged and all(list(inline[q]) == list(merged[q]) for q in merged)
    # the lexical scores are BM25 of the question + answers over the pool (an independent BM25 call here)
    by_id = {q.id: q for q in ds.queries}
    lex = lexical_utilities(ds, {q: list(d) for q, d in u.items()})
    for qid, d in lex.items():
        q = by_id[qid]
        pool = ds.pool(q)
        ref = dict(zip(pool, BM25([ds.passages[p].text for p in pool]).scores(q.question + " " + " ".join(q.answers))))
        np.testing.assert_allclose([d[p] for p in d], [ref[p] for p in d], atol=6e-6)
    assert inline != u and ensemble_utilities([u, u]) != u  # z-units, not the teacher's scale
    base = dict(data=TRAIN, student=tiny, no_gold=True, label_mix=0.0, max_steps=2, batch_size=4, passages_per_query=6,
                max_passage_length=16, lr=1e-3, seed=3)
    train(TrainConfig(utilities=src, lexical_teacher="bm25-answer", **base), str(tmp_path / "a"), progress=False, ds=ds)
    train(TrainConfig(utilities=mix, **base), str(tmp_path / "b"), progress=False, ds=ds)
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    with pytest.raises(ValueError, match="already includes bm25.*--lexical-teacher none"):
        train(TrainConfig(utilities=mix, lexical_teacher="bm25-answer", **base), str(tmp_path / "c"), progress=False, ds=ds)
    with pytest.raises(ValueError, match="lexical_teacher must be one of none, bm25-answer"):
        TrainConfig(lexical_teacher="bm25").check()
    with pytest.raises(ValueError, match="not in the data"):
        lexical_utilities(ds, {"no-such-question": ["x"]})
    q0 = next(iter(u))
    with pytest.raises(ValueError, match="is not in question"):
        lexical_utilities(ds, {q0: ["no-such-paragraph"]})


def test_ensemble_utilities_matches_float64_z_scores():
    a = {"q1": {"p1": 1.0, "p2": 3.0, "p3": 2.0}, "q2": {"p1": 5.0, "p2": 5.0}, "q3": {"p9": 1.0}}
    b = {"q1": {"p3": 10.0, "p1": -4.0, "p2": 0.5, "p4": 7.0}, "q2": {"p1": 2.0, "p2": 1.0}, "q4": {"p1": 1.0}}
    from uae_fast.utilities import ensemble_utilities

    e = ensemble_utilities([a, b])
    assert set(e) == {"q1", "q2"} and list(e["q1"]) == ["p1", "p2", "p3"]  # shared rows, the first table's order
    z = lambda x: (x - x.mean()) / x.std() if x.std() > 0 else x * 0  # noqa: E731
    for qid in e:
        pids = list(e[qid])
        ref = (z(np.array([a[qid][p] for p in pids], np.float64)) + z(np.array([b[qid][p] for p in pids], np.float64))) / 2
        np.testing.assert_allclose([e[qid][p] for p in pids], ref, atol=6e-6)
    assert e["q2"]["p1"] == 0.5 and e["q2"]["p2"] == -0.5  # a constant teacher adds zeros
    with pytest.raises(ValueError, match="at least two"):
        ensemble_utilities([a])
    with pytest.raises(ValueError, match="share no"):
        ensemble_utilities([{"q": {"a": 1.0}}, {"q": {"b": 1.0}}])


def test_squad_corpus_end_to_end_answer_only(tmp_path, tiny, capsys):
    """The other-domain flow (README "Bring your own data"; COVID-QA in docs/answer-only.md) on a hand-written
    SQuAD file: split by article, score answer-only, train --no-gold on the table, evaluate on the held-out
    articles (gold read only there)."""
    import sys
    from test_teacher import byte_tokenizer, tiny_llama
    from uae_fast.cli import main
    from uae_fast.data import load_dataset
    from uae_fast.scoring import score_dataset
    from uae_fast.teacher import UtilityScorer
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "scripts"))
    import split_documents

    words = ["virus", "cell", "protein", "host", "immune", "vaccine", "receptor", "antibody", "lung", "fever"]
    arts = []
    for a in range(8):
        lines = [f"Line {i} of article {a} about {words[(a + i) % 10]} and {words[(a * 3 + i) % 10]}." for i in range(6)]
        ctx = "\n".join(lines)
        qas = [{"id": f"a{a}q{j}", "question": f"What about {words[(a + j) % 10]} in article {a}?",
                "answers": [{"text": lines[j].split(" about ")[1], "answer_start": ctx.index(lines[j]) + len(lines[j].split(" about ")[0]) + 7}]}
               for j in range(3)]
        arts.append({"title": f"Article {a}", "paragraphs": [{"context": ctx, "qas": qas}]})
    src = tmp_path / "corpus.json"
    src.write_text(json.dumps({"version": "1", "data": arts}))
    tr, ho = str(tmp_path / "train.json"), str(tmp_path / "heldout.json")
    assert split_documents.main([str(src), "--train", tr, "--heldout", ho]) == 0
    ds = load_dataset(tr)
    assert all(q.gold for q in ds.queries)  # the answer spans map to their lines
    scorer = UtilityScorer(tiny_llama(), byte_tokenizer(), max_passage_tokens=24, max_answer_tokens=6, name="tiny")
    table = str(tmp_path / "ng.jsonl.gz")
    h = score_dataset(scorer, ds, table, candidates="top:3", no_gold=True, with_gold_only=False, progress=False)
    assert h["no_gold"] is True
    assert main(["train", "--data", tr, "--no-gold", "--utilities", table, "--out", str(tmp_path / "m"), "--student", tiny,
                 "--no-progress", "--max-steps", "2", "--max-passage-length", "16", "--batch-size", "2"]) == 0
    assert main(["eval", "--data", ho, "--model", str(tmp_path / "m"), "--baselines", "bm25", "--no-progress",
                 "--json", str(tmp_path / "e.json")]) == 0
    res = json.load(open(tmp_path / "e.json"))
    assert set(res["systems"]) == {"m", "bm25"} and res["n_queries"] == len(load_dataset(ho).queries)
    capsys.readouterr()


def test_question_likelihood_check(tmp_path, ds, monkeypatch):
    """scripts/check_question_likelihood.py: each candidate's utility is the mean over the question's tokens of
    log p(q_t | passage prompt, q_<t) - log p(q_t | bare prompt) (a plain forward as the oracle); the report
    judges it, and a cache is reused only when it was scored with the same settings and holds the sample."""
    from test_teacher import byte_tokenizer, hf_logprobs, tiny_llama
    from uae_fast.teacher import UtilityScorer

    monkeypatch.syspath_prepend(os.path.join(ROOT, "scripts"))
    import check_question_likelihood as cql

    model, tok = tiny_llama(), byte_tokenizer()
    sc = UtilityScorer(model, tok, prompt_with=cql.PROMPT_WITH, prompt_without=cql.PROMPT_WITHOUT, max_passage_tokens=24)
    qs = [q for q in ds.queries if q.gold][:3]
    cands = {q.id: ds.pool(q)[:3] for q in qs}
    got = cql.question_likelihood(sc, ds, qs, cands, group=2)
    for q in qs:
        ans = sc.answer_ids(q.question)
        assert tok.decode(ans) == " " + q.question.strip()  # the question is what is scored
        base = hf_logprobs(model, sc.prompt_ids(cql.INSTRUCTION)[0], ans)
        for p in cands[q.id]:
            prompt = sc.prompt_ids(cql.INSTRUCTION, ds.passages[p].text)[0]
            text = tok.decode(prompt)
            assert text.startswith("Passage: ") and text.endswith("\n" + cql.INSTRUCTION + "\nQuestion:")
            ref = (hf_logprobs(model, prompt, ans) - base).mean()
            assert got[q.id][p] == pytest.approx(float(ref), abs=1e-4)
        assert len(set(got[q.id].values())) == len(cands[q.id])  # the passage matters
    # main() end to end on a table of the fixtures, the scorer stubbed by the tiny one: cache written, then reused
    table = no_gold_table(tmp_path, ds, m=3)
    monkeypatch.setattr(cql, "question_scorer", lambda teacher=None: sc)
    cache, out = str(tmp_path / "upr.json.gz"), str(tmp_path / "r.json")
    args = ["--data", TRAIN, "--utilities", table, "--per-kind", "2", "--cache", cache, "--json", out]
    cql.main(args)
    with open(out) as f:
        first = json.load(f)
    assert os.path.exists(cache) and [k["n_questions"] for k in first["kinds"].values()] == [2, 2]
    monkeypatch.setattr(cql, "question_scorer", lambda teacher=None: pytest.fail("the cache was not used"))
    cql.main(args)
    with open(out) as f:
        assert json.load(f) == first
    with pytest.raises(SystemExit, match="scored with other settings"):
        cql.main(args + ["--teacher", "gemma3-270m"])
    from uae_fast.data import write_json

    write_json({"key": cql.cache_key(None), "utilities": {}}, cache)
    with pytest.raises(SystemExit, match="not in it with their candidates"):
        cql.main(args)
