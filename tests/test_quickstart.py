"""The quickstart pipeline end to end on tiny models and tiny QASPER slices: every artefact written and loadable."""
import json
import os
import subprocess
import sys

import pytest

from test_student import make_tiny_encoder
from test_teacher import byte_tokenizer, tiny_llama

HERE = os.path.dirname(__file__)
TRAIN = os.path.join(HERE, "fixtures", "qasper-train-mini.json.gz")
DEV = os.path.join(HERE, "fixtures", "qasper-dev-mini.json.gz")


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("qs_models")
    teacher = root / "teacher"
    tiny_llama().save_pretrained(teacher)
    byte_tokenizer().save_pretrained(teacher)
    return str(teacher), str(make_tiny_encoder(root / "student"))


def test_quickstart_writes_every_artefact(tmp_path, tiny_models):
    teacher, student = tiny_models
    out = tmp_path / "qs"
    cmd = [sys.executable, "-m", "uae_fast", "quickstart", "--out", str(out), "--train-data", TRAIN, "--dev-data", DEV,
           "--teacher", teacher, "--student", student, "--score-queries", "3", "--train-steps", "3",
           "--dev-queries", "6", "--rerank-queries", "2", "--no-progress"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=os.path.dirname(HERE),
                       env={**os.environ, "TRITON_INTERPRET": "0"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "S@1" in r.stdout and "R@1" in r.stdout and "faster per query" in r.stdout
    assert "--resume but no checkpoint" not in r.stderr  # a first run starts; only a rerun resumes

    report = json.loads((out / "report.json").read_text())
    assert set(report["eval"]["systems"]) == {"uae", "bm25", "base", "rerank"}
    assert report["stages"]["score"]["queries"] == 3
    assert report["stages"]["train"]["steps"] == 3
    # the slice it scored is a complete utilities file that `uae train` accepts
    from uae_fast.training import load_utilities

    utils, header = load_utilities(str(out / "utilities.jsonl.gz"))
    assert len(utils) == 3 and header["teacher"] == teacher

    png = (out / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(out / "model"), device="cpu")
    assert st.encode(["a question?"]).shape[0] == 1
    # a rerun with other sizes is refused in quickstart's own terms, leaving the run as it was
    r = subprocess.run([c if c != "3" else "4" for c in cmd], capture_output=True, text=True, timeout=600,
                       cwd=os.path.dirname(HERE), env={**os.environ, "TRITON_INTERPRET": "0"})
    assert r.returncode == 1 and "holds a quickstart run made with other options" in r.stderr, r.stderr[-2000:]
    assert json.loads((out / "report.json").read_text()) == report


def test_quickstart_rejects_bad_sizes(tmp_path):
    from uae_fast.quickstart import quickstart

    with pytest.raises(ValueError, match="train_steps"):
        quickstart(str(tmp_path), train_data=TRAIN, dev_data=DEV, train_steps=0)


def test_quickstart_dry_run_checks_what_the_run_would_trip_on(tmp_path, capsys):
    """--dry-run (and a real run, before stage 1) refuses bad sizes, model paths and tables up front."""
    from uae_fast.cli import main

    nan = tmp_path / "nan.jsonl"
    nan.write_text('{"qid": "q", "pid": "p", "utility": NaN}\n')
    for argv, msg in ((["--train-steps", "-1"], "--train-steps must be a positive int"),
                      (["--threads", "0"], "--threads must be a positive int"),
                      (["--teacher", str(tmp_path / "nope")], "is not a folder with an HF causal LM"),
                      (["--student", str(tmp_path / "nope")], "--student .*model folder not found"),
                      (["--utilities", str(nan)], "utility is nan"),
                      (["--full", "--dev-queries", "5"], "--dev-queries sets the quick run's size; --full")):
        for dry in (["--dry-run"], []):
            capsys.readouterr()
            assert main(["quickstart", "--out", str(tmp_path / "qs"), "--train-data", TRAIN, "--dev-data", DEV,
                         "--no-progress"] + dry + argv) == 1
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and err[0].startswith("uae quickstart: error: "), err
            assert __import__("re").search(msg, err[0]), err
    assert not (tmp_path / "qs").exists()
    afile = tmp_path / "afile"
    afile.write_text("x")
    for dry in (["--dry-run"], []):
        assert main(["quickstart", "--out", str(afile), "--train-data", TRAIN, "--dev-data", DEV] + dry) == 1
        assert "--out " + str(afile) + " is a file" in capsys.readouterr().err


def test_quickstart_with_another_teacher_trains_on_its_own_scores(capsys):
    # The shipped table is the default teacher's: with --teacher X stage 2 must train on what X scored.
    from uae_fast.cli import main
    from uae_fast.teacher import TEACHERS

    other = next(k for k in TEACHERS if k != "smollm2-135m")
    for teacher, shipped in ((None, True), ("smollm2-135m", True), (other, False)):
        capsys.readouterr()
        assert main(["quickstart", "--dry-run"] + (["--teacher", teacher] if teacher else [])) == 0
        out = capsys.readouterr().out
        assert ("qasper-train-utilities.jsonl.gz" in out) == shipped, (teacher, out)


def test_quickstart_refuses_train_data_it_cannot_score(tmp_path, capsys):
    # a BEIR folder has no answers: nothing for stage 1 to score; said before the teacher loads, dry run or not
    import json as _json

    from uae_fast.cli import main

    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    (beir / "corpus.jsonl").write_text(_json.dumps({"_id": "d1", "text": "a b"}) + "\n")
    (beir / "queries.jsonl").write_text(_json.dumps({"_id": "q1", "text": "a?"}) + "\n")
    (beir / "qrels" / "test.tsv").write_text("q1\td1\t1\n")
    # a folder trains on its train split, as `uae train` does (the test split is what `uae eval` judges)
    assert main(["quickstart", "--out", str(tmp_path / "qs"), "--train-data", str(beir), "--dev-data", DEV, "--dry-run"]) == 1
    assert "has no qrels/train.tsv" in capsys.readouterr().err
    (beir / "qrels" / "train.tsv").write_text("q1\td1\t1\n")
    for dry in (["--dry-run"], []):
        assert main(["quickstart", "--out", str(tmp_path / "qs"), "--train-data", str(beir), "--dev-data", DEV] + dry) == 1
        assert "no train question has both an answer and gold evidence" in capsys.readouterr().err


def test_quickstart_with_utilities_skips_teacher_scoring(tmp_path, monkeypatch):
    # stage 2 trains on --utilities: stage 1 must not load the teacher (BEIR train data has nothing to score)
    import uae_fast.teacher
    import uae_fast.training
    from test_training import write_utilities
    from uae_fast.data import load_dataset
    from uae_fast.quickstart import quickstart

    table = write_utilities(tmp_path / "u.jsonl.gz", load_dataset(TRAIN))

    def no_teacher(*a, **k):
        raise AssertionError("the teacher was loaded")

    def stage2(*a, **k):
        raise RuntimeError("stage 2 reached")
    monkeypatch.setattr(uae_fast.teacher.UtilityScorer, "from_pretrained", no_teacher)
    monkeypatch.setattr(uae_fast.training, "train", stage2)
    with pytest.raises(RuntimeError, match="stage 2 reached"):
        quickstart(str(tmp_path / "qs"), train_data=TRAIN, dev_data=DEV, utilities=table, progress=False)


@pytest.mark.parametrize("rerank_n", [None, 6, 2])
def test_report_png_compares_the_reranker_on_its_own_questions(tmp_path, rerank_n):
    # the re-ranker runs on the first n questions: with n below the whole set, every system gets a second quality
    # panel on those n (the full set's panel leaves the re-ranker out), so no bar pair mixes question sets
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from uae_fast.quickstart import plot_report

    def m(s, lat):
        return {"Success@1": s, "MAP": s + 0.1, "latency_ms_mean": lat}

    systems = {"uae": m(0.4, 2.0), "bm25": m(0.2, 0.5), "base": m(0.25, 2.0)}
    ev = {"n_queries": 6, "data": "dev", "systems": dict(systems)}
    if rerank_n:
        ev["systems"]["rerank"] = m(0.3, 900.0)
        ev["rerank_subset"] = {"n": rerank_n, "systems": {k: m(v["Success@1"] / 2, v["latency_ms_mean"])
                                                          for k, v in ev["systems"].items()}}
        ev["speedup_vs_rerank"] = {"uae": 450.0, "base": 450.0}
    seen = {}
    real = plt.subplots

    def spy(*a, **k):
        fig, axes = real(*a, **k)
        seen["axes"] = axes
        return fig, axes

    plt.subplots = spy
    try:
        assert plot_report({"eval": ev}, str(tmp_path / "r.png")) is True
    finally:
        plt.subplots = real
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    titles = [a.get_title() for a in seen["axes"]]
    ticks = [[t.get_text() for t in a.get_xticklabels()] for a in seen["axes"]]
    if rerank_n == 2:
        assert len(titles) == 3 and "all 6" in titles[0] and "first 2" in titles[1]
        assert "rerank" not in ticks[0] and "rerank" in ticks[1]
        halves = [p.get_height() for p in seen["axes"][1].patches]  # the subset's numbers, not the full set's
        assert 0.2 in [round(h, 6) for h in halves] and 0.4 not in [round(h, 6) for h in halves]
    else:
        assert len(titles) == 2 and "6 questions" in titles[0]
    assert "Latency" in titles[-1]
