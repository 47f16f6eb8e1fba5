"""uae train: utilities loading/validation, deterministic batches, exact resume, CLI errors."""
import dataclasses
import gzip
import json
import math
import os
import random

import numpy as np
import pytest
import torch

from test_student import make_tiny_encoder
from uae_fast.data import load_dataset, shipped_file
from uae_fast.training import (BatchSampler, TrainConfig, check_utilities, latest_checkpoint, load_utilities, train)

HERE = os.path.dirname(__file__)
TRAIN = os.path.join(HERE, "fixtures", "qasper-train-mini.json.gz")


def write_utilities(path, ds, *, seed=0, gold_bonus=2.0, header=True):
    """A tiny utilities file in `uae score`'s shape: a header, then one row per (query, pool passage)."""
    rng = random.Random(seed)
    with gzip.open(path, "wt") as f:
        if header:
            f.write(json.dumps({"type": "header", "teacher": "test", "data": "mini"}) + "\n")
        for q in ds.queries:
            if not q.answers:
                continue
            for pid in ds.pool(q):
                u = rng.gauss(0, 0.5) + (gold_bonus if pid in q.gold else 0.0)
                f.write(json.dumps({"qid": q.id, "pid": pid, "utility": u, "n_answer_tokens": 3}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def ds():
    return load_dataset(TRAIN)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_encoder(tmp_path_factory.mktemp("tiny") / "enc")


def test_load_utilities_averages_and_header(tmp_path):
    p = tmp_path / "u.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in [
        {"type": "header", "teacher": "x"}, {"qid": "a", "pid": "d:0", "utility": 1.0},
        {"qid": "a", "pid": "d:0", "utility": 3.0}, {"qid": "a", "pid": "d:1", "utility": -1}, {"qid": 7, "pid": "d:1", "utility": 0.5}]))
    u, header = load_utilities(str(p))
    assert u == {"a": {"d:0": 2.0, "d:1": -1.0}, "7": {"d:1": 0.5}}
    assert header["teacher"] == "x"


@pytest.mark.parametrize("rows,match", [
    ([{"qid": "a", "pid": "x"}], "missing \\['utility'\\]"),
    ([{"qid": "a", "pid": "x", "utility": float("nan")}], "must be finite"),
    ([{"qid": "a", "pid": "x", "utility": "high"}], "must be a number"),
    ([{"qid": "a", "pid": "x", "utility": "2.5"}], "must be a number, got '2.5'"),
    ([{"qid": "a", "pid": "x", "utility": True}], "must be a number, got True"),
    ([{"type": "header"}], "no utility rows"),
    # two tables concatenated (two teachers' raw utilities would be averaged); repeats in a `uae score` table
    ([{"type": "header"}, {"qid": "a", "pid": "x", "utility": 1}, {"type": "header"}], "u.jsonl:3: a second header"),
    ([{"type": "header", "format": "uae-utilities/1"}, {"qid": "a", "pid": "x", "utility": 1},
      {"qid": "a", "pid": "x", "utility": 2}], "u.jsonl:3: duplicate \\(qid, pid\\) row \\(a, x\\)"),
    (["[1, 2]"], "JSON object"),
    # float32 overflow (training computes in float32), ids that are not ids, a row with misspelt keys
    ([{"qid": "a", "pid": "x", "utility": 1e39}], "u.jsonl:1: utility is 1e\\+39 \\(must be finite, within float32"),
    ([{"qid": ["a"], "pid": "x", "utility": 1}], "u.jsonl:1: qid must be a string \\(or an integer\\), got \\['a'\\]"),
    ([{"qid": "a", "pid": None, "utility": 1}], "pid must be a string"),
    ([{"type": "header"}, {"q": "a", "p": "x", "utility": 5.0}], "u.jsonl:2: a record with neither qid nor pid that is not a header"),
])
def test_load_utilities_errors(tmp_path, rows, match):
    p = tmp_path / "u.jsonl"
    p.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows))
    with pytest.raises(ValueError, match=match):
        load_utilities(str(p))


def test_load_utilities_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_utilities(str(tmp_path / "nope.jsonl"))
    (tmp_path / "x.jsonl").write_text("{oops\n")
    with pytest.raises(ValueError, match=":1: not valid JSON"):
        load_utilities(str(tmp_path / "x.jsonl"))
    (tmp_path / "y.jsonl.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="cannot read"):
        load_utilities(str(tmp_path / "y.jsonl.gz"))


def test_utilities_must_match_data(tmp_path, ds):
    u, _ = load_utilities(write_utilities(tmp_path / "u.jsonl.gz", ds))
    check_utilities(u, ds)  # matches
    dev = load_dataset(os.path.join(HERE, "fixtures", "qasper-dev-mini.json.gz"))
    with pytest.raises(ValueError, match="does not match data.*query ids are not in the data"):
        check_utilities(u, dev)
    q0 = next(iter(u))
    other = next(p for p in ds.passages if p not in ds.pool(next(q for q in ds.queries if q.id == q0)))
    bad = {q0: {other: 1.0}}
    with pytest.raises(ValueError, match="outside the query's candidate pool"):
        check_utilities(bad, ds)


def test_large_pools_draw_as_the_list_does_without_building_it(monkeypatch):
    # a BEIR question's pool is the whole corpus: _draw skips listing it per question, drawing exactly what
    # rng.choice over the list of the pool minus the chosen passages would draw
    import uae_fast.training as T

    rng = random.Random(0)
    for trial in range(40):
        pool = [f"p{i}" for i in range(rng.randint(1, 60))]
        chosen = rng.sample(pool, rng.randint(0, min(len(pool), 8))) + (["elsewhere"] if trial % 3 == 0 else [])
        n = rng.randint(1, len(pool) + 2)
        got = {}
        for large, qid in ((10**9, None), (0, "q"), (0, None)):  # the list path, then skipping (the pool, another list)
            monkeypatch.setattr(T, "_LARGE_POOL", large)
            sampler = T.BatchSampler.__new__(T.BatchSampler)
            sampler._positions, sampler._pools = {}, {"q": pool}
            got[large, qid] = sampler._draw(pool if qid else list(pool), chosen, n, np.random.default_rng(trial), qid)
            assert bool(sampler._positions) == (large == 0 and qid == "q")  # only the sampler's own pools are cached
        assert got[0, "q"] == got[0, None] == got[10**9, None]
        got = {0: got[0, "q"]}
        assert len(set(got[0])) == len(got[0]) and not set(got[0]) & set(chosen)
        assert len(got[0]) == min(n, len(set(pool) - set(chosen)))


def test_batches_deterministic_and_targets(tmp_path, ds):
    u, _ = load_utilities(write_utilities(tmp_path / "u.jsonl.gz", ds))
    cfg = TrainConfig(loss="uae", batch_size=4, passages_per_query=3, seed=3)
    s1, s2 = BatchSampler(ds, cfg, u), BatchSampler(ds, cfg, u)
    by_id = {q.id: q for q in ds.queries}
    seen = []
    for m in range(s1.batches_per_epoch):
        b1, b2 = s1.batch(m), s2.batch(m)
        assert b1.passages == b2.passages and torch.equal(b1.target_idx, b2.target_idx)
        seen += b1.qids
        for i, qid in enumerate(b1.qids):
            valid = b1.target_idx[i] >= 0
            # each target is a batch passage the teacher scored for this query, with its utility
            for j, uu in zip(b1.target_idx[i][valid].tolist(), b1.target_utility[i][valid].tolist()):
                text = b1.passages[j]
                match = [p for p, val in u[qid].items() if ds.passages[p].text == text]
                assert match and any(abs(u[qid][p] - uu) < 1e-6 for p in match)
            if by_id[qid].gold:  # the sampled gold passage is in the batch and marked
                g = int(b1.gold_idx[i])
                assert g >= 0 and b1.passages[g] in {ds.passages[p].text for p in by_id[qid].gold}
    # one epoch covers every query with utilities or gold exactly once
    assert sorted(seen) == sorted(q.id for q in ds.queries if q.id in u or q.gold)
    # with utilities for the gold-evidence queries (what `uae score` writes), infonce with the same file and
    # seed sees exactly the same batches as uae: only the targets differ
    ug = {q.id: u[q.id] for q in ds.queries if q.gold and q.id in u}
    a_s = BatchSampler(ds, TrainConfig(loss="uae", batch_size=4, passages_per_query=3, seed=3), ug)
    b_s = BatchSampler(ds, TrainConfig(loss="infonce", batch_size=4, passages_per_query=3, seed=3), ug)
    for m in range(a_s.batches_per_epoch + 1):
        a, b = a_s.batch(m), b_s.batch(m)
        assert a.qids == b.qids and a.passages == b.passages
        assert not torch.equal(a.target_idx, b.target_idx) or not torch.equal(a.target_utility, b.target_utility)
    # a new epoch is reshuffled, and another seed gives other batches
    assert [s1.batch(m).qids for m in range(2)] != [s1.batch(s1.batches_per_epoch + m).qids for m in range(2)]
    s3 = BatchSampler(ds, TrainConfig(loss="uae", batch_size=4, passages_per_query=3, seed=4), u)
    assert [s1.batch(m).qids for m in range(3)] != [s3.batch(m).qids for m in range(3)]


@pytest.mark.parametrize("loss", ["infonce", "uae"])
def test_teacher_gate_excludes_likely_false_negatives(tmp_path, ds, loss):
    u, _ = load_utilities(write_utilities(tmp_path / "u.jsonl.gz", ds, gold_bonus=0.3))
    ug = {q.id: u[q.id] for q in ds.queries if q.gold and q.id in u}
    base = BatchSampler(ds, TrainConfig(loss=loss, batch_size=4, passages_per_query=5, seed=2), ug)
    gate = BatchSampler(ds, TrainConfig(loss=loss, batch_size=4, passages_per_query=5, seed=2, teacher_gate=0.1), ug)
    by_id = {q.id: q for q in ds.queries}
    n_gated = 0
    for m in range(base.batches_per_epoch):
        a, b = base.batch(m), gate.batch(m)
        assert a.qids == b.qids and a.passages == b.passages and a.exclude_idx is None  # same batches
        for i, qid in enumerate(b.qids):
            q, uq = by_id[qid], ug.get(qid, {})
            text_to_pid = {ds.passages[pid].text: pid for pid in ds.pool(q)}
            best_gold = max((uq[g] for g in q.gold if g in uq), default=None)
            want = set() if best_gold is None else {
                j for j, t in enumerate(b.passages)
                if text_to_pid.get(t) in uq and text_to_pid[t] not in q.gold and uq[text_to_pid[t]] >= best_gold - 0.1}
            got = {int(j) for j in b.exclude_idx[i] if j >= 0}
            assert got == want
            n_gated += len(got)
            targets = {int(j) for j in b.target_idx[i] if j >= 0}
            assert not (got & targets)  # a gated passage is neither target nor negative
    assert n_gated > 0


def test_teacher_gate_trains_and_needs_utilities(tmp_path, ds, tiny):
    utils = write_utilities(tmp_path / "u.jsonl.gz", ds, gold_bonus=0.3)
    cfg = TrainConfig(data=TRAIN, utilities=utils, student=tiny, loss="infonce", max_steps=2, batch_size=4,
                      passages_per_query=4, max_passage_length=32, teacher_gate=0.5)
    s = train(cfg, str(tmp_path / "g"), progress=False, ds=ds)
    assert s["finished"] and math.isfinite(s["final_loss"])
    with pytest.raises(ValueError, match="--teacher-gate needs --utilities"):
        train(TrainConfig(data=TRAIN, student=tiny, loss="infonce", max_steps=1, teacher_gate=0.5), str(tmp_path / "h"),
              progress=False, ds=ds)
    with pytest.raises(ValueError, match="teacher_gate must be a finite number"):
        TrainConfig(teacher_gate=float("nan")).check()


def test_resume_removes_a_killed_final_saves_staging_folder(tmp_path, ds, tiny):
    utils = write_utilities(tmp_path / "u.jsonl.gz", ds)
    cfg = TrainConfig(data=TRAIN, utilities=utils, student=tiny, max_steps=2, batch_size=4, passages_per_query=4,
                      max_passage_length=32)
    out = tmp_path / "run"
    assert not train(cfg, str(out), stop_after=1, progress=False, ds=ds)["finished"]
    (out / ".saving-killed").mkdir()
    (out / ".saving-killed" / "model.safetensors").write_bytes(b"torn")
    assert train(cfg, str(out), resume=True, progress=False, ds=ds)["finished"]
    assert not [e for e in os.listdir(out) if e.startswith(".saving-")] and (out / "model.safetensors").exists()


def test_candidates_option_keeps_batches_of_a_smaller_table(ds):
    # A table over every paragraph + --candidates top:2 samples exactly the batches of the top:2 table
    # (same passages, same order), while targets may use the extra utilities.
    from uae_fast.scoring import CandidatePolicy

    rng = random.Random(5)
    qs = [q for q in ds.queries if q.gold]
    u_all = {q.id: {p: rng.uniform(-1, 1) for p in ds.pool(q)} for q in qs}
    policy = CandidatePolicy(ds, "top:2")
    u_top = {q.id: {p: u_all[q.id][p] for p in policy(q)} for q in qs}
    assert any(len(u_top[q]) < len(u_all[q]) for q in u_top)
    kw = dict(batch_size=3, passages_per_query=4, seed=2)
    hybrid = BatchSampler(ds, TrainConfig(loss="uae", candidates="top:2", **kw), u_all)
    small = BatchSampler(ds, TrainConfig(loss="uae", **kw), u_top)
    gold_only = BatchSampler(ds, TrainConfig(loss="infonce", candidates="top:2", **kw))
    extra = 0
    for m in range(hybrid.batches_per_epoch):
        a, b, c = hybrid.batch(m), small.batch(m), gold_only.batch(m)
        assert a.qids == b.qids == c.qids and a.passages == b.passages == c.passages
        assert ((a.target_idx >= 0).sum(1) >= (b.target_idx >= 0).sum(1)).all()
        extra += int((a.target_idx >= 0).sum() - (b.target_idx >= 0).sum())
    assert extra > 0  # random fill paragraphs got teacher mass from the bigger table
    with pytest.raises(ValueError, match="candidates"):
        TrainConfig(candidates="top:0").check()


def test_student_candidates_sample_the_initial_students_top_m(ds, tiny):
    # --candidates student:M ranks each paper with the initial student (cfg.student), as uae score would.
    from uae_fast.scoring import CandidatePolicy

    pol = CandidatePolicy(ds, "student:1", student=tiny)
    cfg = TrainConfig(loss="infonce", candidates="student:1", student=tiny, batch_size=3, passages_per_query=2, seed=0)
    s = BatchSampler(ds, cfg)
    import numpy as np

    for q in s.queries:
        cands = pol(q)
        picks = s._pick_passages(q, np.random.default_rng(0))
        k = min(len(picks), len(cands))  # beyond the candidates, random paragraphs of the paper top the query up
        assert set(picks[:k]) <= set(cands) and picks[0] in q.gold
    assert any(len(set(pol(q)) - set(q.gold)) for q in s.queries)


def test_partial_utilities_fall_back_to_gold(tmp_path, ds):
    u, _ = load_utilities(write_utilities(tmp_path / "u.jsonl.gz", ds))
    keep = sorted(u)[: len(u) // 2]
    part = {q: u[q] for q in keep}
    s = BatchSampler(ds, TrainConfig(loss="uae", batch_size=5, passages_per_query=3), part)
    by_id = {q.id: q for q in ds.queries}
    n_fallback = 0
    for m in range(s.batches_per_epoch):
        b = s.batch(m)
        for i, qid in enumerate(b.qids):
            tgt = [b.passages[j] for j in b.target_idx[i].tolist() if j >= 0]
            if qid in part:
                assert all(any(ds.passages[p].text == t for p in part[qid]) for t in tgt)
            else:
                n_fallback += 1
                assert tgt and all(t in {ds.passages[p].text for p in by_id[qid].gold} for t in tgt)
    assert n_fallback > 0
    # counted, so train() can say it and record it in the summary
    assert s.n_gold_target == sum(1 for q in s.queries if q.id not in part) > 0
    assert BatchSampler(ds, TrainConfig(loss="uae", batch_size=5, passages_per_query=3), u).n_gold_target == sum(
        1 for q in ds.queries if q.gold and not u.get(q.id))


def test_unscored_gold_in_the_batch_is_excluded_not_a_negative(ds):
    # gold-mode --loss uae, a table that scored one of a question's gold paragraphs: another gold drawn into the
    # batch has no target mass, so it is excluded from the question's softmax rather than pushed down
    q = next(q for q in ds.queries if len(set(q.gold)) >= 2)
    g0, rest = q.gold[0], [g for g in dict.fromkeys(q.gold) if g != q.gold[0]]
    other = next(p for p in ds.pool(q) if p not in q.gold)
    u = {q.id: {g0: 2.0, other: 0.5}}
    cfg = TrainConfig(loss="uae", batch_size=1, passages_per_query=len(ds.pool(q)), seed=0)
    s = BatchSampler(ds, cfg, u)
    seen = 0
    for m in range(s.batches_per_epoch):
        b = s.batch(m)
        if b.qids != [q.id]:
            continue
        texts = {ds.passages[p].text: p for p in ds.pool(q)}
        in_batch = {texts[t]: j for j, t in enumerate(b.passages)}
        targets = {j for j in b.target_idx[0].tolist() if j >= 0}
        excluded = {j for j in b.exclude_idx[0].tolist() if j >= 0}
        for g in rest:
            if g in in_batch and in_batch[g] not in targets and in_batch[g] != int(b.gold_idx[0]):
                assert in_batch[g] in excluded
                seen += 1
        assert not excluded & targets and int(b.gold_idx[0]) not in excluded
    assert seen > 0


@pytest.mark.parametrize("label_mix", [0.0, 0.5])
def test_unscored_drawn_gold_is_excluded_when_the_label_mix_gives_it_no_mass(ds, label_mix):
    # a table that scored none of the question's gold (a --no-gold table in gold mode): at label_mix 0 the drawn
    # gold has no target weight, so it must leave the softmax like the other gold, not be trained as a negative
    from uae_fast.ops import utility_infonce

    q = next(q for q in ds.queries if q.gold)
    others = [p for p in ds.pool(q) if p not in q.gold][:2]
    u = {q.id: {others[0]: 1.0, others[1]: 0.2}}
    cfg = TrainConfig(loss="uae", batch_size=1, passages_per_query=4, seed=0, label_mix=label_mix)
    s = BatchSampler(ds, cfg, u)
    b = next(s.batch(m) for m in range(s.batches_per_epoch) if s.batch(m).qids == [q.id])
    g = int(b.gold_idx[0])
    assert g >= 0 and b.passages[g] in {ds.passages[x].text for x in q.gold}
    excluded = {j for j in b.exclude_idx[0].tolist() if j >= 0} if b.exclude_idx is not None else set()
    assert (g in excluded) == (label_mix == 0.0)
    emb = torch.randn(len(b.passages), 8)
    loss = utility_infonce(torch.randn(1, 8), emb, b.target_idx, b.target_utility, gold_idx=b.gold_idx,
                           label_mix=label_mix, exclude_idx=b.exclude_idx, impl="torch")  # accepted by the loss
    assert torch.isfinite(loss)


def test_a_gold_less_question_whose_drawn_candidates_are_unscored_targets_its_teachers_best(ds):
    # --loss uae with gold, a --candidates policy and a question without gold whose scored rows all lie outside
    # it: its target is the teacher's best paragraph, never an arbitrary unscored candidate.
    from uae_fast.scoring import CandidatePolicy

    q = next(q for q in ds.queries if q.gold and len(ds.pool(q)) > 6)
    gl = dataclasses.replace(q, gold=[])
    ds2 = dataclasses.replace(ds, queries=[gl])
    cands = set(CandidatePolicy(ds2, "top:2")(gl))
    outside = [p for p in ds.pool(q) if p not in cands][:3]
    u = {q.id: {p: float(i) for i, p in enumerate(outside)}}  # the last of them is the teacher's best
    s = BatchSampler(ds2, TrainConfig(loss="uae", candidates="top:2", batch_size=1, passages_per_query=2), u)
    assert [x.id for x in s.queries] == [q.id]
    b = s.batch(0)
    tgt = [b.passages[j] for j in b.target_idx[0].tolist() if j >= 0]
    assert tgt == [ds.passages[outside[-1]].text]


def test_infonce_targets_are_gold_and_ranks_partition(ds):
    cfg = TrainConfig(loss="infonce", batch_size=3, passages_per_query=3)
    whole = BatchSampler(ds, TrainConfig(loss="infonce", batch_size=6, passages_per_query=3))
    r0, r1 = BatchSampler(ds, cfg, world=2, rank=0), BatchSampler(ds, cfg, world=2, rank=1)
    by_id = {q.id: q for q in ds.queries}
    for m in range(whole.batches_per_epoch):
        a, b = r0.batch(m), r1.batch(m)
        assert a.qids + b.qids == whole.batch(m).qids or b.loss_weight == 0
        passages = a.passages + b.passages  # indices point into the global batch's passages
        for bt in (a, b):
            for i, qid in enumerate(bt.qids):
                gold_texts = {ds.passages[p].text for p in by_id[qid].gold}
                tgt = [passages[j] for j in bt.target_idx[i].tolist() if j >= 0]
                assert tgt and all(t in gold_texts for t in tgt)
                assert (bt.target_utility[i] == 0).all()  # uniform over gold


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "model.safetensors"))


def test_resume_is_exact(tmp_path, ds, tiny):
    utils = write_utilities(tmp_path / "u.jsonl.gz", ds)
    cfg = dict(data=TRAIN, utilities=utils, student=tiny, loss="uae", max_steps=4, batch_size=4, passages_per_query=3,
               max_passage_length=32, lr=1e-3, seed=1)
    full = tmp_path / "full"
    s = train(TrainConfig(**cfg), str(full), save_every=2, progress=False, ds=ds)
    assert s["finished"] and s["steps"] == 4
    part = tmp_path / "part"
    s1 = train(TrainConfig(**cfg), str(part), save_every=100, stop_after=2, progress=False, ds=ds)
    assert not s1["finished"] and s1["steps"] == 2
    assert latest_checkpoint(str(part)).endswith("step-000002")
    assert not os.path.exists(part / "model.safetensors")  # not finished: no final model yet
    torch.manual_seed(12345)  # another process's RNG: the resume must restore the checkpoint's, not continue this one
    np.random.seed(12345)
    random.seed(12345)
    s2 = train(TrainConfig(**cfg), str(part), resume=True, save_every=100, progress=False, ds=ds)
    assert s2["finished"] and s2["steps"] == 4
    wf, wp, w0 = _weights(full), _weights(part), _weights(tiny)
    assert wf.keys() == wp.keys()
    for k in wf:
        assert torch.equal(wf[k], wp[k]), k
    assert any(not torch.equal(wf[k], w0[k]) for k in wf if k in w0)  # it did train
    # the per-step losses match too
    lf = [json.loads(x)["loss"] for x in open(full / "train_log.jsonl")]
    lp = [json.loads(x)["loss"] for x in open(part / "train_log.jsonl")]
    assert lf == lp and len(lf) == 4
    # the logged lr is the rate each step used: the schedule's f(step - 1) (it was f(step): the last read 0)
    from uae_fast.training import _scheduler

    c = TrainConfig(**cfg)
    sched = _scheduler(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=c.lr), 4, c.warmup)
    expect = []
    for _ in range(4):
        expect.append(sched.get_last_lr()[0])
        sched.optimizer.step()
        sched.step()
    logged = [json.loads(x)["lr"] for x in open(full / "train_log.jsonl")]
    assert logged == pytest.approx(expect) and logged[-1] > 0
    # resuming with other settings is refused, bf16 autocast included (it changes every step's numbers)
    with pytest.raises(ValueError, match="different training settings.*lr"):
        train(TrainConfig(**{**cfg, "lr": 2e-3}), str(part), resume=True, stop_after=3, progress=False, ds=ds)
    half = tmp_path / "half"
    train(TrainConfig(**cfg), str(half), stop_after=1, progress=False, ds=ds, amp=False)
    with pytest.raises(ValueError, match=r"different training settings.*amp: False -> True"):
        train(TrainConfig(**cfg), str(half), resume=True, progress=False, ds=ds, amp=True)
    # A run saved before an option existed (its config lacks the key) resumes only with that option's default:
    # turning it on mid-run is a change, refused by the summary's check and by the checkpoint's.
    from uae_fast.training import _STATE_FILE

    state_file = os.path.join(latest_checkpoint(str(half)), _STATE_FILE)
    state = torch.load(state_file, weights_only=False)
    del state["config"]["teacher_gate"]
    torch.save(state, state_file)
    summary_file = half / "training_summary.json"
    summary = json.loads(summary_file.read_text())
    del summary["config"]["teacher_gate"]
    summary_file.write_text(json.dumps(summary))
    gated = TrainConfig(**{**cfg, "teacher_gate": 0.5})
    for _ in range(2):
        with pytest.raises(ValueError, match=r"different training settings.*teacher_gate: None -> 0.5"):
            train(gated, str(half), resume=True, progress=False, ds=ds, amp=False)
        summary_file.unlink(missing_ok=True)  # the second round: the checkpoint's config alone
    assert train(TrainConfig(**cfg), str(half), resume=True, progress=False, ds=ds, amp=False)["finished"]


@pytest.mark.parametrize("world", [2, 3, 4])
def test_ranks_split_the_global_batch_of_one_process(tmp_path, ds, world):
    # Rank r's queries, targets and loss weight are its slice of what one process with the global batch sees;
    # the ranks' passage shares, concatenated (what gather_with_grad returns), are that process's passages:
    # a paragraph drawn for queries on two ranks is one passage of the softmax, never a negative copy.
    u, _ = load_utilities(write_utilities(tmp_path / "u.jsonl.gz", ds))
    kw = dict(loss="uae", passages_per_query=3, seed=5)
    one = BatchSampler(ds, TrainConfig(batch_size=2 * world, **kw), u)
    ranks = [BatchSampler(ds, TrainConfig(batch_size=2, **kw), u, world=world, rank=r) for r in range(world)]
    assert ranks[0].batches_per_epoch == one.batches_per_epoch
    short = 0
    for m in range(one.batches_per_epoch + 2):
        ref, parts = one.batch(m), [s.batch(m) for s in ranks]
        assert sum((b.passages for b in parts), []) == ref.passages
        real = [b for b in parts if b.loss_weight > 0]
        assert sum((b.qids for b in real), []) == ref.qids
        # DDP averages the ranks' weighted means: sum_r (w_r / n_r) sum_i loss_i / world, the global mean when
        # w_r = n_r * world / N
        assert [b.loss_weight for b in real] == pytest.approx([len(b.qids) * world / len(ref.qids) for b in real])
        rows = [(i, b) for b in real for i in range(len(b.qids))]
        for k, (i, b) in enumerate(rows):
            valid = b.target_idx[i] >= 0
            assert b.target_idx[i][valid].tolist() == ref.target_idx[k][ref.target_idx[k] >= 0].tolist()
            assert torch.equal(b.target_utility[i][valid], ref.target_utility[k][ref.target_idx[k] >= 0])
            assert int(b.gold_idx[i]) == int(ref.gold_idx[k])
        for b in parts:
            if b.loss_weight == 0:  # a rank left without a query repeats the last one, at weight 0
                assert b.qids == ref.qids[-1:]
        short += len(ref.qids) < 2 * world
    assert short  # the fixture's last batch is short for every world here
    # five questions on four ranks of two: 2, 2, 1 and a rank without a question (weight 0, no passages lost)
    five = dataclasses.replace(ds, queries=[q for q in ds.queries if q.id in u][:5])
    parts = [BatchSampler(five, TrainConfig(batch_size=2, **kw), u, world=4, rank=r).batch(0) for r in range(4)]
    assert [b.loss_weight for b in parts] == [1.6, 1.6, 0.8, 0.0] and parts[3].qids == parts[2].qids
    assert sum((b.passages for b in parts), []) == BatchSampler(five, TrainConfig(batch_size=8, **kw), u).batch(0).passages
    # fewer unique passages than ranks: some ranks encode none, and their (empty) features still make a forward
    one_q = dataclasses.replace(ds, queries=five.queries[:1])
    kw1 = dict(kw, passages_per_query=1)
    parts = [BatchSampler(one_q, TrainConfig(batch_size=1, **kw1), u, world=4, rank=r).batch(0) for r in range(4)]
    assert [len(b.passages) for b in parts] == [0, 0, 0, 1] and [b.loss_weight for b in parts] == [4.0, 0.0, 0.0, 0.0]
    assert parts[0].target_idx[0][parts[0].target_idx[0] >= 0].tolist() == [0]  # the passage rank 3 encodes
    from uae_fast.training import _passage_features, _Towers

    class Enc(torch.nn.Module):
        def forward(self, feats):
            return feats["x"]

    feats, inverse = _passage_features(type("E", (), {"tokenize": lambda self, t, n: {"x": torch.ones(len(t), 3)}})(),
                                       [], 8, 4)
    q, p = _Towers(Enc())({"x": torch.ones(2, 3)}, feats)
    assert feats == [] and p.shape == (0, 3) and p[inverse].shape == (0, 3)


def test_a_short_last_accumulation_step_averages_the_micro_batches_it_has(tmp_path, ds, tiny):
    # One micro-batch in all (epochs 1e-3) with grad_accum 2: the step must equal grad_accum 1's, loss
    # included (it used to be divided by 2, reporting half the loss and halving the gradient).
    utils = write_utilities(tmp_path / "u.jsonl.gz", ds)
    cfg = dict(data=TRAIN, utilities=utils, student=tiny, loss="uae", epochs=1e-3, batch_size=4, passages_per_query=3,
               max_passage_length=32, lr=1e-3, seed=1)
    one = train(TrainConfig(**cfg), str(tmp_path / "one"), progress=False, ds=ds)
    acc = train(TrainConfig(**cfg, grad_accum=2), str(tmp_path / "acc"), progress=False, ds=ds)
    assert one["steps"] == acc["steps"] == 1
    la, lb = ([json.loads(x)["loss"] for x in open(tmp_path / d / "train_log.jsonl")] for d in ("one", "acc"))
    assert la == lb
    wa, wb = _weights(tmp_path / "one"), _weights(tmp_path / "acc")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_config_and_data_errors(tmp_path, ds):
    with pytest.raises(ValueError, match="loss must be"):
        TrainConfig(loss="mse").check()
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0).check()
    with pytest.raises(ValueError, match="label_mix"):
        TrainConfig(label_mix=1.5).check()
    with pytest.raises(ValueError, match="needs a utilities file"):
        BatchSampler(ds, TrainConfig(loss="uae"), None)
    from uae_fast.data import RetrievalDataset

    empty = RetrievalDataset({}, [q for q in ds.queries if not q.gold])
    with pytest.raises(ValueError, match="no training queries"):
        BatchSampler(empty, TrainConfig(loss="infonce"))


def test_cli_reports_mismatched_utilities(tmp_path, capsys, tiny):
    from uae_fast.cli import main

    dev = load_dataset(os.path.join(HERE, "fixtures", "qasper-dev-mini.json.gz"))
    utils = write_utilities(tmp_path / "dev-u.jsonl.gz", dev)
    rc = main(["train", "--data", TRAIN, "--utilities", utils, "--out", str(tmp_path / "o"), "--student", tiny, "--no-progress"])
    assert rc == 1
    assert "does not match data" in capsys.readouterr().err
    good = write_utilities(tmp_path / "u.jsonl.gz", load_dataset(TRAIN))
    (tmp_path / "notamodel").mkdir()
    rc = main(["train", "--data", TRAIN, "--utilities", good, "--out", str(tmp_path / "o"), "--student",
               str(tmp_path / "notamodel"), "--no-progress"])
    assert rc == 1
    assert "not a model folder" in capsys.readouterr().err


def test_partial_scoring_run_reads_complete_queries_only(tmp_path):
    header = {"type": "header", "format": "uae-utilities/1", "teacher": "t"}
    rows = [{"qid": "a", "pid": "a:0", "utility": 1.0, "cand": 0, "n_cand": 2},
            {"qid": "a", "pid": "a:1", "utility": 2.0, "cand": 1, "n_cand": 2},
            {"qid": "b", "pid": "b:0", "utility": 3.0, "cand": 0, "n_cand": 2}]  # b is still in flight
    p = tmp_path / "u.jsonl.gz.partial"
    p.write_text("\n".join(json.dumps(r) for r in [header] + rows) + '\n{"qid": "b", "pi')  # torn tail
    utils, h = load_utilities(str(p))
    assert utils == {"a": {"a:0": 1.0, "a:1": 2.0}} and h["partial"] is True


def test_cpu_bf16_autocast_trains_close_to_fp32(tmp_path, ds, tiny):
    """--amp on a CPU: bf16 autocast runs (weights differ from fp32 training) and stays close to fp32."""
    utils = write_utilities(tmp_path / "u.jsonl.gz", ds)
    cfg = dict(data=TRAIN, utilities=utils, student=tiny, loss="uae", max_steps=2, batch_size=4, passages_per_query=3,
               max_passage_length=32, lr=1e-3, seed=1)
    train(TrainConfig(**cfg), str(tmp_path / "fp32"), amp=False, progress=False, ds=ds)
    train(TrainConfig(**cfg), str(tmp_path / "bf16"), amp=True, device="cpu", progress=False, ds=ds)
    w32, w16, w0 = _weights(tmp_path / "fp32"), _weights(tmp_path / "bf16"), _weights(tiny)
    assert any(not torch.equal(w32[k], w16[k]) for k in w32)  # autocast changed the arithmetic
    assert all(torch.isfinite(w16[k]).all() for k in w16)
    # the whole update points the same way (per tensor it need not: Adam scales a key bias's ~0 gradient,
    # pure rounding noise, to a full-size step)
    keys = [k for k in w32 if k in w0]
    d32 = torch.cat([(w32[k] - w0[k]).flatten() for k in keys])
    d16 = torch.cat([(w16[k] - w0[k]).flatten() for k in keys])
    assert torch.nn.functional.cosine_similarity(d32, d16, dim=0) > 0.8
    l32 = [json.loads(x)["loss"] for x in open(tmp_path / "fp32" / "train_log.jsonl")]
    l16 = [json.loads(x)["loss"] for x in open(tmp_path / "bf16" / "train_log.jsonl")]
    assert l16 == pytest.approx(l32, rel=0.05)


def test_min_steps_adds_epochs_to_small_data_only(ds):
    """--min-steps (opt-in): a small data set trains more epochs (up to MAX_AUTO_EPOCHS); a large one keeps --epochs."""
    from uae_fast.training import MAX_AUTO_EPOCHS

    kw = dict(loss="infonce", batch_size=4, passages_per_query=3)
    bpe = BatchSampler(ds, TrainConfig(**kw)).batches_per_epoch
    assert BatchSampler(ds, TrainConfig(**kw)).total_micro_batches() == 2 * bpe  # default: off
    assert BatchSampler(ds, TrainConfig(**kw, min_steps=3 * bpe)).total_micro_batches() == 3 * bpe
    assert BatchSampler(ds, TrainConfig(**kw, min_steps=10**6)).total_micro_batches() == math.ceil(MAX_AUTO_EPOCHS * bpe)
    assert BatchSampler(ds, TrainConfig(**kw, min_steps=bpe)).total_micro_batches() == 2 * bpe  # epochs already give more
    # grad_accum counts micro-batches per step; max_steps wins over both
    assert BatchSampler(ds, TrainConfig(**kw, min_steps=3 * bpe, grad_accum=2, epochs=1.0)).total_micro_batches() == min(
        6 * bpe, math.ceil(MAX_AUTO_EPOCHS * bpe))
    assert BatchSampler(ds, TrainConfig(**kw, min_steps=10**6, max_steps=5)).total_micro_batches() == 5
    with pytest.raises(ValueError, match="min_steps must be an int >= 0"):
        TrainConfig(min_steps=-1).check()


def test_global_queries_count_each_micro_batch(ds):
    # grad_accum weights a step's micro-batches by these counts: an epoch's short last batch counts its queries
    sampler = BatchSampler(ds, TrainConfig(loss="infonce", batch_size=4, passages_per_query=3))
    n, bpe = len(sampler.queries), sampler.batches_per_epoch
    sizes = [sampler.global_queries(m) for m in range(2 * bpe)]
    assert sum(sizes[:bpe]) == n and sizes[:bpe] == sizes[bpe:]
    assert sizes[bpe - 1] == n - 4 * (bpe - 1) and set(sizes[: bpe - 1]) == {4}
    assert all(len(sampler.batch(m).queries) == sizes[m] for m in (0, bpe - 1))
    assert n % 4, "the fixture should end its epochs with a short batch"


def test_fractional_epochs_count_exact_micro_batches(ds):
    # epochs x batches per epoch in floating point: 1.1 x 100 = 110.00000000000001 must give 110, not 111
    sampler = BatchSampler(ds, TrainConfig(loss="infonce", batch_size=4, passages_per_query=3, epochs=1.1))
    sampler.batches_per_epoch = 100
    assert sampler.total_micro_batches() == 110
    sampler.cfg = TrainConfig(loss="infonce", batch_size=4, passages_per_query=3, epochs=2.2)
    sampler.batches_per_epoch = 50
    assert sampler.total_micro_batches() == 110


def test_sigterm_handler_is_scoped_to_the_training_loop():
    import signal

    from uae_fast.training import _StopOnSigterm

    before = signal.getsignal(signal.SIGTERM)
    try:
        for outside in (signal.SIG_DFL, signal.SIG_IGN):
            signal.signal(signal.SIGTERM, outside)
            with _StopOnSigterm() as stop:
                inside = signal.getsignal(signal.SIGTERM)
            # an ignored SIGTERM stays ignored; otherwise the handler is installed and removed again
            assert (inside == signal.SIG_IGN) if outside == signal.SIG_IGN else (inside == stop._handle)
            assert signal.getsignal(signal.SIGTERM) == outside
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        with _StopOnSigterm() as stop:  # one SIGTERM: a flag, not a kill
            signal.raise_signal(signal.SIGTERM)
        assert stop.signum == signal.SIGTERM and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, before)


def test_torchrun_device_is_the_ranks_own_gpu(monkeypatch):
    """Under torchrun a bare --device cuda means cuda:LOCAL_RANK; another index would put two ranks on one GPU.
    A rank that sees one GPU (per-rank CUDA_VISIBLE_DEVICES) uses cuda:0."""
    import uae_fast.training as tr

    monkeypatch.setattr(tr, "resolve_device", lambda d: torch.device(d))  # no GPU here: accept the name as given
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert tr._dist_device(None) == tr._dist_device("cuda") == tr._dist_device("cuda:1") == torch.device("cuda", 1)
    assert tr._dist_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="each rank trains on its own GPU, cuda:LOCAL_RANK \\(here cuda:1\\)"):
        tr._dist_device("cuda:0")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert tr._dist_device(None) == tr._dist_device("cuda") == tr._dist_device("cuda:0") == torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert tr._dist_device("cuda:0") == torch.device("cuda", 0)  # one process: any GPU it names


def test_the_default_table_is_cut_to_a_qasper_train_slice(tmp_path, tiny, capsys):
    # `uae train` without --utilities on part of QASPER train uses the shipped table's rows for its questions
    # (the mini fixture holds 21 of them); on other data it says to score that data, in one line.
    from uae_fast.cli import main

    for extra in ([], ["--no-gold"]):
        out = tmp_path / f"run{len(extra)}"
        assert main(["train", "--data", TRAIN, "--student", tiny, "--out", str(out), "--max-steps", "1", "--batch-size", "2",
                     "--passages-per-query", "2", "--max-passage-length", "16", "--no-progress", *extra]) == 0
        assert "using the shipped table's rows for the 21 of its" in capsys.readouterr().err
    # a shipped table named, not defaulted (Gemma's answer-only table): cut the same way
    gemma = shipped_file("qasper-train-utilities-nogold-answer12-gemma3-270m.jsonl.gz")
    assert main(["train", "--data", TRAIN, "--student", tiny, "--out", str(tmp_path / "gemma"), "--max-steps", "1",
                 "--batch-size", "2", "--passages-per-query", "2", "--max-passage-length", "16", "--no-progress",
                 "--no-gold", "--utilities", gemma]) == 0
    assert "using the shipped table's rows for the" in capsys.readouterr().err
    dev = os.path.join(HERE, "fixtures", "qasper-dev-mini.json.gz")
    assert main(["train", "--data", dev, "--student", tiny, "--out", str(tmp_path / "dev"), "--max-steps", "1",
                 "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "has no row for the questions of" in err and "uae score" in err, err


def test_a_table_scored_on_other_data_contents_is_warned_about(tmp_path, ds, capsys):
    # QASPER passage ids are positions: an edited copy of the data pairs utilities with other texts
    from uae_fast.data import data_fingerprint

    utils, _ = load_utilities(write_utilities(tmp_path / "u.jsonl.gz", ds))
    check_utilities(utils, ds, path="u", data_path=TRAIN, header={"data_sha1": data_fingerprint(TRAIN)})
    check_utilities(utils, ds, path="u", data_path=TRAIN, header={})  # tables from before the fingerprint
    assert capsys.readouterr().err == ""
    check_utilities(utils, ds, path="u", data_path=TRAIN, header={"data_sha1": "0123456789abcdef"})
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "u was scored on other data contents than" in err and "rescore" in err


def test_trainer_state_loads_without_pickle_and_old_numpy_states_still_resume(tmp_path, ds, tiny):
    # the state file loads with torch.load(weights_only=True) (no code runs on load); one written the older
    # way (numpy's RNG state as an ndarray) still resumes, and its RNG state is restored
    import numpy as np

    from uae_fast.training import _STATE_FILE, _rng_state, _set_rng_state

    utils = write_utilities(tmp_path / "u.jsonl.gz", ds)
    cfg = TrainConfig(data=TRAIN, utilities=utils, student=tiny, max_steps=2, batch_size=4, passages_per_query=4,
                      max_passage_length=32)
    out = tmp_path / "run"
    train(cfg, str(out), stop_after=1, save_every=1, progress=False, ds=ds)
    ckpt = latest_checkpoint(str(out))
    state = torch.load(os.path.join(ckpt, _STATE_FILE), weights_only=True)
    np.random.seed(5)
    want = np.random.get_state()
    state["rng"] = [dict(r, numpy=want) for r in state["rng"]]  # the old format
    torch.save(state, os.path.join(ckpt, _STATE_FILE))
    with pytest.raises(Exception):
        torch.load(os.path.join(ckpt, _STATE_FILE), weights_only=True)  # plain weights_only refuses ndarrays
    # as numpy 1.x names its array rebuild (numpy.core, not numpy._core): rewrite the pickle inside the zip
    import io
    import zipfile

    path = os.path.join(ckpt, _STATE_FILE)
    with zipfile.ZipFile(path) as zin:
        items = [(i, zin.read(i.filename)) for i in zin.infolist()]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zout:
        for info, data in items:
            if info.filename.endswith("data.pkl"):
                old, new = b"numpy.core.multiarray", b"numpy._core.multiarray"
                data = data.replace(new, old) if new in data else data.replace(old, new)  # the other major
                assert data.count(old if new not in data else new) > 0
            zout.writestr(info, data)
    with open(path, "wb") as f:
        f.write(buf.getvalue())
    assert train(cfg, str(out), resume=True, progress=False, ds=ds)["finished"]
    np.random.seed(0)
    st = _rng_state()
    np.random.seed(1)
    _set_rng_state(st)
    a = np.random.get_state()
    np.random.seed(0)
    b = np.random.get_state()
    assert a[0] == b[0] and (a[1] == b[1]).all() and a[2:] == b[2:]


def test_questions_are_encoded_as_queries_and_paragraphs_as_documents(tmp_path, ds, tiny, monkeypatch):
    # a model with sentence-transformers prompts gets the query prompt on questions and the document prompt on
    # paragraphs, in training, evaluation and serving alike (BiEncoder.tokenize is where every path meets)
    from uae_fast.evaluation import DenseRanker
    from uae_fast.search import build_index, search
    from uae_fast.student import BiEncoder

    seen = []
    real = BiEncoder.tokenize

    def spy(self, texts, max_length=None, *, role=None):
        seen.extend((role, t) for t in texts)
        return real(self, texts, max_length, role=role)

    monkeypatch.setattr(BiEncoder, "tokenize", spy)
    questions = {q.question for q in ds.queries}
    passages = {p.text for p in ds.passages.values()}

    def check(what):
        roles = {r for r, _ in seen}
        assert roles <= {"query", "document"} and "query" in roles, (what, roles)
        assert all((t in questions) if r == "query" else (t in passages) for r, t in seen), what
        seen.clear()

    cfg = TrainConfig(data=TRAIN, utilities=write_utilities(tmp_path / "u.jsonl.gz", ds), student=tiny, max_steps=1,
                      batch_size=4, passages_per_query=4, max_passage_length=32)
    train(cfg, str(tmp_path / "run"), progress=False, ds=ds)
    assert any(r == "document" for r, _ in seen)
    check("train")
    ranker = DenseRanker(BiEncoder(tiny, device="cpu"), ds, ds.queries[:3])
    assert any(r == "document" for r, _ in seen)
    ranker.rank(ds.queries[0])
    check("eval")
    build_index(TRAIN, str(tmp_path / "index"), model=tiny, progress=False)
    assert any(r == "document" for r, _ in seen)
    search(str(tmp_path / "index"), [ds.queries[0].question], k=3)
    check("search")
