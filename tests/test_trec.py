"""TREC runs and qrels (uae_fast.trec), and ir-measures (trec_eval's measures) as the oracle for every metric
`uae eval` prints, computed on the runs and qrels `uae eval --save-runs` writes."""
import json
import os
import random

import pytest

from test_evaluation import DEV, tiny, tiny_lm  # noqa: F401 (pytest fixtures)
from uae_fast.data import load_dataset
from uae_fast.evaluation import evaluate
from uae_fast.metrics import retrieval_metrics
from uae_fast.trec import read_qrels, read_run, write_qrels, write_run

METRICS = ("Success@1", "Success@5", "Recall@1", "Recall@5", "MAP", "MRR")


def _ir_measures(run_path, qrels_path):
    """ir-measures' values of our METRICS (means over the queries of the qrels)."""
    irm = pytest.importorskip("ir_measures")
    from ir_measures import AP, RR, R, Success

    run, qrels = list(irm.read_trec_run(str(run_path))), list(irm.read_trec_qrels(str(qrels_path)))
    measures = dict(zip(METRICS, (Success @ 1, Success @ 5, R @ 1, R @ 5, AP, RR)))
    got = irm.calc_aggregate(list(measures.values()), qrels, run)
    return {k: got[m] for k, m in measures.items()}


def test_roundtrip_and_errors(tmp_path):
    rankings = {"q1": ["c", "a", "b"], "q2": ["x"]}
    assert write_run(tmp_path / "r.run", rankings, "sys") == 4
    assert (tmp_path / "r.run").read_text().splitlines() == [
        "q1 Q0 c 1 3 sys", "q1 Q0 a 2 2 sys", "q1 Q0 b 3 1 sys", "q2 Q0 x 1 1 sys"]
    assert read_run(tmp_path / "r.run") == rankings
    assert write_run(tmp_path / "d.run", rankings, "sys", depth=2) == 3
    assert read_run(tmp_path / "d.run") == {"q1": ["c", "a"], "q2": ["x"]}
    assert write_qrels(tmp_path / "qrels", {"q1": ["a", "b", "a"], "q2": []}) == 2
    assert (tmp_path / "qrels").read_text() == "q1 0 a 1\nq1 0 b 1\n"
    assert read_qrels(tmp_path / "qrels") == {"q1": {"a": 1, "b": 1}}

    with pytest.raises(ValueError, match="document id 'a b' is empty or contains whitespace"):
        write_run(tmp_path / "x", {"q": ["a b"]}, "s")
    with pytest.raises(ValueError, match="run name 'my run'"):
        write_run(tmp_path / "x", {"q": ["a"]}, "my run")
    with pytest.raises(ValueError, match="query id ''"):
        write_qrels(tmp_path / "x", {"": ["a"]})
    (tmp_path / "x.tmp").write_text("the user's own file")
    with pytest.raises(ValueError, match="twice"):
        write_run(tmp_path / "x", {"q": ["a", "a"]}, "s")
    # a refused run leaves nothing behind, and a file that happens to be named PATH.tmp is not ours to delete
    assert sorted(os.listdir(tmp_path)) == ["d.run", "qrels", "r.run", "x.tmp"]
    with pytest.raises(ValueError, match="depth"):
        write_run(tmp_path / "x", {"q": ["a"]}, "s", depth=0)
    with pytest.raises(ValueError, match="query 'q2': the ranking is empty"):  # trec_eval would drop q2 from its means
        write_run(tmp_path / "x", {"q1": ["a"], "q2": []}, "s")
    with pytest.raises(TypeError, match="not one string"):
        write_qrels(tmp_path / "x", {"q": "abc"})
    for text, msg in (("q Q0 a 1 0.5\n", r"bad:1: expected 6 fields 'qid Q0 docid rank score run_name', got 5"),
                      ("q Q0 a 1 0.5 s\n\nq Q0 b 2 high s\n", r"bad:3: score 'high' is not a number"),
                      ("q Q0 a 1 0.5 s\nq Q0 a 2 0.4 s\n", r"bad:2: document 'a' ranked twice for query 'q'"),
                      ("q Q0 a 1 4 s\nq Q0 b 2 nan s\nq Q0 c 3 3 s\n", r"bad:2: score 'nan' is not finite"),
                      ("\n", r"bad: the run holds no rows")):
        (tmp_path / "bad").write_text(text)
        with pytest.raises(ValueError, match=msg):
            read_run(tmp_path / "bad")
    (tmp_path / "bad").write_text("q 0 a yes\n")
    with pytest.raises(ValueError, match=r"bad:1: relevance 'yes' is not an integer"):
        read_qrels(tmp_path / "bad")
    with pytest.raises(FileNotFoundError, match="TREC file not found"):
        read_run(tmp_path / "missing.run")
    with pytest.raises(TypeError, match=r"query 'q1': the ranking must be a sequence of ids, not one string"):
        write_run(tmp_path / "x", {"q1": "d12"}, "s")
    for write, value in ((write_run, ["a"]), (write_qrels, ["a"])):
        with pytest.raises(ValueError, match=r"query id '1' appears twice"):
            write(tmp_path / "x", {1: value, "1": value}, *(["s"] if write is write_run else []))
    assert not (tmp_path / "x").exists()  # refused midway: nothing written
    # document ids equal as text: one id in the file (a run refuses the repeat, qrels write one judgment)
    with pytest.raises(ValueError, match=r"query 'q': the ranking contains a document twice"):
        write_run(tmp_path / "x", {"q": [1, "1"]}, "s")
    assert write_qrels(tmp_path / "x", {"q": [1, "1", "d"]}) == 2 and read_qrels(tmp_path / "x") == {"q": {"1": 1, "d": 1}}
    (tmp_path / "empty").write_text("\n# a comment\n")
    with pytest.raises(ValueError, match=r"empty: the qrels hold no rows"):
        read_qrels(tmp_path / "empty")
    import gzip

    (tmp_path / "cut.gz").write_bytes(gzip.compress(b"q Q0 a 1 1 s\n" * 1000)[:-30])
    with pytest.raises(ValueError, match=r"cut.gz"):
        read_run(tmp_path / "cut.gz")
    (tmp_path / "latin1").write_bytes("q 0 caf\xe9 1\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1"):
        read_qrels(tmp_path / "latin1")


def test_read_run_orders_ties_as_trec_eval(tmp_path):
    """A run from another tool with tied scores: our metrics on read_run's order equal ir-measures on the file."""
    rng = random.Random(3)
    lines, golds = [], {}
    for q in range(40):
        docs = [f"d{i:02d}" for i in rng.sample(range(30), rng.randint(3, 12))]
        for rank, d in enumerate(docs, 1):
            lines.append(f"q{q} Q0 {d} {rank} {rng.choice([0.5, 1.0, 1.0, 2.25])} other")  # many ties, rank column ignored
        golds[f"q{q}"] = rng.sample(docs, rng.randint(1, min(3, len(docs))))
    (tmp_path / "other.run").write_text("\n".join(lines) + "\n")
    write_qrels(tmp_path / "qrels.txt", golds)
    run = read_run(tmp_path / "other.run")
    ours = retrieval_metrics([run[q] for q in golds], [set(g) for g in golds.values()])
    want = _ir_measures(tmp_path / "other.run", tmp_path / "qrels.txt")
    for k in METRICS:
        assert ours[k] == pytest.approx(want[k], abs=1e-12), k
    # and the file order would not do: the ties matter on this run
    in_file = {}
    for line in lines:
        in_file.setdefault(line.split()[0], []).append(line.split()[2])
    assert retrieval_metrics([in_file[q] for q in golds], [set(g) for g in golds.values()]) != ours


def test_read_run_reads_scores_at_trec_evals_float32_precision(tmp_path):
    """Scores that differ only past float32's ~7 digits tie in trec_eval (a C float) and go by docid: so here."""
    lines, golds = [], {}
    for q in range(20):
        docs = [f"d{i}" for i in range(6)]
        for rank, d in enumerate(docs, 1):  # 80.123456 + 1e-6 * k: distinct as doubles, tied in pairs as floats
            lines.append(f"q{q} Q0 {d} {rank} {80.123456 + 1e-6 * (len(docs) - rank):.6f} other")
        golds[f"q{q}"] = [docs[q % len(docs)]]
    (tmp_path / "dense.run").write_text("\n".join(lines) + "\n")
    write_qrels(tmp_path / "qrels.txt", golds)
    run = read_run(tmp_path / "dense.run")
    assert run["q0"] != [f"d{i}" for i in range(6)]  # the double order is not trec_eval's
    ours = retrieval_metrics([run[q] for q in golds], [set(g) for g in golds.values()])
    want = _ir_measures(tmp_path / "dense.run", tmp_path / "qrels.txt")
    for k in METRICS:
        assert ours[k] == pytest.approx(want[k], abs=1e-12), k
    (tmp_path / "huge.run").write_text("q Q0 a 1 2e39 s\nq Q0 b 2 1e39 s\n")  # both inf in a C float: by docid
    assert read_run(tmp_path / "huge.run") == {"q": ["b", "a"]}


def test_trec_comments_ids_and_repeated_judgments(tmp_path):
    (tmp_path / "c.run").write_text("# made by hand: q Q0 x 1 3 s\nq Q0 a 1 2 s\n#q Q0 b 2 1 s\n")
    assert read_run(tmp_path / "c.run") == {"q": ["a"]}  # as trec_eval 9.0.8: '#' in column 0 starts a comment
    for bad in ("#q", "q\0x"):
        with pytest.raises(ValueError, match="holds a NUL or starts a line with '#'"):
            write_run(tmp_path / "x.run", {bad: ["a"]}, "s")
    with pytest.raises(ValueError, match="document id .* holds a NUL"):
        write_qrels(tmp_path / "x.qrels", {"q": ["a\0"]})
    write_run(tmp_path / "ok.run", {"q#1": ["d#3", "#d"]}, "s")  # '#' inside an id (MS MARCO's ids) is kept
    assert read_run(tmp_path / "ok.run") == {"q#1": ["d#3", "#d"]}
    for text in ("q 0 a 1\nq 0 a 0\n", "q 0 a 1\nq 0 a 1\n"):  # trec_eval refuses both
        (tmp_path / "q.txt").write_text(text)
        with pytest.raises(ValueError, match=r"q.txt:2: document 'a' of query 'q' is judged twice \(1 and [01]\)"):
            read_qrels(tmp_path / "q.txt")


def test_write_run_refuses_scores_trec_eval_cannot_tell_apart(tmp_path, monkeypatch):
    import uae_fast.trec as trec

    assert trec._float32(2.0 ** 24 + 1) == trec._float32(2.0 ** 24)  # why the limit is where it is
    assert trec._float32(2.0 ** 24) != trec._float32(2.0 ** 24 - 1)
    monkeypatch.setattr(trec, "MAX_RUN_DEPTH", 3)  # the check, without writing 16M lines
    with pytest.raises(ValueError, match="query 'q': 4 documents; .* pass depth <= 3"):
        write_run(tmp_path / "x.run", {"q": ["a", "b", "c", "d"]}, "s")
    assert write_run(tmp_path / "x.run", {"q": ["a", "b", "c", "d"]}, "s", depth=3) == 3


def test_uae_eval_metrics_equal_ir_measures(tmp_path, tiny, tiny_lm, capsys):  # noqa: F811
    """Every metric `uae eval` prints, for every system and both tables, equals ir-measures on --save-runs' files."""
    from uae_fast.cli import main

    pytest.importorskip("ir_measures")
    out = tmp_path / "runs"
    js = tmp_path / "res.json"
    assert main(["eval", "--data", DEV, "--model", tiny, "--name", "tiny", "--baselines", "bm25,base,rerank", "--student", tiny,
                 "--teacher", tiny_lm, "--rerank-limit", "5", "--rerank-depth", "4", "--save-runs", str(out),
                 "--json", str(js), "--no-progress"]) == 0
    res = json.loads(js.read_text())
    assert sorted(p.name for p in out.iterdir()) == ["base.run", "bm25.run", "qrels-rerank-subset.txt", "qrels.txt", "rerank.run",
                                                      "tiny.run"]
    dev = load_dataset(DEV)
    queries = [q for q in dev.queries if q.gold]
    assert read_qrels(out / "qrels.txt") == {q.id: dict.fromkeys(q.gold, 1) for q in queries}
    assert any(len(q.gold) > 1 for q in queries)  # so Recall@k and Success@k differ somewhere
    # BM25 gives tied scores here (passages sharing no query term), so the run's scores must carry our order
    from uae_fast.bm25 import BM25

    scores = [BM25([dev.passages[p].text for p in dev.pool(q)]).topk(q.question, len(dev.pool(q)))[0].tolist() for q in queries]
    assert any(len(set(s)) < len(s) for s in scores)
    assert read_qrels(out / "qrels-rerank-subset.txt") == {q.id: dict.fromkeys(q.gold, 1) for q in queries[:5]}
    for name, m in res["systems"].items():
        run = read_run(out / f"{name}.run")
        assert len(run) == m["n"] and all(len(run[q.id]) == len(dev.pool(q)) for q in queries[: m["n"]])
        # the re-ranker's run covers its 5 queries: its row goes with their qrels
        want = _ir_measures(out / f"{name}.run", out / ("qrels-rerank-subset.txt" if name == "rerank" else "qrels.txt"))
        for k in METRICS:
            assert m[k] == pytest.approx(want[k], abs=1e-12), (name, k)
        sub = res["rerank_subset"]["systems"][name]  # the table of the re-ranker's 5 queries
        want = _ir_measures(out / f"{name}.run", out / "qrels-rerank-subset.txt")
        for k in METRICS:
            assert sub[k] == pytest.approx(want[k], abs=1e-12), (name, k, "subset")
    assert res["systems"]["bm25"]["Recall@1"] < res["systems"]["bm25"]["Success@1"]
    assert res["runs"]["systems"]["tiny"] == str(out / "tiny.run")
    assert "TREC runs and qrels written" in capsys.readouterr().out


def test_depth_cuts_the_runs_and_the_metrics_alike(tmp_path):
    # --depth K: each run holds K passages per query and the printed metrics are ir-measures' on those files
    # (a gold passage below K is never retrieved, as trec_eval reads it)
    from uae_fast.evaluation import evaluate

    pytest.importorskip("ir_measures")
    dev = load_dataset(DEV)
    full = evaluate(dev, [], baselines=("bm25",), progress=False)
    cut = evaluate(dev, [], baselines=("bm25",), progress=False, save_runs=str(tmp_path / "r"), depth=3)
    run = read_run(tmp_path / "r" / "bm25.run")
    assert max(map(len, run.values())) == 3 and cut["settings"]["depth"] == 3
    want = _ir_measures(tmp_path / "r" / "bm25.run", tmp_path / "r" / "qrels.txt")
    for k in METRICS:
        assert cut["systems"]["bm25"][k] == pytest.approx(want[k], abs=1e-12), k
    assert cut["systems"]["bm25"]["Success@1"] == full["systems"]["bm25"]["Success@1"]
    assert cut["systems"]["bm25"]["MAP"] < full["systems"]["bm25"]["MAP"]
    with pytest.raises(ValueError, match="depth must be a positive int"):
        evaluate(dev, [], baselines=("bm25",), progress=False, depth=0)


def test_save_runs_errors(tmp_path):
    from uae_fast.data import RetrievalDataset

    ds = load_dataset(DEV)
    q = next(q for q in ds.queries if q.gold)
    with pytest.raises(ValueError, match="query id .* occurs twice: TREC runs need unique query ids"):
        evaluate(RetrievalDataset(ds.passages, [q, q], "dup"), [], baselines=("bm25",), progress=False, save_runs=str(tmp_path))
    # ids and names a TREC file cannot hold are refused before any system runs, and nothing is written
    import dataclasses

    import uae_fast.evaluation as ev

    runs = tmp_path / "runs"
    spaced = dataclasses.replace(q, id="q 1")
    p0 = next(iter(ds.passages))
    bad_passages = dict(ds.passages, **{"d x:0": ds.passages[p0]})
    for args, msg in (((RetrievalDataset(ds.passages, [spaced], "sp"), []), "query id 'q 1'"),
                      ((RetrievalDataset(bad_passages, [q], "sp"), []), "passage id 'd x:0'"),
                      ((ds, [DEV]), "system name 'a/b' contains a path separator")):
        with pytest.raises(ValueError, match=msg):
            ev.evaluate(*args, names=["a/b"] if args[1] else None, baselines=("bm25",), progress=False, save_runs=str(runs))
        assert not runs.exists()
    with pytest.raises(ValueError, match="is a file, not a folder"):  # before any system runs
        (tmp_path / "afile").write_text("x")
        evaluate(ds, [], baselines=("bm25",), progress=False, save_runs=str(tmp_path / "afile"))
    pid = next(iter(ds.passages))
    with pytest.raises(ValueError, match="passage id .* occurs twice once written"):
        evaluate(RetrievalDataset({**ds.passages, 7: ds.passages[pid], "7": ds.passages[pid]}, [q], "c"), [],
                 baselines=("bm25",), progress=False, save_runs=str(runs))
    # query ids that collide once written (1 and "1") are refused like equal ones
    with pytest.raises(ValueError, match="occurs twice"):
        evaluate(RetrievalDataset(ds.passages, [dataclasses.replace(q, id=1), dataclasses.replace(q, id="1")], "c"), [],
                 baselines=("bm25",), progress=False, save_runs=str(runs))


def test_save_runs_refuses_a_folder_with_another_evaluations_runs(tmp_path):
    # a scorer of every *.run in the folder (scripts/runs_report.py) would mix the two evaluations
    ds = load_dataset(DEV)
    runs = tmp_path / "runs"
    evaluate(ds, [], baselines=("bm25",), progress=False, save_runs=str(runs), limit=4)
    evaluate(ds, [], baselines=("bm25",), progress=False, save_runs=str(runs), limit=3)  # the same files: rewritten
    assert sorted(os.listdir(runs)) == ["bm25.run", "qrels.txt"] and len(read_run(runs / "bm25.run")) == 3
    (runs / "old-model.run").write_text("q Q0 a 1 1 old-model\n")
    with pytest.raises(ValueError, match=r"--save-runs .*runs: it holds old-model.run from another evaluation"):
        evaluate(ds, [], baselines=("bm25",), progress=False, save_runs=str(runs), limit=3)
    (runs / "old-model.run").unlink()
    (runs / "qrels-rerank-subset.txt").write_text("q 0 a 1\n")
    with pytest.raises(ValueError, match="qrels-rerank-subset.txt"):
        evaluate(ds, [], baselines=("bm25",), progress=False, save_runs=str(runs), limit=3)


def test_run_files_are_never_half_written(tmp_path):
    with pytest.raises(ValueError, match="document id 'b c'"):
        write_run(str(tmp_path / "x.run"), {"q1": ["a"], "q2": ["b c"]}, "x")
    with pytest.raises(ValueError, match="document id ''"):
        write_qrels(str(tmp_path / "qrels.txt"), {"q1": ["a"], "q2": [""]})
    assert os.listdir(tmp_path) == []


def test_runs_report_groups_seeds_and_pairs(tmp_path, capsys):
    """scripts/runs_report.py: NAME-sN runs are one system (mean, sd over seeds); paired tests use per-query
    metrics averaged over seeds; hand-computed values."""
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
    import runs_report
    from uae_fast.trec import write_qrels, write_run
    write_qrels(str(tmp_path / "qrels.txt"), {"q1": ["a"], "q2": ["b"], "q3": ["c", "d"], "q4": []})
    write_run(str(tmp_path / "uae-s0.run"), {"q1": ["a", "x"], "q2": ["x", "b"], "q3": ["c", "d"]}, "uae-s0")
    write_run(str(tmp_path / "uae-s1.run"), {"q1": ["a", "x"], "q2": ["b", "x"], "q3": ["x", "c"]}, "uae-s1")
    write_run(str(tmp_path / "bm25.run"), {"q1": ["x", "a"], "q2": ["x", "b"], "q3": ["x", "y"]}, "bm25")
    assert runs_report.main([str(tmp_path), "--json", str(tmp_path / "r.json")]) == 0
    r = json.load(open(tmp_path / "r.json"))
    assert r["n_queries"] == 3  # q4 has no relevant passage
    s1 = r["systems"]["uae"]["Success@1"]
    assert r["systems"]["uae"]["seeds"] == [0, 1] and s1["per_seed"] == pytest.approx([2 / 3, 2 / 3]) and s1["sd"] == 0
    # per-query S@1 averaged over seeds: q1 1, q2 0.5, q3 0.5; bm25: 0, 0, 0
    assert r["paired"]["uae - bm25"]["Success@1"]["diff"] == pytest.approx(2 / 3)
    mrr = r["systems"]["uae"]["MRR"]["per_seed"]
    assert mrr == pytest.approx([(1 + 0.5 + 1) / 3, (1 + 1 + 0.5) / 3])
    assert "| uae | 2 |" in capsys.readouterr().out
    assert runs_report.main([str(tmp_path), "--json", str(tmp_path / "r.json.gz"), "--per-query"]) == 0
    import gzip
    r = json.load(gzip.open(tmp_path / "r.json.gz", "rt"))
    assert r["queries"] == ["q1", "q2", "q3"] and r["per_query"]["uae-s0"]["Success@1"] == [1, 0, 1]
    assert r["per_query"]["bm25"]["MAP"] == [0.5, 0.5, 0]
    assert runs_report.main([str(tmp_path), "--ref", "nope"]) == 2
    assert "no run for reference 'nope'" in capsys.readouterr().err
    # a re-ranker's run over the first queries only: left out of the full report (its missing queries are not
    # zeros), reported on its own queries with their qrels
    write_run(str(tmp_path / "rerank.run"), {"q1": ["a", "x"], "q2": ["b", "x"]}, "rerank")
    write_qrels(str(tmp_path / "qrels-rerank-subset.txt"), {"q1": ["a"], "q2": ["b"]})
    assert runs_report.main([str(tmp_path), "--json", str(tmp_path / "r.json")]) == 0
    assert "rerank.run lacks 1 of the 3 queries" in capsys.readouterr().err
    assert "rerank" not in json.load(open(tmp_path / "r.json"))["systems"]
    assert runs_report.main([str(tmp_path), "--qrels", "qrels-rerank-subset.txt", "--ref", "rerank",
                             "--json", str(tmp_path / "r.json")]) == 0
    r = json.load(open(tmp_path / "r.json"))
    assert r["n_queries"] == 2 and r["systems"]["rerank"]["Success@1"]["mean"] == 1.0
    assert r["paired"]["uae - rerank"]["Success@1"]["diff"] == pytest.approx(-0.25)  # uae: q1 1, q2 0.5
    # two seeded systems pair on the seeds both ran (same seed, same batches), not each one's own mean
    write_run(str(tmp_path / "ib-s1.run"), {"q1": ["x", "a"], "q2": ["b", "x"], "q3": ["c", "x"]}, "ib-s1")
    write_run(str(tmp_path / "ib-s2.run"), {"q1": ["a", "x"], "q2": ["b", "x"], "q3": ["c", "x"]}, "ib-s2")
    assert runs_report.main([str(tmp_path), "--ref", "ib", "--json", str(tmp_path / "r2.json")]) == 0
    p2 = json.load(open(tmp_path / "r2.json"))["paired"]["uae - ib"]
    # shared seed 1: uae-s1 S@1 per query 1, 1, 0; ib-s1 0, 1, 1 -> 0 (own means would give 2/3 - 5/6)
    assert p2["seeds"] == [[1], [1]] and p2["Success@1"]["diff"] == pytest.approx(0.0)
    # a lone seeded run pairs on its own seed only; two seeded systems without a common seed are not paired
    os.remove(tmp_path / "ib-s2.run")
    assert runs_report.main([str(tmp_path), "--ref", "ib", "--json", str(tmp_path / "r3.json")]) == 0
    p3 = json.load(open(tmp_path / "r3.json"))["paired"]["uae - ib"]
    assert p3["seeds"] == [[1], [1]] and p3["Success@1"]["diff"] == pytest.approx(0.0)
    os.rename(tmp_path / "ib-s1.run", tmp_path / "ib-s7.run")
    assert runs_report.main([str(tmp_path), "--ref", "ib", "--json", str(tmp_path / "r4.json")]) == 0
    assert json.load(open(tmp_path / "r4.json"))["paired"]["uae - ib"] == {"skipped": "no seed in common"}
    os.remove(tmp_path / "ib-s7.run")
    write_qrels(str(tmp_path / "one.txt"), {"q1": ["a"]})  # one query: no bootstrap, no traceback
    assert runs_report.main([str(tmp_path), "--qrels", "one.txt", "--json", str(tmp_path / "r1.json")]) == 0
    assert json.load(open(tmp_path / "r1.json"))["paired"] == {}


def test_runs_report_by_document_and_seed_level_p(tmp_path, capsys):
    """--by-document resamples articles (a query's document from its relevant ids DOC:i); three seeds add the
    seeds-and-queries p."""
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
    import runs_report
    from uae_fast.trec import write_qrels, write_run

    qrels = {f"q{i}": [f"doc{i % 4}:{i}"] for i in range(12)}
    write_qrels(str(tmp_path / "qrels.txt"), qrels)
    for seed in (0, 1, 2):
        write_run(str(tmp_path / f"uae-s{seed}.run"),
                  {q: ([g[0], "x:0"] if (int(q[1:]) + seed) % 3 else ["x:0", g[0]]) for q, g in qrels.items()}, f"uae-s{seed}")
    write_run(str(tmp_path / "bm25.run"), {q: ["x:0", g[0]] for q, g in qrels.items()}, "bm25")
    assert runs_report.main([str(tmp_path), "--by-document", "--json", str(tmp_path / "r.json")]) == 0
    r = json.load(open(tmp_path / "r.json"))
    s1 = r["paired"]["uae - bm25"]["Success@1"]
    assert r["paired_by"] == "document (4 documents)" and s1["groups"] == 4 and "p_seeds" in s1
    assert "resampled by document: 4 documents" in capsys.readouterr().out
    write_qrels(str(tmp_path / "qrels.txt"), {"q0": ["nodoc"], **{q: g for q, g in qrels.items() if q != "q0"}})
    assert runs_report.main([str(tmp_path), "--by-document"]) == 2
    assert "do not name one document" in capsys.readouterr().err
