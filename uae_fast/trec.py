"""TREC run and qrels files: what trec_eval, ir-measures, ranx, pyserini and the BEIR tools read.

- run: one line per (query, ranked document), ``qid Q0 docid rank score run_name``;
- qrels: one line per judged (query, document), ``qid 0 docid relevance``.

Fields are separated by whitespace, so ids must not contain any (:func:`write_run` and
:func:`write_qrels` refuse them, NUL, and query ids starting with ``#``, which begin a line that trec_eval 9.0.8
reads as a comment; a ``#`` inside an id, as in MS MARCO's, is kept: 9.0.8's line count stumbled on it, which
upstream reverted).
trec_eval and ir-measures ignore the rank column and re-sort each query's documents by score, read as a
32-bit float, breaking ties by docid in *descending* order; :func:`read_run` does the same (scores that differ
only past float32's ~7 digits tie there too), so a run written by another tool reads back in the order those
tools evaluate. Lines starting with ``#`` (in the first column) are comments, as trec_eval 9.0.8 reads them.

``uae eval --save-runs DIR`` writes ``DIR/qrels.txt`` and one ``DIR/NAME.run`` per system with every
ranked candidate. Its scores are ``depth - rank + 1`` (strictly decreasing: the tools evaluate exactly
the ranking ``uae eval`` did, ties included), not the systems' raw scores. The qrels are binary and list
positives only (``qid 0 docid 1``): graded judgments are binarised and judged-nonrelevant rows left out, so
nDCG on a graded set, or a mean over a set with queries judged nonrelevant only, differs from the official
qrels' figures.

Example::

    >>> import os, tempfile
    >>> d = tempfile.mkdtemp()
    >>> write_run(os.path.join(d, "bm25.run"), {"q1": ["p3", "p1"]}, "bm25")
    2
    >>> open(os.path.join(d, "bm25.run")).read().splitlines()
    ['q1 Q0 p3 1 2 bm25', 'q1 Q0 p1 2 1 bm25']
    >>> read_run(os.path.join(d, "bm25.run"))
    {'q1': ['p3', 'p1']}
"""
from __future__ import annotations

import math
import os
import struct
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

__all__ = ["write_run", "write_qrels", "read_run", "read_qrels"]


# A score above this is not distinct from its neighbour once trec_eval reads it as a 32-bit float.
MAX_RUN_DEPTH = 2 ** 24


def _token(x, what: str) -> str:
    s = str(x)
    if not s or any(c.isspace() for c in s):
        raise ValueError(f"{what} {s!r} is empty or contains whitespace: TREC files separate fields by whitespace")
    if "\0" in s or (what == "query id" and s.startswith("#")):
        raise ValueError(f"{what} {s!r} holds a NUL or starts a line with '#': trec_eval cannot hold the first "
                         f"and reads the second as a comment")
    return s


def _float32(x: float) -> float:
    """``x`` as trec_eval holds it (C ``float``): beyond float32's range it is +-inf."""
    try:
        return struct.unpack("f", struct.pack("f", x))[0]
    except OverflowError:
        return math.copysign(math.inf, x)


def _open_for_write(path: str):
    """Write through a temporary file and rename (:func:`uae_fast.data.atomic_write`): a refused id or a kill
    never leaves half a file behind."""
    from .data import atomic_write

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return atomic_write(path)


def _queries(mapping: Mapping, what: str):
    """``(query id, its ids)`` of a run's or qrels' mapping, as the writers take them: each id a TREC token and
    written once (1 and "1" print as one id, which trec_eval would merge), its ids never one string (list("d12")
    would be documents d, 1 and 2)."""
    seen = set()
    for qid, ids in mapping.items():
        qid = _token(qid, "query id")
        if qid in seen:
            raise ValueError(f"query id {qid!r} appears twice (keys that are equal as text, such as 1 and '1')")
        seen.add(qid)
        if isinstance(ids, (str, bytes)):
            raise TypeError(f"query {qid!r}: {what}, not one string")
        yield qid, ids


def write_run(path: str, rankings: Mapping[str, Sequence[str]], run_name: str, *, depth: Optional[int] = None) -> int:
    """Write ``rankings`` (query id -> ranked doc ids, best first) as a TREC run; returns the line count.

    ``depth`` keeps the first ``depth`` documents of each query (default: all). Scores are
    ``n - rank + 1`` for a query's ``n`` written documents.
    """
    if depth is not None and (not isinstance(depth, int) or depth < 1):
        raise ValueError(f"depth must be a positive int or None, got {depth!r}")
    path, tag = os.fspath(path), _token(run_name, "run name")
    lines = 0
    with _open_for_write(path) as f:
        for qid, ranking in _queries(rankings, "the ranking must be a sequence of ids"):
            docs = [_token(doc, "document id") for doc in list(ranking)[:depth]]  # 1 and "1" are one id in the file
            if not docs:  # trec_eval would leave the query out of its means, where `uae eval` scores it 0
                raise ValueError(f"query {qid!r}: the ranking is empty; a TREC run cannot hold a query without documents")
            if len(set(docs)) != len(docs):
                raise ValueError(f"query {qid!r}: the ranking contains a document twice (ids equal as text count as one)")
            n = len(docs)
            if n > MAX_RUN_DEPTH:
                raise ValueError(f"query {qid!r}: {n} documents; scores n - rank + 1 above 2**24 tie in trec_eval's "
                                 f"32-bit floats: pass depth <= {MAX_RUN_DEPTH}")
            for rank, doc in enumerate(docs, 1):
                f.write(f"{qid} Q0 {doc} {rank} {n - rank + 1} {tag}\n")
            lines += n
    return lines


def write_qrels(path: str, golds: Mapping[str, Iterable[str]]) -> int:
    """Write binary qrels (``qid 0 docid 1`` for every gold id of every query); returns the line count."""
    path, lines = os.fspath(path), 0
    with _open_for_write(path) as f:
        for qid, gold in _queries(golds, "gold must be a collection of ids"):
            for doc in dict.fromkeys(_token(doc, "document id") for doc in gold):  # unique as text, in order
                f.write(f"{qid} 0 {doc} 1\n")
                lines += 1
    return lines


def _rows(path: str, n_fields: int, form: str):
    from .data import read_lines

    path = os.fspath(path)
    for n, line in read_lines(path, "TREC file"):  # a truncated .gz or bad UTF-8: one line naming the file
        fields = line.split()
        if not fields or line.startswith("#"):  # blank, or a comment (trec_eval 9.0.8: '#' in column 0)
            continue
        if len(fields) != n_fields:
            raise ValueError(f"{path}:{n}: expected {n_fields} fields '{form}', got {len(fields)}")
        yield n, fields


def read_run(path: str) -> Dict[str, List[str]]:
    """Read a TREC run: query id -> doc ids in trec_eval's order (score descending, ties by docid descending)."""
    scored: Dict[str, Dict[str, float]] = {}
    for n, (qid, _, doc, _, score, _) in _rows(path, 6, "qid Q0 docid rank score run_name"):
        try:
            s = float(score)
        except ValueError:
            raise ValueError(f"{path}:{n}: score {score!r} is not a number") from None
        if not math.isfinite(s):  # a NaN key would scramble the whole query's sort, not only its own place
            raise ValueError(f"{path}:{n}: score {score!r} is not finite")
        q = scored.setdefault(qid, {})
        if doc in q:
            raise ValueError(f"{path}:{n}: document {doc!r} ranked twice for query {qid!r}")
        q[doc] = _float32(s)  # trec_eval's precision: scores equal there are ties, ordered by docid
    if not scored:
        raise ValueError(f"{os.fspath(path)}: the run holds no rows")
    # two stable sorts: docid descending, then score descending
    return {qid: sorted(sorted(d, reverse=True), key=lambda doc: -d[doc]) for qid, d in scored.items()}


def read_qrels(path: str) -> Dict[str, Dict[str, int]]:
    """Read TREC qrels: query id -> {doc id: relevance} (relevance > 0 is relevant)."""
    out: Dict[str, Dict[str, int]] = {}
    for n, (qid, _, doc, rel) in _rows(path, 4, "qid 0 docid relevance"):
        try:
            r = int(rel)
        except ValueError:
            raise ValueError(f"{path}:{n}: relevance {rel!r} is not an integer") from None
        q = out.setdefault(qid, {})
        if doc in q:  # trec_eval refuses any repeated judgment, equal or not
            raise ValueError(f"{path}:{n}: document {doc!r} of query {qid!r} is judged twice ({q[doc]} and {r})")
        q[doc] = r
    if not out:  # as read_run: an empty file is a mistake (a wrong path, a failed export), not "no judgments"
        raise ValueError(f"{os.fspath(path)}: the qrels hold no rows")
    return out
