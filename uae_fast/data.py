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
``candidates`` if given, else the passages sharing its ``doc_id``, else the whole corpus. Types are
checked: ids are strings (integers are read as their decimal string), ``text``/``question`` strings,
``answers`` a list of non-empty strings, ``gold``/``candidates`` lists of passage ids; passage ids and
query ids must be unique. Any violation is a ValueError naming the file and line.

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

import contextlib
import gzip
import hashlib
import io
import json
import math
import os
import re
import sys
import threading
import zlib
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

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

    def with_answers(self) -> str:
        """The question followed by its answers: the lexical query of answer-aware distant supervision
        (``answer:M`` candidates, ``--positive bm25-answer``)."""
        return " ".join([self.question] + list(self.answers))


@dataclass
class RetrievalDataset:
    passages: Dict[str, Passage]
    queries: List[Query]
    name: str = ""
    # QASPER: evidence strings that match no paragraph (after stripping), so gave no gold: "headings" (a
    # section name, the usual case), "other" (e.g. whitespace inside the text differs), and
    # "questions_without_gold" (had text evidence, none matched). BEIR: "qrels_missing_documents" (judgments of
    # documents the corpus lacks, dropped) and "questions_without_gold". Empty for other formats.
    unmatched_evidence: Dict[str, int] = field(default_factory=dict)
    # BEIR: a query whose id is also a corpus document's (ArguAna, Quora hold the queries in the corpus) is
    # evaluated without that document, as BEIR's EvaluateRetrieval(ignore_identical_ids=True) does
    ignore_identical_ids: bool = False
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
        return RetrievalDataset({k: v for k, v in self.passages.items() if k in keep}, qs, self.name,
                                ignore_identical_ids=self.ignore_identical_ids)


# A gzip member expands at most ~1000:1, so a small crafted file can stand for terabytes of text (a "gzip
# bomb"); JSON files are parsed whole. Real data compresses 5-30x: past 1 GiB, more than 100x is refused.
GUNZIP_FLOOR_BYTES = 1 << 30
GUNZIP_MAX_RATIO = 100


class _CappedGunzip(io.RawIOBase):
    """A gzip file's decompressed bytes, refused (ValueError) once they pass ``limit``."""

    def __init__(self, path: str, limit: int, what: str):
        super().__init__()
        self._gz, self._path, self._limit, self._what, self._n = gzip.open(path, "rb"), path, limit, what, 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self._gz.readinto(b)
        self._n += n
        if self._n > self._limit:
            raise ValueError(f"{self._path}: its gzip data expands past {self._limit:,} bytes "
                             f"({os.path.getsize(self._path):,} compressed); not reading this {self._what} further "
                             f"(a decompression bomb?)")
        return n

    def close(self) -> None:
        if not self.closed:
            self._gz.close()
        super().close()


def open_text(path: str, what: str = "data file"):
    """Open a ``.json``/``.jsonl`` file for reading as text, gunzipping ``*.gz`` and any gzip content
    (``uae score`` writes ``OUT.jsonl.gz.partial`` as plain text and gzips it only when complete).

    Errors that show at open time are one clear line; errors while reading (a truncated ``.gz``) surface
    in :func:`read_lines` / :func:`read_text`, which callers use to get them as ValueError too."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    if os.path.isdir(path):
        raise ValueError(f"cannot read {what} {path}: it is a directory, not a file")
    if not os.path.isfile(path):
        # A pipe or FIFO (`--data <(zcat x)`, mkfifo) cannot be read twice: the format sniffing below, a loader's
        # second pass or the data fingerprint would see it empty, or wait forever for a writer.
        raise ValueError(f"cannot read {what} {path}: not a regular file (a pipe or FIFO?); write it to a file first")
    with open(path, "rb") as f:
        head = f.read(8)
    gz = head[:2] == b"\x1f\x8b"
    if head == b"UAETOPK1":  # the container of every uae index file (dense.uae, lexical.uae)
        raise ValueError(f"{path} is a uae index file, not a {what}")
    # utf-8-sig: a byte-order mark (as some Windows tools write) is dropped, not read as part of the first id
    if gz:
        raw = _CappedGunzip(path, max(GUNZIP_FLOOR_BYTES, GUNZIP_MAX_RATIO * os.path.getsize(path)), what)
        return io.TextIOWrapper(io.BufferedReader(raw), encoding="utf-8-sig")
    if path.endswith(".gz"):
        raise ValueError(f"cannot read {what} {path}: it is named .gz but is not gzip-compressed")
    return open(path, "r", encoding="utf-8-sig")


# Reading a truncated or corrupt file raises EOFError (gzip stream cut short), OSError (BadGzipFile, CRC),
# zlib.error (a damaged deflate block: not an OSError) or UnicodeDecodeError; callers want one line that
# names the file.
READ_ERRORS = (OSError, EOFError, zlib.error, UnicodeDecodeError)


def _unreadable(path: str, what: str, e: BaseException, line: Optional[int] = None) -> ValueError:
    where = f"{path}:{line}" if line else path
    kind = "truncated or corrupt gzip data" if isinstance(e, (EOFError, gzip.BadGzipFile, zlib.error)) else type(e).__name__
    return ValueError(f"{where}: cannot read {what} ({kind}: {e})")


def read_lines(path: str, what: str = "data file") -> Iterator[Tuple[int, str]]:
    """``(line number, line)`` of a text file (gzipped or not); read errors become one ValueError naming the file."""
    with open_text(path, what) as f:
        n = 0
        while True:
            try:
                line = f.readline()
            except READ_ERRORS as e:
                raise _unreadable(path, what, e, n + 1) from None
            if not line:
                return
            n += 1
            yield n, line


def data_fingerprint(path: str, split: Optional[str] = None) -> str:
    """sha1 (first 16 hex digits) of the bytes :func:`load_dataset` ``(path, split)`` reads: the file, or a BEIR
    folder's corpus, queries and ``split`` (default ``test``) qrels, with their names. A scoring table records it so
    --resume / --reuse / merges refuse an edited file. Other files in the folder (a table written there, an
    index) do not count; a re-gzipped copy of the same text does (the compressed bytes are hashed)."""
    path = os.fspath(path)
    if os.path.isdir(path) or _is_beir_qrels(path):
        folder = path if os.path.isdir(path) else os.path.dirname(os.path.dirname(os.path.abspath(path)))
        qrels = os.path.join(path, "qrels", f"{split or 'test'}.tsv") if os.path.isdir(path) else path
        files = []
        for name in ("corpus.jsonl", "queries.jsonl"):  # the copy the loader reads (plain before .gz)
            try:
                files.append(_beir_file(folder, name))
            except FileNotFoundError:
                pass
        files += [qrels] if os.path.isfile(qrels) else []
    else:
        folder, files = None, [path]
    h = hashlib.sha1()
    try:
        for f in files:
            if folder is not None:
                h.update(os.path.relpath(f, folder).encode() + b"\0")
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    except OSError as e:
        raise _unreadable(path, "data file", e) from None
    return h.hexdigest()[:16]


def read_text(path: str, what: str = "data file") -> str:
    """The whole text of a file (gzipped or not); read errors become one ValueError naming the file."""
    with open_text(path, what) as f:
        try:
            return f.read()
        except READ_ERRORS as e:
            raise _unreadable(path, what, e) from None


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w"):
    """Open a temporary sibling of ``path`` for writing (``mode`` "w" text or "wb" bytes), fsync it and rename it
    onto ``path`` when the block ends: a kill or an error never leaves half a file at ``path``, and on an error
    the temporary file is removed. The temporary name is unique per process and thread; those left by killed
    processes (no longer running) are deleted first, so repeated kills do not pile up large leftovers."""
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):  # name the file asked for, not its temporary sibling
        raise FileNotFoundError(f"cannot write {path}: its folder {parent} does not exist")
    _remove_orphans(path)
    tmp = f"{path}.tmp{os.getpid()}.{threading.get_ident()}"
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


_ORPHAN_AGE_S = 600  # a temporary file untouched this long whose process is gone here is a killed writer's


def _remove_orphans(path: str) -> None:
    """Delete ``path``'s temporary files left by killed writers: their process is not running on this machine and
    the file has not changed for 10 minutes (a writer on another host of shared storage looks dead here, but its
    file is still growing)."""
    import glob
    import time

    for f in glob.glob(glob.escape(path) + ".tmp*"):
        m = re.fullmatch(re.escape(path) + r"\.tmp(\d+)\.\d+", f)
        if m is None or int(m.group(1)) == os.getpid():
            continue
        try:
            if time.time() - os.path.getmtime(f) < _ORPHAN_AGE_S:
                continue
        except OSError:
            continue
        try:
            os.kill(int(m.group(1)), 0)  # that process still runs (maybe writing): leave its file alone
        except ProcessLookupError:
            try:
                os.remove(f)
            except OSError:
                pass
        except (PermissionError, OverflowError):
            pass


def write_text_atomic(path: str, text: str) -> None:
    """Replace ``path`` by ``text`` in one rename, fsync'd first (a kill never leaves a torn file)."""
    with atomic_write(path) as f:
        f.write(text)


def write_json(obj, path: str) -> None:
    """``obj`` as JSON at ``path``, gzipped when it ends in ``.gz`` with no name or timestamp in the header, so
    the same object always gives the same bytes; written through :func:`atomic_write`."""
    data = json.dumps(obj, ensure_ascii=False).encode("utf-8")
    with atomic_write(path, "wb") as f:
        if path.endswith(".gz"):
            with gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0, compresslevel=9) as gz:
                gz.write(data)
        else:
            f.write(data)


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


# ------------------------------------------------------------------------------------- type checks
# Every field is checked where it is read, so a wrong type is one error naming the file, the record
# and the field, never a silent misreading (a string answer iterated as characters) or an AttributeError.
_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
               float: "a number", type(None): "null"}


def _jtype(v) -> str:
    return _JSON_TYPES.get(type(v), type(v).__name__)


def _expect(v, kind, where: str, what: str, *, optional: bool = False):
    """``v`` if it has JSON type ``kind`` (dict, list or str); ``optional`` lets null through."""
    if v is None and optional:
        return v
    if not isinstance(v, kind):
        raise ValueError(f"{where}: {what} must be {_JSON_TYPES[kind]}, got {_jtype(v)}")
    return v


def _id(v, where: str, what: str, *, blank_ok: bool = False) -> str:
    """An id: a string, or an integer (kept as its decimal string); not blank unless ``blank_ok``."""
    if isinstance(v, bool) or not isinstance(v, (str, int)):
        raise ValueError(f"{where}: {what} must be a string id, got {_jtype(v)}")
    if not blank_ok and not str(v).strip():  # a blank id cannot be written to a TREC run or told apart in messages
        raise ValueError(f"{where}: {what} is blank")
    return str(v)


def _strings(v, where: str, what: str) -> List[str]:
    """A JSON array of strings (null = empty)."""
    items = _expect(v, list, where, what, optional=True) or []
    for i, x in enumerate(items):
        if not isinstance(x, str):
            raise ValueError(f"{where}: {what}[{i}] must be a string, got {_jtype(x)}")
    return list(items)


def _ids(v, where: str, what: str) -> List[str]:
    items = _expect(v, list, where, what, optional=True) or []
    return [_id(x, where, f"{what}[{i}]") for i, x in enumerate(items)]


# ------------------------------------------------------------------------------------- QASPER
def _qasper_from_dict(raw: dict, name: str, path: Optional[str] = None) -> RetrievalDataset:
    path = path or name
    passages: Dict[str, Passage] = {}
    queries: List[Query] = []
    seen_q: Dict[str, str] = {}
    unmatched = {"headings": 0, "other": 0, "questions_without_gold": 0}
    fmt = raw.get("format")
    if isinstance(fmt, str) and fmt.startswith("uae-"):  # a file uae wrote (an index manifest, say), given as data
        raise ValueError(f"{path} is a uae file of format {fmt!r} (an index manifest or a config), not a data file")
    for paper_id, paper in raw.items():
        where = f"{path}: paper {paper_id!r}"
        if not isinstance(paper, dict) or "full_text" not in paper:
            raise ValueError(f"{where} lacks 'full_text': not the QASPER schema")
        text_to_ids: Dict[str, List[str]] = {}
        headings = set()
        i = 0
        for s, sec in enumerate(_expect(paper["full_text"], list, where, "full_text", optional=True) or []):
            _expect(sec, dict, where, f"full_text[{s}]")
            section = _expect(sec.get("section_name"), str, where, f"full_text[{s}].section_name", optional=True) or ""
            headings.add(section.strip())
            for para in _strings(sec.get("paragraphs"), where, f"full_text[{s}].paragraphs"):
                if not para.strip():
                    continue
                pid = f"{paper_id}:{i}"
                passages[pid] = Passage(pid, paper_id, para, section)
                text_to_ids.setdefault(para.strip(), []).append(pid)
                i += 1
        for j, qa in enumerate(_expect(paper.get("qas"), list, where, "qas", optional=True) or []):
            _expect(qa, dict, where, f"qas[{j}]")
            if "question_id" not in qa or "question" not in qa:
                missing = [k for k in ("question_id", "question") if k not in qa]
                raise ValueError(f"{where}: qas[{j}] lacks {' and '.join(map(repr, missing))}")
            qid = _id(qa["question_id"], where, f"qas[{j}].question_id")
            qwhere = f"{where} question {qid!r}"
            question = _expect(qa["question"], str, qwhere, "question")
            if not question.strip():  # BM25 would score every passage 0 and pool order would count as hits
                raise ValueError(f"{qwhere}: question is blank")
            if qid in seen_q:
                raise ValueError(f"{qwhere}: duplicate question_id (also in paper {seen_q[qid]!r})")
            seen_q[qid] = paper_id
            answers, gold, n_text_evidence = [], [], 0
            for k, a in enumerate(_expect(qa.get("answers"), list, qwhere, "answers", optional=True) or []):
                a = _expect(a, dict, qwhere, f"answers[{k}]")
                a = _expect(a.get("answer", a), dict, qwhere, f"answers[{k}].answer")
                field = f"answers[{k}].answer"
                _expect(a.get("free_form_answer"), str, qwhere, f"{field}.free_form_answer", optional=True)
                _strings(a.get("extractive_spans"), qwhere, f"{field}.extractive_spans")
                _expect(a.get("yes_no"), bool, qwhere, f"{field}.yes_no", optional=True)  # "no" would read as Yes
                unanswerable = _expect(a.get("unanswerable"), bool, qwhere, f"{field}.unanswerable", optional=True)
                text = qasper_answer_text(a)
                if text is not None and text not in answers:
                    answers.append(text)
                if unanswerable:  # as the official reader: an unanswerable annotation's evidence is no gold
                    continue
                for ev in _strings(a.get("evidence"), qwhere, f"{field}.evidence"):
                    if not ev or ev.startswith(FLOAT_SELECTED):
                        continue
                    n_text_evidence += 1
                    if ev.strip() not in text_to_ids:
                        unmatched["headings" if ev.strip() in headings else "other"] += 1
                    for pid in text_to_ids.get(ev.strip(), []):
                        if pid not in gold:
                            gold.append(pid)
            unmatched["questions_without_gold"] += bool(n_text_evidence and not gold)
            queries.append(Query(qid, question, answers, gold, doc_id=paper_id))
    return RetrievalDataset(passages, queries, name, unmatched_evidence=unmatched)


# ------------------------------------------------------------------------------------- JSONL
class _DuplicateKey(ValueError):
    pass


def _no_duplicate_keys(pairs):
    """json's object hook: a repeated key (a paper id twice) would silently keep only the last record."""
    d = dict(pairs)
    if len(d) != len(pairs):
        seen = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _DuplicateKey(f"the key {dup!r} appears twice in one object (only the last would be kept)")
    return d


def jsonl_records(path: str, what: str = "data file") -> Iterator[Tuple[int, dict]]:
    """``(line number, record)`` of a JSONL file; blank lines skipped, anything but a JSON object per line is an error."""
    for n, line in read_lines(path, what):
        if line.strip():
            try:
                rec = json.loads(line, object_pairs_hook=_no_duplicate_keys)
            except _DuplicateKey as e:
                raise ValueError(f"{path}:{n}: {e}") from None
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            except RecursionError:
                raise ValueError(f"{path}:{n}: not valid JSON (nested too deeply)") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{path}:{n}: each line must be a JSON object, got {_jtype(rec)}")
            yield n, rec


def _from_jsonl(path: str) -> RetrievalDataset:
    passages: Dict[str, Passage] = {}
    queries: List[Query] = []
    p_line: Dict[str, int] = {}
    q_line: Dict[str, int] = {}
    for n, rec in jsonl_records(path):
        where = f"{path}:{n}"
        kind = rec.get("type")
        if kind not in ("passage", "query"):
            raise ValueError(f"{where}: record type must be 'passage' or 'query', got {kind!r}")
        missing = [k for k in (("id", "text") if kind == "passage" else ("id", "question")) if k not in rec]
        if missing:
            raise ValueError(f"{where}: {kind} record lacks the field {missing[0]!r}")
        rid = _id(rec["id"], where, "id")
        seen = p_line if kind == "passage" else q_line
        if rid in seen:
            raise ValueError(f"{where}: duplicate {kind} id {rid!r} (first on line {seen[rid]})")
        seen[rid] = n
        doc_id = rec.get("doc_id")
        doc_id = None if doc_id is None else _id(doc_id, where, "doc_id", blank_ok=True)  # "": the passages without one
        if kind == "passage":
            text = _expect(rec["text"], str, where, "text")
            if not text.strip():
                raise ValueError(f"{where}: passage text is blank")
            section = _expect(rec.get("section"), str, where, "section", optional=True) or ""
            passages[rid] = Passage(rid, doc_id if doc_id is not None else "", text, section)
        else:
            question = _expect(rec["question"], str, where, "question")
            if not question.strip():
                raise ValueError(f"{where}: question is blank")
            answers = _strings(rec.get("answers"), where, "answers")
            empty = [i for i, a in enumerate(answers) if not a.strip()]
            if empty:
                raise ValueError(f"{where}: answers[{empty[0]}] is empty (a gold answer needs text)")
            answers = list(dict.fromkeys(answers))  # as the QASPER and SQuAD loaders: a repeat is one answer
            gold = list(dict.fromkeys(_ids(rec.get("gold"), where, "gold")))  # (a repeat would be sampled twice as often)
            cands = None if rec.get("candidates") is None else _ids(rec["candidates"], where, "candidates")
            if cands is not None and len(set(cands)) != len(cands):
                dup = next(c for i, c in enumerate(cands) if c in cands[:i])
                raise ValueError(f"{where}: candidates lists {dup!r} more than once")
            queries.append(Query(rid, question, answers, gold, doc_id, cands))
    ds = RetrievalDataset(passages, queries, os.path.basename(path))
    for q in queries:
        missing = [pid for pid in q.gold + list(q.candidates or []) if pid not in passages]
        if missing:
            raise ValueError(f"{path}:{q_line[q.id]}: query {q.id!r} names unknown passage id(s) {missing[:3]}")
        if (q.candidates is not None or q.doc_id is not None) and not ds.pool(q):
            where = "its candidates list is empty" if q.candidates is not None else f"no passage has doc_id {q.doc_id!r}"
            raise ValueError(f"{path}:{q_line[q.id]}: query {q.id!r} has no candidate passages ({where})")
        pool = set(ds.pool(q)) if q.gold and (q.candidates is not None or q.doc_id is not None) else None
        outside = [pid for pid in q.gold if pool is not None and pid not in pool]
        if outside:  # it could never be retrieved: every metric would count it as a miss
            where = "its candidates" if q.candidates is not None else f"the passages of doc_id {q.doc_id!r}"
            raise ValueError(f"{path}:{q_line[q.id]}: query {q.id!r} has gold passage(s) {outside[:3]} outside {where}")
    return ds


# ------------------------------------------------------------------------------------- BEIR
BEIR_SPLITS = ("test", "dev", "train")


def _beir_file(folder: str, name: str) -> str:
    for p in (os.path.join(folder, name), os.path.join(folder, name + ".gz")):
        if os.path.exists(p):
            return p
    raise FileNotFoundError(f"BEIR folder {folder} has no {name}")


def _beir_records(path: str, what: str) -> Iterator[tuple]:
    for n, rec in jsonl_records(path, f"BEIR {what} file"):
        if "_id" not in rec or not isinstance(rec.get("text"), str):
            raise ValueError(f"{path}: {what} record {n} needs '_id' and a string 'text'")
        yield n, _id(rec["_id"], f"{path}: {what} record {n}", "_id"), rec


def _beir_qrels(path: str) -> Dict[str, Dict[str, float]]:
    qrels: Dict[str, Dict[str, float]] = {}
    for n, line in read_lines(path, "BEIR qrels"):
        if not line.strip():
            continue
        fields = line.rstrip("\r\n").split("\t")
        if len(fields) != 3:
            raise ValueError(f"{path}:{n}: expected 3 tab-separated fields 'query-id corpus-id score', got {len(fields)}")
        if n == 1 and fields[2].strip().lower() in ("score", "relevance", "rel", "label", "grade"):
            continue  # the header row "query-id\tcorpus-id\tscore" (a malformed first data row is not skipped)
        try:
            score = float(fields[2])  # BEIR writes ints; some exporters write 1.0
        except ValueError:
            raise ValueError(f"{path}:{n}: score {fields[2]!r} is not a number") from None
        if not math.isfinite(score):
            raise ValueError(f"{path}:{n}: score {fields[2]!r} is not a finite number")
        old = qrels.setdefault(fields[0], {}).setdefault(fields[1], score)
        if old != score:
            raise ValueError(f"{path}:{n}: query {fields[0]!r} judges document {fields[1]!r} twice, with scores {old:g} and "
                             f"{score:g}")
    return qrels


def _beir_corpus(corpus: str) -> Dict[str, Passage]:
    passages: Dict[str, Passage] = {}
    for n, did, rec in _beir_records(corpus, "corpus"):
        title = str(rec.get("title") or "").strip()
        text = f"{title} {rec['text']}" if title else rec["text"]
        if did in passages:  # an exact repeat (some published corpora have them) is one document; a clash is an error
            if passages[did].text != text:
                raise ValueError(f"{corpus}: corpus record {n} repeats _id {did!r} with another text")
            continue
        passages[did] = Passage(did, did, text, title)
    return passages


def _from_beir(path: str, split: Optional[str]) -> RetrievalDataset:
    if os.path.isdir(path):
        if not any(os.path.exists(os.path.join(path, f)) for f in ("corpus.jsonl", "corpus.jsonl.gz")):
            raise ValueError(f"cannot read data {path}: it is a directory, and not a BEIR folder (no corpus.jsonl)")
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
    corpus, queries_path = _beir_file(folder, "corpus.jsonl"), _beir_file(folder, "queries.jsonl")
    passages = _beir_corpus(corpus)
    qrels = _beir_qrels(qrels_path)
    queries: List[Query] = []
    seen_q = set()
    for n, qid, rec in _beir_records(queries_path, "query"):
        if qid in seen_q:
            raise ValueError(f"{queries_path}: query record {n} repeats _id {qid!r}")
        seen_q.add(qid)
        if qid in qrels:
            if not rec["text"].strip():
                raise ValueError(f"{queries_path}: query record {n} ({qid!r}): question is blank")
            gold = [d for d, s in qrels[qid].items() if s > 0 and d in passages]
            queries.append(Query(qid, rec["text"], [], gold))
    have = {q.id for q in queries}
    unknown = next((qid for qid in qrels if qid not in have), None)
    if unknown is not None:
        raise ValueError(f"{qrels_path}: query {unknown!r} is not in queries.jsonl")
    # Published qrels judge a few documents their corpus lacks (ArguAna: one): dropped with a warning rather than
    # refusing the dataset. BEIR's evaluation keeps them as relevant documents never retrieved, so its Recall
    # and MAP of those queries are lower than ours.
    missing = [(qid, d) for qid, docs in qrels.items() for d, s in docs.items() if s > 0 and d not in passages]
    unmatched = {}
    if missing:
        lost = sum(1 for q in queries if not q.gold and any(s > 0 for s in qrels[q.id].values()))
        unmatched = {"qrels_missing_documents": len(missing), "questions_without_gold": lost}
        print(f"uae: warning: {qrels_path}: {len(missing)} relevance judgment(s) name documents missing from "
              f"{os.path.basename(corpus)} (e.g. query {missing[0][0]!r}, document {missing[0][1]!r}); dropped"
              + (f", leaving {lost} quer{'y' if lost == 1 else 'ies'} without gold" if lost else ""), file=sys.stderr)
    return RetrievalDataset(passages, queries, f"{os.path.basename(os.path.normpath(folder))}/{os.path.basename(qrels_path)[:-4]}",
                            unmatched_evidence=unmatched, ignore_identical_ids=True)


def _is_beir_qrels(path: str) -> bool:
    return path.endswith(".tsv") and os.path.basename(os.path.dirname(os.path.abspath(path))) == "qrels"


# ------------------------------------------------------------------------------------- SQuAD
def _squad_from_dict(raw: dict, name: str) -> RetrievalDataset:
    passages: Dict[str, Passage] = {}
    queries: List[Query] = []
    keys, seen_q = set(), set()
    for n, art in enumerate(raw["data"]):
        if not isinstance(art, dict) or not isinstance(art.get("paragraphs"), list):
            raise ValueError(f"{name}: data[{n}] lacks a 'paragraphs' list: not the SQuAD schema")
        title = str(art.get("title") or "").strip()
        key = re.sub(r"\s+", "_", title) or f"article{n}"
        if key in keys:  # ids must stay unique when two articles share a title (and a title may look like "T#2")
            base, k = key, n
            while key in keys:
                key, k = f"{base}#{k}", k + 1
        keys.add(key)
        line_ids: Dict[str, str] = {}  # a line repeated in the article (flattened files) is one passage
        i = 0
        for m, para in enumerate(art["paragraphs"]):
            context = para.get("context") if isinstance(para, dict) else None
            if not isinstance(context, str):
                raise ValueError(f"{name}: data[{n}].paragraphs[{m}] lacks a string 'context'")
            spans = []  # (start, end, passage id) of each non-empty line of the context
            for line in re.finditer(r"[^\n]+", context):
                text = line.group().strip()
                if text:
                    pid = line_ids.get(text)
                    if pid is None:
                        pid = line_ids[text] = f"{key}:{i}"
                        passages[pid] = Passage(pid, key, text, title)
                        i += 1
                    spans.append((line.start(), line.end(), pid))
            for qa in _expect(para.get("qas"), list, f"{name}: data[{n}].paragraphs[{m}]", "qas", optional=True) or []:
                if not isinstance(qa, dict) or "id" not in qa or not isinstance(qa.get("question"), str):
                    raise ValueError(f"{name}: a question of data[{n}].paragraphs[{m}] lacks 'id' or 'question'")
                qid = _id(qa["id"], f"{name}: data[{n}].paragraphs[{m}]", "a question's id")
                if qid in seen_q:
                    raise ValueError(f"{name}: data[{n}].paragraphs[{m}]: duplicate question id {qid!r}")
                seen_q.add(qid)
                answers, gold = [], []
                qwhere = f"{name}: question {qid!r}"
                if not qa["question"].strip():
                    raise ValueError(f"{qwhere}: question is blank")
                impossible = _expect(qa.get("is_impossible"), bool, qwhere, "is_impossible", optional=True)
                for a in ([] if impossible else _expect(qa.get("answers"), list, qwhere, "answers", optional=True) or []):
                    text, start = (a.get("text"), a.get("answer_start")) if isinstance(a, dict) else (None, None)
                    if not isinstance(text, str) or not isinstance(start, int) or isinstance(start, bool):
                        raise ValueError(f"{qwhere}: an answer lacks 'text' or an integer 'answer_start'")
                    if not 0 <= start < len(context):
                        raise ValueError(f"{qwhere}: answer_start {start} is outside its context ({len(context)} characters)")
                    if text and context[start:start + len(text)] != text:  # the gold line comes from the offset
                        # misaligned offsets are common in SQuAD-format conversions: the answer's occurrence
                        # nearest to the offset, and an error only where the context does not hold it at all
                        hits = [hit.start() for hit in re.finditer(re.escape(text), context)]
                        if not hits:
                            raise ValueError(f"{qwhere}: its context does not contain the answer {text!r} "
                                             f"(answer_start {start})")
                        start = min(hits, key=lambda h: abs(h - start))
                    end = start + max(1, len(text))
                    gold += [pid for s, e, pid in spans if s < end and start < e and pid not in gold]
                    if text.strip() and text.strip() not in answers:
                        answers.append(text.strip())
                queries.append(Query(qid, qa["question"], answers, gold, doc_id=key))
    return RetrievalDataset(passages, queries, name)


def _check_unicode(path: str, passages: Dict[str, Passage], queries: Sequence[Query] = ()) -> None:
    """JSON's ``\\ud800`` escapes decode to lone surrogates, which no UTF-8 writer, tokenizer or index file takes:
    refuse them here, by record, not hours later in a write (one pass over the text, string by string: joining
    the corpus first would hold it at 4 bytes a character, 8x its size, once one emoji is in it)."""
    def strings():
        for pid, p in passages.items():
            yield "passage", pid, (pid, p.text)
        for q in queries:
            yield "query", q.id, (q.id, q.question, *q.answers, *q.gold)

    for kind, rid, ts in strings():
        for t in ts:
            if t.isascii():
                continue
            try:
                t.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ValueError(f"{path}: {kind} {rid!r} holds a lone surrogate ({t[e.start]!r} at position {e.start}, "
                                 f"from a \\u escape), not valid Unicode") from None


def load_corpus(path: str) -> Dict[str, Passage]:
    """The passages of ``path`` alone, for indexing (``uae index build``): any :func:`load_dataset` format, where
    queries are not needed (a JSONL file of passage records, a BEIR folder with only ``corpus.jsonl``)."""
    path = os.fspath(path)
    if os.path.isdir(path) and any(os.path.exists(os.path.join(path, f)) for f in ("corpus.jsonl", "corpus.jsonl.gz")):
        passages = _beir_corpus(_beir_file(path, "corpus.jsonl"))
        if not passages:
            raise ValueError(f"{path}: no passages found")
        _check_unicode(path, passages)
        return passages
    return load_dataset(path, require_queries=False).passages


def load_train_dataset(path: str) -> RetrievalDataset:
    """:func:`load_dataset` for training data: a BEIR folder's ``train`` split (its default, ``test``, is what
    evaluation judges), any other path as given."""
    path = os.fspath(path)
    return load_dataset(path, split="train" if os.path.isdir(path) else None)


def load_dataset(path: str, *, split: Optional[str] = None, require_queries: bool = True) -> RetrievalDataset:
    """Load QASPER or SQuAD JSON (``.json``/``.json.gz``), the JSONL schema (``.jsonl``/``.jsonl.gz``) or a
    BEIR folder (``split``: its qrels file, default ``test``; ``DIR/qrels/SPLIT.tsv`` names one too).

    Malformed input (unreadable or truncated file, wrong JSON types, missing fields, duplicate ids)
    raises ValueError naming the file and, for JSONL, the line."""
    path = os.fspath(path)
    base = path[:-3] if path.endswith(".gz") else path
    if os.path.isdir(path) or _is_beir_qrels(path):
        ds = _from_beir(path, split)
    elif split is not None:
        raise ValueError(f"split={split!r} applies to BEIR folders only, not {path}")
    elif base.endswith(".jsonl"):
        ds = _from_jsonl(path)
    else:
        text = read_text(path)
        try:
            raw = json.loads(text, object_pairs_hook=_no_duplicate_keys)
        except _DuplicateKey as e:
            raise ValueError(f"{path}: {e}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: cannot read as QASPER or SQuAD JSON ({e})") from None
        except RecursionError:  # pathologically nested input
            raise ValueError(f"{path}: cannot read as QASPER or SQuAD JSON (nested too deeply)") from None
        if isinstance(raw, dict) and isinstance(raw.get("data"), list):
            ds = _squad_from_dict(raw, os.path.basename(path))
        elif isinstance(raw, dict):
            ds = _qasper_from_dict(raw, os.path.basename(path), path)
        else:
            raise ValueError(f"{path}: JSON must be QASPER (paper ids -> papers) or SQuAD ({{\"data\": [articles]}})")
    if require_queries and not ds.queries:
        raise ValueError(f"{path}: no queries found")
    if not ds.passages:
        raise ValueError(f"{path}: no passages found")
    _check_unicode(path, ds.passages, ds.queries)
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
    env = os.environ.get(DATA_DIR_ENV)
    if env and not _qasper_in(env, split):  # a set folder that lacks the file: an error, never another copy
        raise FileNotFoundError(f"{DATA_DIR_ENV}={env} holds no {name[:-3]}(.gz); pass {flag} FILE, or unset "
                                f"{DATA_DIR_ENV}")
    roots = [env, os.path.join(here, "..", "shared", "data", "qasper"), os.path.join(here, "data", "qasper")]
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
