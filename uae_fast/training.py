"""Distillation training: ``uae train`` turns a teacher utility table into a bi-encoder.

Batches: ``batch_size`` queries, grouped by document (queries of one paper sit in the same batch, so
their candidates are shared hard negatives). Each query brings ``passages_per_query`` passages: one of its
gold passages (when it has one), then a uniform sample of its candidate set - the passages the teacher
scored for it when a utilities file is given (``uae score``'s policy: BM25 top-M + gold), else its whole
pool, or the set ``candidates`` names (``top:M`` / ``all``, chosen as ``uae score`` does) - topped up
with random passages of its pool (with the default 8 and ``uae score``'s top:3 policy, ~4 scored
candidates and ~4 random paragraphs of the paper, which get no teacher mass). The selection never looks
at utility *values*, so ``--loss uae`` and ``--loss infonce`` with the same utilities file and seed see
exactly the same batches and differ only in their targets: the same-budget comparison. Every passage of
the batch is a negative for every query (in-batch negatives; under ``torchrun`` also the other ranks'
passages).

Targets per query (:func:`uae_fast.utility_infonce`):

* ``uae``: every batch passage the teacher scored for that query, weighted ``softmax(utility /
  teacher_temperature)``, mixed with the gold passage: ``(1 - label_mix) * teacher + label_mix * gold``;
  queries without utilities but with gold evidence (a partial utilities file) fall back to the gold target;
* ``infonce`` (the supervised baseline): the query's gold passages in the batch, uniformly (one-hot when one).

Both losses see the same number of passages per step, so ``--loss infonce`` with the same settings is
the same-budget supervised baseline.

Answer-only (``no_gold``, ``uae train --no-gold``): no gold passage is drawn first and nothing reads
``gold``; the table must come from ``uae score --no-gold`` (or score every paragraph), ``label_mix`` is 0,
and ``--loss infonce`` takes a weak ``positive`` among the scored candidates (``bm25``, ``bm25-answer``,
``teacher-top1``: :func:`weak_positives`) on the same batches as ``--loss uae``. ``--loss uae`` with a weak
``positive`` and ``label_mix > 0`` mixes that weak label in where gold would be:
``(1 - label_mix) * teacher + label_mix * weak``.

Determinism and resuming: the query order of epoch ``e`` is a function of ``(seed, e)`` and the passages
drawn for micro-batch ``m`` of ``(seed, m)``, so the data position is just the step counter. A checkpoint
(``DIR/checkpoints/step-NNNNNN/``: the model in sentence-transformers format + ``trainer_state.pt`` with
optimizer, scheduler and RNG states) lets ``--resume`` continue bit-for-bit (tested on CPU).

Utilities file (written by ``uae score``; JSONL, optionally gzipped): an optional header record, then rows
with at least ``qid``, ``pid`` and ``utility``; several rows for one (qid, pid) (e.g. one per gold answer)
are averaged.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import math
import os
import random
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ._checks import resolve_device
from .data import RetrievalDataset, Query, default_qasper_path, load_train_dataset, shipped_file, write_text_atomic

# The utilities table (reading, validation) is owned by .utilities; these names stay importable from here.
from .utilities import check_answer_only, check_utilities, load_utilities  # noqa: F401

# Shipped with the package (data/ of a checkout, uae_fast/_data when installed): the default teacher on QASPER train.
DEFAULT_UTILITIES = "qasper-train-utilities.jsonl.gz"
# The answer-only table of the default teacher (`answer:12`: BM25 top-12 of the question and its answers, no
# gold added), cut from the shipped every-paragraph table: what `uae train --no-gold` reads by default.
DEFAULT_NOGOLD_UTILITIES = "qasper-train-utilities-nogold-answer12.jsonl.gz"
# --no-gold's passages per question: its 12 scored candidates (all of them, so a weak positive is always in
# the batch) + 4 random paragraphs of the paper, as the gold defaults have ~4.
NO_GOLD_PASSAGES_PER_QUERY = 16
MAX_AUTO_EPOCHS = 10.0  # the ceiling of --min-steps' extra epochs
POSITIVES = ("gold", "bm25", "bm25-answer", "teacher-top1")
_STATE_FILE = "trainer_state.pt"
_LARGE_POOL = 4096  # pools above this many passages are drawn from without listing them per question (_draw)


# ------------------------------------------------------------------------------------- config
@dataclass
class TrainConfig:
    """Everything that shapes the training trajectory (checked on ``--resume``)."""
    data: str = ""
    utilities: Optional[str] = None
    student: Optional[str] = None
    loss: str = "uae"
    epochs: float = 2.0
    max_steps: Optional[int] = None
    # Opt-in floor: a small data set gets more epochs so the run has at least this many optimizer steps
    # (at most MAX_AUTO_EPOCHS). Off by default: on 300 answer-only QASPER questions, 100 steps (5.3 epochs)
    # retrieved worse on dev than the plain 2 epochs (38 steps): S@1 0.307 vs 0.336, p 0.007 (docs/answer-only.md, "Small corpora").
    min_steps: int = 0
    batch_size: int = 16
    passages_per_query: int = 8  # gold + scored candidates + random paragraphs of the paper (best dev R@1)
    grad_accum: int = 1
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup: float = 0.1
    temperature: float = 0.05
    teacher_temperature: float = 0.5  # sharper than 1: best dev R@1/MAP (0.447/0.532 vs 0.443/0.528 at 1.0)
    label_mix: float = 0.5
    max_query_length: int = 64
    max_passage_length: int = 128
    seed: int = 0
    encode_chunk: int = 16
    # Where each query's passages are sampled from (after its gold): None = the rows the utilities file
    # has for it; "top:M" / "all" = ``uae score``'s policies (BM25 top-M + gold / the whole pool), so a
    # table scored with --candidates all can give teacher mass while the batches keep BM25 hard negatives.
    candidates: Optional[str] = None
    # Teacher-gated negatives: a scored paragraph whose utility is at least (the query's best gold utility
    # - teacher_gate) is taken out of that query's softmax (neither target nor negative): a likely false
    # negative of single-annotator evidence. None = off. Needs utilities; works with both losses.
    teacher_gate: Optional[float] = None
    # Answer-only training: batches, targets and the loss never read ``gold`` (the table must be scored
    # without gold paragraphs added: ``uae score --no-gold``); targets are the teacher's distribution.
    no_gold: bool = False
    # The infonce positive: "gold" (evidence labels) or, with no_gold, a weak label among the scored
    # candidates: "bm25" (BM25 top-1 of the question), "bm25-answer" (of question + answers), "teacher-top1".
    positive: str = "gold"
    # A second, lexical teacher averaged in (per-question z-scores, :mod:`uae_fast.lexical_teacher`): "none" or
    # "bm25-answer" (BM25 of the question + its answers). ``uae train --no-gold`` sets "bm25-answer" (its default).
    lexical_teacher: str = "none"
    # Answer-only: train only on questions whose target is confident, its largest probability
    # softmax(utility / teacher_temperature) over the scored candidates (after the lexical ensemble) at least
    # this. None = every question. Where the default target is least confident its top candidate is rarely
    # gold (scripts/check_target_confidence.py); experimental, not a default.
    min_confidence: Optional[float] = None
    # Answer-only: weight each question's loss by its target's largest probability (as min_confidence reads it),
    # scaled so the training questions' mean weight is 1: low-confidence targets, mostly wrong for every label,
    # count less without being dropped. Experimental, not a default.
    confidence_weight: bool = False

    def check(self) -> None:
        """Type and range of every field. NaN and inf are rejected everywhere: a NaN passes ``v < 0``
        checks, and one NaN weight decay silently fills the saved model with NaN."""
        if self.loss not in ("uae", "infonce"):
            raise ValueError(f"loss must be 'uae' or 'infonce', got {self.loss!r}")
        ints = ("batch_size", "passages_per_query", "grad_accum", "max_query_length", "max_passage_length", "encode_chunk")
        for k in ints + (("max_steps",) if self.max_steps is not None else ()):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{k} must be a positive int, got {v!r}")
        for k in ("seed", "min_steps"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{k} must be an int >= 0, got {v!r}")
        for k in ("epochs", "lr", "temperature", "teacher_temperature", "label_mix", "warmup", "weight_decay") + (
                ("teacher_gate",) if self.teacher_gate is not None else ()):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                what = " (a utility margin)" if k == "teacher_gate" else ""
                raise ValueError(f"{k} must be a finite number{what}, got {v!r}")
        for k in ("epochs", "lr", "temperature", "teacher_temperature"):
            if getattr(self, k) <= 0:
                raise ValueError(f"{k} must be a number > 0, got {getattr(self, k)!r}")
        for k in ("label_mix", "warmup"):
            if not 0 <= getattr(self, k) <= 1:
                raise ValueError(f"{k} must be in [0, 1], got {getattr(self, k)!r}")
        if self.epochs > 1e6:  # the step count is an int: 1e308 epochs overflowed in math.ceil, not a clear error
            raise ValueError(f"epochs must be in (0, 1e6], got {self.epochs!r}")
        # AdamW works in float32: beyond these bounds its step arithmetic overflows (a RuntimeError, not a NaN)
        if self.lr > 10:
            raise ValueError(f"lr must be in (0, 10], got {self.lr!r}")
        if not 0 <= self.weight_decay <= 1000:
            raise ValueError(f"weight_decay must be in [0, 1000], got {self.weight_decay!r}")
        if self.candidates is not None:
            from .scoring import parse_candidates

            parse_candidates(self.candidates)
        self._check_answer_only()

    def _check_answer_only(self) -> None:
        from .lexical_teacher import LEXICAL_TEACHERS

        if self.lexical_teacher not in LEXICAL_TEACHERS:
            raise ValueError(f"lexical_teacher must be one of {', '.join(LEXICAL_TEACHERS)}, got {self.lexical_teacher!r}")
        if self.lexical_teacher != "none" and self.loss != "uae":
            raise ValueError(f"--lexical-teacher {self.lexical_teacher} is ensembled into the uae target: use --loss uae "
                             f"(or --lexical-teacher none)")
        if self.positive not in POSITIVES:
            raise ValueError(f"positive must be one of {', '.join(POSITIVES)}, got {self.positive!r}")
        if self.positive != "gold" and self.loss != "infonce" and not (self.no_gold and self.label_mix > 0):
            raise ValueError(f"--positive {self.positive} sets the InfoNCE positive: use it with --loss infonce (or with "
                             f"--loss uae --no-gold --label-mix > 0, the weak label mixed into the teacher's target)")
        if self.positive != "gold" and not self.no_gold:
            raise ValueError(f"--positive {self.positive} is a baseline for answer-only data: add --no-gold")
        if self.no_gold:
            if self.loss == "infonce" and self.positive == "gold":
                raise ValueError("--no-gold --loss infonce needs a weak --positive (bm25, bm25-answer or teacher-top1): "
                                 "there are no gold labels")
            if self.label_mix != 0 and self.positive == "gold":
                raise ValueError(f"--no-gold trains without gold labels: --label-mix must be 0, got {self.label_mix!r} "
                                 f"(or name the weak label it mixes in with --positive)")
            if self.teacher_gate is not None:
                raise ValueError("--teacher-gate compares with the gold paragraph's utility: not available with --no-gold")
        if self.min_confidence is not None:
            v = self.min_confidence
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
                raise ValueError(f"min_confidence must be a probability in (0, 1], got {v!r}")
            if not (self.no_gold and self.loss == "uae"):
                raise ValueError("--min-confidence keeps the questions whose teacher target is confident: it needs "
                                 "--no-gold --loss uae")
        if not isinstance(self.confidence_weight, bool):
            raise ValueError(f"confidence_weight must be a bool, got {self.confidence_weight!r}")
        if self.confidence_weight and not (self.no_gold and self.loss == "uae"):
            raise ValueError("--confidence-weight weights each question by its teacher target's confidence: it needs "
                             "--no-gold --loss uae")


# Settings that may differ between a run and its --resume (they do not change the trajectory).
_RESUME_FREE = ()


def _config_changes(old: dict, cfg: "TrainConfig", old_world: int, world: int) -> dict:
    """``{field: (old, new)}`` where ``cfg`` (and the world size) differs from a saved run's. A field the saved
    config lacks (the run predates it) counts as its default, so turning a new option on for an old run is a
    change too. The world size counts: each rank's slice of a global batch depends on it."""
    from dataclasses import MISSING, fields

    out = {}
    for f in fields(TrainConfig):
        if f.name in _RESUME_FREE:
            continue
        before = old.get(f.name, f.default if f.default is not MISSING else None)
        if getattr(cfg, f.name) != before:
            out[f.name] = (before, getattr(cfg, f.name))
    if old_world != world:
        out["world_size"] = (old_world, world)
    return out  # (a key this version no longer has cannot be set either: not compared)


# ------------------------------------------------------------------------------------- batches
@dataclass
class Batch:
    """One rank's share of a global micro-batch. Indices point into the passages of the *whole* global batch
    (unique across ranks, rank-major: what ``gather_with_grad`` of every rank's ``passages`` returns)."""
    queries: List[str]                 # question texts, [B]
    passages: List[str]                # this rank's share of the global batch's unique passage texts
    target_idx: torch.Tensor           # [B, K] long, -1 padded
    target_utility: torch.Tensor       # [B, K] float32
    gold_idx: torch.Tensor             # [B] long, -1 = no gold in batch
    qids: List[str] = field(default_factory=list)
    exclude_idx: Optional[torch.Tensor] = None  # [B, E] long, -1 padded: teacher-gated passages per query
    # This rank's share of the global mean loss: (its real queries) x world / (the global batch's queries).
    # 1 when the global batch splits evenly; 0 for a rank left without a query (it repeats the last one).
    loss_weight: float = 1.0
    query_weight: Optional[torch.Tensor] = None  # [B] float32 per-query loss weights (confidence_weight), else None
    # A 63-bit digest of the global batch's passage ids, in order: equal on every rank, or the targets of one
    # rank point at another rank's passages (checked in training under torchrun).
    digest: int = 0


def _target_confidence(utilities: Dict[str, float], teacher_temperature: float) -> float:
    """The largest probability of softmax(utility / T) over a question's scored candidates."""
    u = torch.tensor(list(utilities.values()), dtype=torch.float64) / teacher_temperature
    return float(torch.softmax(u, 0).max())


class BatchSampler:
    """Deterministic batches: epoch order from ``(seed, epoch)``, passages from ``(seed, micro_batch)``.

    ``world``/``rank``: each global micro-batch has ``world * batch_size`` queries; rank ``r`` takes its slice of
    the queries and a share of the global batch's unique passages (:meth:`batch`).
    """

    def __init__(self, ds: RetrievalDataset, cfg: TrainConfig, utilities: Optional[Dict[str, Dict[str, float]]] = None,
                 *, world: int = 1, rank: int = 0, progress: bool = False,
                 candidates: Optional[Dict[str, List[str]]] = None):
        """``candidates``: each query's ``cfg.candidates`` set when already computed (by ``_cut_to_policy``)."""
        self.ds, self.cfg, self.world, self.rank = ds, cfg, world, rank
        self.utilities = utilities or {}
        self.n_gold_target = 0  # --loss uae: questions with gold but no table rows (they train on gold alone)
        conf: Dict[str, float] = {}  # each question's target confidence, for min_confidence / confidence_weight
        if cfg.no_gold:  # answer-only: every question the teacher scored, labels never read
            if not utilities:
                raise ValueError("--no-gold needs a utilities file (--utilities) scored with `uae score --no-gold`")
            queries = [q for q in ds.queries if self.utilities.get(q.id)]
            if cfg.min_confidence is not None or cfg.confidence_weight:
                conf = {q.id: _target_confidence(self.utilities[q.id], cfg.teacher_temperature) for q in queries}
            if cfg.min_confidence is not None:
                kept = [q for q in queries if conf[q.id] >= cfg.min_confidence]
                if not kept:
                    raise ValueError(f"--min-confidence {cfg.min_confidence}: no question's target is that confident "
                                     f"(at --teacher-temperature {cfg.teacher_temperature}); lower it")
                self.n_low_confidence = len(queries) - len(kept)
                queries = kept
        elif cfg.loss == "uae":
            if not utilities:
                raise ValueError("--loss uae needs a utilities file (--utilities); --loss infonce trains on gold evidence only")
            queries = [q for q in ds.queries if self.utilities.get(q.id) or q.gold]
            # a table covering part of the data: the rest trains on gold alone, which the run must say
            self.n_gold_target = sum(1 for q in queries if not self.utilities.get(q.id))
        else:
            queries = [q for q in ds.queries if q.gold]
        if not queries:
            what = ("teacher utilities" if cfg.no_gold else "teacher utilities or gold evidence passages"
                    if cfg.loss == "uae" else "gold evidence passages")
            raise ValueError(f"no training queries: none of the {len(ds.queries)} queries in the data has {what}")
        self.queries = queries
        self._qweight: Dict[str, float] = {}  # confidence_weight: each question's loss weight, mean 1
        if cfg.confidence_weight:
            mean = sum(conf[q.id] for q in queries) / len(queries)
            self._qweight = {q.id: conf[q.id] / mean for q in queries}
        # One list per document (doc_id None: the whole corpus): BEIR questions all rank the whole corpus, and a
        # copy per question would take O(questions x corpus) memory (FiQA: ~2.5 GB). The lists are only read.
        by_doc: Dict[Optional[str], List[str]] = {}

        def pool(q: Query) -> List[str]:
            if q.candidates is not None:
                return ds.pool(q)
            if q.doc_id not in by_doc:
                by_doc[q.doc_id] = ds.pool(q)
            return by_doc[q.doc_id]

        self._pools = {q.id: pool(q) for q in queries}
        self._positions: Dict[int, Dict[str, int]] = {}  # id(large pool) -> {pid: position} (_draw)
        self._cands: Optional[Dict[str, List[str]]] = None
        if cfg.candidates is not None:
            if candidates is None:
                from .scoring import CandidatePolicy

                # student:M = the initial student
                policy = CandidatePolicy(ds, cfg.candidates, student=cfg.student, no_gold=cfg.no_gold)
                policy.prepare(queries, progress=progress and rank == 0)
                candidates = {q.id: policy(q) for q in queries}
            missing = [q.id for q in queries if q.id not in candidates]
            if missing:
                raise ValueError(f"candidates has no set for {len(missing)} training queries (e.g. {missing[:3]})")
            self._cands = {q.id: candidates[q.id] for q in queries}
            if cfg.no_gold:  # the target is the teacher's distribution over the candidates: they must be scored
                for q in queries:
                    unscored = [p for p in self._cands[q.id] if p not in self.utilities[q.id]]
                    if unscored:
                        raise ValueError(f"--candidates {cfg.candidates} with --no-gold: question {q.id} has candidate(s) "
                                         f"{unscored[:3]} that the utilities table did not score; use the table's own "
                                         f"policy (its header's 'candidates') or score this one")
        self._positive: Dict[str, str] = {}
        if cfg.positive != "gold":
            cands = {q.id: self._candidates(q) for q in queries}
            long = [q for q, c in cands.items() if len(c) > cfg.passages_per_query]
            if long:  # every candidate enters the batch, so the positive does and all losses see the same batches
                raise ValueError(f"--positive {cfg.positive}: question {long[0]} has {len(cands[long[0]])} candidates, more "
                                 f"than --passages-per-query {cfg.passages_per_query}, so its positive could miss the "
                                 f"batch; raise --passages-per-query or use a smaller candidate policy")
            self._positive = weak_positives(ds, queries, cands, cfg.positive, self.utilities)
        self._docs: Dict[str, List[Query]] = {}
        for q in queries:  # group by document, keep first-seen order (shuffled per epoch below)
            self._docs.setdefault(q.doc_id if q.doc_id is not None else q.id, []).append(q)
        self.global_batch = cfg.batch_size * world
        self.batches_per_epoch = math.ceil(len(queries) / self.global_batch)
        self._order_cache: Tuple[int, List[Query]] = (-1, [])

    def total_micro_batches(self) -> int:
        if self.cfg.max_steps is not None:
            return self.cfg.max_steps * self.cfg.grad_accum
        # rounded first: 1.1 epochs of 100 batches is 110, not ceil(110.00000000000001) = 111
        n = math.ceil(round(self.cfg.epochs * self.batches_per_epoch, 9))
        floor = min(self.cfg.min_steps * self.cfg.grad_accum, math.ceil(MAX_AUTO_EPOCHS * self.batches_per_epoch))
        return max(1, n, floor)

    def _epoch_order(self, epoch: int) -> List[Query]:
        if self._order_cache[0] != epoch:
            rng = random.Random(self.cfg.seed * 1_000_003 + epoch)
            docs = list(self._docs)
            rng.shuffle(docs)
            order: List[Query] = []
            for d in docs:
                qs = list(self._docs[d])
                rng.shuffle(qs)
                order.extend(qs)
            self._order_cache = (epoch, order)
        return self._order_cache[1]

    def _candidates(self, q: Query) -> Optional[List[str]]:
        """The query's candidate set: ``candidates``' policy, else the passages the table scored for it."""
        scored = self._cands[q.id] if self._cands is not None else self.utilities.get(q.id)
        return list(scored) if scored else None

    def _draw(self, cands: List[str], chosen: List[str], n: int, rng: np.random.Generator,
              q_id: Optional[str] = None) -> List[str]:
        """Up to ``n`` of ``cands`` not in ``chosen``, drawn as ``rng.choice`` over that list would draw them; for a
        large pool (BEIR's: the whole corpus, shared by every question) without building it: the draws depend on
        its length only, and the i-th survivor is found by skipping the few chosen positions."""
        if len(cands) <= _LARGE_POOL:
            rest = [p for p in cands if p not in chosen]
            n = min(n, len(rest))
            return [rest[int(i)] for i in rng.choice(len(rest), size=n, replace=False)] if n > 0 else []
        # a pool is kept for the sampler's life (its id stays its own): its map is cached; another list (a large
        # scored set, built per call) is mapped for this draw only
        pool = self._pools.get(q_id)
        pos = self._positions.get(id(cands)) if cands is pool else None
        if pos is None:
            pos = {p: i for i, p in enumerate(cands)}
            if cands is pool:
                self._positions[id(cands)] = pos
        gone = sorted({pos[p] for p in chosen if p in pos})
        n = min(n, len(cands) - len(gone))
        out = []
        for i in (rng.choice(len(cands) - len(gone), size=n, replace=False) if n > 0 else ()):
            i = int(i)
            for g in gone:
                if g > i:
                    break
                i += 1
            out.append(cands[i])
        return out

    def _pick_passages(self, q: Query, rng: np.random.Generator) -> List[str]:
        pool = self._pools[q.id]
        want = min(self.cfg.passages_per_query, len(pool))
        chosen: List[str] = []
        if q.gold and not self.cfg.no_gold:
            chosen.append(q.gold[int(rng.integers(len(q.gold)))])
        scored = self._candidates(q)
        for cands in ((list(scored) if scored else pool), pool):  # the candidate set first, then the rest of the pool
            if len(chosen) < want:
                chosen.extend(self._draw(cands, chosen, want - len(chosen), rng, q.id))
        u = self.utilities.get(q.id) if self.cfg.loss == "uae" else None
        if u and chosen and not (q.gold and not self.cfg.no_gold) and not any(p in u for p in chosen):
            # A question without gold whose drawn candidates (a --candidates policy) were never scored would
            # have no target but an arbitrary passage: its teacher's best paragraph of the pool takes the last slot.
            in_pool = set(pool)
            best = max((p for p in u if p in in_pool), key=lambda p: u[p], default=None)
            if best is not None:
                chosen[-1] = best
        return chosen

    def global_queries(self, micro: int) -> int:
        """How many queries micro-batch ``micro`` holds over all ranks (the last of an epoch may be short)."""
        pos = micro % self.batches_per_epoch
        return min(self.global_batch, len(self.queries) - pos * self.global_batch)

    def batch(self, micro: int) -> Batch:
        """Micro-batch number ``micro`` (0-based, counting across epochs) for this rank.

        Every rank draws the passages of the whole global batch (deterministic per query), so a paragraph drawn
        on two ranks is one passage of the softmax and every query's targets cover the teacher-scored passages
        of the whole batch: ``world`` ranks of ``batch_size`` train the objective of one process with
        ``world * batch_size`` queries. Each rank encodes a contiguous share of the unique passages."""
        epoch, pos = divmod(micro, self.batches_per_epoch)
        order = self._epoch_order(epoch)
        start = pos * self.global_batch
        everyone = order[start:start + self.global_batch]
        pids: List[str] = []
        index: Dict[str, int] = {}
        picks = []
        for j, q in enumerate(everyone):
            rng = np.random.default_rng([self.cfg.seed, micro, start + j])
            chosen = self._pick_passages(q, rng)
            picks.append(chosen)
            for p in chosen:
                if p not in index:
                    index[p] = len(pids)
                    pids.append(p)
        # Ranks split the global batch evenly; a short last batch may leave a rank with fewer queries, or none
        # (it then repeats the last query at loss weight 0, so every rank still runs the same collectives).
        per = math.ceil(len(everyone) / self.world)
        lo, hi = min(self.rank * per, len(everyone)), min((self.rank + 1) * per, len(everyone))
        weight = (hi - lo) * self.world / len(everyone)
        if hi == lo:
            lo, hi = len(everyone) - 1, len(everyone)
        queries, picks = everyone[lo:hi], picks[lo:hi]
        share = pids[self.rank * len(pids) // self.world:(self.rank + 1) * len(pids) // self.world]
        rows_idx, rows_u, gold, excl = [], [], [], []
        for q, chosen in zip(queries, picks):
            gated = self._gated(q, pids)
            excl.append([index[p] for p in gated])
            if self.cfg.loss == "uae" and q.id in self.utilities:
                u = self.utilities[q.id]
                tgt = [(index[p], u[p]) for p in pids if p in u and p not in gated]
            elif self.cfg.positive != "gold":
                tgt = [(index[self._positive[q.id]], 0.0)]
            else:
                gs = set(q.gold)
                tgt = [(index[p], 0.0) for p in pids if p in gs]
            if not tgt:  # e.g. passages_per_query=1 filled by an unscored gold: the gold stands in
                tgt = [(index[chosen[0]], 0.0)]
            rows_idx.append([t[0] for t in tgt])
            rows_u.append([t[1] for t in tgt])
            if self.cfg.no_gold:  # the label_mix one-hot: the weak positive, if any (never gold)
                g = self._positive.get(q.id)
            else:
                g = chosen[0] if q.gold and chosen and chosen[0] in set(q.gold) else None
            gold.append(index[g] if g is not None else -1)
            if self.cfg.loss == "uae" and not self.cfg.no_gold and q.id in self.utilities and q.gold:
                # another of the question's gold paragraphs in the batch that the table did not score has no
                # target mass: left in, it would be pushed down as a hard negative (infonce counts it positive);
                # the drawn gold stays where the label mix gives it mass
                u, keep = self.utilities[q.id], set(rows_idx[-1]) | ({gold[-1]} if self.cfg.label_mix > 0 else set())
                excl[-1] += [index[p] for p in dict.fromkeys(q.gold) if p in index and p not in u and index[p] not in keep]
        t_idx, t_u = _padded(rows_idx, -1, torch.long), _padded(rows_u, 0.0, torch.float32)
        ex = _padded(excl, -1, torch.long) if self.cfg.teacher_gate is not None or any(excl) else None
        qw = torch.tensor([self._qweight[q.id] for q in queries], dtype=torch.float32) if self._qweight else None
        digest = int.from_bytes(hashlib.blake2b("\x1f".join(pids).encode(), digest_size=8).digest(), "little") >> 1
        return Batch([q.question for q in queries], [self.ds.passages[p].text for p in share], t_idx, t_u,
                     torch.tensor(gold, dtype=torch.long), [q.id for q in queries], ex, weight, qw, digest)

    def _gated(self, q: Query, pids: List[str]) -> set:
        """The batch passages the teacher rates within ``teacher_gate`` of ``q``'s best gold paragraph (not gold)."""
        u = self.utilities.get(q.id)
        if self.cfg.teacher_gate is None or not u or not q.gold:
            return set()
        gs = set(q.gold)
        gold_u = [u[g] for g in gs if g in u]
        if not gold_u:
            return set()
        thr = max(gold_u) - self.cfg.teacher_gate
        return {p for p in pids if p in u and p not in gs and u[p] >= thr}


def weak_positives(ds: RetrievalDataset, queries: Sequence[Query], candidates: Dict[str, List[str]], kind: str,
                   utilities: Optional[Dict[str, Dict[str, float]]] = None) -> Dict[str, str]:
    """Each query's weak positive among its ``candidates`` (ties: the earlier candidate); gold is never read.

    ``bm25``: the candidate BM25 ranks first for the question, ``bm25-answer``: for the question followed by its
    answers (BM25 indexes the query's whole pool, as the ``top:M`` policy does); ``teacher-top1``: the
    candidate with the highest utility.
    """
    from .lexical_teacher import PoolBM25

    if kind not in POSITIVES[1:]:
        raise ValueError(f"weak positive must be one of {', '.join(POSITIVES[1:])}, got {kind!r}")
    out: Dict[str, str] = {}
    bm25 = PoolBM25(ds)
    for q in queries:
        cands = candidates[q.id]
        if kind == "teacher-top1":
            u = (utilities or {}).get(q.id, {})
            scores = [u.get(p, -math.inf) for p in cands]
        else:
            by_pid = bm25(q, q.question if kind == "bm25" else q.with_answers())
            scores = [by_pid[p] for p in cands]
        out[q.id] = cands[int(np.argmax(scores))]
    return out


def _cut_to_policy(utilities: Dict[str, Dict[str, float]], ds: RetrievalDataset, cfg: "TrainConfig",
                   progress: bool = False) -> Tuple[Dict[str, Dict[str, float]], Dict[str, List[str]]]:
    """The table's rows of each question's ``cfg.candidates`` (answer-only): a per-question ensemble
    (``--lexical-teacher``) is then standardised over the passages the target covers, not over the table's
    other rows. Candidates the table did not score stay out here; the sampler refuses them. Also returns
    each question's candidates, which the sampler reuses (``student:M`` embeds the corpus: once is enough)."""
    from .scoring import CandidatePolicy

    queries = [q for q in ds.queries if utilities.get(q.id)]
    policy = CandidatePolicy(ds, cfg.candidates, student=cfg.student, no_gold=True)
    policy.prepare(queries, progress=progress)
    cands = {q.id: policy(q) for q in queries}
    out = {q.id: {p: utilities[q.id][p] for p in cands[q.id] if p in utilities[q.id]} for q in queries}
    return {qid: u for qid, u in out.items() if u}, cands


def _padded(rows: List[list], fill, dtype) -> torch.Tensor:
    """Ragged rows as one [len(rows), max(1, longest)] tensor, right-padded with ``fill``."""
    out = torch.full((len(rows), max(1, max(len(r) for r in rows))), fill, dtype=dtype)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r, dtype=dtype)
    return out


# ------------------------------------------------------------------------------------- model pieces
class _Towers(torch.nn.Module):
    """One forward for queries and length-sorted passage chunks (a single call, so DDP sees one forward)."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, query_feats, passage_feats: List[dict]):
        q = self.encoder(query_feats)
        # a rank whose share of a small global batch has no passage gathers the others' only
        p = torch.cat([self.encoder(f) for f in passage_feats], dim=0) if passage_feats else q[:0]
        return q, p


def _passage_features(encoder, texts: Sequence[str], max_length: int, chunk: int):
    """Features in length-sorted chunks (less padding) and the permutation back to ``texts`` order."""
    lens = [len(t) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: -lens[i])
    feats = [encoder.tokenize([texts[i] for i in order[s:s + chunk]], max_length, role="document")
             for s in range(0, len(order), chunk)]
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
    return feats, inverse


def _optimizer(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "LayerNorm" in n or "layer_norm" in n else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr)


def _scheduler(opt, total_steps: int, warmup: float):
    """Linear warmup over ``warmup * total_steps`` steps, then linear decay to 0."""
    w = int(round(warmup * total_steps))

    def f(step: int) -> float:
        if step < w:
            return (step + 1) / (w + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - w))

    return torch.optim.lr_scheduler.LambdaLR(opt, f)


def _rng_state() -> dict:
    # numpy's state as a tensor and plain numbers: the trainer state then loads with torch.load(weights_only=True)
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    st = {"torch": torch.get_rng_state(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos),
                                                    int(has_gauss), float(gauss)),
          "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


_np_core = getattr(np, "_core", None) or np.core
# What torch.load(weights_only=True) needs to rebuild a numpy array, and nothing that can run code.
# The pickle names the module it was written under, numpy.core (1.x) or numpy._core (2.x): both are allowed.
_NUMPY_ARRAY_GLOBALS = [_np_core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32)),
                        (_np_core.multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
                        (_np_core.multiarray._reconstruct, "numpy._core.multiarray._reconstruct")]


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    name, keys, pos, has_gauss, gauss = st["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        # per device, as many as both runs see: a resume with fewer visible GPUs must not fail here
        for i, s in enumerate(st["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)


_CHECKPOINT_NAME = re.compile(r"step-(\d+)")


def _checkpoints(root: str) -> List[Tuple[int, str]]:
    """``(step, folder name)`` of the complete checkpoints in ``root``, oldest first. Only ``step-N`` folders
    holding a trainer state count: an interrupted write's ``step-N.tmp`` (or anything else) is skipped."""
    if not os.path.isdir(root):
        return []
    found = []
    for d in os.listdir(root):
        m = _CHECKPOINT_NAME.fullmatch(d)
        if m and os.path.isfile(os.path.join(root, d, _STATE_FILE)):
            found.append((int(m.group(1)), d))
    return sorted(found)


def latest_checkpoint(out_dir: str) -> Optional[str]:
    """The newest complete checkpoint under ``out_dir/checkpoints`` (None if there is none)."""
    root = os.path.join(out_dir, "checkpoints")
    done = _checkpoints(root)
    return os.path.join(root, done[-1][1]) if done else None


def _check_finite_model(model: torch.nn.Module, step: int) -> None:
    """Never save a model with NaN/inf weights (a diverged run must fail, not ship NaN)."""
    bad = [n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise FloatingPointError(f"the model has NaN/inf weights after step {step} ({len(bad)} tensors, e.g. {bad[0]}); "
                                 f"not saving it: lower --lr or check --weight-decay / --temperature")


def _fsync_tree(path: str) -> None:
    """Flush every file and folder under ``path`` to disk (so a rename publishes complete data)."""
    for d, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(d, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(d)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _checkpoint_test_hook(step: int) -> None:
    """Crash-safety test hook, between writing a checkpoint and publishing it: ``UAE_TEST_CHECKPOINT=sleep:S``
    pauses S seconds (a window for outside signals); ``kill:N`` / ``int:N`` / ``term:N`` sends this process
    SIGKILL / SIGINT (Ctrl-C) / SIGTERM inside the write of checkpoint N."""
    spec = os.environ.get("UAE_TEST_CHECKPOINT")
    if not spec:
        return
    what, _, arg = spec.partition(":")
    if what == "sleep":
        time.sleep(float(arg))
    elif what in ("kill", "int", "term") and int(arg) == step:
        import signal

        os.kill(os.getpid(), {"kill": signal.SIGKILL, "int": signal.SIGINT, "term": signal.SIGTERM}[what])
        if what != "term":  # SIGTERM is handled: the write goes on
            time.sleep(5)  # the signal lands here, inside the write


class Stopped(KeyboardInterrupt):
    """``train`` ended early on SIGTERM after checkpointing its last step: rerun with ``resume=True``.
    A KeyboardInterrupt, so code that handles Ctrl-C handles a scheduler's stop the same way."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"stopped by signal {signum} after checkpointing step {step}")
        self.signum, self.step = signum, step


class _StopOnSigterm:
    """SIGTERM (what Slurm, Kubernetes and torchrun send before killing) finishes the current step, which is
    then checkpointed, instead of losing every step since the last checkpoint. A second SIGTERM acts at once.
    Ctrl-C (SIGINT) keeps stopping at once. Under torchrun every rank stops at the same step (:func:`_agree`)."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._installed, self._old = False, None

    def __enter__(self):
        import signal
        import threading

        # Signal handlers live in the main thread; a SIGTERM the caller chose to ignore stays ignored.
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN:
            self._old = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
        return self

    def _previous(self):
        import signal

        return self._old if self._old is not None else signal.SIG_DFL  # None: a handler set from C

    def _handle(self, signum, frame):
        if self.signum is not None:  # asked twice: stop now
            import signal

            signal.signal(signum, self._previous())
            os.kill(os.getpid(), signum)
            return
        self.signum = signum

    def __exit__(self, *exc):
        import signal

        if self._installed:
            signal.signal(signal.SIGTERM, self._previous())
            self._installed = False
        return False


def _agree(flags: List[bool], world: int, device) -> List[bool]:
    """Each flag true on any rank is true on every rank (one all-reduce per step under torchrun): a rank that
    stopped or failed alone would leave the others waiting in the next collective until a timeout."""
    if world == 1:
        return flags
    import torch.distributed as dist

    t = torch.tensor([int(f) for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def _reraise(failed: bool, error: Optional[BaseException], elsewhere: BaseException) -> None:
    """After an agreement (:func:`_agree`) that some rank failed: this rank's own error, else ``elsewhere`` (the
    error saying another rank failed): every rank raises, none is left waiting in a collective."""
    if failed:
        raise error if error is not None else elsewhere


def _same_on_every_rank(value: int, device) -> bool:
    """Whether ``value`` (an int below 2**63) is the same on every rank: one all-reduce, the same answer everywhere."""
    import torch.distributed as dist

    t = torch.tensor([value, -value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t[0]) == -int(t[1])


def _global_mean(x: float, world: int, device) -> float:
    """The mean over ranks of ``x`` (each rank's loss is weighted by its share of the global batch, so this is the
    global batch's mean loss)."""
    if world == 1:
        return x
    import torch.distributed as dist

    t = torch.tensor([x], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t) / world


def _gather_rng(world: int) -> list:
    """Every rank's RNG state (checkpointed per rank: under torchrun each rank's CUDA generator is its own)."""
    if world == 1:
        return [_rng_state()]
    import torch.distributed as dist

    states = [None] * world
    dist.all_gather_object(states, _rng_state())
    return states


def _input_digests(cfg: "TrainConfig") -> Dict[str, str]:
    """sha256 of the data and utilities files (a BEIR folder: ``data_folder``, the fingerprint of the files its
    loader reads): --resume refuses a run whose inputs were rewritten at the same paths (a rescored table would
    silently change the targets). Not the folder's other files: a run's --out (its checkpoints), caches or
    indexes kept inside the data folder change nothing."""
    import hashlib

    from .data import data_fingerprint

    out = {}
    for key in ("data", "utilities"):
        path = getattr(cfg, key) or (default_qasper_path("train") if key == "data" else None)
        if not path or not os.path.exists(path):
            continue
        if os.path.isdir(path):  # (checkpoints before 2026-12-07 kept a digest of every file's mtime under "data")
            out["data_folder"] = data_fingerprint(path, split="train")  # the split train() loads from a folder
            continue
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        out[key] = h.hexdigest()
    return out


_SAMPLER = "global-batch"  # how ranks split a batch (torchrun); checkpoints of the per-rank sampler had none


def _runtime(amp: bool, device, world: int = 1) -> dict:
    """What a checkpoint records beside the config and ``--resume`` checks: bf16 autocast and the device type
    change every step's numbers (and the dropout RNG stream); under torchrun, the way ranks split a batch."""
    return {"amp": bool(amp), "device": device.type, **({"sampler": _SAMPLER} if world > 1 else {})}


def _version() -> str:
    from . import __version__

    return __version__


def _save_checkpoint(out_dir, encoder, opt, sched, step, cfg, log, keep, world=1, rng=None, inputs=None, runtime=None):
    """Write ``out_dir/checkpoints/step-N`` atomically: into ``step-N.tmp``, fsync'd, then renamed. A kill at
    any moment leaves the previous checkpoints intact plus at most a ``.tmp`` folder that ``--resume``
    ignores and the next save deletes. Pruning keeps this checkpoint and the ``keep - 1`` newest others."""
    _check_finite_model(encoder, step)
    root = os.path.join(out_dir, "checkpoints")
    os.makedirs(root, exist_ok=True)
    for d in os.listdir(root):  # leftovers of an interrupted save
        if d.endswith(".tmp"):
            shutil.rmtree(os.path.join(root, d), ignore_errors=True)
    name = f"step-{step:06d}"
    final = os.path.join(root, name)
    tmp = final + ".tmp"
    encoder.save(tmp)
    torch.save({"step": step, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "rng": rng if rng is not None else [_rng_state()], "inputs": inputs or {},
                "config": asdict(cfg), "log": log, "world_size": world, "runtime": runtime or {},
                "version": _version()},
               os.path.join(tmp, _STATE_FILE))
    _fsync_tree(tmp)
    _checkpoint_test_hook(step)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _fsync_dir(root)
    if keep > 0:
        older = [d for _, d in _checkpoints(root) if d != name]
        for d in older[:max(0, len(older) - (keep - 1))]:
            shutil.rmtree(os.path.join(root, d), ignore_errors=True)
    return final


def _write_log(out_dir: str, log: List[dict]) -> None:
    write_text_atomic(os.path.join(out_dir, "train_log.jsonl"), "".join(json.dumps(r) + "\n" for r in log))


def _dist_device(device) -> torch.device:
    """This process's training device. Under torchrun each rank takes the GPU of its LOCAL_RANK: ``None`` or a
    bare ``cuda`` means cuda:LOCAL_RANK, or cuda:0 where a rank sees one GPU (a launcher that sets each rank's
    CUDA_VISIBLE_DEVICES); with several GPUs visible, another index is refused (ranks would share a GPU)."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    own = local_rank if visible > 1 else 0
    if device is None and visible:
        device = f"cuda:{own}"
    device = resolve_device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", own)
        elif visible > 1 and device.index != local_rank:
            raise ValueError(f"--device {device} under torchrun: each rank trains on its own GPU, cuda:LOCAL_RANK "
                             f"(here cuda:{local_rank}); pass --device cuda or leave it out")
    return device


def _dist_info(device: torch.device):
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if not dist.is_initialized():  # the backend follows the device: a CPU run on a GPU machine needs gloo
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _on_rank0(fn, world: int, rank: int):
    """``fn()`` on rank 0 only; its result, or its exception, on every rank (one broadcast). Decisions about
    ``--out`` are rank 0's: other ranks listing the folder while rank 0 deletes it, or nodes whose ``--out``
    is not the same storage, would otherwise decide differently and wait in different collectives."""
    if world == 1:
        return fn()
    import torch.distributed as dist

    box = [None]
    if rank == 0:
        try:
            box[0] = (True, fn())
        except Exception as e:  # re-raised on every rank (as a ValueError with its message if it cannot travel)
            import pickle

            try:
                pickle.loads(pickle.dumps(e))
            except Exception:
                e = ValueError(f"{type(e).__name__}: {e}")
            box[0] = (False, e)
    dist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        raise value
    return value


_RUN_FILES = ("checkpoints", "train_log.jsonl", "training_summary.json")  # what marks a folder as a uae train run


def _prepare_out_dir(out_dir: str, cfg: TrainConfig, *, resume: bool, overwrite: bool, world: int) -> Optional[dict]:
    """One run per folder. A fresh run needs an empty or new ``out_dir`` (``overwrite`` first deletes a
    previous run there); ``resume`` needs the same settings as the run it finds. Returns that run's
    summary when it is already finished (nothing left to do). Under torchrun rank 0 alone calls it (``_on_rank0``)."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"--out {out_dir} is a file; training writes a folder there")
    entries = sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []
    ours = any(e in _RUN_FILES for e in entries)
    if overwrite:
        if resume:
            raise ValueError("--overwrite and --resume contradict each other (--resume continues the run in --out, "
                             "--overwrite deletes it)")
        if entries and not ours:
            raise ValueError(f"--overwrite: {out_dir} holds no uae train run (no checkpoints/, train_log.jsonl or "
                             f"training_summary.json); refusing to delete its files, choose another --out")
        return None  # deleted by _clear_run once the inputs have loaded: a typo in them keeps the old run
    if not entries:
        return None
    if not resume:
        what = "a previous uae train run" if ours else f"{len(entries)} other file(s), e.g. {entries[0]!r}"
        raise ValueError(f"--out {out_dir} is not empty ({what}); pass --resume to continue that run, "
                         f"--overwrite to replace it, or choose another --out")
    if not ours:
        raise ValueError(f"--resume: {out_dir} holds no uae train run (no checkpoints/ or training_summary.json)")
    path = os.path.join(out_dir, "training_summary.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            summary = json.load(f)
        old = summary["config"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"--resume: {path} is not a training summary ({type(e).__name__}: {e})") from None
    if not isinstance(old, dict):
        raise ValueError(f"--resume: {path} is not a training summary (its config is not an object)")
    changed = _config_changes(old, cfg, summary.get("world_size", 1), world)
    if changed:
        desc = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
        raise ValueError(f"--resume with different training settings than the run in {out_dir} ({desc}); "
                         f"use the same settings, --overwrite, or a new --out")
    return summary if summary.get("finished") else None


def _clear_run(out_dir: str) -> None:
    """``--overwrite``: delete the previous run in ``out_dir`` (checked by _prepare_out_dir). The summary goes
    first: a kill midway must not leave a "finished" run without its weights for --resume to hand back."""
    entries = os.listdir(out_dir) if os.path.isdir(out_dir) else []
    for e in sorted(entries, key=lambda e: (e != "training_summary.json", e)):
        path = os.path.join(out_dir, e)
        shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)


# ------------------------------------------------------------------------------------- training loop
def train(cfg: TrainConfig, out_dir: str, *, resume: bool = False, device=None, amp: Optional[bool] = None,
          gradient_checkpointing: bool = False, save_every: int = 100, keep_checkpoints: int = 2,
          stop_after: Optional[int] = None, progress: bool = True, ds: Optional[RetrievalDataset] = None,
          overwrite: bool = False) -> dict:
    """Train a :class:`uae_fast.BiEncoder` and save it (sentence-transformers format) to ``out_dir``.

    Returns a summary dict (steps, final loss, seconds, ...). ``stop_after`` ends this run after that many
    optimizer steps in total (checkpointing there) without changing the schedule; ``resume`` continues from
    the newest checkpoint under ``out_dir/checkpoints`` (a finished run is returned as is). A non-empty
    ``out_dir`` without ``resume`` is refused unless ``overwrite`` (which deletes the previous run there).
    """
    from .ops.infonce import utility_infonce
    from .distributed import gather_with_grad
    from .student import BiEncoder

    cfg.check()
    for k, v, low in (("save_every", save_every, 1), ("keep_checkpoints", keep_checkpoints, 0),
                      ("stop_after", 1 if stop_after is None else stop_after, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"{k} must be an int >= {low}, got {v!r}")
    out_dir = os.fspath(out_dir)
    device = _dist_device(device)
    rank, world = _dist_info(device)
    if world > 1 and device.type == "cuda":  # collectives of objects (all_gather_object) use the current device
        torch.cuda.set_device(device)
    done = _on_rank0(lambda: _prepare_out_dir(out_dir, cfg, resume=resume, overwrite=overwrite, world=world),
                     world, rank)
    if done is not None:
        if rank == 0:
            print(f"uae train: {out_dir} already holds this finished run ({done.get('steps')} steps); nothing to do",
                  file=sys.stderr)
        return dict(done, rank=rank, seconds_this_run=0.0, already_finished=True)
    # bf16 autocast: default on CUDA only. On CPUs with AVX512-BF16/AMX a MiniLM step is ~1.5x faster
    # (benchmarks/bench_train_amp.py); elsewhere bf16 is emulated, so on CPUs it stays opt-in.
    amp = (device.type == "cuda") if amp is None else bool(amp)
    if amp and device.type not in ("cuda", "cpu"):
        raise ValueError(f"--amp (bf16 autocast) supports CUDA and CPU devices, not {device.type}")

    runtime = _runtime(amp, device, world)
    if ds is None:  # a BEIR folder trains on its train split (its default, test, is for evaluation)
        ds = load_train_dataset(cfg.data)
    utilities = None
    if cfg.loss == "uae" and not cfg.utilities:
        raise ValueError("--loss uae needs --utilities FILE (from `uae score`)")
    if cfg.teacher_gate is not None and not cfg.utilities:
        raise ValueError("--teacher-gate needs --utilities FILE: the gate compares teacher utilities")
    if cfg.no_gold and not cfg.utilities:
        raise ValueError("--no-gold needs --utilities FILE (from `uae score --no-gold`): its rows are the candidates")
    cands = None  # the --candidates sets, when computed here for the lexical teacher
    teacher = None  # the table's teacher, for the model card (a Gemma teacher's terms travel with the model)
    if cfg.utilities:  # infonce uses it only for the candidate sets (same batches as uae)
        utilities, header = load_utilities(cfg.utilities)
        teacher = header.get("teacher")
        if cfg.no_gold:
            check_answer_only(header, cfg.utilities)
        if _is_shipped_default(cfg.utilities):
            utilities = _shipped_for_data(utilities, ds, cfg, rank == 0)
        check_utilities(utilities, ds, path=cfg.utilities, data_path=cfg.data, header=header if rank == 0 else None)
        if cfg.lexical_teacher != "none":
            from .lexical_teacher import with_lexical_teacher

            if cfg.no_gold and cfg.candidates is not None:  # z-scored over the candidates the batches use
                utilities, cands = _cut_to_policy(utilities, ds, cfg, progress and rank == 0)
            utilities = with_lexical_teacher(utilities, ds, header, path=cfg.utilities)
    elif cfg.lexical_teacher != "none":
        raise ValueError(f"--lexical-teacher {cfg.lexical_teacher} is ensembled with a teacher table: give --utilities FILE")
    sampler = BatchSampler(ds, cfg, utilities, world=world, rank=rank, progress=progress, candidates=cands)
    if sampler.n_gold_target and rank == 0:
        print(f"uae train: {sampler.n_gold_target} of {len(sampler.queries)} training questions have no rows in the "
              f"utilities table; they train on their gold evidence alone (a one-hot target)", file=sys.stderr)
    total_micro = sampler.total_micro_batches()
    total_steps = max(1, math.ceil(total_micro / cfg.grad_accum))

    inputs = _input_digests(cfg)
    # the per-batch digest sees passage ids only: a node whose table or data differs in its values would train
    # on other targets without a word
    if world > 1 and not _same_on_every_rank(int(hashlib.sha256(json.dumps(inputs, sort_keys=True).encode())
                                                 .hexdigest()[:15], 16), device):
        raise ValueError("the ranks' data or utilities files differ (sha256 of their bytes: a .gz each node compressed "
                         "itself differs in its header): every rank must train on the same files")
    ckpt = _on_rank0(lambda: latest_checkpoint(out_dir), world, rank) if resume else None
    if ckpt is not None and _agree([not os.path.isfile(os.path.join(ckpt, _STATE_FILE))], world, device)[0]:
        raise ValueError(f"--resume: rank 0 resumes from {ckpt}, which not every rank can read: under torchrun on "
                         f"several nodes --out must be storage that every node shares")
    if resume and ckpt is None and rank == 0:
        print(f"uae train: --resume but no checkpoint under {out_dir}/checkpoints; starting from scratch", file=sys.stderr)
    if ckpt is not None:
        try:
            # weights_only: a trainer state is tensors and plain values, and a pickle could run code on load;
            # numpy arrays allowed for checkpoints written before the RNG state became tensors
            with torch.serialization.safe_globals(_NUMPY_ARRAY_GLOBALS):
                state = torch.load(os.path.join(ckpt, _STATE_FILE), map_location="cpu", weights_only=True)
            if not isinstance(state, dict) or not {"config", "step", "optimizer", "scheduler", "rng"} <= state.keys():
                raise KeyError("not a trainer state")
        except Exception as e:  # a checkpoint damaged after it was written (disk, copy)
            raise ValueError(f"checkpoint {ckpt} is unreadable ({type(e).__name__}: {' '.join(str(e).split())[:200]}); "
                             f"delete it to resume from the previous one") from None
        changed = _config_changes(state["config"], cfg, state.get("world_size", 1), world)
        old_rt = state.get("runtime") or ({"sampler": "per-rank (uae_fast <= 0.2.0)"} if world > 1 else {})
        for k, v in old_rt.items():
            if runtime.get(k, v) != v:
                changed[k] = (v, runtime.get(k))
        if rank == 0 and state.get("version") != _version():
            # candidates, lexical targets and the sampler are recomputed by this version: say so, do not refuse
            # (a checkpoint without a version predates 2026-12-07's BM25 tokeniser, which moved lexical targets)
            was = f"uae_fast {state['version']}" if state.get("version") else "an earlier uae_fast (before 2026-12-07)"
            print(f"uae train: warning: {ckpt} was written by {was}, resuming with {_version()}; the rest of the run "
                  f"follows this version's sampling and targets", file=sys.stderr)
        rewritten = [k for k, d in (state.get("inputs") or {}).items() if inputs.get(k, d) != d]
        if rewritten:
            raise ValueError(f"--resume: the {' and '.join(rewritten)} file(s) changed since the checkpoint {ckpt} "
                             f"(same path, other contents); resume with the original files or start a new --out")
        if changed:
            desc = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
            raise ValueError(f"--resume with different training settings than the checkpoint {ckpt} ({desc}); "
                             f"use the same settings or a new --out")
        try:
            encoder = BiEncoder(ckpt, device=device)
        except ValueError as e:  # its weights damaged after they were written
            raise ValueError(f"checkpoint {ckpt} is unreadable ({e}); delete it to resume from the previous one") from None
    else:
        torch.manual_seed(cfg.seed)
        encoder = BiEncoder(cfg.student, device=device)
        state = None
    if overwrite:  # every input loaded and checked: only now the previous run goes
        _on_rank0(lambda: _clear_run(out_dir), world, rank)
    # BERT's pooler head is computed but unused by sentence pooling: freeze it so DDP sees no unused
    # parameters and AdamW's weight decay does not silently shrink it.
    pooler = getattr(encoder.model, "pooler", None)
    if pooler is not None:
        pooler.requires_grad_(False)
    if gradient_checkpointing:
        encoder.gradient_checkpointing_enable()
    towers = _Towers(encoder)
    if world > 1:
        towers = torch.nn.parallel.DistributedDataParallel(towers, device_ids=[device.index] if device.type == "cuda" else None)
    opt = _optimizer(encoder, cfg)
    sched = _scheduler(opt, total_steps, cfg.warmup)
    step, log = 0, []
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        rng = state["rng"]  # a list per rank (a dict in checkpoints of 0.1, rank 0's only)
        _set_rng_state(rng[rank] if isinstance(rng, list) else rng)
        step, log = int(state["step"]), list(state["log"])
    end = total_steps if stop_after is None else min(total_steps, int(stop_after))

    os.makedirs(out_dir, exist_ok=True)
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=step, desc=f"uae train ({cfg.loss})", unit="step", dynamic_ncols=True)
    encoder.train()
    t0, ema = time.time(), None
    with _StopOnSigterm() as stop:
        step, ema = _train_steps(step, end, total_steps, total_micro, log, ema, stop, bar, encoder, towers, sampler, opt,
                                 sched, cfg, device, amp, rank, world, out_dir, save_every, keep_checkpoints, inputs,
                                 runtime)
    if bar is not None:
        bar.close()
    seconds = time.time() - t0
    summary = {"steps": step, "total_steps": total_steps, "finished": step >= total_steps,
               "final_loss": log[-1]["loss"] if log else None, "seconds_this_run": round(seconds, 1),
               "train_queries": len(sampler.queries),
               **({"low_confidence_questions": sampler.n_low_confidence} if cfg.min_confidence is not None else {}),
               **({"gold_target_questions": sampler.n_gold_target} if sampler.n_gold_target else {}),
               "world_size": world, "rank": rank, "config": asdict(cfg),
               **({"teacher": str(teacher)} if teacher else {})}
    # a SIGTERM after the last step's agreement (a --stop-after run) still stops every rank the same way
    if _agree([stop.signum is not None and step < total_steps], world, device)[0]:
        import signal

        summary["stopped_by_signal"] = stop.signum or int(signal.SIGTERM)
    error = None
    if rank == 0:
        try:
            if step >= total_steps:
                _check_finite_model(encoder, step)
                for stale in glob.glob(os.path.join(glob.escape(out_dir), ".saving-*")):  # a save killed earlier
                    shutil.rmtree(stale, ignore_errors=True)
                encoder.save(out_dir, training=summary)
            _write_log(out_dir, log)
            write_text_atomic(os.path.join(out_dir, "training_summary.json"), json.dumps(summary, indent=2))
        except Exception as e:  # every rank fails, none waits in the barrier
            error = e
    _reraise(_agree([error is not None], world, device)[0], error,
             OSError(f"rank 0 could not write the final model or the training summary in {out_dir} (its error says why)"))
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    if "stopped_by_signal" in summary:
        raise Stopped(summary["stopped_by_signal"], step)
    return summary


def _train_steps(step, end, total_steps, total_micro, log, ema, stop, bar, encoder, towers, sampler, opt, sched, cfg,
                 device, amp, rank, world, out_dir, save_every, keep_checkpoints, inputs=None, runtime=None):
    """The optimisation loop from ``step`` to ``end``; returns (step, loss EMA). Checkpoints every
    ``save_every`` steps, at the last step (the final model is published from a saved state), and at the step
    a SIGTERM arrived in."""
    from .distributed import gather_with_grad
    from .ops.infonce import nonfinite_passthrough, utility_infonce

    while step < end:
        opt.zero_grad(set_to_none=True)
        step_loss = 0.0
        n_micro = min(cfg.grad_accum, total_micro - step * cfg.grad_accum)  # a short last step averages what it has
        # each micro-batch by its share of the step's queries: an epoch's short last batch must not count as much
        # as a full one (with grad_accum 1, or only full batches, this is 1 / n_micro)
        sizes = [sampler.global_queries(step * cfg.grad_accum + a) for a in range(n_micro)]
        step_queries = sum(sizes)
        for a in range(n_micro):
            micro = step * cfg.grad_accum + a
            b = sampler.batch(micro)
            qf = encoder.tokenize(b.queries, cfg.max_query_length, role="query")
            pf, inverse = _passage_features(encoder, b.passages, cfg.max_passage_length, cfg.encode_chunk)
            # DDP all-reduces the gradients once per step, after the last micro-batch (the sum is the same)
            sync = contextlib.nullcontext() if world == 1 or a == n_micro - 1 else towers.no_sync()
            with sync, torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
                q, p = towers(qf, pf)
            q, p = q.float(), p.float()[inverse.to(device)]
            t_idx, t_u, gold = b.target_idx.to(device), b.target_utility.to(device), b.gold_idx.to(device)
            ex = None if b.exclude_idx is None else b.exclude_idx.to(device)
            if world > 1 and not _same_on_every_rank(b.digest, device):
                raise ValueError(f"micro-batch {micro}: the ranks drew different passages for the same global batch "
                                 f"(different data, utilities or candidates on some node?); every rank must see the same")
            p = gather_with_grad(p)  # the global batch's unique passages; the indices already point into them
            mix = cfg.label_mix if cfg.loss == "uae" else 0.0
            weighted = b.query_weight is not None
            bad = not (bool(torch.isfinite(q).all()) and bool(torch.isfinite(p).all()))
            loss, error = None, None
            if not bad:
                try:  # an overflow comes back as inf (checked for the step below), in forward and in backward
                    with nonfinite_passthrough():
                        loss = utility_infonce(q, p, t_idx, t_u, temperature=cfg.temperature,
                                               teacher_temperature=cfg.teacher_temperature, label_mix=mix,
                                               gold_idx=gold if mix > 0 else None, exclude_idx=ex,
                                               reduction="none" if weighted else "mean")
                except Exception as e:  # raised on this rank alone, the others would wait in backward's all-reduce
                    error = e
            # Diverged embeddings, or a loss that failed, stop every rank at once, with the step.
            bad, failed = _agree([bad, error is not None], world, device)
            if bad:
                raise FloatingPointError(f"the encoder's embeddings are not finite at step {step} (on this or another "
                                         f"rank); lower --lr or check the utilities")
            _reraise(failed, error, RuntimeError(f"the loss failed on another rank at step {step} (its error says why)"))
            if weighted:
                loss = (loss * b.query_weight.to(device)).mean()
            if b.loss_weight != 1.0:  # DDP averages the ranks: weighted, that is the global batch's mean
                loss = loss * b.loss_weight
            share = sizes[a] / step_queries
            (loss * share).backward()
            step_loss += float(loss.detach()) * share
        grads = [t.grad for t in encoder.parameters() if t.grad is not None]
        # the loss returns overflowing gradients as inf (nonfinite_passthrough); DDP's average spreads them
        bad_grads = bool(grads) and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
        bad_loss, bad_grads, stopping = _agree([not math.isfinite(step_loss), bad_grads, stop.signum is not None],
                                               world, device)
        if bad_loss or bad_grads:  # on every rank at once, not one rank raising while the others wait
            if not math.isfinite(step_loss):
                what = f"loss is {step_loss}"
            elif bad_loss:
                what = "loss is not finite on another rank"
            else:
                what = "the gradients are not finite (an overflow of q . p / temperature on this or another rank)"
            raise FloatingPointError(f"{what} at step {step}; lower --lr or check the utilities")
        lr = sched.get_last_lr()[0]  # the rate this step used (after sched.step() it is the next one's)
        opt.step()
        sched.step()
        step += 1
        step_loss = _global_mean(step_loss, world, device)  # the logged loss is the global batch's, on every rank
        log.append({"step": step, "loss": step_loss, "lr": lr})
        ema = step_loss if ema is None else 0.9 * ema + 0.1 * step_loss
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{ema:.4f}", lr=f"{lr:.2e}")
        if step % save_every == 0 or step == end or stopping:  # the same decision on every rank
            rng, error = _gather_rng(world), None
            if rank == 0:
                try:
                    _save_checkpoint(out_dir, encoder, opt, sched, step, cfg, log, keep_checkpoints, world, rng=rng,
                                     inputs=inputs, runtime=runtime)
                    _write_log(out_dir, log)
                except Exception as e:  # disk full, a non-finite model: every rank stops, not only rank 0
                    error = e
            _reraise(_agree([error is not None], world, device)[0], error,
                     OSError(f"rank 0 could not write the checkpoint of step {step} (its error says why)"))
        if stopping:
            if stop.signum is None:  # another rank's SIGTERM: this rank stops the same way
                import signal

                stop.signum = int(signal.SIGTERM)
            break
    return step, ema


# ------------------------------------------------------------------------------------- CLI
def _default_utilities(no_gold: bool = False) -> str:
    """The shipped QASPER train utilities table (``no_gold``: the answer-only one); ``FileNotFoundError``
    saying to pass --utilities if absent."""
    return shipped_file(DEFAULT_NOGOLD_UTILITIES if no_gold else DEFAULT_UTILITIES,
                        instead="--utilities FILE (a table from `uae score`)")


def _is_shipped_default(path: Optional[str]) -> bool:
    """True for a QASPER train table shipped with the package (the defaults ``uae train`` reads when
    --utilities is not given, and the others of data/: every-paragraph, Gemma, top12), given or named."""
    from .data import _shipped_dirs

    name = os.path.basename(path or "")
    if not (name.startswith("qasper-train-utilities") and name.endswith(".jsonl.gz")):
        return False
    return os.path.dirname(os.path.realpath(path)) in [os.path.realpath(d) for d in _shipped_dirs()]


def _shipped_for_data(utilities: Dict[str, Dict[str, float]], ds, cfg, say: bool) -> Dict[str, Dict[str, float]]:
    """The shipped table's rows for the questions of ``ds`` (a QASPER train slice, say), so training on part
    of QASPER train needs no table of its own; none of them there means other data, which needs scoring."""
    ids = {q.id for q in ds.queries}
    keep = {q: d for q, d in utilities.items() if q in ids}
    if not keep:
        raise ValueError(f"the shipped utilities table {os.path.basename(cfg.utilities)} (QASPER train) has "
                         f"no row for the questions of {cfg.data}: score this data with `uae score"
                         f"{' --no-gold' if cfg.no_gold else ''}` and pass --utilities FILE")
    if len(keep) < len(utilities) and say:
        print(f"uae train: using the shipped table's rows for the {len(keep)} of its {len(utilities)} questions that "
              f"{os.path.basename(cfg.data)} holds", file=sys.stderr)
    return keep


def add_parser(subparsers) -> None:
    d = TrainConfig()
    p = subparsers.add_parser(
        "train", help="train a bi-encoder on teacher utilities (UAE) or gold evidence (InfoNCE)",
        description="Distil teacher utilities into a bi-encoder (utility-modulated InfoNCE). The output folder loads "
                    "with SentenceTransformer(DIR). Multi-GPU: torchrun --nproc_per_node N -m uae_fast.cli train ...")
    p.add_argument("--data", default=None, help="training data: QASPER or SQuAD JSON(.gz), the JSONL schema or a BEIR folder (default: the full QASPER train split in $UAE_DATA_DIR)")
    p.add_argument("--utilities", default=None,
                   help=f"utilities JSONL(.gz) from `uae score` (uae default: the shipped {DEFAULT_UTILITIES}; with --no-gold: "
                        f"{DEFAULT_NOGOLD_UTILITIES}; with --loss infonce it only supplies the candidate sets, so both "
                        "losses see the same batches)")
    p.add_argument("--out", required=True, help="output folder (sentence-transformers format); checkpoints go to OUT/checkpoints")
    p.add_argument("--student", default=None, help="initial encoder folder (default: all-MiniLM-L6-v2)")
    p.add_argument("--loss", choices=("uae", "infonce"), default=d.loss,
                   help="uae: teacher utilities (+ label_mix gold); infonce: gold evidence only (supervised baseline) "
                        f"or the --positive weak label (default {d.loss})")
    p.add_argument("--no-gold", action="store_true",
                   help="answer-only training: batches, targets and loss never read gold evidence; needs a table scored "
                        "with `uae score --no-gold` (default off)")
    p.add_argument("--positive", choices=POSITIVES, default=d.positive,
                   help="--loss infonce positive: gold (evidence labels) or, with --no-gold, a weak label among the "
                        "scored candidates: bm25 (BM25 top-1 of the question), bm25-answer (of question + answers), "
                        f"teacher-top1 (the teacher's best candidate; under --loss uae --label-mix, the best of the "
                        f"target the loss uses, the lexical teacher's ensemble by default) (default {d.positive})")
    p.add_argument("--lexical-teacher", choices=("none", "bm25-answer"), default=None,
                   help="average each question's z-scored teacher utilities with the z-scored BM25(question + answers) "
                        "scores of the same candidates (a teacher ensemble; gold is never read) (default: bm25-answer "
                        "with --no-gold --loss uae, else none)")
    p.add_argument("--min-confidence", type=float, default=None, metavar="P",
                   help="--no-gold: train only on questions whose target's largest probability is at least P "
                        "(experimental; default: every question)")
    p.add_argument("--confidence-weight", action="store_true",
                   help="--no-gold: weight each question's loss by its target's largest probability, scaled to mean 1 "
                        "(experimental, ~1.2x the step time on CPUs: the per-question loss recomputes its scores in "
                        "backward; default: equal weights)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in OUT from its newest checkpoint (same settings required; a finished run "
                        "is left as is)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the previous uae train run in OUT (checkpoints, logs, model) and start afresh "
                        "(default: a non-empty OUT without --resume is refused)")
    p.add_argument("--epochs", type=float, default=d.epochs, help="passes over the training questions (fractions allowed)")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs; default: from --epochs)")
    p.add_argument("--min-steps", type=int, default=d.min_steps,
                   help="give a small data set more epochs (up to 10) so the run has at least this many optimizer "
                        "steps; 0 = exactly --epochs (on 300 QASPER questions 2 epochs beat a 100-step floor)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="queries per micro-batch (per device)")
    p.add_argument("--passages-per-query", type=int, default=None,
                   help=f"passages sampled per question (default {d.passages_per_query}; {NO_GOLD_PASSAGES_PER_QUERY} "
                        "with --no-gold: its top-12 candidates + random paragraphs)")
    p.add_argument("--candidates", default=None,
                   help="sample each question's passages (after a gold one) from 'top:M' (BM25 top-M + gold, as "
                        "uae score), 'answer:M' (BM25 of question + answers), 'student:M' (the initial student's top-M + gold) or 'all' (its paper); "
                        "default: the questions' rows in --utilities")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=d.lr, help="AdamW peak learning rate")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    p.add_argument("--warmup", type=float, default=d.warmup, help="fraction of steps with linear warmup")
    p.add_argument("--temperature", type=float, default=d.temperature, help="student softmax temperature")
    p.add_argument("--teacher-temperature", type=float, default=None,
                   help=f"teacher distribution softmax(utility / T), --loss uae only (default {d.teacher_temperature})")
    p.add_argument("--label-mix", type=float, default=None,
                   help=f"weight of the gold passage in the uae target (default {d.label_mix}; 0 with --no-gold, where a value > 0 "
                        "mixes in the weak --positive instead)")
    p.add_argument("--teacher-gate", type=float, default=None, metavar="MARGIN",
                   help="take each question's scored paragraphs with utility >= (its best gold's - MARGIN) out of its "
                        "softmax: likely false negatives (both losses; compares the --utilities table's, the "
                        "shipped one by default; default off)")
    p.add_argument("--max-query-length", type=int, default=d.max_query_length, help="questions cut to this many tokens")
    p.add_argument("--max-passage-length", type=int, default=d.max_passage_length, help="passages cut to this many tokens")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the query order, passage sampling and torch")
    p.add_argument("--save-every", type=int, default=50, help="checkpoint every N optimizer steps")
    p.add_argument("--keep-checkpoints", type=int, default=2, help="checkpoints kept (0 = all)")
    p.add_argument("--stop-after", type=int, default=None, help="end this run after N total steps (resume later; default: run to the end)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute encoder activations in backward: less memory, one more forward of compute")
    p.add_argument("--amp", default="auto", choices=("auto", "on", "off"), help="bf16 autocast, master weights stay fp32 (auto = on for CUDA; on: also on CPUs, ~1.5x faster "
                        "where the CPU has AVX512-BF16 or AMX)")
    p.add_argument("--device", default=None,
                   help="torch device, e.g. cpu, cuda, cuda:1 (default: CUDA if available, else CPU; under torchrun cuda:LOCAL_RANK)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's, one per core)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_main)


def _main(args) -> int:
    from .cli import check_output_path, set_threads

    set_threads(args.threads)
    check_output_path(args.out, "--out", folder=True)  # before the data and the student load
    data = args.data or default_qasper_path("train")
    utilities = args.utilities
    if (args.loss == "uae" or args.teacher_gate is not None or args.no_gold) and utilities is None:
        utilities = _default_utilities(args.no_gold)
    if args.label_mix and args.loss == "infonce":  # 0 is what infonce does anyway
        raise ValueError("--label-mix mixes a label into the uae loss's teacher target: it has no effect with --loss infonce")
    if args.teacher_temperature is not None and args.loss == "infonce":
        raise ValueError("--teacher-temperature shapes the uae loss's teacher target: it has no effect with --loss infonce")
    if args.min_steps and args.max_steps is not None:
        raise ValueError("--min-steps lengthens an --epochs budget: it has no effect with --max-steps")
    label_mix = args.label_mix if args.label_mix is not None else (0.0 if args.no_gold else TrainConfig.label_mix)
    ppq = args.passages_per_query
    if ppq is None:
        ppq = NO_GOLD_PASSAGES_PER_QUERY if args.no_gold else TrainConfig.passages_per_query
    lexical = args.lexical_teacher or ("bm25-answer" if args.no_gold and args.loss == "uae" else TrainConfig.lexical_teacher)
    cfg = TrainConfig(data=data, utilities=utilities, student=args.student, loss=args.loss,
                      epochs=args.epochs, max_steps=args.max_steps, min_steps=args.min_steps, batch_size=args.batch_size,
                      passages_per_query=ppq, grad_accum=args.grad_accum, lr=args.lr,
                      weight_decay=args.weight_decay, warmup=args.warmup, temperature=args.temperature,
                      teacher_temperature=TrainConfig.teacher_temperature if args.teacher_temperature is None
                      else args.teacher_temperature, label_mix=label_mix,
                      max_query_length=args.max_query_length, max_passage_length=args.max_passage_length, seed=args.seed,
                      candidates=args.candidates, teacher_gate=args.teacher_gate, no_gold=args.no_gold,
                      positive=args.positive, lexical_teacher=lexical, min_confidence=args.min_confidence,
                      confidence_weight=args.confidence_weight)
    amp = {"auto": None, "on": True, "off": False}[args.amp]
    s = train(cfg, args.out, resume=args.resume, device=args.device, amp=amp,
              gradient_checkpointing=args.gradient_checkpointing, save_every=args.save_every,
              keep_checkpoints=args.keep_checkpoints, stop_after=args.stop_after, progress=not args.no_progress,
              overwrite=args.overwrite)
    if s["rank"] != 0 or s.get("already_finished"):
        return 0
    if s["finished"]:
        print(f"trained {s['steps']} steps ({cfg.loss}) in {s['seconds_this_run']:.0f} s, final loss {s['final_loss']:.4f}; "
              f"model saved to {args.out} (SentenceTransformer({args.out!r}) loads it)")
    else:
        print(f"stopped at step {s['steps']}/{s['total_steps']}; continue with --resume")
    return 0
