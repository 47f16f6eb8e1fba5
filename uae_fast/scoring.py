"""``uae score``: teacher utilities for a whole dataset, resumable, shardable, mergeable.

Output: a ``uae-utilities/1`` table (format, reading, merging and subsetting in :mod:`uae_fast.utilities`),
one row per (query, candidate passage). ``utility`` is the mean per-token log-prob gain of the gold
answer(s) given the passage (averaged over a query's gold answers). With ``--save-deltas`` rows also
carry ``deltas`` (per-token, first answer).

Crash safety: rows go to ``OUT.partial``, one ``write`` + ``fsync`` per group of whole queries; ``--resume`` cuts the
file back to the last complete query (the last row with ``cand == n_cand - 1``) and skips the queries
already there, so a Ctrl-C or ``kill -9`` loses at most the group in flight and never duplicates a row.
``OUT`` itself appears only when the run is complete (atomic rename; gzipped if it ends in ``.gz``).

Candidate policies: ``all`` (every paragraph of the query's paper), ``top:M`` (BM25 top-M over the
paper's paragraphs plus every gold-evidence paragraph, in paper order), ``answer:M`` (the same with BM25 over
the question followed by its answers: the passages that share the answer's words) or ``student:M`` (the
base student's cosine top-M: the hard negatives it confuses; ``--candidate-student`` picks the encoder).
``--no-gold`` (answer-only data): the top-M alone, no gold paragraph added, every question with an answer.

Reuse: ``--reuse TABLE...`` copies the utility of each (question, paragraph) row already in earlier tables of the
same teacher and settings instead of scoring it again. A row's utility depends only on the question, its
answers, the paragraph and the teacher, not on the other candidates, so switching candidate policies (e.g.
``top:12`` -> ``answer:12``) costs only the rows that are new.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple


# The table format is owned by .utilities; these names stay importable from here.
from .utilities import FORMAT, RESUME_KEYS, finalize, header_diff, make_row, read_utilities, recover_partial, student_name
from .utilities import reusable_rows
from .utilities import merge_shards as merge

DEFAULT_CANDIDATES = "top:3"
# Answer-only candidates: BM25 top-12 of the question followed by its answers (README "Answer-only training").
# On train they hold a gold paragraph for 0.95 of the questions vs 0.75 for the question's top-12, and the
# teacher's top-1 is gold for 0.66 vs 0.49; on dev the student trained on them gained +0.015 S@1 / +0.017 MAP.
# M = 12 keeps the batch of the earlier top:12 default (coverage flattens past it: 0.92 / 0.95 / 0.96 at
# 8 / 12 / 16; benchmarks/results/diagnose-answer-policy-train.json).
DEFAULT_NO_GOLD_CANDIDATES = "answer:12"


# ------------------------------------------------------------------------------------ candidates
def parse_candidates(policy: str) -> Tuple[str, Optional[int]]:
    """``"all"`` -> ("all", None); ``"top:M"`` -> ("top", M) (BM25 of the question); ``"answer:M"`` ->
    ("answer", M) (BM25 of the question and its answers); ``"student:M"`` -> ("student", M)."""
    if policy == "all":
        return "all", None
    for kind in ("top", "answer", "student"):
        if isinstance(policy, str) and policy.startswith(kind + ":"):
            digits = policy[len(kind) + 1:]
            m = int(digits) if digits.isdigit() and digits.isascii() else 0
            if m >= 1 and digits == str(m):  # the canonical spelling only: headers compare it as a string
                return kind, m
    raise ValueError(f"--candidates must be 'all', 'top:M' (BM25 of the question), 'answer:M' (BM25 of the question and "
                     f"its answers) or 'student:M' (base student) with M >= 1, got {policy!r}")


class CandidatePolicy:
    """A query's candidate passage ids, in pool order: ``all`` of its pool, or its top-M plus its gold
    (``no_gold=True``: the top-M alone, chosen from the question (and, for ``answer:M``, its answers) only, for
    data without evidence labels).

    ``top:M`` ranks the pool with BM25 over the question; ``answer:M`` over the question followed by its
    answers (answer-only data still has answers: the passages sharing their words hold the evidence far more
    often than the question's top-M); ``student:M`` with the base bi-encoder (``student``: a folder or
    :class:`uae_fast.BiEncoder`, default all-MiniLM-L6-v2) by cosine similarity, i.e. the passages the
    untrained student confuses with the answer-bearing ones: the hard negatives a retriever is trained on.
    """

    def __init__(self, ds, policy: str = "top:3", *, student=None, no_gold: bool = False):
        self.ds, self.policy, self.no_gold = ds, policy, bool(no_gold)
        self.kind, self.m = parse_candidates(policy)
        self._student = student
        self._bm25: Dict[Tuple[str, ...], object] = {}
        self._emb: Dict[str, object] = {}  # pid -> student embedding (student policy)
        self._qemb: Dict[str, object] = {}  # qid -> student embedding

    def prepare(self, queries, *, progress: bool = False) -> None:
        """Embed every question and pool passage of ``queries`` in large batches (student policy only;
        ``progress``: a bar, since on a CPU this takes minutes before any scoring starts)."""
        if self.kind != "student":
            return
        enc = self._encoder()
        qs = [q for q in queries if q.id not in self._qemb]
        pids = sorted({p for q in qs for p in self.ds.pool(q) if p not in self._emb})
        if pids:
            for p, e in zip(pids, enc.encode([self.ds.passages[p].text for p in pids], show_progress=progress,
                                             desc="encode passages", role="document")):
                self._emb[p] = e
        if qs:
            for q, e in zip(qs, enc.encode([q.question for q in qs], show_progress=progress, desc="encode questions",
                                          role="query")):
                self._qemb[q.id] = e

    def _encoder(self):
        from .student import as_encoder

        if self._student is None or isinstance(self._student, str):
            self._student = as_encoder(self._student, device="cpu")
        return self._student

    def _top_student(self, q, pool: List[str]):
        import torch

        if q.id not in self._qemb:  # not prepared up front: embed this query's paper now
            self.prepare([q])
        scores = torch.stack([self._emb[p] for p in pool]) @ self._qemb[q.id]
        return torch.topk(scores, self.m).indices.tolist()

    def __call__(self, q) -> List[str]:
        pool = self.ds.pool(q)
        if self.kind == "all" or len(pool) <= self.m:
            return pool
        if self.kind == "student":
            top = self._top_student(q, pool)
        else:
            from .bm25 import BM25

            key = tuple(pool)  # one index per paper, reused by all its questions
            bm = self._bm25.get(key)
            if bm is None:
                if len(self._bm25) > 2048:
                    self._bm25.clear()
                bm = self._bm25[key] = BM25([self.ds.passages[p].text for p in pool])
            _, top = bm.topk(q.with_answers() if self.kind == "answer" else q.question, self.m)
        keep = set(int(i) for i in top)
        if not self.no_gold:
            gold = set(q.gold)
            keep |= {i for i, p in enumerate(pool) if p in gold}
        return [pool[i] for i in sorted(keep)]


def select_queries(ds, *, with_gold_only: bool = True, order: str = "hash", shard: Tuple[int, int] = (0, 1)):
    """Queries to score: with answers (and gold evidence), ordered, then this shard's share.

    ``order="hash"`` sorts by a hash of the query id: deterministic, and any prefix of a run is an
    unbiased sample of the dataset (useful when a CPU run is stopped early). ``order="paper"`` sorts
    papers by a hash of their id and keeps each paper's questions together (shards split by paper), so
    a passage scored for several of its paper's questions runs through the teacher once.
    """
    qs = [q for q in ds.queries if q.answers and (q.gold or not with_gold_only)]
    key = lambda s: hashlib.sha1(s.encode()).hexdigest()  # noqa: E731
    i, n = shard
    if order == "hash":
        qs.sort(key=lambda q: key(q.id))
    elif order == "paper":
        papers: Dict[str, List] = {}
        for q in qs:
            papers.setdefault(q.doc_id if q.doc_id is not None else q.id, []).append(q)
        ids = sorted(papers, key=key)[i::n]
        return [q for d in ids for q in sorted(papers[d], key=lambda q: key(q.id))]
    elif order != "data":
        raise ValueError(f"order must be 'hash', 'paper' or 'data', got {order!r}")
    return qs[i::n]


def parse_shard(text: Optional[str]) -> Tuple[int, int]:
    """``"I/N"`` (0-based I), else torchrun's RANK/WORLD_SIZE, else (0, 1)."""
    if text is None:
        n = int(os.environ.get("WORLD_SIZE", "1"))
        return (int(os.environ.get("RANK", "0")), n) if n > 1 else (0, 1)
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like I/N (e.g. 0/4), got {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"--shard {text}: need 0 <= I < N")
    return i, n


def shard_path(out: str, shard: Tuple[int, int]) -> str:
    if shard[1] == 1:
        return out
    for ext in (".jsonl.gz", ".jsonl"):
        if out.endswith(ext):
            return f"{out[: -len(ext)]}.shard{shard[0]}-of-{shard[1]}{ext}"
    return f"{out}.shard{shard[0]}-of-{shard[1]}"


def _maybe_test_kill(f, payload: bytes, n_groups_done: int) -> None:
    """Crash-safety test hook: ``UAE_TEST_KILL_AFTER=N[:torn][:int]`` sends this process SIGKILL (a real
    ``kill -9``; ``int``: SIGINT, a Ctrl-C) once N groups are on disk, optionally after writing half of the
    next group's bytes."""
    spec = os.environ.get("UAE_TEST_KILL_AFTER")
    if not spec:
        return
    n, *modes = spec.split(":")
    if n_groups_done == int(n):
        if "torn" in modes:
            f.write(payload[: len(payload) // 2])
            f.flush()
            os.fsync(f.fileno())
        import signal

        os.kill(os.getpid(), signal.SIGINT if "int" in modes else signal.SIGKILL)
        time.sleep(5)  # the signal lands here


# ------------------------------------------------------------------------------------------- run
def check_out(out: str, resume: bool) -> None:
    """Without ``resume``, refuse an existing table or an interrupted run's ``.partial`` (the CLI calls this
    before the teacher loads, so the error comes in seconds, not after minutes of setup)."""
    if resume:
        return
    if os.path.exists(out):
        raise ValueError(f"{out} already exists; delete it or choose another --out")
    if os.path.exists(out + ".partial"):
        raise ValueError(f"{out}.partial exists from an interrupted run; pass --resume to continue it (or delete it)")


def queries_to_score(ds, *, with_gold_only: bool = True, order: str = "paper", shard: Tuple[int, int] = (0, 1),
                     questions_from: Optional[str] = None, limit: Optional[int] = None) -> list:
    """The queries :func:`score_dataset` scores (:func:`select_queries`, then ``questions_from`` and ``limit``);
    raises when none is left. ``uae score`` calls it before the teacher loads, so an empty selection is an
    error in seconds."""
    queries = select_queries(ds, with_gold_only=with_gold_only, order=order, shard=shard)
    if questions_from is not None:
        keep = {str(r["qid"]) for r in read_utilities(questions_from)[1]}
        queries = [q for q in queries if q.id in keep]
        if not queries:
            raise ValueError(f"--questions-from {questions_from}: none of its questions is among those to score here")
    if limit is not None:
        queries = queries[:limit]
    if not queries:
        where = f" in shard {shard[0]}/{shard[1]} (use fewer shards)" if shard[1] > 1 else ""
        raise ValueError("no query has " + ("both a gold answer and gold evidence" if with_gold_only else "a gold answer")
                         + where + " to score")
    return queries


def score_dataset(scorer, ds, out: str, *, candidates: str = "top:3", answers: str = "all", resume: bool = False,
                  shard: Tuple[int, int] = (0, 1), order: str = "paper", with_gold_only: bool = True,
                  limit: Optional[int] = None, save_deltas: bool = False, progress: bool = True,
                  data_name: Optional[str] = None, group: int = 16, candidate_student=None, no_gold: bool = False,
                  questions_from: Optional[str] = None, reuse: Sequence[str] = (), data_sha1: Optional[str] = None) -> dict:
    """Score every selected query of ``ds`` and write the utilities file ``out``; returns the header.

    ``candidate_student``: the encoder of a ``student:M`` policy (folder or BiEncoder; default all-MiniLM-L6-v2).
    ``no_gold``: answer-only candidates (the policy's top-M, no gold paragraph added; ``with_gold_only`` must
    then be False, since choosing questions by their evidence would use the labels).
    ``questions_from``: a utilities table; only its questions are scored (a second teacher on the same rows as
    the first, for ``--merge-teachers``); the header names it.
    ``reuse``: utilities tables of the same teacher and settings (:func:`uae_fast.utilities.reusable_rows`); their
    rows' utilities are copied, not rescored, and the header counts them (``n_reused_rows``).
    ``data_sha1``: the data file's fingerprint (:func:`uae_fast.data.data_fingerprint`; ``uae score`` passes
    it); recorded, so resuming or reusing against an edited file is refused.
    """
    if no_gold and with_gold_only:
        raise ValueError("no_gold scoring selects questions by their answers alone: pass with_gold_only=False")
    for k, v in (("group", group), ("limit", 1 if limit is None else limit)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{k} must be a positive int, got {v!r}")
    if answers not in ("all", "first", "shortest"):
        raise ValueError(f"answers must be 'all', 'first' or 'shortest', got {answers!r}")
    policy = CandidatePolicy(ds, candidates, student=candidate_student, no_gold=no_gold)
    queries = queries_to_score(ds, with_gold_only=with_gold_only, order=order, shard=shard,
                               questions_from=questions_from, limit=limit)
    policy.prepare(queries, progress=progress)
    pools = [policy(q) for q in queries]
    # A paper with no paragraphs leaves nothing to score (one train question set of QASPER does this
    # once --include-no-gold lets evidence-free questions in): skip those queries, say so.
    empty = [q.id for q, p in zip(queries, pools) if not p]
    if empty:
        print(f"uae score: skipping {len(empty)} quer{'y' if len(empty) == 1 else 'ies'} with no candidate passages "
              f"(e.g. {empty[:3]})", file=sys.stderr)
        keep = [i for i, p in enumerate(pools) if p]
        queries, pools = [queries[i] for i in keep], [pools[i] for i in keep]
        if not queries:
            raise ValueError("no query to score has a candidate passage")
    # The teacher refuses blank text mid-run (hours in, naming neither): check every row before any compute.
    blank = next((q.id for q in queries if not q.question.strip()), None)
    if blank is not None:
        raise ValueError(f"query {blank!r} has a blank question: the teacher cannot score it")
    blank = next(((q.id, p) for q, pids in zip(queries, pools) for p in pids if not ds.passages[p].text.strip()), None)
    if blank is not None:
        raise ValueError(f"passage {blank[1]!r} (a candidate of query {blank[0]!r}) has no text: the teacher cannot "
                         f"score it; drop it from the data or give it text")
    header = {"type": "header", "format": FORMAT, **scorer.settings(), "candidates": candidates, "answers": answers,
              "data": data_name or ds.name, "order": order, "with_gold_only": with_gold_only, "shard": list(shard),
              "n_queries": len(queries), "n_rows": sum(len(p) for p in pools)}
    if no_gold:  # only when set: tables written before the flag existed keep resuming and merging
        header["no_gold"] = True
    header["save_deltas"] = bool(save_deltas)  # a resume or shard merge must not mix rows with and without deltas
    if data_sha1 is not None:
        header["data_sha1"] = data_sha1
    if policy.kind == "student":
        header["candidate_student"] = student_name(candidate_student)
        if isinstance(candidate_student, (str, os.PathLike)):  # a student retrained at the same path mines others
            from .embcache import model_fingerprint

            header["candidate_student_sha1"] = model_fingerprint(os.fspath(candidate_student))
    if questions_from is not None:
        header["questions_from"] = os.path.basename(questions_from)
    if limit is not None:
        header["limit"] = limit
    if empty:
        header["n_skipped_no_passages"] = len(empty)
    known = {}
    if reuse:
        known = reusable_rows(reuse, header, with_deltas=save_deltas)
        header["reused_from"] = [os.path.basename(os.fspath(r)) for r in reuse]
        header["n_reused_rows"] = sum((q.id, p) in known for q, pids in zip(queries, pools) for p in pids)
    out = os.fspath(out)
    partial = out + ".partial"
    check_out(out, resume)
    if os.path.exists(out):  # and resume
        done_header = read_utilities(out)[0]
        diff = header_diff(done_header, header, RESUME_KEYS)
        if diff:  # "nothing to do" would hand back a table these options did not ask for
            raise ValueError(f"--resume: {out} is complete but was written with different settings "
                             f"({', '.join(diff)}); use the same options, or delete it or choose another --out")
        print(f"{out} is already complete; nothing to do", file=sys.stderr)
        return done_header
    done: set = set()
    rows_done = 0
    if os.path.exists(partial):  # and resume
        done, rows_done, _ = recover_partial(partial, header)
        if rows_done < 0:
            os.remove(partial)
            rows_done = 0
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    if not os.path.exists(partial):
        with open(partial, "wb") as f:
            f.write((json.dumps(header) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())

    total = header["n_rows"]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=rows_done, unit="passage", dynamic_ncols=True, smoothing=0.05,
                   desc=f"scoring shard {shard[0]}/{shard[1]}" if shard[1] > 1 else "scoring")
    t0, n_new = time.time(), 0
    todo = [(q, pids) for q, pids in zip(queries, pools) if q.id not in done]
    with open(partial, "ab") as f:
        for g in range(0, len(todo), group):
            chunk = todo[g : g + group]
            items, new = [], []
            for q, pids in chunk:
                ans = list(q.answers)
                if answers == "first":
                    ans = ans[:1]
                elif answers == "shortest":
                    ans = [min(ans, key=len)]
                todo_p = [p for p in pids if (q.id, p) not in known]
                new.append(todo_p)
                if todo_p:
                    items.append((q.question, ans, [ds.passages[p].text for p in todo_p]))
            # Several queries per call: their rows are length-sorted into shared, fuller batches.
            results = iter(scorer.score_many(items) if items else [])
            lines = []
            for (q, pids), todo_p in zip(chunk, new):
                gold = set(q.gold)
                scored = {}
                if todo_p:
                    r = next(results)
                    scored = {p: (r.utility[i], len(r.answer_ids), r.deltas[i].tolist() if save_deltas else None)
                              for i, p in enumerate(todo_p)}
                for i, p in enumerate(pids):
                    u, n_tok, deltas = scored[p] if p in scored else known[(q.id, p)]
                    lines.append(json.dumps(make_row(q.id, p, u, n_tok, p in gold, i, len(pids), deltas)))
            # One write + fsync per group: a kill lands between whole queries or tears only the tail,
            # which --resume cuts back to the last complete query.
            payload = ("\n".join(lines) + "\n").encode()
            _maybe_test_kill(f, payload, g // group)
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
            n = sum(len(p) for _, p in chunk)
            n_new += n
            if bar is not None:
                bar.update(n)
    if bar is not None:
        bar.close()
    _, rows = read_utilities(partial)
    if len(rows) != total:  # read_utilities refuses repeated rows
        raise ValueError(f"{partial}: expected {total} unique rows, found {len(rows)}; rerun with --resume")
    finalize(partial, out)
    dt = time.time() - t0
    if progress and n_new:
        print(f"wrote {out}: {total} rows, {len(queries)} queries ({n_new / max(dt, 1e-9):.2f} passages/s this run)", file=sys.stderr)
    return header


# ------------------------------------------------------------------------------------------- CLI
_SCORING_DEFAULTS: dict = {}  # filled by add_parser: the options --merge and --merge-teachers refuse


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("score", help="teacher utilities for every (query, candidate passage)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="QASPER or SQuAD .json(.gz), uae JSONL or a BEIR folder (default: the full QASPER train split in $UAE_DATA_DIR)")
    p.add_argument("--out", required=True, help="output .jsonl or .jsonl.gz (appears only when complete)")
    p.add_argument("--teacher", default=None,
                   help="smollm2-135m | gemma3-270m (named GGUF teachers from pip packages, cached as safetensors) | an "
                        "HF causal-LM folder (default: smollm2-135m, SmolLM2-135M-Instruct)")
    p.add_argument("--candidates", default=None,
                   help=f"'all', 'top:M' (BM25 top-M of the question + gold evidence), 'answer:M' (BM25 of question + answers) or "
                        f"'student:M' (base student top-M + gold); "
                        f"default {DEFAULT_CANDIDATES}, {DEFAULT_NO_GOLD_CANDIDATES} with --no-gold")
    p.add_argument("--no-gold", action="store_true",
                   help="answer-only data: candidates from the question (and answers, answer:M) alone (no gold paragraph added), every question "
                        "with an answer; the header records \"no_gold\": true (default off)")
    p.add_argument("--candidate-student", default=None, help="encoder folder for 'student:M' (default: all-MiniLM-L6-v2)")
    p.add_argument("--answers", default="all", choices=["all", "first", "shortest"], help="gold answers to average over")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run (OUT.partial)")
    p.add_argument("--shard", default=None, help="I/N: this shard's part of the queries (0-based): with --order paper every N-th paper, so a paper's "
                        "questions stay together; else every N-th query. torchrun ranks are used when unset")
    p.add_argument("--merge", nargs="+", metavar="SHARD", help="merge finished shard files into --out instead of scoring")
    p.add_argument("--merge-teachers", nargs="+", metavar="TABLE",
                   help="teacher ensemble into --out instead of scoring: per-query z-scored utilities averaged over the "
                        "rows all tables share (tables of one candidate policy; default off)")
    p.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--device", default=None, help="torch device, e.g. cpu, cuda, cuda:1 (default: CUDA if available, else CPU)")
    p.add_argument("--max-passage-tokens", type=int, default=None, help="passages cut to this many tokens (default 128)")
    p.add_argument("--max-answer-tokens", type=int, default=None, help="answers cut to this many tokens (default 48)")
    p.add_argument("--aggregation", default="mean", choices=["mean", "sum", "clipped_mean"],
                   help="per-token deltas to one utility: their mean, sum, or mean after clipping each to [-2, 2]")
    p.add_argument("--token-budget", type=int, default=None, help="padded tokens per forward (default 8192 on CPU, 32768 on CUDA)")
    p.add_argument("--order", default="paper", choices=["paper", "hash", "data"],
                   help="query order: paper (default; a paper's questions together, so passages they share run once), "
                        "hash (by query), data (the file's order); paper and hash make any prefix of a run a random sample")
    p.add_argument("--no-share-prefix", action="store_true",
                   help="run every (passage, question, answer) row on its own (slower; same numbers)")
    p.add_argument("--compile", action="store_true",
                   help="run the teacher's decoder through torch.compile: a one-time compile of 3-6 min on 2 CPU cores, "
                        "then 0-17%% faster there (same numbers up to float rounding); for runs of hours")
    p.add_argument("--include-no-gold", action="store_true", help="also score questions without text evidence")
    p.add_argument("--questions-from", default=None, metavar="TABLE",
                   help="score only the questions of this utilities table (a second teacher on the first one's rows, "
                        "for --merge-teachers; default: every selected question)")
    p.add_argument("--reuse", nargs="+", default=None, metavar="TABLE",
                   help="copy the utilities of rows already in these tables (same teacher and settings, any candidate "
                        "policy) instead of scoring them again (default: score every row)")
    p.add_argument("--limit", type=int, default=None, help="score only the first N queries (after order/shard; default: all)")
    p.add_argument("--save-deltas", action="store_true", help="store per-token deltas in each row")
    p.add_argument("--group", type=int, default=16, help="queries batched together per scoring call (default 16)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's, one per core)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_main)
    # the scoring options' defaults, so --merge can refuse the ones it would ignore
    _SCORING_DEFAULTS.update({a.dest: a.default for a in p._actions
                              if a.dest not in ("help", "out", "merge", "merge_teachers", "no_progress", "threads")})


def _main(args) -> int:
    if not args.out.strip() or args.out.endswith(os.sep):
        raise ValueError(f"--out must name a table file (.jsonl or .jsonl.gz), got {args.out!r}")
    from .cli import check_encoder_folder, check_output_path

    check_output_path(args.out, "--out")
    if args.merge and args.merge_teachers:
        raise ValueError("--merge (shards of one run) and --merge-teachers (tables of several teachers) are two jobs: give one")
    if args.merge or args.merge_teachers:  # nothing is scored: a scoring option would be silently ignored
        flag = "--merge" if args.merge else "--merge-teachers"
        ignored = [k for k, v in vars(args).items() if k in _SCORING_DEFAULTS and v != _SCORING_DEFAULTS[k]]
        if ignored:
            names = ", ".join("--" + k.replace("_", "-") for k in ignored)
            raise ValueError(f"{flag} only combines finished tables into --out: {names} would have no effect")
    if args.merge:
        h = merge(args.merge, args.out)
        print(f"merged {len(args.merge)} shard(s) into {args.out}: {h['n_rows']} rows, {h['n_queries']} queries", file=sys.stderr)
        return 0
    if args.merge_teachers:
        from .utilities import merge_teachers

        h = merge_teachers(args.merge_teachers, args.out)
        print(f"ensembled {h['teacher']} into {args.out}: {h['n_rows']} rows, {h['n_queries']} queries", file=sys.stderr)
        return 0
    import torch

    from .data import data_fingerprint, default_qasper_path, load_dataset
    from .teacher import UtilityScorer

    from .cli import set_threads

    set_threads(args.threads)
    for k in ("limit", "group", "max_passage_tokens", "max_answer_tokens", "token_budget"):
        v = getattr(args, k)
        if v is not None and v < 1:  # checked before the teacher loads
            raise ValueError(f"--{k.replace('_', '-')} must be a positive int, got {v}")
    shard = parse_shard(args.shard)
    data = args.data or default_qasper_path("train")
    ds = load_dataset(data)
    candidates = args.candidates or (DEFAULT_NO_GOLD_CANDIDATES if args.no_gold else DEFAULT_CANDIDATES)
    parse_candidates(candidates)  # fail before the model loads
    device = args.device
    if device is None and torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    out = shard_path(args.out, shard)
    check_out(out, args.resume)
    for p in [args.questions_from, *(args.reuse or ())]:
        if p is not None and not os.path.isfile(p):
            raise ValueError(f"{p}: " + ("a folder, not a utilities table" if os.path.isdir(p) else "no such file"))
    # Everything that can fail on the data or the tables fails here, before the teacher loads (a first load
    # dequantises a GGUF: 15-40 s), not after it.
    with_gold_only = not (args.include_no_gold or args.no_gold)
    queries_to_score(ds, with_gold_only=with_gold_only, order=args.order, shard=shard,
                     questions_from=args.questions_from, limit=args.limit)
    for p in args.reuse or ():
        read_utilities(p)
    if parse_candidates(candidates)[0] == "student":
        check_encoder_folder(args.candidate_student, "--candidate-student")
    elif args.candidate_student is not None:
        raise ValueError(f"--candidate-student is used only by --candidates student:M, not {candidates}; drop it")
    opts = {k: v for k, v in (("max_passage_tokens", args.max_passage_tokens), ("max_answer_tokens", args.max_answer_tokens),
                              ("token_budget", args.token_budget)) if v is not None}
    scorer = UtilityScorer.from_pretrained(args.teacher, dtype=args.dtype, device=device, aggregation=args.aggregation,
                                           share_prefix=not args.no_share_prefix, compile=args.compile, **opts)
    score_dataset(scorer, ds, out, candidates=candidates, answers=args.answers,
                  resume=args.resume, shard=shard, order=args.order,
                  with_gold_only=with_gold_only, no_gold=args.no_gold,
                  limit=args.limit, save_deltas=args.save_deltas, progress=not args.no_progress,
                  data_name=os.path.basename(data), group=args.group, candidate_student=args.candidate_student,
                  questions_from=args.questions_from, reuse=args.reuse or (), data_sha1=data_fingerprint(data))
    return 0
