"""uae calibrate-fusion (never reads gold evidence; picks what the teacher agrees with), uae index build /
uae search, and uae eval's hybrid rows, on the QASPER fixtures with a tiny encoder and a tiny teacher."""
import gzip
import json
import os
import random
import shutil

import numpy as np
import pytest

from test_evaluation import DEV, tiny, tiny_lm  # noqa: F401  (fixtures)
from test_training import TRAIN
from uae_fast.calibration import calibrate_fusion, fusion_grid, select_config, teacher_agreement
from uae_fast.cli import main
from uae_fast.fusion import DEFAULT_FUSION


def _strip_timing(res):
    res = json.loads(json.dumps(res))
    for k in ("seconds", "rows_scored_now", "data", "data_path"):
        res["calibration"].pop(k)
    return res


def _write_without_gold(src, dst, mode):
    """QASPER JSON whose evidence is removed (mode 'drop') or replaced by random paragraphs of the same paper ('shuffle')."""
    with gzip.open(src, "rt") as f:
        raw = json.load(f)
    rng = random.Random(0)
    for paper in raw.values():
        paras = [p for s in paper["full_text"] for p in s["paragraphs"] if p.strip()]
        for qa in paper["qas"]:
            for a in qa["answers"]:
                a = a.get("answer", a)
                a["evidence"] = [] if mode == "drop" else rng.sample(paras, 2)
                a.pop("highlighted_evidence", None)
    with gzip.open(dst, "wt") as f:
        json.dump(raw, f)


def test_calibration_never_reads_gold(tmp_path, tiny, tiny_lm):  # noqa: F811
    from uae_fast.data import load_dataset

    kw = dict(model=tiny, teacher=tiny_lm, limit=5, candidates=3, progress=False, device="cpu")
    ref = calibrate_fusion(TRAIN, utility_cache=str(tmp_path / "u0.jsonl"), **kw)
    for mode in ("drop", "shuffle"):
        path = tmp_path / f"train-{mode}.json.gz"
        _write_without_gold(TRAIN, path, mode)
        ds = load_dataset(str(path))
        golds = [q.gold for q in ds.queries]
        assert (not any(golds)) if mode == "drop" else golds != [q.gold for q in load_dataset(TRAIN).queries] and any(golds)
        assert _strip_timing(calibrate_fusion(str(path), utility_cache=str(tmp_path / f"u-{mode}.jsonl"), **kw)) == _strip_timing(ref)
    c = ref["calibration"]
    assert c["n_questions"] == 5 and len(c["grid"]) == len(fusion_grid()) and c["objective"] == "teacher_mrr"
    assert {g["weight"] for g in c["grid"]} >= {0.0, 1.0}
    assert ref["method"] in ("minmax", "zscore", "rrf") and 0 <= ref["weight"] <= 1
    # the utility cache resumes: a second run scores nothing new and gives the same answer
    again = calibrate_fusion(TRAIN, utility_cache=str(tmp_path / "u0.jsonl"), **kw)
    assert again["calibration"]["rows_scored_now"] == 0 and _strip_timing(again) == _strip_timing(ref)
    c = again["calibration"]
    assert c["data_path"] == os.path.abspath(TRAIN) and c["limit"] == 5 and c["teacher_settings"]["teacher"] == c["teacher"]
    # the same ids with other text (an edited data file) are scored again, not read from the cache
    edited = tmp_path / "edited.json.gz"
    raw = json.load(gzip.open(TRAIN))
    for paper in raw.values():
        for qa in paper["qas"]:
            qa["question"] = qa["question"] + " (edited)"
    with gzip.open(edited, "wt") as f:
        json.dump(raw, f)
    third = calibrate_fusion(str(edited), utility_cache=str(tmp_path / "u0.jsonl"), **kw)
    c3 = third["calibration"]
    assert c3["rows_scored_now"] == round(c3["mean_candidates"] * c3["n_questions"]) > 0  # every row anew
    # more candidates per side: only the rows the cache lacks go to the teacher, and the answer is a fresh cache's
    wide = dict(kw, candidates=5)
    fresh = calibrate_fusion(TRAIN, utility_cache=str(tmp_path / "u-fresh.jsonl"), **wide)["calibration"]
    grown = calibrate_fusion(TRAIN, utility_cache=str(tmp_path / "u0.jsonl"), **wide)["calibration"]
    old_rows = round(c["mean_candidates"] * c["n_questions"])
    assert grown["rows_scored_now"] == fresh["rows_scored_now"] - old_rows > 0
    for g, f in zip(grown["grid"], fresh["grid"]):
        assert g["teacher_mrr"] == pytest.approx(f["teacher_mrr"], abs=1e-6)


def test_teacher_agreement_and_selection_hand_computed():
    dense = np.array([0.9, 0.1, 0.5, 0.3])
    lexical = np.array([0.0, 5.0, 1.0, 0.0])
    cand = np.array([0, 1, 2])
    util = np.array([0.1, 2.0, 0.3])  # the teacher prefers passage 1: BM25's top, dense's last
    dense_only = dict(DEFAULT_FUSION, method="minmax", weight=1.0)
    bm25_only = dict(DEFAULT_FUSION, method="minmax", weight=0.0)
    assert teacher_agreement(dense, lexical, cand, util, dense_only) == (1 / 3, 0.0)  # order 0, 2, 1
    assert teacher_agreement(dense, lexical, cand, util, bm25_only) == (1.0, 1.0)
    grid = [dict(dense_only, teacher_mrr=0.5), dict(bm25_only, teacher_mrr=0.5), dict(dense_only, method="rrf", weight=0.5, teacher_mrr=0.4)]
    assert select_config(grid)["weight"] == 1.0  # ties go to the higher dense weight


def test_crossfit_scores_each_fold_with_the_config_chosen_on_the_others():
    from uae_fast.calibration import crossfit

    grid = [dict(DEFAULT_FUSION, method="minmax", weight=w) for w in (1.0, 0.5)]
    # documents a, b, c, d -> folds 0, 1, 0, 1; config 0 wins on fold 0's questions, config 1 on fold 1's
    groups = ["a", "a", "b", "c", "d"]
    rr0 = np.array([1.0, 1.0, 0.2, 1.0, 0.2])
    rr1 = np.array([0.5, 0.5, 1.0, 0.5, 1.0])
    per_q = [(rr0, (rr0 == 1.0).astype(float)), (rr1, (rr1 == 1.0).astype(float))]
    h = crossfit(grid, per_q, groups)
    # fold 0 (a, c) is scored with the config fold 1 prefers (1: 0.5 each), fold 1 (b, d) with fold 0's (0: 0.2)
    assert h["picks"] == [{"method": "minmax", "weight": 0.5}, {"method": "minmax", "weight": 1.0}]
    assert h["teacher_mrr"] == pytest.approx((0.5 * 3 + 0.2 * 2) / 5) and h["teacher_success@1"] == 0.0
    # in-sample the best config scores 0.68 (config 0) or 0.7 (config 1): held out, the choice is worse than both
    assert h["teacher_mrr"] < min(rr0.mean(), rr1.mean())
    assert crossfit(grid, per_q, ["a"] * 5) is None
    assert h["split"] == "by document" and crossfit(grid, per_q, list("vwxyz"))["split"] == "by question"


def test_calibrate_cli_index_build_search_and_eval(tmp_path, tiny, tiny_lm, capsys, monkeypatch):  # noqa: F811
    out = tmp_path / "fusion.json"
    assert main(["calibrate-fusion", "--data", TRAIN, "--model", tiny, "--teacher", tiny_lm, "--out", str(out), "--limit", "6",
                 "--candidates", "2", "--methods", "minmax,rrf", "--weights", "0,0.5,1", "--no-progress"]) == 0
    res = json.loads(out.read_text())
    # w = 1 once (dense order for every method); w = 0 per method (only rrf is BM25's order there)
    grid = [(g["method"], g["weight"]) for g in res["calibration"]["grid"]]
    assert grid == [("minmax", 0.0), ("minmax", 0.5), ("minmax", 1.0), ("rrf", 0.0), ("rrf", 0.5)]
    assert os.path.exists(str(out) + ".utilities.jsonl")
    held = res["calibration"]["heldout"]  # 6 questions of 2 papers: each scored with the other's choice
    assert 0 < held["teacher_mrr"] <= 1 and len(held["picks"]) == 2 and held["split"] == "by document"
    idx = tmp_path / "idx"
    assert main(["index", "build", "--data", DEV, "--model", tiny, "--out", str(idx), "--lexical", "--fusion", str(out),
                 "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["search", str(idx), "what dataset do they use", "-k", "3", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)["hits"]
    assert len(hits) == 3 and all(":" in h["id"] and h["text"] for h in hits)
    assert [h["score"] for h in hits] == sorted([h["score"] for h in hits], reverse=True)
    from uae_fast.hybrid import HybridIndex

    assert HybridIndex.load(idx).fusion["weight"] == res["weight"]
    dense_idx = tmp_path / "dense"
    assert main(["index", "build", "--data", DEV, "--model", tiny, "--out", str(dense_idx), "--no-progress"]) == 0
    assert main(["search", str(dense_idx), "a question", "-k", "2"]) == 0
    assert main(["search", str(dense_idx), "a question", "--fusion", str(out)]) == 1
    assert "without --lexical" in capsys.readouterr().err
    assert main(["search", str(dense_idx), "a question", "--width", "3"]) == 1
    assert "--width must be >= 10" in capsys.readouterr().err
    # a folder given as --fusion, and an index missing one of its files: one line each, no OS error
    assert main(["search", str(idx), "a question", "--fusion", str(tmp_path)]) == 1
    assert "is a folder; give a fusion JSON file" in capsys.readouterr().err
    broken = tmp_path / "broken"
    shutil.copytree(idx, broken)
    os.remove(broken / "lexical.uae")
    assert main(["search", str(broken), "a question"]) == 1
    assert "is incomplete (lexical.uae missing); rebuild it" in capsys.readouterr().err
    # a dense-only rebuild of the hybrid index leaves no lexical.uae behind, and the user's own files alone;
    # a rebuild that dies half-way leaves "no index", never the old manifest over new files
    (idx / "notes.txt").write_text("mine")
    assert main(["index", "build", "--data", DEV, "--model", tiny, "--out", str(idx), "--no-progress"]) == 0
    assert sorted(os.listdir(idx)) == sorted(os.listdir(dense_idx) + ["notes.txt"]) and "lexical.uae" not in os.listdir(idx)
    from uae_fast.index import TopKIndex
    from uae_fast.search import build_index, open_index

    def dies(self, path):
        raise OSError("disk full")

    monkeypatch.setattr(TopKIndex, "save", dies)
    with pytest.raises(OSError, match="disk full"):
        build_index(DEV, str(idx), model=tiny, progress=False)
    with pytest.raises(FileNotFoundError, match="missing hybrid.json"):
        open_index(str(idx))
    monkeypatch.undo()
    assert main(["index", "build", "--data", DEV, "--model", tiny, "--out", str(idx), "--no-progress"]) == 0  # rebuilds
    assert open_index(str(idx))[2] == open_index(str(dense_idx))[2]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    capsys.readouterr()
    assert main(["index", "build", "--data", DEV, "--model", tiny, "--out", str(tmp_path / "mine"), "--no-progress"]) == 1
    assert "no index" in capsys.readouterr().err and os.listdir(tmp_path / "mine") == ["notes.txt"]
    # a bad --dtype or --fusion is refused before any passage is encoded (no model is even loaded)
    import uae_fast.student

    monkeypatch.setattr(uae_fast.student, "BiEncoder", lambda *a, **k: pytest.fail("encoded before checking options"))
    for extra, msg in ((["--dtype", "int4"], "dtype must be one of"), (["--lexical", "--fusion", str(tmp_path / "no.json")], "not found"),
                       (["--batch-size", "0"], "batch_size must be a positive int")):
        assert main(["index", "build", "--data", DEV, "--model", tiny, "--out", str(tmp_path / "new"), "--no-progress"] + extra) == 1
        assert msg in capsys.readouterr().err and not (tmp_path / "new").exists()
    monkeypatch.undo()
    js = tmp_path / "eval.json"
    assert main(["eval", "--data", DEV, "--model", tiny, "--name", "tiny", "--baselines", "bm25,hybrid", "--fusion", "default",
                 str(out), "--json", str(js), "--no-progress", "--limit", "6"]) == 0
    ev = json.loads(js.read_text())
    assert set(ev["systems"]) == {"tiny", "bm25", "hybrid", "hybrid:fusion"}
    # options that would be ignored or fail late are refused before any model is loaded
    monkeypatch.setattr(uae_fast.student, "BiEncoder", lambda *a, **k: pytest.fail("encoded before checking options"))
    capsys.readouterr()
    for extra, msg in ((["--baselines", "bm25", "--fusion", str(out)], "add hybrid to --baselines"),
                       (["--baselines", "hybrid", "--fusion", "default", "default"], "same row name"),
                       (["--baselines", "hybrid", "--fusion", str(tmp_path / "no.json")], "not found"),
                       (["--baselines", "rerank", "--teacher", str(tmp_path / "no-lm")], "--teacher"),
                       (["--baselines", "bm25", "--reader", "--reader-model", str(tmp_path / "no-lm")], "--reader-model")):
        assert main(["eval", "--data", DEV, "--model", tiny, "--no-progress", "--limit", "2"] + extra) == 1, extra
        assert msg in capsys.readouterr().err, extra
    monkeypatch.undo()
    assert ev["systems"]["hybrid"]["dense"] == "tiny" and "hybrid:fusion - bm25" in ev["paired"]


@pytest.mark.parametrize("manifest", ["[]", '{"format": "other/1", "files": {}}', '{"format": "uae-hybrid/1", "files": 3}'])
def test_open_index_refuses_a_foreign_manifest(tmp_path, manifest):
    from uae_fast.hybrid import MANIFEST
    from uae_fast.search import open_index

    (tmp_path / MANIFEST).write_text(manifest)
    with pytest.raises(ValueError, match="not an index manifest written by uae index build"):
        open_index(str(tmp_path))


def test_calibrate_errors(tmp_path, tiny, capsys):  # noqa: F811
    with pytest.raises(ValueError, match="candidates"):
        calibrate_fusion(TRAIN, tiny, candidates=0)
    with pytest.raises(ValueError, match="method"):
        calibrate_fusion(TRAIN, tiny, methods=["best"])
    assert main(["calibrate-fusion", "--data", str(tmp_path / "none.json"), "--out", str(tmp_path / "f.json")]) == 1
    assert "none.json" in capsys.readouterr().err
    # --out and --threads are checked before any encoding or scoring (the data is never read)
    none = str(tmp_path / "none.json")
    for argv, msg in ((["--out", str(tmp_path)], "is a directory"), (["--out", str(tmp_path / "f.json"), "--threads", "0"],
                      "--threads must be a positive int")):
        assert main(["calibrate-fusion", "--data", none] + argv) == 1
        assert msg in capsys.readouterr().err
    # the teacher, the caches and --batch-size are checked before the encoder loads (the data is read)
    import uae_fast.student

    def no_encoder(*a, **k):
        pytest.fail("the encoder was loaded before the options were checked")

    bad_cache = tmp_path / "c.jsonl.gz"
    bad_cache.write_bytes(gzip.compress(b'{"type": "header"}\n'))
    table = tmp_path / "t.jsonl"
    table.write_text('{"type": "header", "format": "uae-utilities/1"}\n')
    out = str(tmp_path / "f.json")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(uae_fast.student, "BiEncoder", no_encoder)
        for argv, msg in ((["--teacher", str(tmp_path / "nope")], "is not a folder with an HF causal LM"),
                          (["--utility-cache", str(bad_cache)], "is not a fusion utility cache"),
                          (["--utility-cache", str(table)], "is not a fusion utility cache"),
                          (["--utility-cache", str(tmp_path)], "is a folder"),
                          (["--embedding-cache", str(table)], "--embedding-cache"),
                          (["--batch-size", "0"], "batch_size must be a positive int")):
            assert main(["calibrate-fusion", "--data", TRAIN, "--model", tiny, "--out", out, "--no-progress"] + argv) == 1
            err = capsys.readouterr().err.strip()
            assert msg in err and len(err.splitlines()) == 1 and "delete it" not in err, (argv, err)
        assert table.read_text().startswith('{"type": "header"')  # never touched


def test_utility_cache_bad_header_is_one_clear_error_and_bad_rows_are_rescored(tmp_path):
    from uae_fast.calibration import UTILITY_FORMAT, _read_cache

    path = tmp_path / "u.jsonl"
    for header in ("[]", "not json", '"a string"'):
        path.write_text(header + "\n")
        with pytest.raises(ValueError, match="not a fusion utility cache"):
            _read_cache(str(path), {"t": 1})
    path.write_text(json.dumps({"format": UTILITY_FORMAT, "settings": {"t": 1}}) + "\n"
                    + '{"key": "a", "utility": 0.5}\n{"key": "b", "utility": "high"}\n{"key": "d", "utility": NaN}\n'
                    + '{"key": "e", "utility": -Infinity}\n{"key": "c", "utili')
    assert _read_cache(str(path), {"t": 1}) == {"a": 0.5}  # b, the non-finite d and e, the torn c: scored again
    path.write_text("\n")  # a blank first line is no header (rows appended after it could never be read)
    with pytest.raises(ValueError, match="not a fusion utility cache"):
        _read_cache(str(path), {"t": 1})
    path.write_text("")  # empty: a cache killed before its header, started afresh
    assert _read_cache(str(path), {"t": 1}) == {}
    # a cache written before PATH teachers were fingerprinted still serves the same teacher (by name)
    path.write_text(json.dumps({"format": UTILITY_FORMAT, "settings": {"t": 1}}) + "\n" + '{"key": "a", "utility": 0.5}\n')
    assert _read_cache(str(path), {"t": 1, "teacher_sha1": "abc"}) == {"a": 0.5}
    path.write_text(json.dumps({"format": UTILITY_FORMAT, "settings": {"t": 1, "teacher_sha1": "old"}}) + "\n")
    with pytest.raises(ValueError, match="other teacher settings"):
        _read_cache(str(path), {"t": 1, "teacher_sha1": "abc"})


def test_eval_hybrid_row_ranks_as_serving_and_calibration(tiny):  # noqa: F811
    # uae eval's hybrid row fuses each side's top k_each (what a search for the top hits fuses, and what
    # calibrate-fusion scores), then the rest of the pool in dense order; not a fusion of the whole pool
    import numpy as np
    import torch

    from uae_fast.bm25 import BM25
    from uae_fast.calibration import fused_ranking
    from uae_fast.data import load_dataset
    from uae_fast.evaluation import DenseRanker, HybridRanker
    from uae_fast.student import BiEncoder

    ds = load_dataset(DEV)
    queries = [q for q in ds.queries if q.gold][:6]
    enc = BiEncoder(tiny, device="cpu")
    cfg = {"method": "minmax", "weight": 0.5, "k_each": 3, "rrf_k": 60}
    hybrid = HybridRanker(DenseRanker(enc, ds, queries), cfg)
    for q in queries:
        pool = ds.pool(q)
        with torch.no_grad():
            emb = enc.encode([ds.passages[p].text for p in pool])
            dense = (emb @ enc.encode([q.question])[0]).double().numpy()
        lexical = BM25([ds.passages[p].text for p in pool]).scores(q.question)
        want = [pool[i] for i in fused_ranking(dense, np.asarray(lexical, np.float64), cfg)]
        got = hybrid.rank(q)
        assert len(got) == len(pool) > 3 and got == want, q.id
        index, _ = hybrid.indexes[hybrid.dense._key(q)]
        _, top = index.search(enc.encode([q.question]), [q.question], 3)  # serving's top 3 = the row's first 3
        assert [pool[int(i)] for i in top[0].tolist()] == got[:3]


def test_index_build_from_a_corpus_and_search_guards(tmp_path, tiny, capsys):  # noqa: F811
    # a corpus without queries indexes (JSONL passages, a BEIR folder with only corpus.jsonl); search refuses a
    # blank question, a dense manifest that disagrees with its file, and a model changed since the build
    import shutil

    from uae_fast.cli import main

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"type": "passage", "id": f"p{i}", "text": t}) + "\n"
                              for i, t in enumerate(["cats purr", "dogs bark loudly", "fish swim"])))
    beir = tmp_path / "beir"
    beir.mkdir()
    (beir / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "text": t}) + "\n"
                                               for i, t in enumerate(["a b", "c d"])))
    model = tmp_path / "model"
    shutil.copytree(tiny, model)
    for data, n in ((corpus, 3), (beir, 2)):
        out = tmp_path / f"idx-{n}"
        assert main(["index", "build", "--data", str(data), "--model", str(model), "--out", str(out), "--no-progress"]) == 0
        assert main(["search", str(out), "who barks", "-k", "2"]) == 0
    capsys.readouterr()
    idx = tmp_path / "idx-3"
    assert main(["search", str(idx), "  "]) == 1 and "question 1 is empty" in capsys.readouterr().err
    m = json.loads((idx / "hybrid.json").read_text())
    (idx / "hybrid.json").write_text(json.dumps(dict(m, ntotal=77)))
    assert main(["search", str(idx), "who barks"]) == 1 and "the manifest says 77" in capsys.readouterr().err
    (idx / "hybrid.json").write_text(json.dumps(m))
    cfg = next(p for p in model.rglob("config.json"))
    cfg.write_text(cfg.read_text() + " ")  # the model changed after the build
    assert main(["search", str(idx), "who barks"]) == 1 and "changed since" in capsys.readouterr().err
    assert main(["search", str(idx), "who barks", "--model", str(model)]) == 0  # deliberately
    moved = tmp_path / "model-moved"
    model.rename(moved)  # the recorded encoder is gone: say so and what to do, not "model folder not found"
    assert main(["search", str(idx), "who barks"]) == 1
    err = capsys.readouterr().err
    assert f"was built with the encoder {model}, which is no longer there: pass --model" in err, err
    assert main(["search", str(idx), "who barks", "--model", str(moved)]) == 0
    (idx / "hybrid.json").write_text(json.dumps(dict(m, meta=dict(m["meta"], model=5))))
    assert main(["search", str(idx), "who barks"]) == 1 and "manifest's model 5 is not a folder path" in capsys.readouterr().err
    (idx / "hybrid.json").write_text(json.dumps(m))
    moved.rename(model)
    # a fusion.json saved into the model folder is not a model change; a manifest from before that fix (its
    # fingerprint counted every *.json) still verifies
    from uae_fast.embcache import encoder_fingerprint
    from uae_fast.student import BiEncoder

    assert main(["index", "build", "--data", str(corpus), "--model", str(model), "--out", str(tmp_path / "i3"),
                 "--no-progress"]) == 0
    (model / "fusion.json").write_text('{"method": "minmax", "weight": 0.5}')
    assert main(["search", str(tmp_path / "i3"), "who barks"]) == 0
    m3 = json.loads((tmp_path / "i3" / "hybrid.json").read_text())
    legacy = encoder_fingerprint(BiEncoder(str(model)), legacy=True)
    assert legacy != m3["meta"]["encoder"]
    (tmp_path / "i3" / "hybrid.json").write_text(json.dumps(dict(m3, meta=dict(m3["meta"], encoder=legacy))))
    assert main(["search", str(tmp_path / "i3"), "who barks"]) == 0
    (tmp_path / "i3" / "hybrid.json").write_text(json.dumps(dict(m3, meta=dict(m3["meta"], encoder="0" * 16 + "-0"))))
    assert main(["search", str(tmp_path / "i3"), "who barks"]) == 1 and "changed since" in capsys.readouterr().err
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["index", "build", "--data", str(corpus), "--model", str(model), "--out", str(tmp_path / "i2"),
                 "--embedding-cache", str(afile), "--no-progress"]) == 1
    assert "--embedding-cache" in capsys.readouterr().err


def test_atomic_write_names_the_missing_folder_and_index_build_errors_name_the_action(tmp_path, capsys):
    from uae_fast.cli import main
    from uae_fast.index import TopKIndex

    import torch
    idx = TopKIndex(4)
    idx.add(torch.ones(1, 4))
    with pytest.raises(FileNotFoundError, match=r"cannot write .*x\.uae: its folder .* does not exist"):
        idx.save(tmp_path / "nope" / "x.uae")
    assert main(["index", "build", "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")]) == 1
    assert capsys.readouterr().err.startswith("uae index build: error:")
