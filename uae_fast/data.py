"""Datasets: QASPER (official JSON schema), a documented JSONL schema for your own data, BEIR folders and SQuAD JSON.

All load into a :class:`RetrievalDataset`: passages with stable ids, queries with their gold answers
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

BEIR folder (``corpus.jsonl``, ``queries.jsonl``, ``qrels/{test,dev,train}.tsv``, ``.gz`` allowed for the
JSONL files): a passage per corpus record (text = ``title`` + " " + ``text``, as BEIR's own encoders join
them), the queries that the chosen split's qrels judge, gold = the documents with a qrels score > 0 (graded
relevance is binarised); no answers; every query's pool is the whole corpus. The split is ``test`` unless
``split=`` says otherwise or the path names a qrels file (``DIR/qrels/dev.tsv``).

SQuAD JSON (v1.1/v2.0 schema, ``{"data": [{"title", "paragraphs": [{"context", "qas"}]}]}``): each context
is split on newlines (single or blank lines) into passages, id ``"{title}:{i}"`` numbered through the
article (whitespace in titles becomes ``_``); a question's document is its article (its pool: the article's
passages), its gold the passages its answer spans overlap (``answer_start`` offsets into the context), its
answers the ``answers`` texts; v2.0's unanswerable questions have neither.
"""
from __future__ import annotations

import gzip
import io
import json
import os
import re
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


# ------------------------------------------------------------------------------------- BEIR
BEIR_SPLITS = ("test", "dev", "train")


def _beir_file(folder: str, name: str) -> str:
    for p in (os.path.join(folder, name), os.path.join(folder, name + ".gz")):
        if os.path.exists(p):
            return p
    raise FileNotFoundError(f"BEIR folder {folder} has no {name}")


def _beir_records(path: str, what: str) -> Iterator[tuple]:
    for n, rec in enumerate(_jsonl_records(path), 1):
        if not isinstance(rec, dict) or "_id" not in rec or not isinstance(rec.get("text"), str):
            raise ValueError(f"{path}: {what} record {n} needs '_id' and a string 'text'")
        yield n, str(rec["_id"]), rec


def _beir_qrels(path: str) -> Dict[str, Dict[str, int]]:
    qrels: Dict[str, Dict[str, int]] = {}
    with open_text(path, "BEIR qrels") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            fields = line.rstrip("\r\n").split("\t")
            if len(fields) != 3:
                raise ValueError(f"{path}:{n}: expected 3 tab-separated fields 'query-id corpus-id score', got {len(fields)}")
            try:
                score = int(fields[2])
            except ValueError:
                if n == 1:  # the header row "query-id\tcorpus-id\tscore"
                    continue
                raise ValueError(f"{path}:{n}: score {fields[2]!r} is not an integer") from None
            qrels.setdefault(fields[0], {})[fields[1]] = score
    return qrels


def _from_beir(path: str, split: Optional[str]) -> RetrievalDataset:
    if os.path.isdir(path):
        folder, split = path, split or "test"
        qrels_path = os.path.join(folder, "qrels", f"{split}.tsv")
        if not os.path.exists(qrels_path):
            have = sorted(f[:-4] for f in os.listdir(os.path.join(folder, "qrels")) if f.endswith(".tsv")) \
                if os.path.isdir(os.path.join(folder, "qrels")) else []
            raise FileNotFoundError(f"BEIR folder {folder} has no qrels/{split}.tsv"
                                    + (f"; pass DIR/qrels/SPLIT.tsv for one of: {', '.join(have)}" if have else ""))
    else:
        qrels_path, folder = path, os.path.dirname(os.path.dirname(os.path.abspath(path)))
        named = os.path.basename(path)[: -len(".tsv")]
        if split is not None and split != named:
            raise ValueError(f"split={split!r} contradicts the qrels file {path}")
    passages: Dict[str, Passage] = {}
    corpus, queries_path = _beir_file(folder, "corpus.jsonl"), _beir_file(folder, "queries.jsonl")
    for n, did, rec in _beir_records(corpus, "corpus"):
        title = str(rec.get("title") or "").strip()
        passages[did] = Passage(did, did, f"{title} {rec['text']}" if title else rec["text"], title)
    qrels = _beir_qrels(qrels_path)
    queries: List[Query] = []
    for n, qid, rec in _beir_records(queries_path, "query"):
        if qid in qrels:
            gold = [d for d, s in qrels[qid].items() if s > 0]
            queries.append(Query(qid, rec["text"], [], gold))
    have = {q.id for q in queries}
    for qid, docs in qrels.items():
        if qid not in have:
            raise ValueError(f"{qrels_path}: query {qid!r} is not in queries.jsonl")
        missing = [d for d in docs if d not in passages]
        if missing:
            raise ValueError(f"{qrels_path}: query {qid!r} judges document(s) {missing[:3]} missing from {os.path.basename(corpus)}")
    return RetrievalDataset(passages, queries, f"{os.path.basename(os.path.normpath(folder))}/{os.path.basename(qrels_path)[:-4]}")


def _is_beir_qrels(path: str) -> bool:
    return path.endswith(".tsv") and os.path.basename(os.path.dirname(os.path.abspath(path))) == "qrels"


# ------------------------------------------------------------------------------------- SQuAD
def _squad_from_dict(raw: dict, name: str) -> RetrievalDataset:
    passages: Dict[str, Passage] = {}
    queries: List[Query] = []
    keys = set()
    for n, art in enumerate(raw["data"]):
        if not isinstance(art, dict) or not isinstance(art.get("paragraphs"), list):
            raise ValueError(f"{name}: data[{n}] lacks a 'paragraphs' list: not the SQuAD schema")
        title = str(art.get("title") or "").strip()
        key = re.sub(r"\s+", "_", title) or f"article{n}"
        if key in keys:  # ids must stay unique when two articles share a title
            key = f"{key}#{n}"
        keys.add(key)
        i = 0
        for m, para in enumerate(art["paragraphs"]):
            context = para.get("context") if isinstance(para, dict) else None
            if not isinstance(context, str):
                raise ValueError(f"{name}: data[{n}].paragraphs[{m}] lacks a string 'context'")
            spans = []  # (start, end, passage id) of each non-empty line of the context
            for line in re.finditer(r"[^\n]+", context):
                if line.group().strip():
                    pid = f"{key}:{i}"
                    passages[pid] = Passage(pid, key, line.group().strip(), title)
                    spans.append((line.start(), line.end(), pid))
                    i += 1
            for qa in para.get("qas") or []:
                if not isinstance(qa, dict) or "id" not in qa or not isinstance(qa.get("question"), str):
                    raise ValueError(f"{name}: a question of data[{n}].paragraphs[{m}] lacks 'id' or 'question'")
                answers, gold = [], []
                for a in qa.get("answers") or []:
                    text, start = (a.get("text"), a.get("answer_start")) if isinstance(a, dict) else (None, None)
                    if not isinstance(text, str) or not isinstance(start, int) or isinstance(start, bool):
                        raise ValueError(f"{name}: question {qa['id']!r}: an answer lacks 'text' or an integer 'answer_start'")
                    if not 0 <= start < len(context):
                        raise ValueError(f"{name}: question {qa['id']!r}: answer_start {start} is outside its context "
                                         f"({len(context)} characters)")
                    end = start + max(1, len(text))
                    gold += [pid for s, e, pid in spans if s < end and start < e and pid not in gold]
                    if text.strip() and text.strip() not in answers:
                        answers.append(text.strip())
                queries.append(Query(str(qa["id"]), qa["question"], answers, gold, doc_id=key))
    return RetrievalDataset(passages, queries, name)


def load_dataset(path: str, *, split: Optional[str] = None) -> RetrievalDataset:
    """Load QASPER or SQuAD JSON (``.json``/``.json.gz``), the JSONL schema (``.jsonl``/``.jsonl.gz``) or a
    BEIR folder (``split``: its qrels file, default ``test``; ``DIR/qrels/SPLIT.tsv`` names one too)."""
    path = os.fspath(path)
    base = path[:-3] if path.endswith(".gz") else path
    if os.path.isdir(path) or _is_beir_qrels(path):
        ds = _from_beir(path, split)
    elif split is not None:
        raise ValueError(f"split={split!r} applies to BEIR folders only, not {path}")
    elif base.endswith(".jsonl"):
        ds = _from_jsonl(path)
    else:
        with open_text(path) as f:
            try:
                raw = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
                raise ValueError(f"{path}: cannot read as QASPER or SQuAD JSON ({e})") from None
        if isinstance(raw, dict) and isinstance(raw.get("data"), list):
            ds = _squad_from_dict(raw, os.path.basename(path))
        elif isinstance(raw, dict):
            ds = _qasper_from_dict(raw, os.path.basename(path))
        else:
            raise ValueError(f"{path}: JSON must be QASPER (paper ids -> papers) or SQuAD ({{\"data\": [articles]}})")
    if not ds.queries:
        raise ValueError(f"{path}: no queries found")
    if not ds.passages:
        raise ValueError(f"{path}: no passages found")
    return ds


def default_qasper_path(split: str) -> str:
    """Where the bundled QASPER copy lives (``$UAE_DATA_DIR`` or ``../shared/data/qasper`` of the checkout)."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    roots = [os.environ.get("UAE_DATA_DIR"), os.path.join(here, "..", "shared", "data", "qasper"), os.path.join(here, "data", "qasper")]
    for root in roots:
        if root:
            p = os.path.join(root, f"qasper-{split}-v0.3.json.gz")
            if os.path.exists(p):
                return os.path.abspath(p)
    raise FileNotFoundError(f"QASPER {split} split not found; set UAE_DATA_DIR or pass --data")
