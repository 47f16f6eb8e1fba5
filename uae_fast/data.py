"""Datasets: QASPER (official JSON schema) and a documented JSONL schema for your own data.

Both load into a :class:`RetrievalDataset`: passages with stable ids, queries with their gold answers
and gold evidence passages, and for each query its candidate pool (by default the passages of its document).

QASPER conventions (as in ``shared/data/README.md`` and the usual evidence-retrieval scoring):

- passages are the non-empty paragraphs of ``full_text`` in reading order; id ``"{paper_id}:{i}"``;
- gold passages are those whose text equals a text-evidence string of any annotator; evidence starting
  with ``FLOAT SELECTED`` (figures/tables) is skipped;
- a gold answer per annotator: the free-form answer, else the extractive spans joined with ", ", else
  "Yes"/"No"; unanswerable annotations give none.

JSONL schema (one JSON object per line, ``.jsonl`` or ``.jsonl.gz``)::

    {"type": "passage", "id": "d1:0", "doc_id": "d1", "text": "..."}
    {"type": "query", "id": "q1", "question": "...", "answers": ["..."],
     "gold": ["d1:0"], "doc_id": "d1", "candidates": ["d1:0", "d1:1"]}

``answers`` (for teacher scoring) and ``gold`` (for evaluation) may be empty lists; a query's pool is
``candidates`` if given, else the passages sharing its ``doc_id``, else the whole corpus.
"""
from __future__ import annotations

import gzip
import io
import json
import os
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional

FLOAT_SELECTED = "FLOAT SELECTED"


@dataclass
class Passage:
    id: str
    doc_id: str
    text: str
    section: str = ""


@dataclass
class Query:
    id: str
    question: str
    answers: List[str]
    gold: List[str]
    doc_id: Optional[str] = None
    candidates: Optional[List[str]] = None


@dataclass
class RetrievalDataset:
    passages: Dict[str, Passage]
    queries: List[Query]
    name: str = ""
    _by_doc: Dict[str, List[str]] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self._by_doc = {}
        for pid, p in self.passages.items():
            self._by_doc.setdefault(p.doc_id, []).append(pid)

    def __len__(self) -> int:
        return len(self.queries)

    def pool(self, query: Query) -> List[str]:
        """The query's candidate passage ids (explicit list, its document's passages, or the corpus)."""
        if query.candidates is not None:
            return list(query.candidates)
        if query.doc_id is not None:
            return list(self._by_doc.get(query.doc_id, []))
        return list(self.passages)

    def doc_passages(self, doc_id: str) -> List[str]:
        return list(self._by_doc.get(doc_id, []))

    def subset(self, n: Optional[int] = None, *, with_gold: bool = False, with_answers: bool = False) -> "RetrievalDataset":
        """The first ``n`` queries (after filtering) over only the passages their pools use."""
        qs = [q for q in self.queries if (not with_gold or q.gold) and (not with_answers or q.answers)]
        qs = qs[:n] if n is not None else qs
        keep = {pid for q in qs for pid in self.pool(q)}
        return RetrievalDataset({k: v for k, v in self.passages.items() if k in keep}, qs, self.name)


def open_text(path: str, what: str = "data file"):
    """Open a ``.json``/``.jsonl`` file for reading as text, gunzipping ``*.gz`` and any gzip content
    (``uae score`` writes ``OUT.jsonl.gz.partial`` as plain text and gzips it only when complete)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    if gz or path.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, "r", encoding="utf-8")


def qasper_answer_text(ans: dict) -> Optional[str]:
    """One annotator's answer as text (None for unanswerable)."""
    if ans.get("unanswerable"):
        return None
    if (ans.get("free_form_answer") or "").strip():
        return ans["free_form_answer"].strip()
    spans = [s.strip() for s in ans.get("extractive_spans") or [] if s and s.strip()]
    if spans:
        return ", ".join(spans)
    if ans.get("yes_no") is not None:
        return "Yes" if ans["yes_no"] else "No"
    return None


def _qasper_from_dict(raw: dict, name: str) -> RetrievalDataset:
    passages: Dict[str, Passage] = {}
    queries: List[Query] = []
    for paper_id, paper in raw.items():
        if not isinstance(paper, dict) or "full_text" not in paper:
            raise ValueError(f"{name}: paper {paper_id!r} lacks 'full_text': not the QASPER schema")
        text_to_ids: Dict[str, List[str]] = {}
        i = 0
        for sec in paper.get("full_text") or []:
            for para in sec.get("paragraphs") or []:
                if not para or not para.strip():
                    continue
                pid = f"{paper_id}:{i}"
                passages[pid] = Passage(pid, paper_id, para, sec.get("section_name") or "")
                text_to_ids.setdefault(para.strip(), []).append(pid)
                i += 1
        for qa in paper.get("qas") or []:
            answers, gold = [], []
            for a in qa.get("answers") or []:
                a = a.get("answer", a)
                text = qasper_answer_text(a)
                if text is not None and text not in answers:
                    answers.append(text)
                for ev in a.get("evidence") or []:
                    if not ev or ev.startswith(FLOAT_SELECTED):
                        continue
                    for pid in text_to_ids.get(ev.strip(), []):
                        if pid not in gold:
                            gold.append(pid)
            queries.append(Query(qa["question_id"], qa["question"], answers, gold, doc_id=paper_id))
    return RetrievalDataset(passages, queries, name)


def _jsonl_records(path: str) -> Iterator[dict]:
    with open_text(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None


def _from_jsonl(path: str) -> RetrievalDataset:
    passages: Dict[str, Passage] = {}
    queries: List[Query] = []
    for rec in _jsonl_records(path):
        kind = rec.get("type")
        try:
            if kind == "passage":
                passages[str(rec["id"])] = Passage(str(rec["id"]), str(rec.get("doc_id", "")), rec["text"], rec.get("section", ""))
            elif kind == "query":
                queries.append(Query(str(rec["id"]), rec["question"], list(rec.get("answers") or []), [str(g) for g in rec.get("gold") or []],
                                     rec.get("doc_id"), rec.get("candidates")))
            else:
                raise ValueError(f"{path}: record type must be 'passage' or 'query', got {kind!r}")
        except KeyError as e:
            raise ValueError(f"{path}: {kind} record lacks the field {e.args[0]!r}") from None
    ds = RetrievalDataset(passages, queries, os.path.basename(path))
    for q in queries:
        missing = [pid for pid in q.gold + list(q.candidates or []) if pid not in passages]
        if missing:
            raise ValueError(f"{path}: query {q.id!r} names unknown passage id(s) {missing[:3]}")
    return ds


def load_dataset(path: str) -> RetrievalDataset:
    """Load QASPER JSON (``.json``/``.json.gz``) or the JSONL schema (``.jsonl``/``.jsonl.gz``)."""
    path = os.fspath(path)
    base = path[:-3] if path.endswith(".gz") else path
    if base.endswith(".jsonl"):
        ds = _from_jsonl(path)
    else:
        with open_text(path) as f:
            try:
                raw = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
                raise ValueError(f"{path}: cannot read as QASPER JSON ({e})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: QASPER JSON must map paper ids to papers")
        ds = _qasper_from_dict(raw, os.path.basename(path))
    if not ds.queries:
        raise ValueError(f"{path}: no queries found")
    if not ds.passages:
        raise ValueError(f"{path}: no passages found")
    return ds


# The official QASPER v0.3 file names, and the slices of them shipped for the quickstart
# (scripts/make_qasper_slices.py; data/README.md says what they hold and their licence).
QASPER_FILE = "qasper-{split}-v0.3.json.gz"
QUICKSTART_SLICE = "qasper-{split}-v0.3-quickstart.json.gz"
DATA_DIR_ENV = "UAE_DATA_DIR"


def _shipped_dirs() -> List[str]:
    """Where shipped data files live: ``uae_fast/_data`` of an installed package, ``data/`` of a checkout."""
    pkg = os.path.dirname(os.path.abspath(__file__))
    return [os.path.join(pkg, "_data"), os.path.join(os.path.dirname(pkg), "data")]


def shipped_file(name: str, *, instead: str = "") -> str:
    """Path of a data file shipped with the package (a QASPER slice, a utilities table).

    Raises ``FileNotFoundError`` naming the places searched and, if given, what to pass ``instead``.
    """
    dirs = _shipped_dirs()
    for d in dirs:
        p = os.path.join(d, name)
        if os.path.exists(p):
            return p
    hint = f"; pass {instead}" if instead else ""
    raise FileNotFoundError(f"shipped data file {name} not found in {' or '.join(dirs)}{hint}")


def _qasper_in(root: str, split: str) -> Optional[str]:
    """The official file of ``split`` in ``root``: gzipped (as shipped here) or as the release tarball unpacks."""
    name = QASPER_FILE.format(split=split)
    for p in (os.path.join(root, name), os.path.join(root, name[: -len(".gz")])):
        if os.path.exists(p):
            return os.path.abspath(p)
    return None


def default_qasper_path(split: str, *, flag: str = "--data") -> str:
    """The full QASPER ``split``: in ``$UAE_DATA_DIR``, else ``../shared/data/qasper`` or ``data/qasper`` of the checkout."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    name = QASPER_FILE.format(split=split)
    roots = [os.environ.get(DATA_DIR_ENV), os.path.join(here, "..", "shared", "data", "qasper"), os.path.join(here, "data", "qasper")]
    for root in roots:
        p = _qasper_in(root, split) if root else None
        if p:
            return p
    raise FileNotFoundError(
        f"QASPER {split} split not found: pass {flag} FILE, or set {DATA_DIR_ENV} to a folder holding {name[:-3]}(.gz) "
        f"(the official QASPER v0.3 release; README 'Data')")


def quickstart_qasper_path(split: str) -> str:
    """The quickstart's QASPER ``split``: the full one in ``$UAE_DATA_DIR`` if set, else the shipped slice."""
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        p = _qasper_in(env, split)
        if not p:
            raise FileNotFoundError(f"{DATA_DIR_ENV}={env} holds no {QASPER_FILE.format(split=split)[:-3]}(.gz); "
                                    f"pass --{split}-data FILE, or unset {DATA_DIR_ENV} to use the shipped slice")
        return p
    return shipped_file(QUICKSTART_SLICE.format(split=split), instead=f"--{split}-data FILE or set {DATA_DIR_ENV}")
