"""Index files under damage (#19): truncated and bit-flipped at every header byte and at body bytes,
and crafted headers/sections whose checksums are valid. Every load either raises the one clear
ValueError ("... is not a valid uae_fast index file ...") or gives back the very same ids; search
results may differ only when the flipped byte is vector data and the vector body was not verified
(load(mmap=True) with the default verify=None), and even then they hold stored ids only (or raise).
"""
import json
import zlib

import numpy as np
import pytest

from uae_fast import TopKIndex
from uae_fast.index import _PREFIX

try:
    import faiss  # noqa: F401
except ImportError:  # the native kinds are still fuzzed; the faiss rows skip
    faiss = None
needs_faiss = pytest.mark.skipif(faiss is None, reason="needs faiss (pip install faiss-cpu)")

BAD = "not a valid uae_fast index file"
KINDS = ["float32", "int8", "int8+refine", "bfloat16", pytest.param("faiss", marks=needs_faiss)]
BODY = ("data", "resid")  # the sections whose crc32 only verify=True (or mmap=False) checks


def _build(kind, path):
    rng = np.random.default_rng(19)
    x = rng.standard_normal((37, 10)).astype(np.float32)
    ids = rng.choice(10**9, size=37, replace=False)  # custom ids: a wrong one cannot pass for a position
    if kind == "faiss":
        index = TopKIndex(10, backend="faiss", factory="Flat")
    else:
        index = TopKIndex(10, dtype=kind.split("+")[0], refine=kind.endswith("refine"))
    index.add(x, ids=ids)
    index.save(path)
    return index, rng.standard_normal((5, 10)).astype(np.float32)


def _layout(path):
    """(start of the sections, {name: (first byte, end byte)}) from a good file."""
    raw = open(path, "rb").read()
    _, hlen, _ = _PREFIX.unpack(raw[: _PREFIX.size])
    header = json.loads(raw[_PREFIX.size : _PREFIX.size + hlen])
    start = _PREFIX.size + hlen
    return start, {k: (start + s["offset"], start + s["offset"] + s["nbytes"]) for k, s in header["sections"].items()}


def _write(tmp_path, data, tag=[0]):
    # A new file (inode) per case: an earlier memory map of a rewritten file could otherwise SIGBUS.
    tag[0] += 1
    out = tmp_path / f"case{tag[0]}.uae"
    with open(out, "wb") as f:
        f.write(data)
    return out


def _stored_ids(index):
    return index.ids if index.backend == "native" else index._ids


def _check_case(path, good, queries, mmap, body_byte):
    """One damaged file: ValueError(BAD), or the same ids (and, unless body_byte, the same results)."""
    try:
        loaded = TopKIndex.load(path, mmap=mmap)
    except ValueError as e:
        assert BAD in str(e), str(e)
        return "error"
    np.testing.assert_array_equal(_stored_ids(loaded), _stored_ids(good))
    assert (loaded.dim, loaded.metric, loaded.dtype, len(loaded)) == (good.dim, good.metric, good.dtype, len(good))
    try:
        scores, ids = loaded.search(queries, 5)
    except ValueError as e:  # flipped exponent bits: inf/NaN/huge vectors in unverified mapped data
        assert body_byte and mmap, str(e)
        assert "may be damaged" in str(e), str(e)
        return "search error"
    ref_scores, ref_ids = good.search(queries, 5)
    if body_byte and mmap:  # unverified vector data may rank differently, but only ever stored ids
        assert np.isin(ids, _stored_ids(good)).all()
        assert np.isfinite(scores).all()
    else:
        np.testing.assert_array_equal(ids, ref_ids)
        np.testing.assert_array_equal(scores, ref_scores)
    return "loaded"


@pytest.mark.parametrize("kind", KINDS)
def test_every_header_byte_flipped_or_truncated(kind, tmp_path):
    good, queries = _build(kind, tmp_path / "good.uae")
    raw = bytearray(open(tmp_path / "good.uae", "rb").read())
    start, _ = _layout(tmp_path / "good.uae")
    seen = set()
    for i in range(start):
        flipped = bytearray(raw)
        flipped[i] ^= 1 << (i % 8)
        outcome = _check_case(_write(tmp_path, bytes(flipped)), good, queries, True, False)
        # Only the 4 pad bytes after the header crc carry no information.
        assert outcome == "error" or 20 <= i < 24, (i, outcome)
        seen.add(outcome)
        assert _check_case(_write(tmp_path, bytes(raw[:i])), good, queries, i % 2 == 0, False) == "error"
    assert seen == {"error", "loaded"}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mmap", [True, False])
def test_body_bytes_flipped_or_truncated(kind, mmap, tmp_path):
    good, queries = _build(kind, tmp_path / "good.uae")
    path = tmp_path / "good.uae"
    raw = bytearray(open(path, "rb").read())
    start, sections = _layout(path)
    rng = np.random.default_rng(len(raw) + mmap)
    # Every byte of the small sections (ids, scales, ...), and random bytes of the rest of the body.
    small = [i for name, (a, b) in sections.items() if name not in BODY and name != "faiss" for i in range(a, b)]
    positions = small + rng.integers(start, len(raw), 120).tolist()
    outcomes = {}
    for i in positions:
        where = [name for name, (a, b) in sections.items() if a <= i < b]
        flipped = bytearray(raw)
        flipped[i] ^= 1 << int(rng.integers(0, 8))
        body_byte = bool(where) and where[0] in BODY
        outcome = _check_case(_write(tmp_path, bytes(flipped)), good, queries, mmap, body_byte)
        if where and not (body_byte and mmap):  # a checked section: the crc32 sees every one-bit flip
            assert outcome == "error", (i, where, outcome)
        outcomes.setdefault(where[0] if where else "padding", set()).add(outcome)
    assert outcomes["ids"] == {"error"}
    # Truncation anywhere inside a section (the 64-byte tail padding after the last one is harmless).
    last = max(b for _, b in sections.values())
    for cut in rng.integers(start, last, 40).tolist() + [last - 1]:
        assert _check_case(_write(tmp_path, bytes(raw[:cut])), good, queries, mmap, False) == "error"
    assert _check_case(_write(tmp_path, bytes(raw[:last])), good, queries, mmap, False) == "loaded"


def test_mmap_verify_option_covers_the_vector_body(tmp_path):
    good, queries = _build("float32", tmp_path / "good.uae")
    raw = bytearray(open(tmp_path / "good.uae", "rb").read())
    _, sections = _layout(tmp_path / "good.uae")
    raw[sections["data"][0] + 3] ^= 0x40
    bad = _write(tmp_path, bytes(raw))
    TopKIndex.load(bad, mmap=True)  # lazy by default: the body is not read at open
    for kwargs in ({"mmap": True, "verify": True}, {"mmap": False}):
        with pytest.raises(ValueError, match="section 'data' checksum mismatch"):
            TopKIndex.load(bad, **kwargs)
    assert len(TopKIndex.load(bad, mmap=False, verify=False)) == 37


# ---- crafted files: valid checksums, hostile contents ------------------------------------------------


def _craft(src, tmp_path, edit_header=None, edit_sections=None, edit_raw=None):
    """Rewrite a good file with a changed header (dict -> dict, then JSON bytes -> bytes) and/or changed
    section arrays, recomputing every checksum, so that only the content checks can object."""
    raw = open(src, "rb").read()
    _, hlen, _ = _PREFIX.unpack(raw[: _PREFIX.size])
    header = json.loads(raw[_PREFIX.size : _PREFIX.size + hlen])
    start = _PREFIX.size + hlen
    body = bytearray(raw[start:])
    if edit_sections:
        for name, fn in edit_sections.items():
            s = header["sections"][name]
            arr = np.frombuffer(bytes(body[s["offset"] : s["offset"] + s["nbytes"]]), dtype=s["dtype"]).copy()
            arr = fn(arr)
            body[s["offset"] : s["offset"] + s["nbytes"]] = arr.tobytes()
            s["crc32"] = zlib.crc32(arr.tobytes()) & 0xFFFFFFFF
    if edit_header:
        header = edit_header(header)
    text = json.dumps(header).encode()
    if edit_raw:
        text = edit_raw(text)
    text = text.ljust(hlen, b" ") if len(text) <= hlen else text
    prefix = _PREFIX.pack(b"UAETOPK1", len(text), zlib.crc32(text) & 0xFFFFFFFF)
    return _write(tmp_path, prefix + text + bytes(body))


def _set(path, value):
    def edit(h):
        node = h
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        return h

    return edit


CRAFTED = {
    # RecursionError / OverflowError / MemoryError used to escape from these.
    "deep nesting": dict(edit_raw=lambda t: b"[" * 100000 + b"]" * 100000),
    "dim 1e400": dict(edit_raw=lambda t: t.replace(b'"dim": 10', b'"dim": 1e400')),  # a float inf
    "dim 2**31": dict(edit_header=_set(["dim"], 2**31)),
    "dim float": dict(edit_header=_set(["dim"], 10.0)),
    "ntotal huge": dict(edit_header=_set(["ntotal"], 2**70)),
    "offset 2**80": dict(edit_header=_set(["sections", "ids", "offset"], 2**80)),
    "offset negative": dict(edit_header=_set(["sections", "ids", "offset"], -64)),
    "nbytes string": dict(edit_header=_set(["sections", "ids", "nbytes"], "296")),
    "shape wraps int64": dict(edit_header=lambda h: {**h, "sections": {**h["sections"], "x": {
        "offset": 0, "nbytes": 0, "dtype": "|u1", "shape": [2**32, 2**32], "crc32": 0}}}),
    "shape 2**70": dict(edit_header=_set(["sections", "ids", "shape"], [2**70])),
    "object dtype": dict(edit_header=_set(["sections", "ids", "dtype"], "|O")),
    "record dtype": dict(edit_header=_set(["sections", "ids", "dtype"], [["a", "<i8"]])),
    "string dtype": dict(edit_header=_set(["sections", "ids", "dtype"], "<U2")),
    "crc out of range": dict(edit_header=_set(["sections", "ids", "crc32"], 2**40)),
    "no sections": dict(edit_header=_set(["sections"], [])),
    "format 2": dict(edit_header=_set(["format"], 2)),
    "header not an object": dict(edit_raw=lambda t: b"[1, 2]"),
    "unknown dtype": dict(edit_header=_set(["dtype"], "float16")),
    "candidates -1": dict(edit_header=_set(["candidates"], -1)),
    "max_norm negative": dict(edit_header=_set(["max_norm"], -1.0)),
    "max_norm string": dict(edit_header=_set(["max_norm"], "big")),
    "negative id": dict(edit_sections={"ids": lambda a: np.where(np.arange(a.size) == 3, -1, a)}),
    "duplicate id": dict(edit_sections={"ids": lambda a: np.where(np.arange(a.size) == 3, a[0], a)}),
    "ids of another size": dict(edit_header=_set(["ntotal"], 36)),
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_header_gives_one_clear_error(case, tmp_path):
    src = tmp_path / "good.uae"
    _build("int8", src)
    bad = _craft(src, tmp_path, **CRAFTED[case])
    for mmap in (True, False):
        with pytest.raises(ValueError, match=BAD):
            TopKIndex.load(bad, mmap=mmap)


@needs_faiss
@pytest.mark.parametrize("what", ["faiss blob", "faiss ntotal"])
def test_crafted_faiss_section_gives_one_clear_error(what, tmp_path):
    src = tmp_path / "good.uae"
    _build("faiss", src)
    if what == "faiss blob":  # valid crc, garbage FAISS bytes
        bad = _craft(src, tmp_path, edit_sections={"faiss": lambda a: np.random.default_rng(0).integers(0, 256, a.size).astype(np.uint8)})
    else:
        bad = _craft(src, tmp_path, edit_header=_set(["ntotal"], 36), edit_sections={"ids": lambda a: a})
    with pytest.raises(ValueError, match=BAD):
        TopKIndex.load(bad)


def test_crafted_but_valid_header_values_still_load(tmp_path):
    """Header values that are unusual but legal (huge candidates) load and search normally."""
    src = tmp_path / "good.uae"
    good, queries = _build("int8", src)
    ok = _craft(src, tmp_path, edit_header=_set(["candidates"], 2**40))
    loaded = TopKIndex.load(ok)
    assert loaded.candidates == 2**40
    scores, ids = loaded.search(queries, 5)
    # 2**40 candidates = rescore every vector: the same as an index asked for all 37
    every = TopKIndex(10, dtype="int8", candidates=37)
    every.add(np.random.default_rng(19).standard_normal((37, 10)).astype(np.float32), ids=good.ids)
    want_s, want_i = every.search(queries, 5)
    np.testing.assert_array_equal(ids, want_i)
    np.testing.assert_array_equal(scores, want_s)
    legacy = _craft(src, tmp_path, edit_header=lambda h: {k: v for k, v in h.items() if k != "max_norm"})
    assert TopKIndex.load(legacy)._max_norm is None  # files from before max_norm: scores checked after search
