import gzip
import json
import os

import pytest

from uae_fast.data import load_dataset, qasper_answer_text

MINI = os.path.join(os.path.dirname(__file__), "fixtures", "qasper-dev-mini.json.gz")


def test_qasper_mini_loads_with_gold_from_text_evidence():
    ds = load_dataset(MINI)
    raw = json.load(gzip.open(MINI))
    assert {p.doc_id for p in ds.passages.values()} == set(raw)
    n_para = sum(1 for p in raw.values() for s in p["full_text"] for x in s["paragraphs"] if x.strip())
    assert len(ds.passages) == n_para
    for q in ds.queries:
        pool = set(ds.pool(q))
        assert set(q.gold) <= pool and all(pid.startswith(q.doc_id + ":") for pid in pool)
        for pid in q.gold:  # gold text is an evidence string of some annotator
            qa = next(x for x in raw[q.doc_id]["qas"] if x["question_id"] == q.id)
            assert any(ds.passages[pid].text == e for a in qa["answers"] for e in a["answer"]["evidence"])
    assert sum(bool(q.gold) for q in ds.queries) >= 10


def test_float_selected_evidence_is_skipped(tmp_path):
    paper = {"title": "t", "abstract": "a", "full_text": [{"section_name": "S", "paragraphs": ["FLOAT SELECTED: Table 1", "p1", ""]}],
             "qas": [{"question": "q?", "question_id": "q1", "answers": [{"answer": {
                 "unanswerable": False, "yes_no": None, "free_form_answer": "", "extractive_spans": ["x", "y"],
                 "evidence": ["FLOAT SELECTED: Table 1", "p1"], "highlighted_evidence": None}}]}]}
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"P": paper}))
    ds = load_dataset(str(path))
    assert len(ds.passages) == 2  # empty paragraph dropped
    assert ds.queries[0].gold == ["P:1"] and ds.queries[0].answers == ["x, y"]


def test_unmatched_qasper_evidence_is_counted(tmp_path):
    def qa(qid, evidence):
        return {"question": "q?", "question_id": qid, "answers": [{"answer": {"free_form_answer": "f", "evidence": evidence}}]}

    paper = {"full_text": [{"section_name": "Intro", "paragraphs": ["alpha beta", "gamma"]}],
             "qas": [qa("q1", ["alpha  beta", "gamma"]),  # inner whitespace differs: no match ("other")
                     qa("q2", ["Intro"]),  # a section heading: no paragraph, no gold
                     qa("q3", [])]}  # no text evidence at all: not counted
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"P": paper}))
    ds = load_dataset(str(path))
    assert [q.gold for q in ds.queries] == [["P:1"], [], []]
    assert ds.unmatched_evidence == {"headings": 1, "other": 1, "questions_without_gold": 1}


def test_answer_text_rules():
    assert qasper_answer_text({"unanswerable": True}) is None
    assert qasper_answer_text({"free_form_answer": " f ", "extractive_spans": ["e"]}) == "f"
    assert qasper_answer_text({"free_form_answer": "", "extractive_spans": [], "yes_no": False}) == "No"


def test_jsonl_schema_roundtrip(tmp_path):
    path = tmp_path / "mine.jsonl"
    recs = [{"type": "passage", "id": "a", "doc_id": "d", "text": "alpha"},
            {"type": "passage", "id": "b", "doc_id": "d", "text": "beta"},
            {"type": "query", "id": "q", "question": "which?", "answers": ["alpha"], "gold": ["a"], "doc_id": "d"}]
    path.write_text("\n".join(json.dumps(r) for r in recs))
    ds = load_dataset(str(path))
    assert ds.pool(ds.queries[0]) == ["a", "b"] and ds.queries[0].gold == ["a"]
    # a repeated gold id or answer counts once (training would draw that gold twice as often)
    recs[2] = dict(recs[2], gold=["b", "a", "b"], answers=["alpha", "beta", "alpha"])
    path.write_text("\n".join(json.dumps(r) for r in recs))
    q = load_dataset(str(path)).queries[0]
    assert q.gold == ["b", "a"] and q.answers == ["alpha", "beta"]


@pytest.mark.parametrize("content,msg", [
    ('{"type": "query", "id": "q", "question": "x", "gold": ["nope"]}', "unknown passage"),
    ('{"type": "passage", "id": "a"}', "lacks the field 'text'"),
    ('not json', "not valid JSON"),
    ('{"type": "other"}', "record type"),
    ('{"type": "passage", "id": " ", "text": "x"}', r"bad.jsonl:1: id is blank"),
    ('{"type": "passage", "id": "a", "doc_id": "", "text": "x"}\n{"type": "query", "id": "q", "question": "x", "gold": [""]}',
     r"bad.jsonl:2: gold\[0\] is blank"),  # (a blank doc_id is allowed: it was always the same as none)
])
def test_jsonl_bad_input(tmp_path, content, msg):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=msg):
        load_dataset(str(path))


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_dataset(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{truncated")
    with pytest.raises(ValueError, match="cannot read"):
        load_dataset(str(bad))


def test_atomic_write_removes_leftovers_of_dead_processes_only(tmp_path):
    import os
    import subprocess
    import sys

    from uae_fast.data import atomic_write

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has exited
    target = tmp_path / "index.uae"
    orphan, alive, mine = (tmp_path / f"index.uae.tmp{p}.123" for p in (pid, os.getppid(), os.getpid()))
    other = tmp_path / "index.uae.tmpl"  # not a temporary name of ours
    fresh = tmp_path / f"index.uae.tmp{pid}.456"  # a dead pid here, but written just now (a writer on another host)
    for f in (orphan, alive, mine, other, fresh):
        f.write_text("x")
        if f != fresh:
            os.utime(f, (1, 1))
    with atomic_write(str(target)) as f:
        f.write("data")
    assert target.read_text() == "data"
    assert not orphan.exists() and alive.exists() and mine.exists() and other.exists() and fresh.exists()


def _qasper_one(tmp_path, answer):
    paper = {"full_text": [{"section_name": "S", "paragraphs": ["p1", "p2"]}],
             "qas": [{"question": "q?", "question_id": "q1", "answers": [{"answer": answer}]}]}
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"P": paper}))
    return str(path)


@pytest.mark.parametrize("answer, msg", [
    ({"yes_no": "no", "evidence": ["p1"]}, "yes_no must be a boolean, got a string"),  # "no" would read as Yes
    ({"unanswerable": "false", "free_form_answer": "x"}, "unanswerable must be a boolean, got a string"),
])
def test_qasper_answer_flags_must_be_booleans(tmp_path, answer, msg):
    with pytest.raises(ValueError, match=msg):
        load_dataset(_qasper_one(tmp_path, answer))


def test_qasper_unanswerable_evidence_is_no_gold(tmp_path):
    # as the official reader: an unanswerable annotation gives no answer and no evidence
    ds = load_dataset(_qasper_one(tmp_path, {"unanswerable": True, "evidence": ["p1"]}))
    assert ds.queries[0].answers == [] and ds.queries[0].gold == []
    ds = load_dataset(_qasper_one(tmp_path, {"unanswerable": False, "yes_no": False, "evidence": ["p2"]}))
    assert ds.queries[0].answers == ["No"] and ds.queries[0].gold == ["P:1"]


def test_qasper_blank_question_is_refused(tmp_path):
    path = _qasper_one(tmp_path, {"free_form_answer": "x", "evidence": ["p1"]})
    raw = json.loads(open(path).read())
    raw["P"]["qas"][0]["question"] = " \t"
    open(path, "w").write(json.dumps(raw))
    with pytest.raises(ValueError, match="question 'q1': question is blank"):
        load_dataset(path)


def test_jsonl_queries_without_candidates_and_blank_passages(tmp_path):
    p = tmp_path / "d.jsonl"
    rows = [{"type": "passage", "id": "a", "text": "alpha", "doc_id": "d1"},
            {"type": "query", "id": "q", "question": "?", "answers": ["x"], "doc_id": "D1"}]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"d.jsonl:2: query 'q' has no candidate passages \(no passage has doc_id 'D1'\)"):
        load_dataset(str(p))
    rows[1] = {"type": "query", "id": "q", "question": "?", "answers": ["x"], "candidates": []}
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match="its candidates list is empty"):
        load_dataset(str(p))
    rows[0]["text"] = "   "
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match="d.jsonl:1: passage text is blank"):
        load_dataset(str(p))


def test_byte_order_mark_and_crlf_are_read(tmp_path):
    rows = [{"type": "passage", "id": "a", "text": "alpha", "doc_id": "d1"},
            {"type": "query", "id": "q", "question": "?", "answers": ["x"], "gold": ["a"], "doc_id": "d1"}]
    p = tmp_path / "bom.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\r\n" for r in rows).encode())
    ds = load_dataset(str(p))
    assert list(ds.passages) == ["a"] and ds.queries[0].gold == ["a"]


def test_uae_data_dir_without_the_file_is_an_error(tmp_path, monkeypatch):
    from uae_fast.data import DATA_DIR_ENV, default_qasper_path

    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=f"{DATA_DIR_ENV}=.* holds no qasper-dev"):
        default_qasper_path("dev")


def test_a_pipe_is_refused_by_name_not_read_as_empty(tmp_path):
    # `--data <(zcat x)`: the format sniffing, a second pass or the fingerprint would find the pipe drained
    from uae_fast.utilities import load_utilities

    for load in (load_dataset, load_utilities):
        r, w = os.pipe()
        os.write(w, b'{"type": "header"}\n{"qid": "a", "pid": "x", "utility": 1}\n')
        os.close(w)
        try:
            with pytest.raises(ValueError, match=f"/dev/fd/{r}: not a regular file \\(a pipe or FIFO\\?\\)"):
                load(f"/dev/fd/{r}")
        finally:
            os.close(r)
