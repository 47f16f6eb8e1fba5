"""scripts/sweep_dev.py: its dev ranking equals `uae eval`'s, a tiny sweep runs end to end, the report pairs by seed."""
import gzip
import json
import os
import sys
from types import SimpleNamespace

import pytest

from test_student import make_tiny_encoder
from test_training import TRAIN, write_utilities
from uae_fast.data import load_dataset

HERE = os.path.dirname(__file__)
DEV = os.path.join(HERE, "fixtures", "qasper-dev-mini.json.gz")
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "scripts"))
import sweep_dev  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_encoder(tmp_path_factory.mktemp("tiny") / "enc")


def test_dev_ranking_equals_uae_eval(tiny):
    from uae_fast.evaluation import evaluate

    sweep_dev._init(SimpleNamespace(threads=1, tf32=False, train=TRAIN, dev=DEV, dev_limit=None))
    pq = sweep_dev._rank_dev(tiny, "cpu")
    ref = evaluate(load_dataset(DEV), [tiny], names=["tiny"], baselines=(), device="cpu", progress=False)["systems"]["tiny"]
    assert len(pq["MAP"]) == ref["n"]
    for k in ("Success@1", "Success@5", "Recall@1", "Recall@5", "MAP", "MRR"):
        assert sum(pq[k]) / len(pq[k]) == pytest.approx(ref[k], abs=1e-9), k


def test_tiny_sweep_end_to_end(tmp_path, tiny):
    utils = write_utilities(tmp_path / "u.jsonl.gz", load_dataset(TRAIN))
    out = tmp_path / "out"
    assert sweep_dev.main(["--grid", "tiny", "--out", str(out), "--train", TRAIN, "--dev", DEV, "--utilities", utils,
                           "--student", tiny, "--device", "cpu", "--workers", "1", "--threads", "1"]) == 0
    recs = [json.loads(x) for x in open(out / "sweep.jsonl")]
    assert sorted(r["loss"] for r in recs) == ["infonce", "uae"]
    n_dev = sum(1 for q in load_dataset(DEV).queries if q.gold)
    for r in recs:
        assert r["steps"] == 2 and len(r["per_query"]["MAP"]) == n_dev
        assert 0 <= r["metrics"]["Success@1"] <= r["metrics"]["Success@5"] <= 1
        assert r["metrics"]["Recall@1"] <= r["metrics"]["Success@1"]
    # a failing job is recorded, and the others still run
    out3 = tmp_path / "out3"
    sweep_dev.main(["--grid", "tiny", "--out", str(out3), "--train", TRAIN, "--dev", DEV, "--utilities",
                    str(tmp_path / "missing.jsonl.gz"), "--student", tiny, "--device", "cpu"])
    recs3 = [json.loads(x) for x in open(out3 / "sweep.jsonl")]
    assert len(recs3) == 2 and all("FileNotFoundError" in r["error"] or "missing" in r["error"] for r in recs3)
    assert "2 job(s) failed" in sweep_dev.report(str(out3 / "sweep.jsonl"))
    # a zero budget skips every job and says so
    out2 = tmp_path / "out2"
    sweep_dev.main(["--grid", "tiny", "--out", str(out2), "--train", TRAIN, "--dev", DEV, "--utilities", utils,
                    "--student", tiny, "--device", "cpu", "--budget-s", "0"])
    assert all(json.loads(x).get("skipped") for x in open(out2 / "sweep.jsonl"))


@pytest.mark.parametrize("old_names", [False, True])
def test_report_means_and_pairs_by_seed(tmp_path, old_names):
    """Records from before Success@k (the committed sweep files) called it Recall@k: both read the same."""
    s = "Recall" if old_names else "Success"

    def rec(loss, seed, r1):
        m = {f"{s}@1": sum(r1) / len(r1), f"{s}@5": 1.0, "MAP": sum(r1) / len(r1), "MRR": 1.0}
        if not old_names:
            m["Recall@1"] = 0.125
        return {"group": "base", "loss": loss, "seed": seed, "train_s": 1.0, "steps": 1, "metrics": m,
                "per_query": {f"{s}@1": r1, "MAP": r1}}
    recs = [rec("uae", 0, [1, 1, 0, 0]), rec("infonce", 0, [1, 0, 0, 0]),
            {"group": "base", "loss": "uae", "seed": 1, "skipped": True},  # skipped at one sweep's budget ...
            {"group": "base", "loss": "uae", "seed": 2, "skipped": True},
            rec("uae", 1, [1, 1, 1, 0]), rec("infonce", 1, [1, 1, 0, 0])]  # ... and run by the next
    path = tmp_path / "s.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs)
    table = sweep_dev.report(str(path))
    assert table.startswith("| group | loss | seeds | S@1 | S@5 | R@1 |")
    uae = next(line for line in table.splitlines() if line.startswith("| base | uae |"))
    assert "| 2 | 0.6250" in uae  # mean S@1 over the two seeds
    assert ("| 1.0000 | - |" if old_names else "| 1.0000 | 0.1250 |") in uae  # S@5, then R@1 (absent from old records)
    assert "+0.2500 [" in uae  # UAE minus InfoNCE, 8 paired queries: (2 - 0) / 8
    assert table.endswith("1 job(s) skipped at the budget: base/uae/2")


def test_report_reads_several_files_as_one(tmp_path):
    # a sweep and the sweep that ran the reference's other seeds: one table, sample sd over all seeds; the
    # same job in both files is read once if it is the same run, and refused if its results differ
    def rec(seed, r1):
        return {"group": "base", "loss": "uae", "seed": seed, "train_s": 1.0, "steps": 1,
                "metrics": {"Success@1": sum(r1) / 4, "Success@5": 1.0, "MAP": sum(r1) / 4, "MRR": 1.0},
                "per_query": {"Success@1": r1, "MAP": r1}}
    a, b, c = (tmp_path / n for n in ("a.jsonl", "b.jsonl", "c.jsonl"))
    a.write_text(json.dumps(rec(0, [1, 1, 0, 0])) + "\n")
    b.write_text(json.dumps(rec(0, [1, 1, 0, 0])) + "\n" + json.dumps(rec(1, [1, 1, 1, 1])) + "\n")
    row = next(x for x in sweep_dev.report(str(a), str(b)).splitlines() if x.startswith("| base | uae |"))
    assert "| 2 | 0.7500 (sd 0.3536) |" in row  # seeds 0.5 and 1.0: sample sd 0.3536 (population sd would be 0.25)
    c.write_text(json.dumps(rec(0, [1, 0, 0, 0])) + "\n")
    with pytest.raises(ValueError, match="job base/uae/0 has different results in .*a.jsonl and .*c.jsonl"):
        sweep_dev.report(str(a), str(c))


def test_report_pairs_the_defaults_with_every_weak_baseline(tmp_path):
    def rec(group, loss, seed, r1):
        return {"group": group, "loss": loss, "seed": seed, "train_s": 1.0, "steps": 1,
                "metrics": {"Success@1": sum(r1) / 4, "Success@5": 1.0, "MAP": sum(r1) / 4, "MRR": 1.0},
                "per_query": {"Success@1": r1, "MAP": r1}}
    path = tmp_path / "s.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in (
        rec("ao-default", "uae", 0, [1, 1, 1, 0]), rec("weak-bm25-answer", "infonce", 0, [1, 1, 0, 0]),
        rec("weak-teacher-top1", "infonce", 0, [1, 0, 0, 0]))))
    line = next(x for x in sweep_dev.report(str(path)).splitlines() if x.startswith("ao-default vs every weak"))
    assert "weak-bm25-answer +0.2500" in line and "weak-teacher-top1 +0.5000" in line


def test_answer_only_grid_end_to_end(tmp_path, tiny):
    # The #16 grid at tiny size: every group trains (or ranks) and the report pairs each row with gold
    # InfoNCE and the best weak baseline; a second call runs only what is missing.
    from test_answer_only import no_gold_table
    from uae_fast.utilities import merge_teachers

    train_ds = load_dataset(TRAIN)
    a = no_gold_table(tmp_path, train_ds, m=3, name="a.jsonl.gz", seed=1, teacher="A")
    b = no_gold_table(tmp_path, train_ds, m=3, name="b.jsonl.gz", seed=2, teacher="B")
    merge_teachers([a, b], str(tmp_path / "ens.jsonl.gz"))
    gold = write_utilities(tmp_path / "u.jsonl.gz", train_ds)
    out = tmp_path / "out"
    common = ["--out", str(out), "--train", TRAIN, "--dev", DEV, "--utilities", gold, "--nogold-utilities", a,
              "--student", tiny, "--device", "cpu", "--workers", "1", "--threads", "1", "--grid", "answeronly-tiny"]
    assert sweep_dev.main(common) == 0  # no gemma tables: those groups are left out
    recs = [json.loads(x) for x in open(out / "sweep.jsonl")]
    assert not [r for r in recs if r.get("error")], [r["error"] for r in recs if r.get("error")]
    assert {r["group"] for r in recs} == {"untrained", "bm25", "ao-smollm", "ao-mix-bm25a", "weak-bm25", "weak-bm25-answer",
                                          "weak-teacher-top1", "gold-infonce", "gold-uae", "ao-default"}
    # ao-default (`uae train --no-gold`'s defaults) is ao-ensemble computed at train time
    assert next(r for r in recs if r["group"] == "ao-default")["cfg"]["lexical_teacher"] == "bm25-answer"
    bm = next(r for r in recs if r["group"] == "bm25")
    from uae_fast.evaluation import evaluate

    ref = evaluate(load_dataset(DEV), [], baselines=("bm25",), device="cpu", progress=False)["systems"]["bm25"]
    assert bm["metrics"]["MAP"] == pytest.approx(ref["MAP"], abs=1e-9)
    assert sweep_dev.main(common + ["--gemma-utilities", b, "--ensemble-utilities", str(tmp_path / "ens.jsonl.gz"),
                                    "--gemma-gold-utilities", gold, "--teachers-utilities", str(tmp_path / "ens.jsonl.gz"),
                                    "--round2-utilities", b]) == 0
    recs2 = [json.loads(x) for x in open(out / "sweep.jsonl")]
    new = {r["group"]: r for r in recs2[len(recs):]}  # only the new groups ran
    assert sorted(new) == ["ao-default-gemma", "ao-default-round2", "ao-default-teachers", "ao-ensemble", "ao-gemma",
                           "gold-uae-gemma"]
    assert new["ao-default-round2"]["utilities"] == b and new["ao-default-round2"]["cfg"]["lexical_teacher"] == "bm25-answer"
    assert new["ao-default-gemma"]["utilities"] == b and new["ao-default-gemma"]["cfg"]["lexical_teacher"] == "bm25-answer"
    assert new["ao-default-teachers"]["utilities"] == str(tmp_path / "ens.jsonl.gz")
    table = sweep_dev.report(str(out / "sweep.jsonl"))
    row = next(line for line in table.splitlines() if line.startswith("| ao-ensemble | 1 |"))
    assert "x |" in row and "(p=" in row
    assert "vs best weak (weak-" in table


def test_groups_set_keep_models_and_eval_model(tmp_path, tiny, capsys):
    # --groups picks rows, --set reaches every training job's config, --keep-models keeps (and resumes into)
    # the model folders, and --eval-model ranks a kept folder exactly as the sweep ranked it.
    from test_answer_only import no_gold_table

    a = no_gold_table(tmp_path, load_dataset(TRAIN), m=3, name="a.jsonl.gz", seed=1, teacher="A")
    gold = write_utilities(tmp_path / "u.jsonl.gz", load_dataset(TRAIN))
    out, keep = tmp_path / "out", tmp_path / "models"
    common = ["--out", str(out), "--train", TRAIN, "--dev", DEV, "--utilities", gold, "--nogold-utilities", a,
              "--student", tiny, "--device", "cpu", "--threads", "1", "--grid", "answeronly-tiny"]
    assert sweep_dev.main(common + ["--groups", "ao-smollm,weak-bm25-answer", "--set", "lr=0.002", "--set", "candidates=top:3",
                                    "--keep-models", str(keep)]) == 0
    recs = [json.loads(x) for x in open(out / "sweep.jsonl")]
    assert [r["group"] for r in recs] == ["ao-smollm", "weak-bm25-answer"]
    assert all(r["cfg"]["lr"] == 0.002 and r["cfg"]["max_steps"] == 2 for r in recs)
    assert all(r["cfg"]["candidates"] == "top:3" for r in recs)  # a string value
    assert sorted(os.listdir(keep)) == ["ao-smollm-uae-s0", "weak-bm25-answer-infonce-s0"]
    cfg = json.load(open(keep / "ao-smollm-uae-s0" / "training_summary.json"))["config"]
    assert cfg["lr"] == 0.002 and cfg["no_gold"]
    ev = tmp_path / "ev"
    assert sweep_dev.main(["--out", str(ev), "--dev", DEV, "--train", TRAIN, "--device", "cpu", "--threads", "1",
                           "--eval-model", f"x={keep / 'ao-smollm-uae-s0'}"]) == 0
    (r,) = [json.loads(x) for x in open(ev / "sweep.jsonl")]
    assert r["group"] == "x" and r["per_query"] == recs[0]["per_query"]
    # --first-seed adds seeds to a finished grid: only the new seed runs
    assert sweep_dev.main(common + ["--groups", "weak-bm25-answer", "--seeds", "1", "--first-seed", "1"]) == 0
    recs = [json.loads(x) for x in open(out / "sweep.jsonl")]
    assert [(r["group"], r["seed"]) for r in recs] == [("ao-smollm", 0), ("weak-bm25-answer", 0), ("weak-bm25-answer", 1)]
    for argv, msg in ((["--out", str(ev), "--eval-model", str(tmp_path / "nope")], "nope"),
                      (common + ["--set", "lr"], "--set wants KEY=VALUE"), (common + ["--set", "seed=3"], "--set wants KEY=VALUE")):
        with pytest.raises(SystemExit) as e:
            sweep_dev.main(argv)
        assert e.value.code == 2 and msg in capsys.readouterr().err, argv


def _rec(group, loss, seed, r1, **kw):
    return {"group": group, "loss": loss, "seed": seed, "train_s": 1.0, "steps": 1,
            "metrics": {"Success@1": sum(r1) / len(r1), "Success@5": 1.0, "MAP": sum(r1) / len(r1), "MRR": 1.0},
            "per_query": {"Success@1": list(r1), "MAP": list(r1)}, **kw}


def test_paired_averages_each_question_over_seeds():
    # Two seeds with the same per-question results carry no more evidence than one: the interval over the
    # questions must not narrow (concatenating the seeds' lists counted each question twice).
    from uae_fast.metrics import paired_bootstrap

    a, b = [1, 1, 0, 1, 0, 1, 1, 0, 1, 1], [1, 0, 0, 1, 0, 0, 1, 0, 0, 1]
    runs = {s: _rec("x", "uae", s, a) for s in (0, 1)}
    ref = {s: _rec("y", "infonce", s, b) for s in (0, 1)}
    one = paired_bootstrap(a, b, resamples=sweep_dev.RESAMPLES)
    assert sweep_dev._paired(runs, ref, "Success@1") == one
    # per question, the seeds' mean: seed 1 of a half as good -> the pooled diff is the mean of the seeds' diffs
    runs[1] = _rec("x", "uae", 1, b)
    assert sweep_dev._paired(runs, ref, "Success@1")["diff"] == pytest.approx((sum(a) - sum(b)) / 10 / 2)


def test_paired_adds_a_seed_level_p_from_three_seeds():
    # three seeds whose difference flips sign: the question-level p cannot see it, the seeds-and-questions one does
    import numpy as np

    rng = np.random.default_rng(0)
    base = (rng.random(400) < 0.5).astype(int).tolist()
    effects = {0: 12, 1: -40, 2: -36}  # questions turned from miss to hit (+) or hit to miss (-) per seed
    runs, ref = {}, {}
    for s, e in effects.items():
        a = list(base)
        idx = [i for i, v in enumerate(base) if v == (0 if e > 0 else 1)][:abs(e)]
        for i in idx:
            a[i] = 1 - a[i]
        runs[s], ref[s] = _rec("x", "uae", s, a), _rec("y", "infonce", s, base)
    pb = sweep_dev._paired(runs, ref, "Success@1")
    assert pb["p"] < 0.05 < pb["p_seeds"], pb
    assert "seeds p=" in sweep_dev._cell(pb, 3)
    two = sweep_dev._paired({s: runs[s] for s in (0, 1)}, ref, "Success@1")  # two seeds: no seed-level p
    assert "p_seeds" not in two


def test_paired_seedless_reference_and_question_checks():
    runs = {s: _rec("x", "uae", s, [1, 0, 1, 1]) for s in (0, 1, 2)}
    bm25 = {0: _rec("bm25", "none", 0, [0, 0, 1, 0])}
    trained0 = {0: _rec("y", "infonce", 0, [1, 1, 1, 1])}  # a trained reference that only finished seed 0
    assert sweep_dev._paired(runs, bm25, "Success@1")["diff"] == pytest.approx(0.5)  # BM25 pairs every seed
    assert sweep_dev._paired(runs, trained0, "Success@1")["diff"] == pytest.approx(-0.25)  # seed 0 only ...
    runs[1] = _rec("x", "uae", 1, [0, 0, 0, 0])
    assert sweep_dev._paired(runs, trained0, "Success@1")["diff"] == pytest.approx(-0.25)  # ... not seeds 1 and 2
    with pytest.raises(ValueError, match="different dev questions"):
        sweep_dev._paired(runs, {0: _rec("y", "infonce", 0, [1, 1, 1])}, "Success@1")
    other = {0: _rec("y", "infonce", 0, [1, 1, 1, 1], dev_questions="abc")}
    runs[0]["dev_questions"] = "def"
    with pytest.raises(ValueError, match="other ids"):
        sweep_dev._paired(runs, other, "Success@1")


def test_resume_refuses_a_finished_job_with_other_settings(tmp_path, tiny, capsys):
    from test_answer_only import no_gold_table

    a = no_gold_table(tmp_path, load_dataset(TRAIN), m=3, name="a.jsonl.gz", seed=1, teacher="A")
    out = tmp_path / "out"
    out.mkdir()
    done = _rec("ao-smollm", "uae", 0, [1, 0], cfg={"lr": 0.5}, utilities=a)
    (out / "sweep.jsonl").write_text(json.dumps(done) + "\n")
    with pytest.raises(SystemExit) as e:
        sweep_dev.main(["--out", str(out), "--train", TRAIN, "--dev", DEV, "--nogold-utilities", a, "--student", tiny,
                        "--device", "cpu", "--threads", "1", "--grid", "answeronly-tiny", "--groups", "ao-smollm"])
    assert e.value.code == 2 and "with other settings" in capsys.readouterr().err
    assert (out / "sweep.jsonl").read_text().count("\n") == 1  # nothing ran


def test_resume_refuses_a_finished_job_run_in_another_precision(tmp_path, tiny, capsys):
    # the same job key, config and table, but run with --amp: a rerun without it must not report the old row
    from test_answer_only import no_gold_table

    a = no_gold_table(tmp_path, load_dataset(TRAIN), m=3, name="a.jsonl.gz", seed=1, teacher="A")
    out = tmp_path / "out"
    argv = ["--out", str(out), "--train", TRAIN, "--dev", DEV, "--nogold-utilities", a, "--student", tiny,
            "--device", "cpu", "--threads", "1", "--grid", "answeronly-tiny", "--groups", "ao-smollm"]
    sweep_dev.main(argv + ["--amp"])
    assert (out / "sweep.jsonl").read_text().count("\n") == 1
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        sweep_dev.main(argv)
    assert e.value.code == 2 and "with other settings" in capsys.readouterr().err
    sweep_dev.main(argv + ["--amp"])  # the same settings: nothing to run
    assert (out / "sweep.jsonl").read_text().count("\n") == 1


def test_a_seedless_row_pairs_with_every_seed_of_a_trained_reference():
    bm25 = {0: _rec("bm25", "none", 0, [0, 0, 1, 0])}
    gold = {0: _rec("g", "infonce", 0, [1, 1, 1, 1]), 1: _rec("g", "infonce", 1, [1, 0, 1, 1])}
    # per question over the reference's seeds: [1, .5, 1, 1] -> diff (1 - 3.5) / 4
    assert sweep_dev._paired(bm25, gold, "Success@1")["diff"] == pytest.approx((1 - 3.5) / 4)


def test_a_worker_exits_when_the_sweep_is_killed(tmp_path):
    # A killed sweep must not leave its pool workers training (and holding ~10 GiB each) for nobody: a child
    # whose parent dies exits within the watchdog's poll.
    import subprocess
    import time

    scripts = os.path.join(os.path.dirname(HERE), "scripts")
    code = (f"import sys, time; sys.path.insert(0, {scripts!r}); import sweep_dev; "
            "sweep_dev._exit_with_parent(0.05); open(sys.argv[1], 'w').write('up'); time.sleep(60)")
    flag = tmp_path / "up"
    parent = subprocess.Popen(["bash", "-c", f'"{sys.executable}" -c "{code}" {flag} & echo $!; wait'],
                              stdout=subprocess.PIPE, text=True)
    pid = int(parent.stdout.readline())
    deadline = time.time() + 60
    while not flag.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert flag.exists()

    def running(p):
        try:
            with open(f"/proc/{p}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
        except FileNotFoundError:
            return False

    assert running(pid)
    parent.kill()  # SIGKILL: no cleanup in the parent at all
    parent.wait()
    deadline = time.time() + 10
    while running(pid) and time.time() < deadline:
        time.sleep(0.05)
    assert not running(pid)


def test_report_by_answer_kind(tmp_path, capsys):
    # S@1 per kind of answer: each cell is the mean over seeds of that kind's questions, each difference the
    # paired bootstrap over those questions; "all" equals the main report's pair.
    import numpy as np
    from check_target_confidence import KINDS, answer_kind

    qs = [q for q in load_dataset(DEV).queries if q.gold]
    kinds = [answer_kind(q) for q in qs]
    rng = np.random.default_rng(0)
    recs = [_rec(g, loss, s, rng.integers(0, 2, len(qs)).astype(float).tolist())
            for g, loss in (("ao-default", "uae"), ("weak-bm25-answer", "infonce")) for s in (0, 1)]
    path = tmp_path / "sweep.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert sweep_dev.main(["--report", str(path), "--by-answer-kind", "--dev", DEV]) == 0
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in capsys.readouterr().out.splitlines()[2:]}
    for kind in (*KINDS, "all"):
        m = np.array([kind in ("all", k) for k in kinds])
        if not m.any():
            continue
        want = [np.mean([np.array(r["per_query"]["Success@1"])[m].mean() for r in recs if r["group"] == g])
                for g in ("ao-default", "weak-bm25-answer")]
        assert [float(x) for x in rows[kind][2:4]] == pytest.approx(want, abs=5e-4), kind
        assert rows[kind][1] == str(int(m.sum()))
        diff = float(rows[kind][4].split(" ")[0])
        assert diff == pytest.approx(want[0] - want[1], abs=5e-4)
    by = {(r["group"], r["loss"]): {} for r in recs}
    for r in recs:
        by[(r["group"], r["loss"])][r["seed"]] = r
    pb = sweep_dev._paired(by[("ao-default", "uae")], by[("weak-bm25-answer", "infonce")], "Success@1")
    assert f"{pb['diff']:+.3f} (p={pb['p']:.3f})" in rows["all"][4]
    # rows from other dev questions are refused, not mispaired
    recs[0]["per_query"]["Success@1"] = recs[0]["per_query"]["Success@1"][:-1]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    with pytest.raises(ValueError, match="not evaluated on the questions of"):
        sweep_dev.answer_kind_table([str(path)], DEV)


def test_lexical_text_variants_match_the_default_ensemble():
    # The default query text's row must equal what per_question computes through lexical_utilities and
    # ensemble_utilities (the training path); the other texts must be scored with their own query.
    import numpy as np
    from check_target_confidence import LEXICAL_TEXTS, lexical_text_variants, per_question
    from uae_fast.lexical_teacher import lexical_utilities
    from uae_fast.utilities import ensemble_utilities

    ds = load_dataset(DEV)
    rng = np.random.default_rng(1)
    qs = [q for q in ds.queries if q.gold][:12]
    llm = {q.id: {p: float(rng.normal()) for p in ds.pool(q)[:9]} for q in qs}
    gold = {q.id: set(q.gold) for q in ds.queries}
    lex = lexical_utilities(ds, {q: list(d) for q, d in llm.items()})
    a, _ = per_question(llm, lex, ensemble_utilities([llm, lex]), gold, 0.5)
    got = lexical_text_variants(ds, llm, gold, 0.5)
    assert set(got) == set(LEXICAL_TEXTS)
    one_hot, mass, top = got["question + answers"]
    assert one_hot == pytest.approx(a[:, 3].mean())
    assert mass == pytest.approx(a[:, 1].mean(), abs=1e-4)
    assert top == pytest.approx(a[:, 2].mean())
    assert all(0.0 <= v <= 1.0 for vals in got.values() for v in vals)
    # the other texts, by an independent BM25 over each pool: the one-hot top-1 of each query text
    from uae_fast.bm25 import BM25

    texts = {"answers": lambda q: " ".join(q.answers), "question + answers x2": lambda q: q.question + " " + " ".join(
        q.answers) + " " + " ".join(q.answers)}
    for name, text in texts.items():
        hits = []
        for q in qs:
            pool = ds.pool(q)
            sc = dict(zip(pool, BM25([ds.passages[p].text for p in pool]).scores(text(q)).tolist()))
            pids = list(llm[q.id])
            hits.append(pids[int(np.argmax([sc[p] for p in pids]))] in gold[q.id])
        assert got[name][0] == pytest.approx(np.mean(hits)), name
    assert len({got[k] for k in got}) == 3  # three texts, three different results on these 12 questions
