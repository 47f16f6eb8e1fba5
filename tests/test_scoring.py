"""``uae score``: candidate policies, the output format, kill -9 + --resume, shards + merge, bad input.

Uses the tiny random-init Llama of test_teacher (saved to a folder, so the CLI loads it like any HF model).
"""
import dataclasses
import gzip
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from uae_fast.bm25 import BM25
from uae_fast.data import data_fingerprint, load_dataset
from uae_fast.scoring import CandidatePolicy, merge, parse_shard, read_utilities, score_dataset, select_queries, shard_path
from uae_fast.utilities import write_table
from uae_fast.teacher import UtilityScorer

from test_teacher import byte_tokenizer, tiny_llama

DATA = os.path.join(os.path.dirname(__file__), "fixtures", "qasper-train-mini.json.gz")
OPTS = dict(max_passage_tokens=48, max_answer_tokens=12)


@pytest.fixture(scope="module")
def ds():
    return load_dataset(DATA)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_teacher")
    model, tok = tiny_llama(), byte_tokenizer()
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def scorer(teacher_dir):
    return UtilityScorer.from_pretrained(teacher_dir, device="cpu", token_budget=1, **OPTS)


def cli(*args, env=None):
    e = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "uae_fast.cli", "score", *args], capture_output=True, text=True, env=e,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=300)


def test_candidate_policies(ds):
    qs = select_queries(ds)
    assert qs and all(q.answers and q.gold for q in qs)
    assert sorted(q.id for q in qs) == sorted(q.id for q in ds.queries if q.answers and q.gold)
    top, every = CandidatePolicy(ds, "top:3"), CandidatePolicy(ds, "all")
    for q in qs:
        pool, cands = ds.pool(q), top(q)
        assert every(q) == pool
        assert set(q.gold) <= set(cands) <= set(pool)
        assert cands == [p for p in pool if p in set(cands)]  # paper order
        _, ids = BM25([ds.passages[p].text for p in pool]).topk(q.question, 3)
        assert {pool[i] for i in ids} <= set(cands)
        assert len(cands) <= 3 + len(q.gold)
    for bad in ("top:0", "top:x", "bm25", "top:"):
        with pytest.raises(ValueError, match="--candidates"):
            CandidatePolicy(ds, bad)


def test_student_candidate_policy(ds, tmp_path, scorer, capsys):
    # student:M = the encoder's cosine top-M over the paper's paragraphs, plus gold, in paper order.
    from test_student import make_tiny_encoder
    from uae_fast.student import BiEncoder

    enc = BiEncoder(make_tiny_encoder(tmp_path / "enc"), device="cpu")
    qs = select_queries(ds)
    pol = CandidatePolicy(ds, "student:2", student=enc)
    pol.prepare(qs)
    n_more = 0
    for q in qs:
        pool, cands = ds.pool(q), pol(q)
        p_emb = enc.encode([ds.passages[p].text for p in pool]).double()
        scores = p_emb @ enc.encode([q.question]).double()[0]
        top = {pool[i] for i in torch.topk(scores, min(2, len(pool))).indices.tolist()}
        assert set(cands) == top | set(q.gold)
        assert cands == [p for p in pool if p in set(cands)]
        n_more += len(set(cands) - set(q.gold))
    assert n_more > 0
    # without prepare() (one query at a time) the answer is the same
    lazy = CandidatePolicy(ds, "student:2", student=enc)
    assert [lazy(q) for q in qs[:3]] == [pol(q) for q in qs[:3]]
    # with progress, the (minutes-long on a CPU) pool embedding shows a bar before the scoring bar
    capsys.readouterr()
    CandidatePolicy(ds, "student:2", student=enc).prepare(qs[:2], progress=True)
    assert "encode" in capsys.readouterr().err
    for bad in ("student:0", "student:", "student:x"):
        with pytest.raises(ValueError, match="--candidates"):
            CandidatePolicy(ds, bad)
    # uae score records the policy and its encoder in the header
    out = str(tmp_path / "u.jsonl")
    score_dataset(scorer, ds, out, candidates="student:2", candidate_student=enc, progress=False, limit=3)
    h, rows = read_utilities(out)
    assert h["candidates"] == "student:2" and h["candidate_student"] == "BiEncoder"
    by_q = {}
    for r in rows:
        by_q.setdefault(r["qid"], []).append(r["pid"])
    qmap = {q.id: q for q in qs}
    assert len(by_q) == 3 and all(by_q[qid] == pol(qmap[qid]) for qid in by_q)
    # a student folder is recorded by content too: one retrained at the same path mines other candidates, so a
    # resume on it is refused
    folder = str(tmp_path / "enc")
    out2 = str(tmp_path / "u2.jsonl")
    h = score_dataset(scorer, ds, out2, candidates="student:2", candidate_student=folder, progress=False, limit=2)
    assert h["candidate_student"] == os.path.abspath(folder) and len(h["candidate_student_sha1"]) == 16
    make_tiny_encoder(tmp_path / "enc", seed=1)  # retrained in place
    with pytest.raises(ValueError, match=r"different settings \(.*candidate_student_sha1\)"):
        score_dataset(scorer, ds, out2, candidates="student:2", candidate_student=folder, progress=False, limit=2,
                      resume=True)


def test_query_orders_and_paper_shards(ds):
    by_hash, by_paper = select_queries(ds, order="hash"), select_queries(ds, order="paper")
    assert sorted(q.id for q in by_paper) == sorted(q.id for q in by_hash)
    assert [q.id for q in by_paper] != [q.id for q in by_hash]
    runs = [d for i, d in enumerate(q.doc_id for q in by_paper) if i == 0 or by_paper[i - 1].doc_id != d]
    assert len(runs) == len(set(runs)) > 1  # a paper's questions are contiguous
    shards = [select_queries(ds, order="paper", shard=(i, 3)) for i in range(3)]
    assert sorted(q.id for s in shards for q in s) == sorted(q.id for q in by_paper)
    papers = [{q.doc_id for q in s} for s in shards]
    assert all(papers) and sum(map(len, papers)) == len(set().union(*papers))  # shards split by paper
    with pytest.raises(ValueError, match="order"):
        select_queries(ds, order="random")


def test_output_rows_and_header(ds, scorer, tmp_path):
    out = str(tmp_path / "u.jsonl.gz")
    score_dataset(scorer, ds, out, candidates="top:2", progress=False, group=3, save_deltas=True, limit=6)
    assert not os.path.exists(out + ".partial")
    header, rows = read_utilities(out)
    assert header["teacher"] == scorer.name and header["candidates"] == "top:2"
    assert header["prompt_with"] == scorer.prompt_with and header["max_passage_tokens"] == 48
    assert header["n_rows"] == len(rows) and header["n_queries"] == len({r["qid"] for r in rows})
    qs = {q.id: q for q in ds.queries}
    pol = CandidatePolicy(ds, "top:2")
    i = 0
    while i < len(rows):  # rows of a query are contiguous, in candidate order
        q = qs[rows[i]["qid"]]
        n = rows[i]["n_cand"]
        block = rows[i : i + n]
        assert [r["cand"] for r in block] == list(range(n)) and {r["qid"] for r in block} == {q.id}
        assert [r["pid"] for r in block] == pol(q)
        assert [r["gold"] for r in block] == [r["pid"] in q.gold for r in block]
        i += n
    # Spot-check one query against a direct score() call (all gold answers averaged).
    q = qs[rows[0]["qid"]]
    r = scorer.score(q.question, q.answers, [ds.passages[p].text for p in pol(q)])
    got = [x["utility"] for x in rows[: rows[0]["n_cand"]]]
    torch.testing.assert_close(torch.tensor(got), r.utility, atol=1e-5, rtol=0)
    assert rows[0]["n_answer_tokens"] == len(r.answer_ids) == len(rows[0]["deltas"])


def test_queries_without_passages_are_skipped(ds, scorer, tmp_path, capsys):
    # A paper with no paragraphs (QASPER train has one) must not stop an --include-no-gold run.
    from uae_fast.data import Query

    q0 = next(q for q in ds.queries if q.answers)
    ghost = Query(id="ghost-q", question="What is it?", doc_id="no-such-paper", gold=[], answers=["nothing"])
    sub = dataclasses.replace(ds, queries=[ghost, q0])
    out = str(tmp_path / "u.jsonl.gz")
    header = score_dataset(scorer, sub, out, candidates="top:2", with_gold_only=False, progress=False)
    assert "skipping 1 query with no candidate passages" in capsys.readouterr().err
    assert header["n_skipped_no_passages"] == 1 and header["n_queries"] == 1
    _, rows = read_utilities(out)
    assert {r["qid"] for r in rows} == {q0.id} and len(rows) == header["n_rows"] > 0
    with pytest.raises(ValueError, match="no query to score has a candidate passage"):
        score_dataset(scorer, dataclasses.replace(ds, queries=[ghost]), str(tmp_path / "v.jsonl.gz"),
                      with_gold_only=False, progress=False)


def _text(path):
    with (gzip.open(path, "rt") if path.endswith(".gz") else open(path)) as f:
        return f.read()


def test_kill9_then_resume_is_identical(ds, teacher_dir, scorer, tmp_path):
    # token_budget=1 (one forward per row, or per trie of rows sharing a prefix) and the same groups of 2
    # questions (the tries are built per group) make every number independent of the kill, so the resumed file
    # must be byte-identical to an uninterrupted run's.
    common = ["--data", DATA, "--teacher", teacher_dir, "--candidates", "top:2", "--max-passage-tokens", "48",
              "--max-answer-tokens", "12", "--token-budget", "1", "--group", "2", "--limit", "7", "--no-progress",
              "--device", "cpu", "--dtype", "fp32"]  # the reference scorer's; a GPU machine would default to CUDA bf16
    ref = str(tmp_path / "ref.jsonl")
    score_dataset(scorer, ds, ref, candidates="top:2", progress=False, limit=7, data_name=os.path.basename(DATA),
                  data_sha1=data_fingerprint(DATA), group=2)
    out = str(tmp_path / "run.jsonl.gz")
    # A real SIGKILL after 2 groups are on disk, mid-way through writing the third.
    p = cli("--out", out, *common, env={"UAE_TEST_KILL_AFTER": "2:torn"})
    assert p.returncode == -9, (p.returncode, p.stderr)
    assert not os.path.exists(out)  # nothing half-written at the output path
    partial = open(out + ".partial").read()
    assert not partial.endswith("\n") and partial.count("\n") > 1  # complete queries + a torn tail
    _, done = read_utilities(out + ".partial", allow_partial=True)  # a run in progress is readable
    _, ref_rows = read_utilities(ref)
    assert 0 < len(done) < len(ref_rows) and done == ref_rows[: len(done)]
    with pytest.raises(ValueError, match="not a utilities"):
        read_utilities(out + ".partial")
    p = cli("--out", out, *common, "--resume")
    assert p.returncode == 0, p.stderr
    assert _text(out) == _text(ref)
    assert not os.path.exists(out + ".partial")


def test_clean_kill_point_refuse_without_resume_and_noop(ds, scorer, tmp_path):
    ref = str(tmp_path / "ref.jsonl")
    score_dataset(scorer, ds, ref, candidates="top:2", progress=False, limit=5)
    out = str(tmp_path / "run.jsonl")
    lines = open(ref).read().splitlines(keepends=True)
    first_q = 1 + json.loads(lines[1])["n_cand"]
    with open(out + ".partial", "w") as f:  # exactly one complete query on disk, as after a clean kill
        f.writelines(lines[:first_q])
    with pytest.raises(ValueError, match="--resume"):
        score_dataset(scorer, ds, out, candidates="top:2", progress=False, limit=5)
    score_dataset(scorer, ds, out, candidates="top:2", progress=False, limit=5, resume=True)
    assert open(out).read() == open(ref).read()
    score_dataset(scorer, ds, out, candidates="top:2", progress=False, limit=5, resume=True)  # complete: no-op
    assert open(out).read() == open(ref).read()


def test_non_finite_utility_stops_before_it_is_written_and_resume_cuts_it(ds, scorer, tmp_path, monkeypatch):
    # A NaN written into the table made every --resume fail at the final read; now the run stops at once,
    # naming the row, and a partial holding such a row (from an older version) is cut back and rescored.
    ref = str(tmp_path / "ref.jsonl")
    score_dataset(scorer, ds, ref, candidates="top:2", progress=False, limit=5)
    lines = open(ref).read().splitlines(keepends=True)
    out = str(tmp_path / "run.jsonl")
    first_q = 1 + json.loads(lines[1])["n_cand"]
    bad = json.loads(lines[first_q])
    bad["utility"] = float("nan")
    with open(out + ".partial", "w") as f:
        f.writelines(lines[:first_q] + [json.dumps(bad) + "\n"] + lines[first_q + 1 :])
    score_dataset(scorer, ds, out, candidates="top:2", progress=False, limit=5, resume=True)
    assert open(out).read() == open(ref).read()

    real = scorer.score_many

    def nan_second_call(items, _n=[0]):
        _n[0] += 1
        res = real(items)
        if _n[0] == 2:
            res[0].utility[0] = float("nan")
        return res

    monkeypatch.setattr(scorer, "score_many", nan_second_call)
    out2 = str(tmp_path / "nan.jsonl")
    with pytest.raises(ValueError, match=r"utility for question .* is nan .*--dtype fp32"):
        score_dataset(scorer, ds, out2, candidates="top:2", progress=False, limit=5, group=1)
    _, rows = read_utilities(out2 + ".partial", allow_partial=True)
    assert rows and all(math.isfinite(r["utility"]) for r in rows)


@pytest.mark.parametrize("limit", [3, 7, None])
def test_resume_with_other_questions_is_refused(ds, scorer, tmp_path, limit):
    # A partial run of 5 questions resumed with another --limit would publish a table whose header
    # promises other questions (or fail on its row count): refuse it up front, naming the setting.
    ref = str(tmp_path / "ref.jsonl")
    score_dataset(scorer, ds, ref, candidates="top:2", progress=False, limit=5)
    out = str(tmp_path / "run.jsonl")
    lines = open(ref).read().splitlines(keepends=True)
    with open(out + ".partial", "w") as f:
        f.writelines(lines[: 1 + json.loads(lines[1])["n_cand"]])
    with pytest.raises(ValueError, match=r"different settings \(.*limit"):
        score_dataset(scorer, ds, out, candidates="top:2", progress=False, limit=limit, resume=True)
    with pytest.raises(ValueError, match=r"is complete but was written with different settings \(.*limit"):
        score_dataset(scorer, ds, ref, candidates="top:2", progress=False, limit=limit, resume=True)


def test_resume_with_batching_keeps_rows_unique(ds, teacher_dir, tmp_path):
    s = UtilityScorer.from_pretrained(teacher_dir, device="cpu", **OPTS)  # default token budget: batched rows
    ref = str(tmp_path / "ref.jsonl")
    score_dataset(s, ds, ref, candidates="top:2", progress=False, group=4)
    out = str(tmp_path / "run.jsonl")
    score_dataset(s, ds, out, candidates="top:2", progress=False, group=4, limit=3)  # a "stopped early" run
    os.replace(out, out + ".partial")
    h, _ = read_utilities(out + ".partial")
    with open(out + ".partial") as f:
        lines = f.read().splitlines()
    # Same settings except the limit -> the header differs; rewrite it as an unlimited run's would be.
    hdr = json.loads(lines[0])
    hdr.pop("limit")
    hdr["n_queries"], hdr["n_rows"] = read_utilities(ref)[0]["n_queries"], read_utilities(ref)[0]["n_rows"]
    with open(out + ".partial", "w") as f:
        f.write("\n".join([json.dumps(hdr)] + lines[1:]) + '\n{"qid": "torn')
    score_dataset(s, ds, out, candidates="top:2", progress=False, group=4, resume=True)
    _, a = read_utilities(ref)
    _, b = read_utilities(out)
    assert [(r["qid"], r["pid"]) for r in a] == [(r["qid"], r["pid"]) for r in b]
    torch.testing.assert_close(torch.tensor([r["utility"] for r in b]), torch.tensor([r["utility"] for r in a]), atol=1e-4, rtol=0)


def test_shards_and_merge(ds, scorer, tmp_path):
    full = str(tmp_path / "full.jsonl")
    score_dataset(scorer, ds, full, candidates="top:1", progress=False)
    base = str(tmp_path / "u.jsonl.gz")
    paths = []
    for i in range(3):
        path = shard_path(base, (i, 3))
        assert path.endswith(f".shard{i}-of-3.jsonl.gz")
        score_dataset(scorer, ds, path, candidates="top:1", progress=False, shard=(i, 3))
        paths.append(path)
    with pytest.raises(ValueError, match="each of the 3 shards"):
        merge(paths[:2], str(tmp_path / "bad.jsonl"))
    with pytest.raises(ValueError, match="each of the 3 shards|duplicate"):
        merge(paths + paths[:1], str(tmp_path / "bad.jsonl"))
    assert not os.path.exists(str(tmp_path / "bad.jsonl"))
    h0, rows0 = read_utilities(paths[0])  # a hand-edited n_rows that is not a number: named
    write_table(str(tmp_path / "s0.jsonl"), dict(h0, n_rows=str(h0["n_rows"])), rows0)
    with pytest.raises(ValueError, match="s0.jsonl: header lacks an integer n_rows"):
        merge([str(tmp_path / "s0.jsonl")] + paths[1:], str(tmp_path / "bad.jsonl"))
    merged = str(tmp_path / "merged.jsonl.gz")
    h = merge(paths, merged)
    assert h["shard"] == [0, 1]
    ha, a = read_utilities(full)
    hb, b = read_utilities(merged)
    assert {k: v for k, v in ha.items()} == {k: v for k, v in hb.items()}
    assert sorted(map(json.dumps, a)) == sorted(map(json.dumps, b))
    # a shard of another question sample (--limit) would mix samples: refused, naming the setting
    other = shard_path(str(tmp_path / "lim.jsonl.gz"), (2, 3))
    score_dataset(scorer, ds, other, candidates="top:1", progress=False, shard=(2, 3), limit=6)
    with pytest.raises(ValueError, match=r"settings differ .*\(limit\); cannot merge"):
        merge(paths[:2] + [other], str(tmp_path / "mixed.jsonl"))


def test_parse_shard_and_torchrun_env(monkeypatch):
    assert parse_shard("1/4") == (1, 4)
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("RANK", "5")
    assert parse_shard(None) == (5, 8)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert parse_shard(None) == (0, 1)
    for bad in ("4/4", "x", "1/0", "-1/2"):
        with pytest.raises(ValueError, match="--shard"):
            parse_shard(bad)


def test_bad_input(ds, scorer, tmp_path):
    out = str(tmp_path / "u.jsonl")
    score_dataset(scorer, ds, out, candidates="top:1", progress=False, limit=2)
    with pytest.raises(ValueError, match="already exists"):
        score_dataset(scorer, ds, out, candidates="top:1", progress=False, limit=2)
    # An interrupted run with other settings is not silently continued.
    os.replace(out, out + ".x")
    with open(out + ".x") as src, open(str(tmp_path / "v.jsonl.partial"), "w") as dst:
        dst.write(src.read())
    with pytest.raises(ValueError, match="different settings"):
        score_dataset(scorer, ds, str(tmp_path / "v.jsonl"), candidates="top:2", progress=False, limit=2, resume=True)
    with pytest.raises(ValueError, match="answers must be"):
        score_dataset(scorer, ds, str(tmp_path / "w.jsonl"), answers="best", progress=False)
    with pytest.raises(FileNotFoundError):
        read_utilities(str(tmp_path / "missing.jsonl"))
    (tmp_path / "junk.jsonl").write_text("not json\n")
    with pytest.raises(ValueError, match="not a utilities"):
        read_utilities(str(tmp_path / "junk.jsonl"))
    # A finished table is handed back by --resume only for the options that wrote it.
    os.replace(out + ".x", out)
    assert score_dataset(scorer, ds, out, candidates="top:1", progress=False, limit=2, resume=True)["n_queries"] == 2
    for kw, diff in ((dict(candidates="top:1", limit=3), "n_queries, n_rows"), (dict(candidates="all", limit=2), "candidates")):
        with pytest.raises(ValueError, match=f"--resume: .*u.jsonl is complete but was written with different settings \\({diff}"):
            score_dataset(scorer, ds, out, progress=False, resume=True, **kw)
    with pytest.raises(ValueError, match=r"no query has both a gold answer and gold evidence in shard 40/41 \(use fewer shards\)"):
        score_dataset(scorer, ds, str(tmp_path / "s.jsonl"), candidates="top:1", progress=False, shard=(40, 41))
    # Rows every reader (merge, subset, ensemble, reuse) would copy or trip on are refused on reading.
    lines = open(out).read().splitlines()
    row = json.loads(lines[1])
    for bad, msg in (({**row, "utility": float("nan")}, "utility must be a finite number, got nan"),
                     ({**row, "utility": "abc"}, "utility must be a finite number, got 'abc'"),
                     ({k: v for k, v in row.items() if k != "utility"}, "utility must be a finite number, got None"),
                     ({**row, "utility": 1e39}, "utility must be a finite number, got 1e\\+39 \\(within float32"),
                     ({**row, "qid": [row["qid"]]}, "row 2: qid must be a string \\(or an integer\\)"),
                     (row, "row 2: duplicate \\(qid, pid\\) row")):
        path = tmp_path / "bad.jsonl"
        path.write_text("\n".join([lines[0], lines[1], json.dumps(bad)] + lines[2:]) + "\n")
        with pytest.raises(ValueError, match=msg):
            read_utilities(str(path))


def test_cli_unreadable_data_and_bad_options(tmp_path, teacher_dir, capsys):
    from uae_fast.cli import main

    bad = tmp_path / "broken.json.gz"
    bad.write_bytes(b"\x1f\x8b garbage")
    out = str(tmp_path / "o.jsonl")
    assert main(["score", "--data", str(bad), "--out", out, "--teacher", teacher_dir]) == 1
    assert "broken.json.gz" in capsys.readouterr().err
    assert not os.path.exists(out) and not os.path.exists(out + ".partial")
    assert main(["score", "--data", DATA, "--out", out, "--teacher", teacher_dir, "--candidates", "top:zero"]) == 1
    assert "--candidates" in capsys.readouterr().err
    assert main(["score", "--data", DATA, "--out", out, "--teacher", str(tmp_path / "nope")]) == 1
    assert "nope" in capsys.readouterr().err
    assert main(["score", "--data", DATA, "--out", out, "--teacher", teacher_dir, "--shard", "3/3"]) == 1
    assert "--shard" in capsys.readouterr().err
    assert not os.path.exists(out) and not os.path.exists(out + ".partial")
    # an existing table, an interrupted run's .partial and a missing --reuse / --questions-from file are refused
    # before the teacher loads (a teacher that does not exist shows it)
    nope = str(tmp_path / "nope")
    for path, why in ((out, "already exists"), (out + ".partial", "pass --resume")):
        open(path, "w").close()
        assert main(["score", "--data", DATA, "--out", out, "--teacher", nope]) == 1
        assert why in capsys.readouterr().err
        os.remove(path)
    for flag in ("--reuse", "--questions-from"):
        assert main(["score", "--data", DATA, "--out", out, "--teacher", nope, flag, str(tmp_path / "gone.jsonl")]) == 1
        assert "gone.jsonl: no such file" in capsys.readouterr().err


def test_reuse_copies_known_rows_and_scores_only_the_new_ones(ds, scorer, teacher_dir, tmp_path, capsys):
    # top:2 first, then answer:3 reusing it: the same table as answer:3 scored from scratch, with the overlap
    # copied instead of passed to the teacher again.
    kw = dict(no_gold=True, with_gold_only=False, progress=False, limit=6)
    first = str(tmp_path / "top2.jsonl")
    score_dataset(scorer, ds, first, candidates="top:2", **kw)
    ref = str(tmp_path / "ref.jsonl")
    score_dataset(scorer, ds, ref, candidates="answer:3", **kw)
    seen = []
    real = scorer.score_many

    def counting(items):
        seen.extend(len(p) for _, _, p in items)
        return real(items)

    scorer.score_many = counting
    try:
        out = str(tmp_path / "reused.jsonl")
        h = score_dataset(scorer, ds, out, candidates="answer:3", reuse=[first], group=2, **kw)
    finally:
        del scorer.score_many
    (_, a), (_, b) = read_utilities(ref), read_utilities(out)
    overlap = len({(r["qid"], r["pid"]) for r in a} & {(r["qid"], r["pid"]) for r in read_utilities(first)[1]})
    assert 0 < overlap < len(a) and h["n_reused_rows"] == overlap and h["reused_from"] == ["top2.jsonl"]
    assert sum(seen) == len(a) - overlap  # the teacher saw only the rows no table had
    keys = ("qid", "pid", "gold", "cand", "n_cand", "n_answer_tokens")
    assert [tuple(r[k] for k in keys) for r in a] == [tuple(r[k] for k in keys) for r in b]
    torch.testing.assert_close(torch.tensor([r["utility"] for r in b]), torch.tensor([r["utility"] for r in a]),
                               atol=2e-5, rtol=0)
    # The first run's header is the table's: a resume must read the same --reuse tables, or it would name tables
    # it did not read (or not name those it did)
    with pytest.raises(ValueError, match=r"different settings \(reused_from\)"):
        score_dataset(scorer, ds, out, candidates="answer:3", resume=True, **kw)
    assert score_dataset(scorer, ds, out, candidates="answer:3", reuse=[first], resume=True, **kw) == h
    # Rows without per-token deltas are scored again when deltas are asked for.
    h = score_dataset(scorer, ds, str(tmp_path / "d.jsonl"), candidates="answer:3", reuse=[first], save_deltas=True, **kw)
    assert h["n_reused_rows"] == 0 and all("deltas" in r for r in read_utilities(str(tmp_path / "d.jsonl"))[1])
    # Another teacher's (or prompt's, dtype's, data's) rows are refused, in one line, through the CLI too.
    other_h, other_rows = read_utilities(first)
    other = str(tmp_path / "other.jsonl")
    with open(other, "w") as f:
        f.write(json.dumps(dict(other_h, teacher="another-teacher")) + "\n")
        f.writelines(json.dumps(r) + "\n" for r in other_rows)
    with pytest.raises(ValueError, match=r"other settings \(teacher"):
        score_dataset(scorer, ds, str(tmp_path / "e.jsonl"), candidates="answer:3", reuse=[other], **kw)
    from uae_fast.cli import main

    bad = str(tmp_path / "nan.jsonl")
    with open(bad, "w") as f:
        f.write(json.dumps(other_h) + "\n" + json.dumps(dict(other_rows[0], utility=float("nan"))) + "\n")
    e_out = str(tmp_path / "f.jsonl")
    assert main(["score", "--data", DATA, "--out", e_out, "--teacher", teacher_dir, "--no-gold",
                 "--limit", "2", "--no-progress", "--max-passage-tokens", "48", "--max-answer-tokens", "12",
                 "--reuse", bad]) == 1
    err = capsys.readouterr().err
    assert "nan.jsonl" in err and "utility must be a finite number" in err and not os.path.exists(e_out + ".partial")


def test_header_records_deltas_and_data_fingerprint(ds, scorer, tmp_path):
    """--save-deltas and the data file's contents are settings: a resume or reuse that would mix rows of
    other settings is refused (tables without a fingerprint, older ones, compare by file name alone)."""
    kw = dict(candidates="top:1", progress=False, limit=2)
    out = str(tmp_path / "u.jsonl")
    h = score_dataset(scorer, ds, out, save_deltas=True, data_sha1="aaaa", **kw)
    assert h["save_deltas"] is True and h["data_sha1"] == "aaaa"
    assert all("deltas" in r for r in read_utilities(out)[1])
    for extra, diff in ((dict(data_sha1="aaaa"), "save_deltas"), (dict(save_deltas=True, data_sha1="bbbb"), "data_sha1")):
        with pytest.raises(ValueError, match=f"is complete but was written with different settings \\({diff}\\)"):
            score_dataset(scorer, ds, out, resume=True, **kw, **extra)
        part = str(tmp_path / "p.jsonl")
        with open(out) as src, open(part + ".partial", "w") as dst:
            dst.write(src.readline())  # an interrupted run: the header alone
        with pytest.raises(ValueError, match=f"\\.partial was written with different settings \\({diff}\\)"):
            score_dataset(scorer, ds, part, resume=True, **kw, **extra)
        os.remove(part + ".partial")
    assert score_dataset(scorer, ds, out, resume=True, save_deltas=True, **kw)["n_rows"] == h["n_rows"]  # no fingerprint: by name
    # A table written before the two were recorded (neither key) resumes with either setting.
    old_h, old_rows = read_utilities(out)
    legacy = str(tmp_path / "legacy.jsonl")
    with open(legacy, "w") as f:
        f.write(json.dumps({k: v for k, v in old_h.items() if k not in ("save_deltas", "data_sha1")}) + "\n")
        f.writelines(json.dumps(r) + "\n" for r in old_rows)
    for extra in (dict(save_deltas=True, data_sha1="bbbb"), dict(save_deltas=False)):
        assert score_dataset(scorer, ds, legacy, resume=True, **kw, **extra)["n_rows"] == h["n_rows"]
    # Reused rows carry deltas only when the new table asks for them.
    plain = str(tmp_path / "plain.jsonl")
    hp = score_dataset(scorer, ds, plain, reuse=[out], data_sha1="aaaa", **kw)
    assert hp["n_reused_rows"] == h["n_rows"] and hp["save_deltas"] is False
    assert not any("deltas" in r for r in read_utilities(plain)[1])
    with pytest.raises(ValueError, match=r"--reuse .*other settings \(data_sha1"):
        score_dataset(scorer, ds, str(tmp_path / "x.jsonl"), reuse=[out], data_sha1="cccc", **kw)


def test_a_path_teacher_is_fingerprinted_so_another_model_at_its_path_is_refused(ds, tmp_path):
    # the header names a PATH teacher by its path; a model saved over that path later must not resume, reuse or
    # merge into the first one's rows (teacher_sha1)
    from uae_fast.embcache import model_fingerprint

    folder = tmp_path / "teacher"
    kw = dict(no_gold=True, with_gold_only=False, progress=False, limit=2, candidates="top:2")
    first = str(tmp_path / "first.jsonl")
    for seed, out in ((0, first), (1, None)):
        tiny_llama(seed=seed).save_pretrained(folder)
        byte_tokenizer().save_pretrained(folder)
        sc = UtilityScorer.from_pretrained(str(folder), device="cpu", token_budget=1, **OPTS)
        assert sc.settings()["teacher_sha1"] == model_fingerprint(str(folder))
        if out:
            h = score_dataset(sc, ds, out, **kw)
            assert h["teacher_sha1"] == sc.fingerprint and h["teacher"] == os.path.normpath(str(folder))
    assert sc.fingerprint != h["teacher_sha1"]  # the second model, same path
    with pytest.raises(ValueError, match=r"--reuse .*other settings \(teacher_sha1"):
        score_dataset(sc, ds, str(tmp_path / "x.jsonl"), reuse=[first], **kw)
    with pytest.raises(ValueError, match=r"different settings \(teacher_sha1\)"):
        score_dataset(sc, ds, first, resume=True, **kw)
    assert "teacher_sha1" not in UtilityScorer(sc.model, sc.tokenizer, **OPTS).settings()  # no path, no fingerprint
    # an ensemble of the two models is what --merge-teachers is for: their fingerprints differ by design
    from uae_fast.utilities import _one_value, merge_teachers

    second = str(tmp_path / "second.jsonl")
    score_dataset(sc, ds, second, **kw)
    assert merge_teachers([first, second], str(tmp_path / "both.jsonl"))["n_rows"] > 0
    # shards are one teacher's: every fingerprint recorded must agree, not each with the first shard's (none)
    with pytest.raises(ValueError, match=r"s2: scored by another teacher model than s1 \(teacher_sha1"):
        _one_value(["s0", "s1", "s2"], [{}, {"teacher_sha1": "a"}, {"teacher_sha1": "b"}], "teacher_sha1")


def test_teacher_fingerprint_counts_model_files_only(tmp_path):
    # a table, its .partial or a cache written into the teacher's folder must not change the teacher's identity
    from uae_fast.embcache import model_fingerprint

    a = tmp_path / "a"
    tiny_llama().save_pretrained(a)
    byte_tokenizer().save_pretrained(a)
    before = model_fingerprint(str(a))
    for name in ("u.jsonl.gz", "u.jsonl.gz.partial", "cache.jsonl", "README.md", "notes.txt.log"):
        (a / name).write_text("x")
    assert model_fingerprint(str(a)) == before
    (a / "config.json").write_text((a / "config.json").read_text().replace("}", ', "x_extra": 1}', 1))
    assert model_fingerprint(str(a)) != before


def test_blank_texts_are_refused_before_any_scoring(scorer, tmp_path):
    path = tmp_path / "d.jsonl"
    recs = [dict(type="passage", id="p0", doc_id="d", text="The capital of France is Paris."),
            dict(type="passage", id="p1", doc_id="d", text="   "),
            dict(type="query", id="q0", doc_id="d", question="What is the capital?", answers=["Paris"], gold=["p0"])]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    with pytest.raises(ValueError, match="d.jsonl:2: passage text is blank"):  # a JSONL file: refused as it loads
        load_dataset(str(path))
    # data built in Python (or read from a format that keeps blank text) is caught before the teacher runs
    from uae_fast.data import Passage, Query, RetrievalDataset

    ds = RetrievalDataset({r["id"]: Passage(r["id"], "d", r["text"], "") for r in recs[:2]},
                          [Query("q0", "What is the capital?", ["Paris"], ["p0"], doc_id="d")], "d")
    seen = []
    real = scorer.score_many
    scorer.score_many = lambda items: seen.append(items) or real(items)
    try:
        with pytest.raises(ValueError, match="passage 'p1' \\(a candidate of query 'q0'\\) has no text"):
            score_dataset(scorer, ds, str(tmp_path / "u.jsonl"), candidates="all", progress=False)
    finally:
        del scorer.score_many
    assert not seen and not os.path.exists(tmp_path / "u.jsonl.partial")


def test_candidates_spelling_and_teacher_path_are_canonical():
    from uae_fast.scoring import parse_candidates
    from uae_fast.teacher import teacher_name

    assert parse_candidates("answer:12") == ("answer", 12)
    for bad in ("top:03", "top:3 ", "top:+3", "top:٣", "top:0"):
        with pytest.raises(ValueError, match="--candidates"):
            parse_candidates(bad)
    assert teacher_name("models/t/") == teacher_name("./models/t") == os.path.join("models", "t")
    assert teacher_name("gemma3-270m") == "gemma-3-270m"  # a named teacher keeps its name


def test_data_fingerprint_reads_what_the_loader_reads(tmp_path):
    """A BEIR folder's fingerprint covers its corpus, queries and qrels: a table or index written into the folder
    does not change it (a resume would refuse its own run), an edited corpus does."""
    from uae_fast.data import data_fingerprint

    folder = tmp_path / "beir"
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text(json.dumps({"_id": "d1", "title": "", "text": "alpha beta"}) + "\n")
    (folder / "queries.jsonl").write_text(json.dumps({"_id": "q1", "text": "alpha?"}) + "\n")
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    before = data_fingerprint(str(folder))
    (folder / "u.jsonl.partial").write_text("{}\n")
    (folder / "index").mkdir()
    os.symlink(str(tmp_path / "gone"), str(folder / "broken-link"))
    assert data_fingerprint(str(folder)) == before
    assert data_fingerprint(str(folder / "qrels" / "test.tsv")) == before  # the qrels path names the same data
    (folder / "corpus.jsonl").write_text(json.dumps({"_id": "d1", "title": "", "text": "alpha gamma"}) + "\n")
    assert data_fingerprint(str(folder)) != before
    f = tmp_path / "d.json"
    f.write_text("{}")
    a = data_fingerprint(str(f))
    f.write_text("{} ")
    assert data_fingerprint(str(f)) != a and len(a) == 16
    with pytest.raises(ValueError, match="cannot read data file"):
        data_fingerprint(str(tmp_path / "missing.json"))
