"""The ``uae-utilities/1`` table: read, write, validate, merge shards, cut to a candidate policy, ensemble teachers.

One file per table (JSONL, optionally gzipped): a header record, then one row per (query, candidate)::

    {"type": "header", "format": "uae-utilities/1", "teacher": ..., "prompt_with": ..., "prompt_without": ...,
     "max_passage_tokens": ..., "aggregation": ..., "candidates": "top:3", "answers": "all",
     "data": ..., "order": "hash", "shard": [0, 1], "n_queries": ..., "n_rows": ...}
    {"qid": "...", "pid": "...", "utility": 0.83127, "n_answer_tokens": 12, "gold": true, "cand": 0, "n_cand": 5}

``utility`` is the mean per-token log-prob gain of the gold answer(s) given the passage; ``gold`` marks
gold-evidence passages (written for diagnostics; answer-only training never reads it); ``cand``/``n_cand``
are the row's index in its query's candidate list and the list's length (a query's rows are contiguous).
``"no_gold": true`` in the header (absent otherwise) says the candidates came from the question alone (``uae score
--no-gold``): no gold paragraph was added, so the table can train a retriever without evidence labels.
A table scored with ``--candidates all`` holds every paragraph, so it needs no gold either.

Writers (``uae score``, :func:`merge_shards`, :func:`subset`, :func:`merge_teachers`) fill ``OUT.partial``
and publish it at ``OUT`` by an atomic rename (:func:`finalize`), so ``OUT`` exists only when complete.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import sys
from typing import Dict, List, Optional, Sequence, Tuple

from .data import READ_ERRORS, RetrievalDataset, jsonl_records, read_text

FORMAT = "uae-utilities/1"
# Settings that fix a row's utility: the teacher and its prompt, and which answers and data it read. The
# candidate policy is not among them: a row does not depend on the question's other candidates (``--reuse``).
_ROW_VALUE_KEYS = ("format", "teacher", "dtype", "prompt_with", "prompt_without", "answer_prefix", "max_passage_tokens",
                   "max_answer_tokens", "aggregation", "clip", "answers", "data")
# Settings that must match for rows to be combined into one table (resume / shard merge): also the same rows.
COMPAT_KEYS = _ROW_VALUE_KEYS + ("candidates", "candidate_student", "order", "with_gold_only", "no_gold")
# Settings that must match to resume a run: also the same questions (--limit, --questions-from), shard and --reuse
# tables (the first run's header is the table's: it would name tables a resumed run did not read, or not name them).
RESUME_KEYS = COMPAT_KEYS + ("shard", "n_queries", "n_rows", "limit", "questions_from", "reused_from")
# Settings that must match for tables of different teachers to be ensembled (the same rows were scored).
_SAME_ROWS_KEYS = ("candidates", "candidate_student", "no_gold", "data", "answers")


# Recorded since 2026-12-06 (data_sha1: the data file's contents; save_deltas: rows carry per-token deltas) and
# 2026-12-07 (teacher_sha1: a PATH teacher's model_fingerprint; candidate_student_sha1: a student:M policy's encoder
# folder's): compared only where both headers have them, so tables written before keep resuming and merging.
_RECORDED_KEYS = ("data_sha1", "save_deltas", "teacher_sha1", "candidate_student_sha1")
_VALUE_RECORDED_KEYS = ("data_sha1", "teacher_sha1")  # those that change a row's utility


def header_diff(a: dict, b: dict, keys, *, recorded: Sequence[str] = _RECORDED_KEYS) -> List[str]:
    """The settings among ``keys`` in which two headers differ, plus those of ``recorded`` both headers have
    (default every _RECORDED_KEYS; readers that copy utilities but not deltas pass _VALUE_RECORDED_KEYS)."""
    diff = [k for k in keys if a.get(k) != b.get(k)]
    for k in recorded:
        if k in a and k in b and a[k] != b[k]:
            diff.append(k)
    return diff


def _one_value(paths, headers, key: str = "data_sha1") -> None:
    """Tables combined into one must agree on ``key`` (the data's or the teacher's fingerprint) wherever they
    recorded it: all of them, not each against the first (which may predate the key)."""
    seen = {}
    for p, h in zip(paths, headers):
        if h.get(key):
            seen.setdefault(h[key], p)
    if len(seen) > 1:
        (a, pa), (b, pb) = list(seen.items())[:2]
        what = "on other data contents" if key == "data_sha1" else "by another teacher model"
        raise ValueError(f"{pb}: scored {what} than {pa} ({key} {b} vs {a}); cannot combine them")


# ------------------------------------------------------------------------------------------- reading
FLOAT32_MAX = 3.4028234663852886e38  # utilities beyond it would be inf in training, which computes in float32


def _bad_id(r: dict) -> Optional[str]:
    """Why a row's qid or pid cannot be an id (ids are strings; integers are read as their decimal text)."""
    for k in ("qid", "pid"):
        if type(r[k]) not in (str, int):
            return f"{k} must be a string (or an integer), got {r[k]!r}"
    return None


def _is_shard(shard) -> bool:
    """A header's ``shard`` is ``[I, N]``, two ints."""
    return isinstance(shard, list) and len(shard) == 2 and all(type(x) is int for x in shard)


def read_utilities(path: str, *, allow_partial: bool = False) -> Tuple[dict, List[dict]]:
    """(header, rows) of a ``uae score`` table (``.jsonl`` or ``.jsonl.gz``), rows as written.

    ``allow_partial=True`` reads a run still in progress (``OUT.partial``): it keeps only complete
    queries and ignores a torn last line.
    """
    text = read_text(path, "utilities file")
    lines = text.splitlines()
    if allow_partial and lines and not text.endswith("\n"):
        lines = lines[:-1]  # torn tail of a killed or still-running writer
    if not lines:
        raise ValueError(f"{path}: empty utilities file")
    try:
        header = json.loads(lines[0])
        rows = [json.loads(x) for x in lines[1:] if x.strip()]
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not a utilities JSONL file ({e.msg})") from None
    if not isinstance(header, dict) or header.get("type") != "header" or header.get("format") != FORMAT:
        raise ValueError(f"{path}: first record is not a '{FORMAT}' header")
    seen = set()
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or "qid" not in r or "pid" not in r:
            raise ValueError(f"{path}: row {i + 1} is not a utility row (a JSON object with qid, pid, utility)")
        bad_id = _bad_id(r)
        if bad_id:
            raise ValueError(f"{path}: row {i + 1}: {bad_id}")
        u = r.get("utility")
        # every reader (merge, subset, ensemble, reuse) would otherwise copy or crash on a bad value
        if type(u) not in (int, float) or not abs(u) <= FLOAT32_MAX:
            raise ValueError(f"{path}: row {i + 1} ({r['qid']}, {r['pid']}): utility must be a finite number, got "
                             f"{u!r} (within float32's range, which training computes in)")
        key = (str(r["qid"]), str(r["pid"]))
        if key in seen:
            raise ValueError(f"{path}: row {i + 1}: duplicate (qid, pid) row {key}")
        seen.add(key)
    if allow_partial:
        end = 0
        for i, r in enumerate(rows):
            if r.get("cand") == r.get("n_cand", 0) - 1:
                end = i + 1
        rows = rows[:end]
    return header, rows


def load_utilities(path: str) -> Tuple[Dict[str, Dict[str, float]], dict]:
    """``({qid: {pid: utility}}, header)`` from a utilities JSONL file (what training reads).

    Records without ``qid``/``pid`` must be a header (``"type": "header"``, or a ``header`` object) and are
    collected into ``header`` (anything else is refused: a row with misspelt keys); a second header
    (concatenated tables) is an error. In a hand-written table several rows for one (qid, pid) are averaged
    (one per gold answer, say); in a ``uae score`` table they are an error. A non-finite utility is an error
    (one NaN would poison a whole softmax). Only ``qid``, ``pid`` and ``utility`` are read: the ``gold`` flag
    never reaches training.
    """
    path = os.fspath(path)
    partial = path.endswith(".partial")  # a `uae score` run in progress: complete queries only
    sums: Dict[str, Dict[str, List[float]]] = {}
    header: dict = {"partial": True} if partial else {}
    n_headers = 0
    try:
        for n, rec in (_partial_records(path) if partial else jsonl_records(path, "utilities file")):
            if not isinstance(rec, dict):
                raise ValueError(f"{path}:{n}: each line must be a JSON object")
            if "qid" not in rec and "pid" not in rec:
                if rec.get("type") != "header" and not isinstance(rec.get("header"), dict):
                    raise ValueError(f"{path}:{n}: a record with neither qid nor pid that is not a header "
                                     f"(\"type\": \"header\"): a utility row with misspelt keys?")
                n_headers += rec.get("type") == "header"
                if n_headers > 1:  # averaging two teachers' raw utilities (other scales) would be silently wrong
                    raise ValueError(f"{path}:{n}: a second header: several tables concatenated? Join shards with "
                                     f"`uae score --merge`, teachers with `uae score --merge-teachers`")
                header.update(rec.get("header", rec) if isinstance(rec.get("header"), dict) else rec)
                continue
            missing = [k for k in ("qid", "pid", "utility") if k not in rec]
            if missing:
                raise ValueError(f"{path}:{n}: a utility row needs qid, pid and utility; missing {missing}")
            if type(rec["utility"]) not in (int, float):  # not a bool (true -> 1.0) or a numeric string
                raise ValueError(f"{path}:{n}: utility must be a number, got {rec['utility']!r}")
            bad_id = _bad_id(rec)
            if bad_id:
                raise ValueError(f"{path}:{n}: {bad_id}")
            u = float(rec["utility"])
            if not abs(u) <= FLOAT32_MAX:  # training computes in float32: 1e39 would be inf there
                raise ValueError(f"{path}:{n}: utility is {u} (must be finite, within float32's range)")
            seen = sums.setdefault(str(rec["qid"]), {}).setdefault(str(rec["pid"]), [])
            if seen and header.get("format") == FORMAT:  # `uae score` writes each (qid, pid) once
                raise ValueError(f"{path}:{n}: duplicate (qid, pid) row ({rec['qid']}, {rec['pid']}) in a `uae score` table")
            seen.append(u)
    except FileNotFoundError:
        raise
    except READ_ERRORS as e:  # truncated, damaged or non-gzip .gz
        raise ValueError(f"{path}: cannot read utilities ({e})") from None
    if not sums:
        if partial:
            raise ValueError(f"{path}: no complete query scored yet")
        raise ValueError(f"{path}: no utility rows (need JSON lines with qid, pid, utility)")
    return {q: {p: sum(v) / len(v) for p, v in d.items()} for q, d in sums.items()}, header


def _partial_records(path: str):
    """``(line number, record)`` of the complete queries of a ``uae score`` run in progress."""
    header, rows = read_utilities(path, allow_partial=True)
    yield 1, header
    yield from enumerate(rows, 2)


# ------------------------------------------------------------------------------------------- validation
def check_utilities(utilities: Dict[str, Dict[str, float]], ds: RetrievalDataset, *, path: str = "utilities",
                    data_path: Optional[str] = None, header: Optional[dict] = None) -> None:
    """Raise ValueError unless every (qid, pid) names a query of ``ds`` and a passage in that query's pool.

    With the table's ``header`` and a ``data_path`` file: a table fingerprinted on other data contents
    (``data_sha1``) gets a warning on stderr. Not an error, since a slice of the scored data or a re-gzipped
    copy differs too; but QASPER passage ids are positions, so an edited copy would pair utilities with
    other paragraphs' texts."""
    sha = (header or {}).get("data_sha1")
    if sha and data_path and os.path.exists(data_path):
        from .data import data_fingerprint

        now = data_fingerprint(data_path)
        if now != sha:
            print(f"uae: warning: {path} was scored on other data contents than {data_path} (data_sha1 {sha} vs "
                  f"{now}); its utilities are matched by question and passage id: if the texts changed, rescore",
                  file=sys.stderr)
    data_path = data_path or ds.name or "the data"
    by_id = {q.id: q for q in ds.queries}
    unknown_q = [q for q in utilities if q not in by_id]
    if unknown_q:
        raise ValueError(f"utilities file {path} does not match data {data_path}: {len(unknown_q)} of {len(utilities)} "
                         f"query ids are not in the data (e.g. {unknown_q[:3]}); score this data with `uae score` first")
    bad, by_doc = [], {}  # one set per document (a BEIR corpus is every question's pool), not per question
    for qid, d in utilities.items():
        q = by_id[qid]
        pool = by_doc.get(q.doc_id) if q.candidates is None else None
        if pool is None:
            pool = set(ds.pool(q))
            if q.candidates is None:
                by_doc[q.doc_id] = pool
        bad.extend((qid, pid) for pid in d if pid not in pool)
    if bad:
        raise ValueError(f"utilities file {path} does not match data {data_path}: {len(bad)} (qid, pid) rows name passages "
                         f"outside the query's candidate pool (e.g. {bad[:3]})")


def is_answer_only(header: dict) -> bool:
    """True when the table's candidates were chosen without gold evidence (``no_gold`` or every paragraph)."""
    return bool(header.get("no_gold")) or header.get("candidates") == "all"


def check_answer_only(header: dict, path: str = "utilities") -> None:
    """Raise ValueError unless the header says no gold paragraph was added to the candidates."""
    if not is_answer_only(header):
        how = f"--candidates {header['candidates']}" if header.get("candidates") else "no uae-utilities header"
        raise ValueError(f"utilities file {path} was scored with gold evidence added to its candidates ({how}, no "
                         f"'\"no_gold\": true' in its header), so it leaks gold labels into answer-only training; score "
                         f"with `uae score --no-gold` or cut a --candidates all table with `scripts/subset_utilities.py --no-gold`")


# ------------------------------------------------------------------------------------------- writing
def make_row(qid, pid, utility, n_tok, gold, cand, n_cand, deltas=None) -> dict:
    """One table row. A non-finite utility raises here, before it is written: a NaN in the table would make the
    whole run (and every --resume of it) fail only when the finished table is read."""
    if not math.isfinite(float(utility)):
        raise ValueError(f"the teacher's utility for question {qid!r}, passage {pid!r} is {float(utility)} (its "
                         f"log-probabilities overflowed); score in float32 (--dtype fp32)")
    r = {"qid": qid, "pid": pid, "utility": round(float(utility), 5), "n_answer_tokens": int(n_tok),
         "gold": bool(gold), "cand": cand, "n_cand": n_cand}
    if deltas is not None:
        r["deltas"] = [round(float(x), 4) for x in deltas]
    return r


def student_name(student) -> str:
    """How a ``student:M`` policy's encoder is named in a header."""
    if student is None:
        return "all-MiniLM-L6-v2"
    return os.path.abspath(student) if isinstance(student, str) else type(student).__name__


def finalize(partial: str, out: str) -> None:
    """Publish ``partial`` at ``out`` atomically (gzip-compressed when ``out`` ends in .gz)."""
    import gzip

    if out.endswith(".gz"):
        from .data import atomic_write

        # fsync'd before it is published; no name or time in the gzip header: same rows, same bytes
        with open(partial, "rb") as src, atomic_write(out, "wb") as f, \
                gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0, compresslevel=9) as dst:
            while True:
                buf = src.read(1 << 20)
                if not buf:
                    break
                dst.write(buf)
        os.remove(partial)
    else:
        os.replace(partial, out)


def write_table(out: str, header: dict, rows: Sequence[dict]) -> dict:
    """Write a complete table (header + rows) to ``out`` through ``OUT.partial``; returns the header."""
    out = os.fspath(out)
    if os.path.exists(out):
        raise ValueError(f"{out} already exists; delete it or choose another --out")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    partial = out + ".partial"
    with open(partial, "w", encoding="utf-8") as f:
        f.write(json.dumps(header) + "\n")
        for r in rows:
            f.write(json.dumps(r) + "\n")
        f.flush()
        os.fsync(f.fileno())  # on disk before finalize publishes it
    finalize(partial, out)
    return header


def recover_partial(partial: str, header: dict) -> Tuple[set, int, int]:
    """Cut ``partial`` back to its last complete query; return (done qids, rows kept, passages kept).

    Rows kept is -1 when not even the header was completed. Raises if the partial run's settings differ.
    """
    with open(partial, "rb") as f:
        data = f.read()
    nl = data.find(b"\n")
    if nl < 0:  # the header itself was never completed
        return set(), -1, 0
    try:
        old = json.loads(data[:nl])
    except (json.JSONDecodeError, UnicodeDecodeError):
        return set(), -1, 0
    if not isinstance(old, dict):
        return set(), -1, 0
    diff = header_diff(old, header, RESUME_KEYS)
    if diff:
        raise ValueError(f"--resume: {partial} was written with different settings ({', '.join(diff)}); "
                         f"use the same options or delete it")
    done, keep_end, pos, n_rows = set(), nl + 1, nl + 1, 0
    pending = 0
    while pos < len(data):
        end = data.find(b"\n", pos)
        if end < 0:
            break  # torn last line
        try:
            row = json.loads(data[pos:end])
        except (json.JSONDecodeError, UnicodeDecodeError):
            break
        if not isinstance(row, dict) or "qid" not in row:
            break  # not a row this writer wrote: keep what precedes it
        u = row.get("utility")
        if isinstance(u, bool) or not isinstance(u, (int, float)) or not math.isfinite(u):
            break  # a NaN row from before make_row refused them: rescore from its query on
        pending += 1
        pos = end + 1
        if row.get("cand") == row.get("n_cand", 0) - 1:
            done.add(row["qid"])
            keep_end, n_rows, pending = pos, n_rows + pending, 0
    if keep_end < len(data):
        with open(partial, "r+b") as f:
            f.truncate(keep_end)
            f.flush()
            os.fsync(f.fileno())
    return done, n_rows, n_rows


# ------------------------------------------------------------------------------------------- combining
def _by_query(rows: Sequence[dict]) -> Dict[str, List[dict]]:
    by: Dict[str, List[dict]] = {}
    for r in rows:
        by.setdefault(r["qid"], []).append(r)
    return by


def merge_shards(inputs: Sequence[str], out: str) -> dict:
    """Combine finished shard files into one (checks settings agree, shards complete, rows unique)."""
    if not inputs:
        raise ValueError("merge needs at least one input file")
    if os.path.exists(out):
        raise ValueError(f"{out} already exists; delete it or choose another --out")
    headers, all_rows = [], []
    for path in inputs:
        h, rows = read_utilities(path)
        shard = h.get("shard")
        if not (_is_shard(shard) and 0 <= shard[0] < shard[1] and type(h.get("n_queries")) is int):
            raise ValueError(f"{path}: header lacks a valid shard [I, N] or n_queries; not a `uae score` shard file")
        if type(h.get("n_rows")) is not int:
            raise ValueError(f"{path}: header lacks an integer n_rows; not a `uae score` shard file")
        if len(rows) != h["n_rows"]:
            raise ValueError(f"{path}: has {len(rows)} rows but its header promises {h['n_rows']}")
        headers.append(h)
        all_rows.extend(rows)
    ref = headers[0]
    for path, h in zip(inputs, headers):  # also the same questions: shards of one --limit / --questions-from
        diff = header_diff(h, ref, COMPAT_KEYS + ("limit", "questions_from"))
        if diff:
            raise ValueError(f"{path}: settings differ from {inputs[0]} ({', '.join(diff)}); cannot merge")
    _one_value(inputs, headers)
    _one_value(inputs, headers, "teacher_sha1")
    n = ref["shard"][1]
    got = sorted(h["shard"][0] for h in headers)
    if any(h["shard"][1] != n for h in headers) or got != list(range(n)):
        raise ValueError(f"merge needs each of the {n} shards exactly once, got shard indices {got}")
    keys = [(r["qid"], r["pid"]) for r in all_rows]
    if len(set(keys)) != len(keys):
        raise ValueError("duplicate (qid, pid) rows across inputs")
    header = dict(ref, shard=[0, 1], n_queries=sum(h["n_queries"] for h in headers), n_rows=len(all_rows))
    for k in ("n_reused_rows", "n_skipped_no_passages"):  # per-shard counts: the table's are their sums
        if any(k in h for h in headers):
            header[k] = sum(int(h.get(k, 0)) for h in headers)
    if any("reused_from" in h for h in headers):
        header["reused_from"] = sorted({f for h in headers for f in h.get("reused_from", [])})
    return write_table(out, header, all_rows)


def subset(table: str, ds: RetrievalDataset, candidates: str, out: str, *, no_gold: bool = False,
           candidate_student=None, progress: bool = False) -> dict:
    """Cut a ``--candidates all`` table down to another policy without the teacher; returns the new header.
    ``progress``: a bar while a ``student:M`` policy embeds the papers (minutes on a CPU).

    The rows of any narrower policy (``top:M``, ``student:M``, with or without the gold paragraphs added)
    are a subset of an ``all`` table: the numbers ``uae score`` would write with that policy and the same
    teacher settings. ``cand``/``n_cand`` are renumbered; the header records ``subset_of``.
    """
    from .scoring import CandidatePolicy  # the policy is scoring's concept; scoring imports this module

    header, rows = read_utilities(table)
    if header.get("candidates") != "all":
        raise ValueError(f"{table} was scored with --candidates {header.get('candidates')}, not 'all'")
    by_q = _by_query(rows)
    qmap = {q.id: q for q in ds.queries}
    missing = [qid for qid in by_q if qid not in qmap]
    if missing:
        raise ValueError(f"{table}: {len(missing)} question ids are not in the data (e.g. {missing[0]})")
    policy = CandidatePolicy(ds, candidates, student=candidate_student, no_gold=no_gold)
    policy.prepare([qmap[qid] for qid in by_q], progress=progress)
    out_rows = []
    for qid, rs in by_q.items():
        keep = set(policy(qmap[qid]))
        sel = [r for r in rs if r["pid"] in keep]
        if len(sel) != len(keep):
            raise ValueError(f"{table}: question {qid} lacks {len(keep) - len(sel)} of its {candidates} candidates")
        out_rows.extend(dict(r, cand=i, n_cand=len(sel)) for i, r in enumerate(sel))
    new = dict(header, candidates=candidates, n_rows=len(out_rows), subset_of=os.path.basename(table))
    new.pop("no_gold", None)
    if no_gold:
        new["no_gold"] = True
    if policy.kind == "student":
        new["candidate_student"] = student_name(candidate_student)
    return write_table(out, new, out_rows)


def reusable_rows(tables: Sequence[str], header: dict, *, with_deltas: bool = False) -> Dict[Tuple[str, str], tuple]:
    """``{(qid, pid): (utility, n_answer_tokens, deltas)}`` from finished tables whose settings match ``header``'s
    (a table of another teacher, dtype, prompt, answers or data file is refused); ``uae score --reuse``.

    ``with_deltas``: only rows that carry per-token deltas (``--save-deltas``) are returned.
    """
    known: Dict[Tuple[str, str], tuple] = {}
    for path in tables:
        h, rows = read_utilities(path)
        diff = header_diff(h, header, _ROW_VALUE_KEYS, recorded=_VALUE_RECORDED_KEYS)
        if diff:
            raise ValueError(f"--reuse {path}: scored with other settings ({', '.join(diff)}: "
                             f"{h.get(diff[0])!r} vs {header.get(diff[0])!r}); its utilities cannot be reused")
        for i, r in enumerate(rows):  # read_utilities checked every utility
            if not isinstance(r.get("n_answer_tokens"), int):
                raise ValueError(f"--reuse {path}: row {i + 1} has no integer n_answer_tokens")
            if with_deltas and "deltas" not in r:
                continue
            # without --save-deltas no row of the new table carries deltas, reused or not
            known.setdefault((r["qid"], r["pid"]), (r["utility"], r["n_answer_tokens"], r.get("deltas") if with_deltas else None))
    return known


def _standardised(rows: Sequence[dict]) -> Dict[str, float]:
    """A query's utilities as z-scores over its rows (all 0 when they are constant or alone)."""
    us = [r["utility"] for r in rows]
    mu = sum(us) / len(us)
    sd = statistics.pstdev(us) if len(us) > 1 else 0.0
    return {r["pid"]: (r["utility"] - mu) / sd if sd > 0 else 0.0 for r in rows}


def ensemble_utilities(tables: Sequence[Dict[str, Dict[str, float]]]) -> Dict[str, Dict[str, float]]:
    """:func:`merge_teachers` on loaded tables (``{qid: {pid: utility}}``): per question, over the paragraphs
    every table scored (in the first table's order), the mean of the per-table z-scores, rounded to 5 decimals
    as a merged table stores them. Questions with no shared paragraph are left out."""
    if len(tables) < 2:
        raise ValueError("a teacher ensemble needs at least two tables")
    out: Dict[str, Dict[str, float]] = {}
    for qid, first in tables[0].items():
        if not all(qid in t for t in tables[1:]):
            continue
        pids = [p for p in first if all(p in t[qid] for t in tables[1:])]
        if not pids:
            continue
        zs = [_standardised([{"pid": p, "utility": t[qid][p]} for p in pids]) for t in tables]
        out[qid] = {p: round(sum(z[p] for z in zs) / len(zs), 5) for p in pids}
    if not out:
        raise ValueError("the tables of the teacher ensemble share no (question, paragraph) pair")
    return out


def merge_teachers(inputs: Sequence[str], out: str) -> dict:
    """A teacher ensemble: per-query standardised utilities averaged across tables, on the rows they share.

    Each table's utilities of a query are z-scored over the (qid, pid) rows every table has (so teachers
    with different utility scales weigh equally), then averaged. The tables must have scored the same
    candidate policy on the same data; the header names the sources (``teacher: "ensemble(A+B)"``,
    ``sources``). Utilities are then z-units: ``--teacher-temperature`` acts on that scale.
    """
    if len(inputs) < 2:
        raise ValueError("--merge-teachers needs at least two tables")
    tables = [read_utilities(p) for p in inputs]
    ref = tables[0][0]
    for path, (h, rows) in zip(inputs, tables):  # a shard or an unfinished run would shrink the ensemble, silently
        shard = h.get("shard") or [0, 1]
        if not _is_shard(shard):
            raise ValueError(f"{path}: its header's shard {shard!r} is not [I, N]; not a `uae score` table")
        if shard != [0, 1]:
            raise ValueError(f"{path}: it is shard {shard[0]} of {shard[1]}; merge the shards first "
                             f"(uae score --merge) and ensemble whole tables")
        if os.fspath(path).endswith(".partial") or (type(h.get("n_rows")) is int and len(rows) != h["n_rows"]):
            raise ValueError(f"{path}: an unfinished table ({len(rows)} of {h.get('n_rows', '?')} rows); finish it "
                             f"(uae score --resume) before ensembling")
    for path, (h, _) in zip(inputs[1:], tables[1:]):
        diff = header_diff(h, ref, _SAME_ROWS_KEYS, recorded=("data_sha1",))  # not teacher_sha1: other teachers
        if diff:
            raise ValueError(f"{path}: candidate settings differ from {inputs[0]} ({', '.join(diff)}); "
                             f"ensemble tables scored on the same rows")
    _one_value(inputs, [h for h, _ in tables])
    seen = {}
    for path, (h, _) in zip(inputs, tables):  # one teacher twice is its own z-scores, labelled an ensemble
        if h.get("teacher") is None:
            continue
        key = tuple(h.get(k) for k in _ROW_VALUE_KEYS + ("teacher_sha1",))  # another prompt or dtype is another teacher
        if key in seen:
            raise ValueError(f"{path}: the same teacher ({h['teacher']}, same settings) as {seen[key]}; an ensemble "
                             f"needs different teachers")
        seen[key] = path
    per = [_by_query(rows) for _, rows in tables]
    shared_q = [q for q in per[0] if all(q in t for t in per[1:])]
    out_rows = []
    for qid in shared_q:
        pids = set.intersection(*({r["pid"] for r in t[qid]} for t in per))
        if not pids:
            continue
        zs = [_standardised([r for r in t[qid] if r["pid"] in pids]) for t in per]
        first = [r for r in per[0][qid] if r["pid"] in pids]  # keeps the first table's order and fields
        for i, r in enumerate(first):
            u = sum(z[r["pid"]] for z in zs) / len(zs)
            row = dict(r, utility=round(u, 5), cand=i, n_cand=len(first))
            row.pop("deltas", None)  # the first teacher's per-token deltas say nothing of the ensemble
            out_rows.append(row)
    if not out_rows:
        raise ValueError(f"the tables {list(inputs)} share no (qid, pid) rows")
    names = [h.get("teacher", "?") for h, _ in tables]
    header = {k: v for k, v in ref.items() if k in ("type", "format") + _SAME_ROWS_KEYS + ("order", "with_gold_only")}
    sha = next((h["data_sha1"] for h, _ in tables if h.get("data_sha1")), None)
    if sha:
        header["data_sha1"] = sha
    header.update(teacher="ensemble(" + "+".join(names) + ")", aggregation="mean of per-query z-scores",
                  sources=[{"file": os.path.basename(p),
                            **{k: h.get(k) for k in _ROW_VALUE_KEYS + ("n_rows",) if k not in ("format", "answers", "data")}}
                           for p, (h, _) in zip(inputs, tables)],
                  shard=[0, 1], n_queries=len({r["qid"] for r in out_rows}), n_rows=len(out_rows))
    return write_table(out, header, out_rows)
