"""Hybrid retrieval: sparse BM25 against a float64 reference, LexicalIndex/HybridIndex persistence and
corruption, fusion against hand-computed cases, pure-side limits, thread safety, and bad input."""
import json
import math
import os
import random
import threading
import time

import numpy as np
import pytest

from test_bm25 import _random_corpus, _reference
from uae_fast import TopKIndex
from uae_fast.bm25 import BM25
from uae_fast.fusion import DEFAULT_FUSION, fuse, fuse_one, normalise, resolve_fusion
from uae_fast.hybrid import HybridIndex
from uae_fast.lexical import LexicalIndex


def _flip_in_section(path, section):
    """Flip one byte inside a named section of a uae container file (not in alignment padding)."""
    from uae_fast.index import _PREFIX

    raw = bytearray(path.read_bytes())
    _, hlen, _ = _PREFIX.unpack(bytes(raw[: _PREFIX.size]))
    sec = json.loads(bytes(raw[_PREFIX.size: _PREFIX.size + hlen]))["sections"][section]
    raw[_PREFIX.size + hlen + sec["offset"] + sec["nbytes"] // 2] ^= 0x01
    path.write_bytes(bytes(raw))


def _ref_order(s):
    return np.lexsort((np.arange(s.size), -s))


# ---- lexical side ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-12), ("float32", 2e-6)])
def test_sparse_bm25_equals_float64_reference(dtype, tol):
    rng = random.Random(7)
    texts = _random_corpus(rng, 53)
    queries = [" ".join(rng.choice([f"w{i}" for i in range(45)] + ["the", "W3"]) for _ in range(rng.randint(1, 6)))
               for _ in range(9)] + ["", "zzz unknown"]
    lex = LexicalIndex(dtype=dtype)
    lex.add(texts[:20])
    lex.add(texts[20:], ids=np.arange(20, 53) + 1000)  # incremental add: idf/avgdl over all passages
    ids_of = np.concatenate([np.arange(20), np.arange(20, 53) + 1000])
    dense = lex.score_matrix(queries).toarray()
    scores, ids = lex.search(queries, 7)
    for r, q in enumerate(queries):
        ref = _reference(texts, q)
        np.testing.assert_allclose(dense[r], ref, rtol=tol, atol=tol)
        order = _ref_order(ref)[:7]
        np.testing.assert_allclose(scores[r], ref[order], rtol=2e-7, atol=1e-7)  # returned as float32
        if dtype == "float64":
            assert ids[r].tolist() == ids_of[order].tolist()
    assert scores.dtype == np.float32 and ids.dtype == np.int64 and scores.shape == (len(queries), 7)


def test_bm25_batch_search_equals_single_topk():
    rng = random.Random(3)
    texts = _random_corpus(rng, 31)
    bm = BM25(texts)
    qs = ["w1 w2 w2", "the", "w39 w0", "nothing"]
    s, i = bm.search(qs, 31)
    for r, q in enumerate(qs):
        s1, i1 = bm.topk(q, 31)
        assert i[r].tolist() == i1.tolist() == _ref_order(bm.scores(q)).tolist()
        np.testing.assert_array_equal(s[r], s1)


def test_lexical_save_load_roundtrip_and_corruption(tmp_path):
    lex = LexicalIndex(k1=1.5, b=0.6, stopwords=True)
    lex.add(["the cat sat on the mat", "dogs bark", "ünïcode wörds and cats", "cat cat cat"], ids=np.array([5, 9, 2, 7]))
    path = tmp_path / "lex.uae"
    lex.save(path)
    back = LexicalIndex.load(path)
    assert (back.k1, back.b, back.stopwords, back.vocab_size) == (1.5, 0.6, True, lex.vocab_size)
    for q in (["cat"], ["wörds dogs", "mat"]):
        a, b = lex.search(q, 4), back.search(q, 4)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
    bad = tmp_path / "bad.uae"
    for section in ("counts", "vocab", "ids"):
        bad.write_bytes(path.read_bytes())
        _flip_in_section(bad, section)
        with pytest.raises(ValueError, match="checksum mismatch"):
            LexicalIndex.load(bad)
    bad.write_bytes(bytes(path.read_bytes()[:-40]))
    with pytest.raises(ValueError, match="truncated|checksum"):
        LexicalIndex.load(bad)
    dense = TopKIndex(4)
    dense.add(np.eye(4, dtype=np.float32))
    dense.save(tmp_path / "dense.uae")
    with pytest.raises(ValueError, match="kind"):
        LexicalIndex.load(tmp_path / "dense.uae")


@pytest.mark.parametrize("section, value, why", [
    ("ids", [10, 10, 12], "repeated ids"), ("ids", [-5, 11, 12], "negative"), ("ids", [10.7, 11.2, 12.9], "non-int64"),
    ("counts", float("nan"), "term counts are not finite"), ("counts", -1.0, "term counts are not finite and >= 0")])
def test_lexical_load_checks_ids_and_counts_of_a_crafted_file(tmp_path, section, value, why):
    # valid checksums, wrong content: as TopKIndex.load, ids must be unique int64 >= 0 and counts finite and >= 0
    from uae_fast.index import _read_file, _write_file

    lex = LexicalIndex()
    lex.add(["the cat sat", "dogs bark", "cat dogs"], ids=[10, 11, 12])
    lex.save(tmp_path / "lex.uae")
    header, arrays = _read_file(str(tmp_path / "lex.uae"), False, True)
    sections = {k: np.asarray(v) for k, v in arrays.items()}
    sections[section] = np.array(value) if section == "ids" else np.full_like(sections["counts"], value)
    _write_file(str(tmp_path / "bad.uae"), {k: v for k, v in header.items() if k not in ("sections", "format")}, sections)
    with pytest.raises(ValueError, match=f"not a valid lexical index file .*{why}"):
        LexicalIndex.load(tmp_path / "bad.uae")


@pytest.mark.parametrize("unicode", [True, False])
def test_lexical_index_keeps_its_tokenisation_when_saved(tmp_path, unicode):
    # a saved index tokenises queries as it tokenised its passages; a file written before the unicode option
    # (no "unicode" in its header) was built lowercase-only and loads that way
    from uae_fast.index import _read_file, _write_file

    lex = LexicalIndex(unicode=unicode)
    lex.add(["text classi\ufb01cation", "other words"], ids=[4, 9])
    lex.save(tmp_path / "lex.uae")
    back = LexicalIndex.load(tmp_path / "lex.uae")
    assert back.unicode is unicode
    s, ids = back.search(["classification"], 1)
    assert (ids[0, 0] == 4 and s[0, 0] > 0) if unicode else s[0, 0] == 0
    header, arrays = _read_file(str(tmp_path / "lex.uae"), False, True)
    old = {k: v for k, v in header.items() if k not in ("sections", "format", "unicode")}
    _write_file(str(tmp_path / "old.uae"), old, {k: np.asarray(v) for k, v in arrays.items()})
    assert LexicalIndex.load(tmp_path / "old.uae").unicode is False
    _write_file(str(tmp_path / "bad.uae"), dict(old, unicode="yes"), {k: np.asarray(v) for k, v in arrays.items()})
    with pytest.raises(ValueError, match="bad header field"):
        LexicalIndex.load(tmp_path / "bad.uae")


def test_lexical_errors():
    lex = LexicalIndex()
    with pytest.raises(ValueError, match="empty"):
        lex.search(["x"], 1)
    with pytest.raises(TypeError, match="texts"):
        lex.add("one string")
    with pytest.raises(TypeError, match="texts must be a sequence of str, got int"):
        lex.add(5)
    with pytest.raises(ValueError, match="shape"):
        lex.add(["a", "b"], ids=np.array([1]))
    with pytest.raises(ValueError, match="dtype"):
        LexicalIndex(dtype="int8")
    lex.add(["a b", "b c"])
    with pytest.raises(ValueError, match=r"k must be in \[1, 2\] \(the number of stored passages\)"):
        lex.search(["a"], 3)
    assert len(lex) == 2 and lex.nbytes > 0


# ---- fusion ------------------------------------------------------------------------------------


def test_fusion_minmax_hand_computed():
    # dense: ids 3, 1, 2 (scores 0.9, 0.5, 0.1); lexical: ids 2, 4 (scores 4, 2) and id 9 at 0 (no shared term)
    cfg = dict(DEFAULT_FUSION, method="minmax", weight=0.75)
    s, i = fuse_one([0.9, 0.5, 0.1], [3, 1, 2], [4.0, 2.0, 0.0], [2, 4, 9], 10, cfg)
    # normalised dense: 3 -> 1, 1 -> 0.5, 2 -> 0, 4 -> 0 (missing = lowest); lexical: 2 -> 1, 4 -> 0, others 0
    expect = {3: 0.75, 1: 0.375, 2: 0.25, 4: 0.0}
    assert i.tolist() == [3, 1, 2, 4] and 9 not in i.tolist()
    np.testing.assert_allclose(s, [expect[x] for x in i.tolist()], rtol=0, atol=1e-15)


def test_fusion_zscore_and_rrf_hand_computed():
    d, di, l, li = [3.0, 1.0, 2.0], [10, 11, 12], [5.0, 1.0], [12, 13]
    # dense scores need not be sorted for normalisation; z of [3, 1, 2]: mean 2, std sqrt(2/3)
    sd = math.sqrt(2 / 3)
    zd = {10: 1 / sd, 11: -1 / sd, 12: 0.0, 13: -1 / sd}
    zl = {12: 1.0, 13: -1.0, 10: -1.0, 11: -1.0}
    s, i = fuse_one(d, di, l, li, 4, dict(DEFAULT_FUSION, method="zscore", weight=0.5))
    exp = {x: 0.5 * zd[x] + 0.5 * zl[x] for x in zd}
    assert i.tolist() == sorted(exp, key=lambda x: (-exp[x], [10, 11, 12, 99].index(x) if x in di else 9))
    np.testing.assert_allclose(s, [exp[x] for x in i.tolist()], atol=1e-12)
    s, i = fuse_one(d, di, l, li, 4, dict(DEFAULT_FUSION, method="rrf", weight=0.5, rrf_k=60))
    exp = {10: 0.5 / 61, 11: 0.5 / 62, 12: 0.5 / 63 + 0.5 / 61, 13: 0.5 / 62}
    # 11 and 13 tie on the fused score: the one the dense side returned (11) comes first
    assert i.tolist() == [12, 10, 11, 13]
    np.testing.assert_allclose(s, [exp[x] for x in i.tolist()], atol=1e-15)


def test_fusion_degenerate_and_batch():
    assert normalise(np.array([2.0, 2.0]), "minmax").tolist() == [1.0, 1.0]
    assert normalise(np.array([2.0, 2.0]), "zscore").tolist() == [1.0, 1.0]
    assert normalise(np.array([-3.0]), "zscore").tolist() == [1.0]
    assert normalise(np.array([2.0, 2.0]), "minmax", complete=False).tolist() == [0.0, 0.0]
    s, i = fuse((np.array([[1.0, 0.5], [0.2, 0.1]]), np.array([[0, 1], [1, -1]])),
                (np.array([[0.0, 0.0], [0.0, 0.0]]), np.array([[2, 3], [0, 1]])), 3, None)
    assert i.tolist() == [[0, 1, -1], [1, -1, -1]] and s[0, 2] == -np.inf and s.dtype == np.float32


@pytest.mark.parametrize("method", ["minmax", "zscore"])
def test_fusion_lone_lexical_hit_gets_credit(method):
    # BM25 finds one passage (an exact identifier): it counts as the side's best, the others as missing (0);
    # it used to be normalised to 0 like them, so a lexical weight of 0.5 could not lift it above dense's top
    d, di = [0.9, 0.8, 0.1], [0, 1, 2]
    # asked for 2 lexical hits, got one (id 2 shares no term: score 0)
    s, i = fuse_one(d, di, [7.5, 0.0], [1, 2], 3, dict(DEFAULT_FUSION, method=method, weight=0.5))
    nd = normalise(np.array(d), method)
    expect = {0: 0.5 * nd[0], 1: 0.5 * nd[1] + 0.5, 2: 0.5 * nd[2]}
    assert i[0] == 1 and i.tolist() == sorted(expect, key=lambda x: -expect[x])
    np.testing.assert_allclose(s, [expect[x] for x in i.tolist()], atol=1e-12)
    # tied lexical hits, the whole group: each gets the side's full credit, ahead of a passage it missed
    cfg = dict(DEFAULT_FUSION, method=method, weight=0.9)
    s, i = fuse_one([0.5, 0.5, 0.5], [0, 1, 2], [2.0, 2.0, -1.0], [1, 2, -1], 3, cfg)
    assert i.tolist() == [1, 2, 0]
    # a full list of ties was cut at its length: its members beyond the cut are unknown, so no credit (else the
    # earliest-added of the tied passages would win); the dense order stands
    s, i = fuse_one([0.5, 0.4, 0.3], [0, 1, 2], [2.0, 2.0], [1, 2], 3, cfg)
    assert i.tolist() == [0, 1, 2]


def test_resolve_fusion(tmp_path):
    assert resolve_fusion(None) == DEFAULT_FUSION
    f = tmp_path / "f.json"
    f.write_text(json.dumps({"method": "rrf", "weight": 0.3, "calibration": {"x": 1}}))
    cfg = resolve_fusion(str(f))
    assert cfg["method"] == "rrf" and cfg["weight"] == 0.3 and cfg["k_each"] == DEFAULT_FUSION["k_each"]
    for bad, msg in (({"method": "max"}, "method"), ({"weight": 1.5}, "weight"), ({"k_each": 0}, "k_each"),
                     ({"rrf_k": -1}, "rrf_k"), ({"weight": True}, "weight")):
        with pytest.raises(ValueError, match=msg):
            resolve_fusion(bad)
    with pytest.raises(FileNotFoundError):
        resolve_fusion(str(tmp_path / "missing.json"))
    f.write_text("{not json")
    with pytest.raises(ValueError, match="not a fusion JSON"):
        resolve_fusion(str(f))


# ---- the hybrid index --------------------------------------------------------------------------


def _corpus(n=60, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    texts = _random_corpus(random.Random(seed), n)
    return rng.standard_normal((n, dim)).astype(np.float32), texts, rng


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_pure_weights_reproduce_each_side(dtype):
    emb, texts, rng = _corpus()
    ids = np.arange(60, dtype=np.int64) * 3 + 1
    h = HybridIndex(16, {"weight": 1.0, "k_each": 20}, dtype=dtype)
    h.add(emb, texts, ids=ids)
    q = rng.standard_normal((5, 16)).astype(np.float32)
    qt = ["w1 w5", "w7 the", "w2", "w30 w31 w32", "w9"]
    dense = TopKIndex(16, dtype=dtype)
    dense.add(emb, ids)
    _, want = dense.search(q, 10)
    _, got = h.search(q, qt, 10)
    np.testing.assert_array_equal(got, want)
    _, got = h.search(q, qt, 10, fusion={"weight": 0.0, "k_each": 20})
    bm = BM25(texts)
    for r in range(5):
        s = bm.scores(qt[r])
        order = [ids[j] for j in _ref_order(s) if s[j] > 0][:10]
        assert got[r][: len(order)].tolist() == order


def test_k_above_k_each_takes_k_from_each_side():
    # asking for more than k_each: each side contributes k candidates, so the k results are all real passages
    emb, texts, rng = _corpus(n=40)
    h = HybridIndex(16, {"method": "minmax", "weight": 0.6, "k_each": 5})
    h.add(emb, texts)
    q = rng.standard_normal((3, 16)).astype(np.float32)
    scores, ids = h.search(q, ["w1 w5", "w2", "w9 w3"], 30)
    assert ids.shape == (3, 30) and (ids >= 0).all() and np.isfinite(scores).all()
    assert all(len(set(r.tolist())) == 30 for r in ids)
    want = fuse(h.dense.search(q, 30), h.lexical.search(["w1 w5", "w2", "w9 w3"], 30), 30, h.fusion)
    np.testing.assert_array_equal(ids, want[1])


def test_hybrid_matches_brute_force_fusion():
    emb, texts, rng = _corpus(n=40)
    h = HybridIndex(16, {"method": "minmax", "weight": 0.6, "k_each": 40})
    h.add(emb, texts)
    q = rng.standard_normal((3, 16)).astype(np.float32)
    qt = ["w1 w2", "w3", "w4 w4 w5"]
    s, i = h.search(q, qt, 5)
    bm = BM25(texts)
    for r in range(3):
        d = emb.astype(np.float64) @ q[r].astype(np.float64)
        lx = bm.scores(qt[r])
        nd = (d - d.min()) / (d.max() - d.min())
        pos = lx > 0
        nl = np.where(pos, (lx - lx[pos].min()) / (lx[pos].max() - lx[pos].min()), 0.0)
        f = 0.6 * nd + 0.4 * nl
        np.testing.assert_allclose(s[r], np.sort(f)[::-1][:5], atol=1e-5)
        assert i[r].tolist() == _ref_order(f)[:5].tolist()


def test_hybrid_save_load_and_corruption(tmp_path):
    emb, texts, rng = _corpus()
    h = HybridIndex(16, {"method": "rrf", "weight": 0.4}, dtype="int8")
    h.add(emb, texts)
    h.meta = {"model": "/some/encoder"}
    h.save(tmp_path / "idx")
    back = HybridIndex.load(tmp_path / "idx")
    assert back.fusion == h.fusion and back.meta == h.meta and back.dense.dtype == "int8" and len(back) == 60
    q, qt = rng.standard_normal((2, 16)).astype(np.float32), ["w1", "w2 w3"]
    for a, b in zip(h.search(q, qt, 7), back.search(q, qt, 7)):
        np.testing.assert_array_equal(a, b)
    other = HybridIndex.load(tmp_path / "idx", fusion={"weight": 1.0})
    assert other.fusion["weight"] == 1.0 and other.fusion["method"] == DEFAULT_FUSION["method"]
    # a section bit flip, a size that disagrees with the manifest, a missing file, a wrong format
    lexf = tmp_path / "idx" / "lexical.uae"
    _flip_in_section(lexf, "indices")
    with pytest.raises(ValueError, match="checksum"):
        HybridIndex.load(tmp_path / "idx")
    densef = tmp_path / "idx" / "dense.uae"
    good = densef.read_bytes()
    _flip_in_section(densef, "data")
    with pytest.raises(ValueError, match="checksum"):
        HybridIndex.load(tmp_path / "idx")
    densef.write_bytes(good)
    lexf.write_bytes(lexf.read_bytes() + b"x")
    with pytest.raises(ValueError, match="manifest says"):
        HybridIndex.load(tmp_path / "idx")
    os.remove(lexf)
    with pytest.raises(ValueError, match="missing"):
        HybridIndex.load(tmp_path / "idx")
    m = tmp_path / "idx" / "hybrid.json"
    m.write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="format"):
        HybridIndex.load(tmp_path / "idx")
    with pytest.raises(FileNotFoundError):
        HybridIndex.load(tmp_path / "nothing")


def test_a_crafted_index_folder_cannot_reach_outside_itself(tmp_path):
    # an index made by someone else: manifest file names are plain names in the folder, its fusion is a config
    # (not a path to read), and string sections must have rising offsets (offsets that go back would decode
    # the whole text again per string: memory quadratic in the file)
    from uae_fast.lexical import pack_strings, unpack_strings

    emb, texts, _ = _corpus(n=12)
    h = HybridIndex(16)
    h.add(emb, texts)
    h.save(tmp_path / "idx")
    h.save(tmp_path / "elsewhere")
    m = tmp_path / "idx" / "hybrid.json"
    good = json.loads(m.read_text())
    for path in ("../elsewhere/dense.uae", str(tmp_path / "elsewhere" / "dense.uae"), ".."):
        m.write_text(json.dumps(dict(good, files=dict(good["files"], dense=dict(good["files"]["dense"], path=path)))))
        with pytest.raises(ValueError, match="expected a file name inside the index folder"):
            HybridIndex.load(tmp_path / "idx")
    m.write_text(json.dumps(dict(good, fusion="/etc/os-release")))
    with pytest.raises(ValueError, match="fusion must be an object"):
        HybridIndex.load(tmp_path / "idx")
    m.write_text(json.dumps(good))
    assert len(HybridIndex.load(tmp_path / "idx")) == 12
    blob, ends = pack_strings(["ab", "cde", ""])
    assert unpack_strings(blob, ends) == ["ab", "cde", ""]
    for bad in (np.array([4, 0, 5]), np.array([2, 5, 4]), np.array([2, 5, 6]), np.array([-1, 5, 5])):
        with pytest.raises(ValueError, match="end offsets must rise from 0 to the text's length"):
            unpack_strings(blob, bad)


def test_search_output_shows_control_characters_as_spaces():
    from uae_fast.search import _printable

    assert _printable("a\x1b]52;c;ZXZpbA==\x07b\tc\u00e9") == "a ]52;c;ZXZpbA== b c\u00e9"


def test_default_ids_continue_after_the_largest_and_never_repeat():
    """The TopKIndex rule on both sides of a hybrid index: a default add after explicit ids takes new ids."""
    lex = LexicalIndex()
    lex.add(["cat"], ids=np.array([5]))
    with pytest.raises(ValueError, match="id 5 is already in the index"):
        lex.add(["cat dog"], ids=np.array([5]))
    lex.add(["dog"])
    assert lex.ids.tolist() == [5, 6]
    assert sorted(lex.search(["cat dog"], 2)[1][0].tolist()) == [5, 6]
    emb, texts, _ = _corpus(n=4)
    h = HybridIndex(16)
    h.add(emb[:2], texts[:2], ids=np.array([10, 11]))
    h.add(emb[2:], texts[2:])
    assert h.dense.ids.tolist() == h.lexical.ids.tolist() == [10, 11, 12, 13]
    for bad in (float("inf"), float("nan"), "1.2", None):
        with pytest.raises(ValueError, match="k1 must be a finite number"):
            LexicalIndex(k1=bad)
    with pytest.raises(ValueError, match="b must be a finite number"):
        LexicalIndex(b=None)


def test_ids_may_be_a_list_as_the_readme_shows():
    emb, texts, _ = _corpus(n=6)
    h = HybridIndex(16)
    h.add(emb[:3], texts[:3], ids=[3, 4, 5])
    h.add(emb[3:], texts[3:])
    assert h.dense.ids.tolist() == h.lexical.ids.tolist() == [3, 4, 5, 6, 7, 8]
    with pytest.raises(TypeError, match="must hold integers"):
        TopKIndex(16).add(emb[:2], ids=[1.0, 2.0])
    with pytest.raises(ValueError, match="more than once"):
        LexicalIndex().add(["a", "b"], ids=[1, 1])


def test_hybrid_save_refused_or_interrupted_never_mixes_files(tmp_path, monkeypatch):
    emb, texts, _ = _corpus(n=20)
    h = HybridIndex(16)
    h.add(emb[:10], texts[:10])
    folder = tmp_path / "idx"
    h.save(folder)
    h.add(emb[10:], texts[10:])
    # meta that JSON cannot hold is refused before a file is touched: the saved index still opens as it was
    h.meta = {"n": np.int64(3)}
    with pytest.raises(TypeError, match="JSON-serialisable"):
        h.save(folder)
    assert len(HybridIndex.load(folder)) == 10 and not [f for f in os.listdir(folder) if ".tmp" in f]
    # a save that dies between the two files leaves no manifest: "not a hybrid index", never old + new mixed
    h.meta = {}

    def boom(path):
        raise OSError("disk full")

    monkeypatch.setattr(h.lexical, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        h.save(folder)
    with pytest.raises(ValueError, match="no hybrid.json"):
        HybridIndex.load(folder)
    monkeypatch.undo()
    h.save(folder)
    assert len(HybridIndex.load(folder)) == 20
    with pytest.raises(NotADirectoryError, match="is a file"):
        HybridIndex.load(folder / "dense.uae")
    with pytest.raises(NotADirectoryError, match="is a file"):
        h.save(folder / "dense.uae")
    # a dense-only index folder (uae index build without --lexical) gets its own message
    manifest = json.loads((folder / "hybrid.json").read_text())
    del manifest["files"]["lexical"]
    (folder / "hybrid.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="dense-only index"):
        HybridIndex.load(folder)


def test_hybrid_ids_must_agree(tmp_path):
    emb, texts, _ = _corpus(n=8)
    d, lx = TopKIndex(16), LexicalIndex()
    d.add(emb)
    lx.add(texts, ids=np.arange(8) + 1)
    with pytest.raises(ValueError, match="same ids"):
        HybridIndex.from_parts(d, lx)


def test_hybrid_concurrent_searches_and_adds():
    emb, texts, rng = _corpus(n=200, dim=8)
    h = HybridIndex(8, {"weight": 0.5})
    h.add(emb[:100], texts[:100])
    q = rng.standard_normal((4, 8)).astype(np.float32)
    qt = ["w1 w2", "w3", "the w4", "w5 w6 w7"]
    want = h.search(q, qt, 10)
    errors, results = [], []

    def worker():
        try:
            for _ in range(15):
                results.append(h.search(q, qt, 10))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for s, i in results:
        np.testing.assert_array_equal(i, want[1])
        np.testing.assert_array_equal(s, want[0])
    # searches while passages are added: every result is a valid top-10 of some prefix of the adds
    done, started = threading.Event(), threading.Event()

    def adder():
        started.wait()
        for s in range(100, 200, 10):
            h.add(emb[s:s + 10], texts[s:s + 10])
            time.sleep(0.002)  # let searches interleave with the adds
        done.set()

    t = threading.Thread(target=adder)
    t.start()
    overlapped = 0
    started.set()
    while not done.is_set():
        before = len(h)
        s, i = h.search(q, qt, 10)
        after = len(h)
        overlapped += before < 200
        assert (i >= 0).all() and (i < after).all() and all(len(set(r)) == 10 for r in i.tolist())
    t.join()
    assert overlapped > 0 and len(h) == 200 and len(h.lexical) == 200


def test_fuse_checks_a_config_dict():
    from uae_fast.fusion import fuse

    d = (np.array([[0.9, 0.1]], np.float32), np.array([[0, 1]]))
    lx = (np.array([[1.0, 0.5]], np.float32), np.array([[1, 0]]))
    with pytest.raises(ValueError, match="weight"):
        fuse(d, lx, 2, {"method": "minmax", "weight": 7.0, "k_each": 10, "rrf_k": 60})
    _, ids = fuse(d, lx, 2, {"method": "rrf"})  # missing keys take their defaults (was a KeyError)
    assert sorted(ids[0].tolist()) == [0, 1]


def test_hybrid_bad_input():
    emb, texts, _ = _corpus(n=5, dim=4)
    h = HybridIndex(4)
    with pytest.raises(ValueError, match="empty"):
        h.search(emb[:1], ["x"], 1)
    with pytest.raises(ValueError, match="texts"):
        h.add(emb, texts[:4])
    with pytest.raises(TypeError, match="str"):
        h.add(emb, "one string")
    with pytest.raises(TypeError, match="passage_emb must be a numpy array or a torch tensor, got list"):
        h.add(emb.tolist(), texts)
    with pytest.raises(ValueError, match="dimension"):
        h.add(np.zeros((5, 3), np.float32), texts)
    assert len(h) == 0 and len(h.lexical) == 0  # a rejected add stores nothing on either side
    h.add(emb, texts)
    with pytest.raises(ValueError, match="query_texts"):
        h.search(emb[:2], ["a"], 1)
    with pytest.raises(TypeError, match="query_texts must be a list of str \\(one per query\\), got NoneType"):
        h.search(emb[:1], None, 1)
    with pytest.raises(ValueError, match="k must be"):
        h.search(emb[:1], ["a"], 6)
    with pytest.raises(ValueError, match="weight"):
        HybridIndex(4, {"weight": -0.1})


# ---- the embedding cache -----------------------------------------------------------------------


class _CountingEncoder:
    dim = 3

    def __init__(self):
        self.seen = []

    def encode(self, texts, batch_size=64, show_progress=False):
        import torch

        self.seen.extend(texts)
        return torch.tensor([[len(t), t.count("a"), 1.0] for t in texts])


def test_embedding_cache_reuses_and_resumes(tmp_path, capsys):
    import torch

    from uae_fast.embcache import Incomplete, encode_cached, encoder_key

    model = tmp_path / "enc"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"x")
    enc = _CountingEncoder()
    texts = ["aa", "b", "aa", "cab", "dddd"]
    want = torch.tensor([[len(t), t.count("a"), 1.0] for t in texts])
    with pytest.raises(Incomplete, match="run again"):  # one 2-text chunk, then out of time
        encode_cached(enc, texts, cache_dir=str(tmp_path / "c"), model_path=str(model), max_seconds=0, chunk=2)
    assert enc.seen == ["aa", "b"]  # duplicates are embedded once
    got = encode_cached(enc, texts, cache_dir=str(tmp_path / "c"), model_path=str(model), chunk=2)
    assert enc.seen == ["aa", "b", "cab", "dddd"] and torch.equal(got, want)
    enc.seen.clear()
    assert torch.equal(encode_cached(enc, texts[::-1], cache_dir=str(tmp_path / "c"), model_path=str(model)), want.flip(0))
    assert enc.seen == []  # all from the cache
    key = encoder_key(str(model))
    (model / "model.safetensors").write_bytes(b"retrained")  # new weights: a new key, nothing stale is read
    assert encoder_key(str(model)) != key
    encode_cached(enc, texts[:1], cache_dir=str(tmp_path / "c"), model_path=str(model))
    assert enc.seen == ["aa"]
    # a chunk damaged on disk is moved aside with a warning and its texts are encoded again
    (chunk,) = (tmp_path / "c" / encoder_key(str(model))).glob("chunk-*.pt")
    chunk.write_bytes(chunk.read_bytes()[:40])
    enc.seen.clear()
    assert torch.equal(encode_cached(enc, texts, cache_dir=str(tmp_path / "c"), model_path=str(model)), want)
    assert enc.seen == ["aa", "b", "cab", "dddd"] and os.path.exists(str(chunk) + ".damaged")
    assert "unreadable" in capsys.readouterr().err
    # an encoder object the cache cannot name is refused, not cached under the default student's key
    with pytest.raises(ValueError, match="pass model_path"):
        encode_cached(enc, texts, cache_dir=str(tmp_path / "c"))


def test_embedding_cache_keys_a_biencoder_by_its_folder_and_settings(tmp_path):
    from test_student import make_tiny_encoder
    from uae_fast.embcache import cache_key
    from uae_fast.student import BiEncoder

    a = make_tiny_encoder(tmp_path / "a")
    b = make_tiny_encoder(tmp_path / "b", seed=1)
    ka = cache_key(BiEncoder(a, device="cpu"))
    assert cache_key(BiEncoder(a, device="cpu"), model_path=b) == ka  # the encoder's own folder wins
    assert cache_key(BiEncoder(b, device="cpu")) != ka
    assert cache_key(BiEncoder(a, device="cpu", max_seq_length=16)) != ka


def test_lexical_default_ids_survive_save_load(tmp_path):
    lex = LexicalIndex()
    lex.add(["a b", "b c"], ids=np.array([7, 3]))
    lex.save(tmp_path / "l.uae")
    again = LexicalIndex.load(tmp_path / "l.uae")
    again.add(["c d"])
    assert again.ids.tolist() == [7, 3, 8]


def test_fusion_refuses_non_finite_scores():
    # one NaN made min/max NaN and zeroed that side for every passage, silently
    cfg = dict(DEFAULT_FUSION, method="minmax", weight=0.5)
    for d, l in (([0.9, float("nan"), 0.1], [4.0, 2.0]), ([0.9, 0.5, 0.1], [float("inf"), 2.0])):
        with pytest.raises(ValueError, match="NaN or infinite"):
            fuse_one(d, [3, 1, 2], l, [2, 4], 10, cfg)
    s, i = fuse_one([0.9, -math.inf], [3, -1], [4.0, math.nan], [2, -1], 10, cfg)  # padding (id -1) is not read
    assert i.tolist() == [3, 2]
    with pytest.raises(TypeError, match="dense_ids must be integers, got float64"):
        fuse_one([0.9, 0.5], [5.7, 6.2], [4.0], [2], 10, cfg)  # would have been ids 5 and 6


def test_encoder_key_sees_subfolders_tokenizer_and_config(tmp_path):
    # a sentence-transformers folder keeps its Transformer in 0_Transformer/: new weights, vocab or config
    # there must change the key (before, only top-level *.safetensors / *.bin counted); checkpoints/ do not
    import time

    from uae_fast.embcache import encoder_key

    root = tmp_path / "st"
    (root / "0_Transformer").mkdir(parents=True)
    (root / "modules.json").write_text('[{"idx": 0, "name": "0", "path": "0_Transformer", "type": "x"}]')
    w = root / "0_Transformer" / "model.safetensors"
    w.write_bytes(b"x" * 10)
    k0 = encoder_key(str(root))
    (root / "checkpoints").mkdir()
    (root / "checkpoints" / "model.safetensors").write_bytes(b"y")
    assert encoder_key(str(root)) == k0
    for name, data in (("model.safetensors", b"z" * 11), ("vocab.txt", b"a\nb\n"), ("config.json", b"{}")):
        time.sleep(0.01)
        (root / "0_Transformer" / name).write_bytes(data)
        k1 = encoder_key(str(root))
        assert k1 != k0, name
        k0 = k1


def test_model_fingerprint_is_content_not_path_and_ignores_what_lies_beside_the_model(tmp_path):
    # uae search refuses a model changed since its index was built: a copy (new path, new mtimes) is the same
    # model; an index built inside the model folder is not part of it; new weights are another model
    import shutil

    from test_student import make_tiny_encoder
    from uae_fast.embcache import model_fingerprint

    a = make_tiny_encoder(tmp_path / "a")
    fp = model_fingerprint(a)
    b = tmp_path / "b"
    shutil.copytree(a, b, copy_function=shutil.copyfile)  # no metadata: other mtimes
    assert model_fingerprint(str(b)) == fp
    (b / "idx").mkdir()
    (b / "idx" / "hybrid.json").write_text("{}")
    assert model_fingerprint(str(b)) == fp
    # JSON a loader never reads, saved into the model folder (uae train's summary, a calibrated fusion.json)
    (b / "fusion.json").write_text('{"method": "minmax", "weight": 0.5}')
    (b / "training_summary.json").write_text("{}")
    assert model_fingerprint(str(b)) == fp and model_fingerprint(str(b), legacy=True) != fp
    (b / "tokenizer_config.json").write_text((b / "tokenizer_config.json").read_text() + " ")
    assert model_fingerprint(str(b)) != fp  # a config the loader reads does count
    c = make_tiny_encoder(tmp_path / "c", seed=1)
    assert model_fingerprint(c) != fp


def test_an_interrupted_add_leaves_both_sides_as_they_were(tmp_path, monkeypatch):
    # an interrupt while the texts are tokenised stored dense rows the lexical side lacked: the folder saved
    # afterwards did not load, and default ids of a retried add skipped the lost rows for good
    import uae_fast.lexical as lx

    emb, texts, rng = _corpus(n=12)
    h = HybridIndex(16)
    h.add(emb[:6], texts[:6])
    real = lx.count_matrix

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(lx, "count_matrix", interrupted)
    with pytest.raises(KeyboardInterrupt):
        h.add(emb[6:], texts[6:])
    assert len(h.dense) == len(h.lexical) == 6
    monkeypatch.setattr(lx, "count_matrix", real)
    h.add(emb[6:], texts[6:])
    assert h.dense.ids.tolist() == h.lexical.ids.tolist() == list(range(12))
    h.save(tmp_path / "h")
    back = HybridIndex.load(tmp_path / "h")
    q = rng.standard_normal((2, 16)).astype(np.float32)
    for a, b in zip(back.search(q, ["w1", "w2"], 5), h.search(q, ["w1", "w2"], 5)):
        np.testing.assert_array_equal(a, b)
    # interrupted as the lexical side publishes: the dense rows are taken back, so the sides stay one prefix
    real_commit = h.lexical._commit

    def interrupted_commit(prepared):
        raise KeyboardInterrupt
    h.lexical._commit = interrupted_commit
    with pytest.raises(KeyboardInterrupt):
        h.add(emb[:4] * 2, texts[:4])
    h.lexical._commit = real_commit
    assert len(h.dense) == len(h.lexical) == len(h) == 12
    h.add(emb[:4] * 2, texts[:4])
    assert h.dense.ids.tolist() == h.lexical.ids.tolist() == list(range(16))
    assert h.search(emb[:4] * 2, texts[:4], 1)[1][:, 0].tolist() == [12, 13, 14, 15]
    h.lexical.add(["an add to one side alone"])  # a folder that would not load is refused, not written
    with pytest.raises(RuntimeError, match="sides hold different passages"):
        h.save(tmp_path / "h2")


def test_a_search_during_an_add_sees_the_index_before_it():
    # the dense side publishes before the lexical one: a search in between used to mix the two states (new
    # dense rows with no lexical side, -1 padding within k <= n, or "k must be in [1, n]" on a first add)
    emb, texts, rng = _corpus(n=20)
    q = rng.standard_normal((3, 16)).astype(np.float32)
    qt = ["w1 w5", "w2", "w9 w3"]
    h = HybridIndex(16, {"method": "minmax", "weight": 0.6, "k_each": 4})
    h.add(emb[:8], texts[:8])
    before = h.search(q, qt, 8)
    seen = []
    real = h.lexical._commit

    def commit_after_a_search(prepared):
        assert len(h.dense) == 20 and len(h.lexical) == 8  # the window: dense published, lexical not yet
        seen.append(h.search(q, qt, 8))
        real(prepared)

    h.lexical._commit = commit_after_a_search
    h.add(emb[8:], texts[8:])
    for a, b in zip(seen[0], before):
        np.testing.assert_array_equal(a, b)
    assert len(h.search(q, qt, 20)[1][0]) == 20 and (h.search(q, qt, 20)[1] >= 0).all()
    first = HybridIndex(16)  # during a first add the index is empty (was: "k must be in [1, 20] ..., got 0")
    real_first = first.lexical._commit

    def search_then_commit(prepared):
        with pytest.raises(ValueError, match="the index is empty"):
            first.search(q[:1], qt[:1], 1)
        real_first(prepared)

    first.lexical._commit = search_then_commit
    first.add(emb[:3], texts[:3])
    assert len(first) == 3
