"""Evidence-retrieval evaluation: ``uae eval`` scores trained bi-encoders against the baselines in one run.

For every query with gold evidence, the candidates are its pool (QASPER: the paper's paragraphs) and the
system ranks all of them; Success@1/5 (any gold in the top k), Recall@1/5 (the share of the gold in the top
k), MAP and MRR follow :mod:`uae_fast.metrics`. ``--save-runs DIR`` writes each system's ranking as a TREC run
and the gold as qrels (:mod:`uae_fast.trec`), so ir-measures, ranx or trec_eval can check or extend them.

Systems (rows of one table):

* each ``--model`` folder and ``base`` (the untrained student): passages are embedded once (offline
  indexing, timed separately), one :class:`uae_fast.TopKIndex` per candidate pool; per query we time
  *embedding the question + the index search* - the serving cost;
* ``bm25``: Okapi BM25 over the pool (:class:`uae_fast.bm25.BM25`), timed per query;
* ``hybrid``: :class:`uae_fast.hybrid.HybridIndex` per pool: BM25 fused with the first ``--model`` (else
  the base student), one row per ``--fusion`` config (``hybrid`` = the default config, ``hybrid:NAME`` =
  ``NAME.json``); timed like the bi-encoders (question embedding + both searches + fusion); paired
  bootstrap against its dense side and BM25;
* ``rerank``: UPR-style LLM re-ranking (Sachan et al., 2022): the teacher LM re-scores the untrained
  student's top ``--rerank-depth`` passages by ``mean_t log p(question_t | passage, question_<t)`` and
  re-orders them (the rest keeps the student's order). Each query costs ``depth`` LM forwards, so it runs
  on the first ``--rerank-limit`` queries; every system is also reported on that subset, and the speedup
  is re-ranker latency / bi-encoder latency per query on it.

``--reader``: a reader LM (default: the teacher, SmolLM2-135M-Instruct) answers each question from each
system's top-1 passage (plus the gold passage as an upper bound); answer Token F1 with SQuAD
normalisation, max over gold answers, on the first ``--reader-limit`` answerable queries.
"""
from __future__ import annotations

import json
import os
import statistics
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ._checks import resolve_device
from .data import Query, RetrievalDataset, default_qasper_path, load_dataset
from .metrics import paired_bootstrap, per_query_metrics, retrieval_metrics, token_f1, upgrade_metric_names

UPR_PROMPT = "Passage: {passage}\nPlease write a question based on this passage.\nQuestion:"
READER_PROMPT = ("Answer the question using only the passage. Reply with a short answer (a few words or a yes/no).\n\n"
                 "Passage: {passage}\n\nQuestion: {question}")
BASELINES = ("bm25", "base", "rerank", "hybrid")
TABLE_METRICS = ("Success@1", "Success@5", "Recall@1", "Recall@5", "MAP", "MRR")


def _short(metric: str) -> str:
    return metric.replace("Success@", "S@").replace("Recall@", "R@")


def _progress(it, desc: str, enabled: bool, total: Optional[int] = None):
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, total=total, unit="q", dynamic_ncols=True, leave=False)


class _torch_threads:
    """Temporarily run torch ops on ``n`` threads (per-query serving: one query per core)."""

    def __init__(self, n: Optional[int]):
        self.n, self.old = n, torch.get_num_threads()

    def __enter__(self):
        if self.n:
            torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.old)


def _latency(ms: List[float]) -> Dict[str, float]:
    return {"latency_ms_mean": statistics.fmean(ms), "latency_ms_p50": statistics.median(ms)} if ms else {}


# ------------------------------------------------------------------------------------- rankers
class DenseRanker:
    """A bi-encoder over per-pool :class:`uae_fast.TopKIndex` indexes (exact inner product)."""

    def __init__(self, encoder, ds: RetrievalDataset, queries: Sequence[Query], *, batch_size: int = 64, progress: bool = False,
                 cache_dir: Optional[str] = None, model_path: Optional[str] = None):
        from .embcache import encode_cached
        from .index import TopKIndex

        self.encoder, self.ds = encoder, ds
        pools = {}
        for q in queries:
            pools.setdefault(self._key(q), self.ds.pool(q))
        pids = sorted({p for pool in pools.values() for p in pool})
        t0 = time.perf_counter()
        emb = encode_cached(encoder, [ds.passages[p].text for p in pids], cache_dir=cache_dir, model_path=model_path,
                            batch_size=batch_size, progress=progress)
        row = {p: i for i, p in enumerate(pids)}
        self.indexes: Dict[object, Tuple[object, List[str]]] = {}
        for key, pool in pools.items():
            index = TopKIndex(encoder.dim, threads=1)  # a pool is tens of passages: threads would only add overhead
            index.add(emb[torch.tensor([row[p] for p in pool], dtype=torch.long)].contiguous())
            self.indexes[key] = (index, pool)
        self.index_seconds = time.perf_counter() - t0
        self.n_passages = len(pids)

    def _key(self, q: Query):
        # Queries of one document share its index, corpus-wide queries (BEIR) the corpus's; explicit
        # candidate lists get their own.
        if q.candidates is None:
            return ("doc", q.doc_id) if q.doc_id is not None else ("corpus",)
        return ("q", q.id)

    def rank(self, q: Query, k: Optional[int] = None) -> List[str]:
        index, pool = self.indexes[self._key(q)]
        emb = self.encoder.encode([q.question], role="query")
        _, ids = index.search(emb, min(k or len(pool), len(pool)))
        return [pool[int(i)] for i in ids[0].tolist() if int(i) >= 0]


class BM25Ranker:
    """Okapi BM25 per candidate pool (indexes built lazily, outside the per-query timing)."""

    def __init__(self, ds: RetrievalDataset):
        self.ds = ds
        self._cache: Dict[tuple, object] = {}

    def prepare(self, q: Query):
        from .bm25 import BM25

        pool = tuple(self.ds.pool(q))
        if pool not in self._cache:
            self._cache[pool] = BM25([self.ds.passages[p].text for p in pool])
        return pool

    def rank(self, q: Query) -> List[str]:
        pool = self.prepare(q)
        _, ids = self._cache[pool].topk(q.question, len(pool))  # ties: lower id (pool order) first
        return [pool[int(i)] for i in ids.tolist()]


class HybridRanker:
    """BM25 fused with a :class:`DenseRanker`'s per-pool indexes (:class:`uae_fast.hybrid.HybridIndex`)."""

    def __init__(self, dense: DenseRanker, fusion=None):
        from .hybrid import HybridIndex
        from .lexical import LexicalIndex

        self.dense, self.indexes = dense, {}
        for key, (index, pool) in dense.indexes.items():
            lex = LexicalIndex()
            lex.add([dense.ds.passages[p].text for p in pool])
            self.indexes[key] = (HybridIndex.from_parts(index, lex, fusion), pool)

    def rank(self, q: Query) -> List[str]:
        """The fused union of both sides' top ``k_each`` (as ``uae calibrate-fusion`` ranks; a search for the top
        ``k <= k_each`` returns its first ``k``), then the rest of the pool in dense order: fusing a whole
        corpus-wide pool would measure another ranking than serving returns."""
        from .fusion import fuse

        index, pool = self.indexes[self.dense._key(q)]
        emb = self.dense.encoder.encode([q.question], role="query")
        each = min(index.fusion["k_each"], len(pool))
        d_scores, d_ids = index.dense.search(emb, len(pool))  # once: its first k_each are the dense side
        lexical = index.lexical.search([q.question], each)
        _, ids = fuse((d_scores[:, :each], d_ids[:, :each]), lexical, len(pool), index.fusion)  # the union, whole
        head = [int(i) for i in ids[0].tolist() if int(i) >= 0]
        if len(head) < len(pool):
            seen = set(head)
            head += [int(i) for i in d_ids[0].tolist() if int(i) >= 0 and int(i) not in seen]
        return [pool[i] for i in head]


def _machine() -> dict:
    """What the timings ran on (they are meaningless without it): versions, CPU, cores, OpenMP's wait policy."""
    import platform

    from . import __version__

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"uae_fast": __version__, "torch": torch.__version__, "python": platform.python_version(), "cpu": cpu,
            "cpus": os.cpu_count(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def _p(p: float) -> str:
    """A p-value as printed: never "p=0.00" (a bootstrap's 0.0 means below 2 / resamples)."""
    return "p<0.001" if p < 0.001 else f"p={p:.3f}" if p < 0.01 else f"p={p:.2f}"


def fusion_row_name(fusion) -> str:
    """Row name of a hybrid config: ``hybrid`` (default) or ``hybrid:<file stem>``."""
    if fusion is None or fusion == "default":
        return "hybrid"
    if isinstance(fusion, dict):
        return f"hybrid:{fusion.get('name', 'custom')}"
    base = os.path.basename(os.fspath(fusion))
    return "hybrid:" + (base[:-5] if base.endswith(".json") else base)


class UPRReranker:
    """Re-rank a first stage's top ``depth`` by the LM's log-likelihood of the question given each passage."""

    def __init__(self, model, tokenizer, *, depth: int = 20, max_passage_tokens: int = 256, prompt: str = UPR_PROMPT):
        if depth < 1:
            raise ValueError(f"rerank depth must be >= 1, got {depth}")
        self.model, self.tok, self.depth = model, tokenizer, depth
        self.max_passage_tokens, self.prompt = max_passage_tokens, prompt

    def _prompt_ids(self, passage: str) -> List[int]:
        before, after = self.prompt.split("{passage}")
        p = self.tok(passage.strip(), add_special_tokens=False).input_ids[: self.max_passage_tokens]
        bos = self.tok("", add_special_tokens=True).input_ids
        return list(bos) + self.tok(before, add_special_tokens=False).input_ids + p + self.tok(after, add_special_tokens=False).input_ids

    def scores(self, question: str, passages: Sequence[str]) -> torch.Tensor:
        from .teacher import target_logprobs

        target = self.tok(" " + question.strip(), add_special_tokens=False).input_ids
        lp = target_logprobs(self.model, [self._prompt_ids(p) for p in passages], target)
        return lp.mean(1)

    def rerank(self, question: str, ranking: List[str], texts: Dict[str, str]) -> List[str]:
        head, tail = ranking[: self.depth], ranking[self.depth:]
        s = self.scores(question, [texts[p] for p in head])
        order = torch.argsort(-s, stable=True).tolist()
        return [head[i] for i in order] + tail


# ------------------------------------------------------------------------------------- reader
class Reader:
    """Greedy short-answer generation from one passage with a causal LM (chat template when it has one)."""

    def __init__(self, model, tokenizer, *, max_new_tokens: int = 32, max_passage_tokens: int = 384):
        self.model, self.tok = model, tokenizer
        self.max_new_tokens, self.max_passage_tokens = max_new_tokens, max_passage_tokens

    @torch.inference_mode()
    def answer(self, question: str, passage: str) -> str:
        ids = self.tok(passage, add_special_tokens=False).input_ids[: self.max_passage_tokens]
        passage = self.tok.decode(ids)
        text = READER_PROMPT.format(passage=passage, question=question)
        if getattr(self.tok, "chat_template", None):
            prompt = self.tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
        else:
            prompt = text + "\nAnswer:"
        enc = self.tok(prompt, return_tensors="pt", add_special_tokens=False)
        ids = enc["input_ids"].to(next(self.model.parameters()).device)
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=self.max_new_tokens,
                                  do_sample=False, pad_token_id=pad)
        return self.tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip().split("\n")[0].strip()


# ------------------------------------------------------------------------------------- evaluation
def evaluate(ds: RetrievalDataset, models: Sequence[str] = (), *, names: Optional[Sequence[str]] = None,
             baselines: Sequence[str] = BASELINES, student: Optional[str] = None, teacher: Optional[str] = None,
             rerank_limit: int = 100, rerank_depth: int = 20, reader: bool = False, reader_model: Optional[str] = None,
             reader_limit: int = 100, limit: Optional[int] = None, batch_size: int = 64, device=None,
             query_threads: Optional[int] = 1, progress: bool = True, save_runs: Optional[str] = None,
             fusion: Sequence = (None,), embedding_cache: Optional[str] = None, paired_by: str = "question",
             depth: Optional[int] = None) -> dict:
    """Evaluate ``models`` (bi-encoder folders) and ``baselines`` on ``ds``; returns the results dict.

    ``save_runs``: a folder for ``qrels.txt`` (the evaluated queries' gold) and one TREC run per reported
    system, ``NAME.run``, with every ranked candidate (``depth``: the first ``depth``; the metrics are then
    computed on the same cut rankings, as trec_eval reads the files: a gold passage below it counts as never
    retrieved. BEIR pools are the whole corpus, so a run of every candidate is queries x corpus lines). The re-ranker's run covers only the first
    ``rerank_limit`` queries; ``qrels-rerank-subset.txt`` holds their gold, the qrels of the re-ranker's
    table (ir-measures and trec_eval -c count a judged query missing from a run as 0).

    Latency: bi-encoders answer each query on ``query_threads`` torch threads (default 1: a server runs
    one query per core, and a one-query forward gains little from more threads but synchronisation; BM25
    is single-threaded numpy); the LLM re-ranker's LM forwards keep every thread. ``fusion``: the
    ``hybrid`` rows' configs (None/"default", a dict or a JSON path); ``embedding_cache``: a folder that
    keeps passage embeddings between runs (:mod:`uae_fast.embcache`).
    """
    from .student import BiEncoder

    bad = [b for b in baselines if b not in BASELINES]
    if bad:
        raise ValueError(f"unknown baseline(s) {bad}; choose from {list(BASELINES)}")
    if not models and not baselines:
        raise ValueError("nothing to evaluate: pass --model DIR and/or --baselines")
    if paired_by not in ("question", "document"):
        raise ValueError(f"paired_by must be 'question' or 'document', got {paired_by!r}")
    # options that would do nothing, or fail only after the dense models were encoded: refused now
    fusion = list(fusion) if fusion else [None]
    if "hybrid" not in baselines and any(f is not None for f in fusion):
        raise ValueError("--fusion configures the hybrid baseline: add hybrid to --baselines")
    from .cli import check_encoder_folder, check_output_path, check_teacher_path

    uses_student = "base" in baselines or "rerank" in baselines or ("hybrid" in baselines and not models)  # as below
    for flag, path, used, needs in (
            ("--teacher", teacher, "rerank" in baselines or (reader and not reader_model),
             "the rerank baseline, or --reader without --reader-model"),
            ("--reader-model", reader_model, reader, "--reader"),
            ("--student", student, uses_student, "the base, rerank or (without --model) hybrid baseline")):
        if path is not None and not used:
            raise ValueError(f"{flag} is used only by {needs}; drop it or add what uses it")
        if used and flag != "--student":
            check_teacher_path(path, flag)
    if paired_by == "document" and not ((models and len(models) + len(baselines) > 1) or "hybrid" in baselines):
        raise ValueError("--paired-by document: nothing is paired (pairs are the first --model against every other "
                         "row, and each hybrid row against its sides)")
    for k, v in (("rerank_limit", rerank_limit), ("rerank_depth", rerank_depth), ("reader_limit", reader_limit),
                 ("batch_size", batch_size), ("query_threads", 1 if query_threads is None else query_threads)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{k} must be a positive int, got {v!r}")
    if depth is not None and (isinstance(depth, bool) or not isinstance(depth, int) or depth < 1):
        raise ValueError(f"depth must be a positive int, got {depth!r}")
    queries = [q for q in ds.queries if q.gold]
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit must be a positive int, got {limit!r}")
        queries = queries[:limit]
    if not queries:
        raise ValueError(f"no queries with gold evidence passages in {ds.name or 'the data'} ({len(ds.queries)} queries): "
                         "nothing to evaluate")
    if reader and not any(q.answers for q in queries):  # before the systems run, not after
        raise ValueError("--reader: none of the evaluated queries has a gold answer")
    names = list(names) if names else [os.path.basename(os.path.normpath(m)) or m for m in models]
    if len(names) != len(models):
        raise ValueError(f"{len(names)} names for {len(models)} models")
    if len(set(names)) != len(names) or set(names) & set(BASELINES):
        raise ValueError(f"system names must be unique and not clash with the baselines: {names}")
    if save_runs:  # a run file's ids and names are checked now, not after every system has run
        rows = [fusion_row_name(fu) for fu in fusion] if "hybrid" in baselines else []
        _check_run_ids(queries, ds, names + [b for b in baselines if b != "hybrid"] + rows, folder=save_runs)
    # every encoder folder now, not after the ones before it have encoded the corpus
    for flag, path in [*(("--model", m) for m in models), *((("--student", student),) if uses_student else ())]:
        check_encoder_folder(path, flag)
    if embedding_cache is not None:
        check_output_path(embedding_cache, "--embedding-cache", folder=True)
    device = resolve_device(device)
    golds = [set(q.gold) for q in queries]
    texts = {pid: p.text for pid, p in ds.passages.items()}
    rankings: Dict[str, List[List[str]]] = {}
    latency: Dict[str, List[float]] = {}
    info: Dict[str, dict] = {}

    def timed(name: str, ranker):
        rk, ms = [], []
        with _torch_threads(query_threads):
            for q in queries[:2]:  # warm-up (allocator, kernels), not timed
                ranker.rank(q)
            for q in _progress(queries, name, progress):
                t0 = time.perf_counter()
                rk.append(ranker.rank(q))
                ms.append((time.perf_counter() - t0) * 1e3)
        rankings[name], latency[name] = rk, ms

    def run_dense(name: str, path: Optional[str]):
        enc = BiEncoder(path, device=device)
        ranker = DenseRanker(enc, ds, queries, batch_size=batch_size, progress=progress, cache_dir=embedding_cache,
                             model_path=path)
        timed(name, ranker)
        info[name] = {"path": path or "default student", "index_build_s": round(ranker.index_seconds, 2),
                      "passages_indexed": ranker.n_passages}
        return ranker

    fusion_cfgs = []
    if "hybrid" in baselines:  # every config read and checked before any encoding
        from .fusion import resolve_fusion

        rows = [fusion_row_name(fu) for fu in fusion]
        dup = next((r for i, r in enumerate(rows) if r in rows[:i]), None)
        if dup is not None:
            raise ValueError(f"two --fusion configs give the same row name {dup!r}")
        fusion_cfgs = [resolve_fusion(None if fu == "default" else fu) for fu in fusion]
    dense_rankers = {}
    for name, path in zip(names, models):
        dense_rankers[name] = run_dense(name, path)
    base = None
    if uses_student:
        base = dense_rankers["base"] = run_dense("base", student)
        if "base" not in baselines:
            info["base"]["hidden"] = True
    hybrid_rows: Dict[str, str] = {}  # row -> its dense side
    if "hybrid" in baselines:
        side = names[0] if models else "base"
        for fu, cfg in zip(fusion, fusion_cfgs):
            row = fusion_row_name(fu)
            timed(row, HybridRanker(dense_rankers[side], cfg))
            hybrid_rows[row] = side
            info[row] = {"dense": side, "fusion": {k: cfg[k] for k in ("method", "weight", "k_each", "rrf_k")}}
    if "bm25" in baselines:
        bm = BM25Ranker(ds)
        for q in queries[:2]:  # untimed warm-up, as the encoders and the re-ranker get
            bm.prepare(q)
            bm.rank(q)
        rk, ms = [], []
        for q in _progress(queries, "bm25", progress):
            bm.prepare(q)
            t0 = time.perf_counter()
            rk.append(bm.rank(q))
            ms.append((time.perf_counter() - t0) * 1e3)
        rankings["bm25"], latency["bm25"] = rk, ms
    lm = None
    n_rr = min(rerank_limit, len(queries))
    if "rerank" in baselines:
        from .teacher import load_causal_lm

        lm = load_causal_lm(teacher, device=device)
        upr = UPRReranker(*lm, depth=rerank_depth)
        for q in queries[:min(2, n_rr)]:  # untimed warm-up, as the bi-encoders get, with the timed threading
            with _torch_threads(query_threads):
                first = base.rank(q)
            upr.rerank(q.question, first, texts)
        rk, ms = [], []
        for i, q in enumerate(_progress(queries[:n_rr], "rerank", progress)):
            t0 = time.perf_counter()
            # the first stage runs inside the timing: the latency is the whole pipeline's
            with _torch_threads(query_threads):
                first = base.rank(q)
            if ds.ignore_identical_ids:  # the LLM judges real candidates only (the filter below comes too late)
                first = [p for p in first if p != q.id]
            rk.append(upr.rerank(q.question, first, texts))
            ms.append((time.perf_counter() - t0) * 1e3)
        rankings["rerank"], latency["rerank"] = rk, ms
        info["rerank"] = {"teacher": teacher or "SmolLM2-135M-Instruct (default)", "depth": rerank_depth,
                          "first_stage": "base"}

    if ds.ignore_identical_ids and any(q.id in ds.passages for q in queries):
        for n in rankings:  # BEIR: a query that is itself a corpus document is not its own answer
            rankings[n] = [[p for p in r if p != q.id] for q, r in zip(queries, rankings[n])]
    if depth is not None:
        for n in rankings:
            rankings[n] = [r[:depth] for r in rankings[n]]
    shown = [n for n in rankings if not info.get(n, {}).get("hidden")]
    systems = {}
    for n in shown:
        m = retrieval_metrics(rankings[n], golds[: len(rankings[n])])
        m.update(_latency(latency[n]))
        m.update(info.get(n, {}))
        systems[n] = m
    result = {"data": ds.name, "n_queries": len(queries), "n_queries_total": len(ds.queries), "device": str(device),
              "unmatched_evidence": dict(ds.unmatched_evidence),
              "torch_threads": torch.get_num_threads(), "machine": _machine(), "systems": systems,
              "settings": {"models": list(models), "baselines": list(baselines), "limit": limit, "query_threads": query_threads,
                           "rerank_threads": torch.get_num_threads(), "rerank_limit": rerank_limit,
                           "rerank_depth": rerank_depth, "reader_limit": reader_limit if reader else None,
                           "depth": depth}}
    if save_runs:
        result["runs"] = _save_runs(save_runs, queries, {n: rankings[n] for n in shown},
                                    n_rr if "rerank" in rankings else None)
    # paired_by="document": resample whole documents (a paper's questions are not independent samples)
    docs = ([q.doc_id if q.doc_id is not None else ("query", q.id) for q in queries]  # no document: its own group
            if paired_by == "document" else None)

    def boot(a, b):
        return paired_bootstrap(a, b, groups=None if docs is None else docs[: len(a)])

    def bootable(n):  # a bootstrap needs 2 queries, and by document 2 documents
        return n >= 2 and (docs is None or len(set(docs[:n])) >= 2)

    if models and len(shown) > 1:
        # Paired over the same queries: the first model against every other system.
        first = shown[0]
        pq = {n: per_query_metrics(rankings[n], golds[: len(rankings[n])]) for n in shown}
        # a bootstrap needs 2 queries (a re-ranker limited to 1 query has no paired row)
        result["paired"] = {f"{first} - {n}": {m: boot(pq[first][m][: len(v)], v) for m, v in pq[n].items()}
                            for n in shown[1:] if bootable(len(rankings[n]))}
    for row, side in hybrid_rows.items():  # each hybrid row against both of its single sides
        pq = {n: per_query_metrics(rankings[n], golds) for n in (row, side, "bm25") if n in rankings}
        for other in (side, "bm25"):
            if other in pq and f"{other} - {row}" not in result.get("paired", {}) and bootable(len(golds)):
                result.setdefault("paired", {})[f"{row} - {other}"] = {
                    m: boot(v, pq[other][m]) for m, v in pq[row].items()}
    if result.get("paired"):
        result["paired_by"] = paired_by
    if "rerank" in rankings:
        sub = {}
        for n in shown:
            m = retrieval_metrics(rankings[n][:n_rr], golds[:n_rr])
            m.update(_latency(latency[n][:n_rr]))
            sub[n] = m
        result["rerank_subset"] = {"n": n_rr, "systems": sub}
        rr = sub["rerank"]["latency_ms_mean"]
        result["speedup_vs_rerank"] = {n: rr / sub[n]["latency_ms_mean"] for n in shown
                                       if n not in ("rerank", "bm25") and sub[n]["latency_ms_mean"] > 0}
    if reader:
        if lm is None or reader_model is not None:  # the re-ranker's LM doubles as the default reader
            from .teacher import load_causal_lm

            lm = load_causal_lm(reader_model or teacher, device=device)
        result["reader"] = _reader_eval(queries, rankings, shown, texts, reader_model or teacher, lm, reader_limit, progress)
    return result


# the qrels files of --save-runs (beside one NAME.run per system)
_QRELS, _QRELS_SUBSET = "qrels.txt", "qrels-rerank-subset.txt"


def _check_run_ids(queries: Sequence[Query], ds: RetrievalDataset, systems: Sequence[str],
                   folder: Optional[str] = None) -> None:
    """What TREC files need (:mod:`uae_fast.trec`): unique query ids; no whitespace in query, passage or system
    names; no path separator in a system name (it names its run file). ``folder``: it must not hold run files
    this evaluation will not overwrite (a scorer of every ``*.run`` in it would mix two evaluations)."""
    from .trec import _token

    seen = set()
    for q in queries:
        qid = _token(q.id, "query id")  # as written: 1 and "1" are one id in a file
        if qid in seen:
            raise ValueError(f"query id {q.id!r} occurs twice: TREC runs need unique query ids")
        seen.add(qid)
    written = set()
    for pid in ds.passages:
        p = _token(pid, "passage id")
        if p in written:  # e.g. 1 and "1": one docid in a file
            raise ValueError(f"passage id {pid!r} occurs twice once written: TREC runs need unique document ids")
        written.add(p)
    for name in systems:
        _token(name, "system name")
        if "/" in name or os.sep in name:
            raise ValueError(f"system name {name!r} contains a path separator: it names its run file")
    if folder and os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"--save-runs {folder}: it is a file, not a folder")
    if folder and os.path.isdir(folder):
        ours = {f"{n}.run" for n in systems} | {_QRELS} | ({_QRELS_SUBSET} if "rerank" in systems else set())
        stale = sorted(f for f in os.listdir(folder)
                       if (f.endswith(".run") or f in (_QRELS, _QRELS_SUBSET)) and f not in ours)
        if stale:
            raise ValueError(f"--save-runs {folder}: it holds {', '.join(stale[:3])}{' ...' if len(stale) > 3 else ''} "
                             f"from another evaluation, which this one would not overwrite; use an empty folder")


def _save_runs(folder: str, queries: Sequence[Query], rankings: Dict[str, List[List[str]]], n_subset: Optional[int]) -> dict:
    """``folder/qrels.txt``, ``folder/NAME.run`` per system and, with a re-ranker subset of ``n_subset``
    queries, ``folder/qrels-rerank-subset.txt`` (TREC formats, :mod:`uae_fast.trec`)."""
    from .trec import write_qrels, write_run

    ids = [q.id for q in queries]
    folder = os.path.abspath(folder)
    out = {"dir": folder, "qrels": os.path.join(folder, _QRELS), "systems": {}}
    write_qrels(out["qrels"], {q.id: q.gold for q in queries})
    if n_subset is not None:
        out["qrels_rerank_subset"] = os.path.join(folder, _QRELS_SUBSET)
        write_qrels(out["qrels_rerank_subset"], {q.id: q.gold for q in queries[:n_subset]})
    for name, rk in rankings.items():
        out["systems"][name] = os.path.join(folder, f"{name}.run")
        write_run(out["systems"][name], dict(zip(ids, rk)), name)
    return out


def _reader_eval(queries, rankings, systems, texts, reader_path, lm, limit, progress) -> dict:
    rd = Reader(*lm)
    idx = [i for i, q in enumerate(queries) if q.answers][:limit]
    if not idx:
        raise ValueError("--reader: none of the evaluated queries has a gold answer")
    out = {"n": len(idx), "reader": reader_path or "SmolLM2-135M-Instruct (default)", "systems": {}}
    cache: Dict[Tuple[int, str], str] = {}  # systems that agree on the top-1 share one generation
    for name in systems + ["gold"]:
        f1 = []
        for i in _progress(idx, f"reader/{name}", progress):
            q = queries[i]
            if name == "gold":
                top = q.gold[0]
            elif i < len(rankings[name]):
                top = rankings[name][i][0]
            else:
                continue
            if (i, top) not in cache:
                cache[(i, top)] = rd.answer(q.question, texts[top])
            f1.append(token_f1(cache[(i, top)], q.answers))
        out["systems"][name] = {"n": len(f1), "token_f1": statistics.fmean(f1) if f1 else float("nan")}
    return out


# ------------------------------------------------------------------------------------- table
def format_table(result: dict) -> str:
    """The printed report: full-set table, re-ranker subset table (with speedups), reader table."""
    lines = []

    def table(title, systems, speed=None):
        lines.append(title)
        head = f"{'system':<24}{'n':>6}" + "".join(f"{_short(k):>8}" for k in TABLE_METRICS) + f"{'ms/query':>11}"
        if speed is not None:
            head += f"{'speedup':>10}"
        lines.append(head)
        lines.append("-" * len(head))
        for n, m in systems.items():
            m = upgrade_metric_names(m)  # a --json file written before Success@k existed
            row = (f"{n:<24}{m['n']:>6}" + "".join(f"{m.get(k, float('nan')):>8.3f}" for k in TABLE_METRICS)
                   + f"{m.get('latency_ms_mean', float('nan')):>11.2f}")
            if speed is not None:
                row += f"{speed[n]:>9.0f}x" if n in speed else f"{'':>10}"
            lines.append(row)
        lines.append("")

    table(f"Evidence retrieval on {result['data']} ({result['n_queries']} queries with gold evidence)", result["systems"])
    built = {n: m["index_build_s"] for n, m in result["systems"].items() if isinstance(m.get("index_build_s"), (int, float))}
    if built:  # ms/query is the query's encoding and search; the passages were encoded once, beforehand
        lines.insert(len(lines) - 1, "ms/query excludes encoding the passages once: " + ", ".join(
            f"{n} {v:.1f} s" for n, v in built.items()))
    um = result.get("unmatched_evidence") or {}
    if um.get("headings") or um.get("other"):
        lines.insert(len(lines) - 1, f"QASPER evidence matching no paragraph, so not gold: {um['headings']} section headings, "
                                     f"{um['other']} other strings; {um['questions_without_gold']} questions with text "
                                     f"evidence have no gold and are not evaluated")
    if um.get("qrels_missing_documents"):
        lines.insert(len(lines) - 1, f"qrels judging documents missing from the corpus: {um['qrels_missing_documents']} "
                                     f"judgments dropped ({um['questions_without_gold']} queries left without gold, not "
                                     f"evaluated); BEIR's evaluation counts them as relevant and never retrieved")
    if "rerank_subset" in result:
        sub = result["rerank_subset"]
        table(f"Same metrics on the first {sub['n']} queries (the LLM re-ranker's subset); speedup = re-ranker ms / system ms",
              sub["systems"], result.get("speedup_vs_rerank", {}))
    lines.append("S@k: Success@k, some gold passage in the top k; R@k: Recall@k, the share of the gold passages in the top k")
    lines.append("")
    if result.get("paired"):
        unit = "documents" if result.get("paired_by") == "document" else "queries"
        n_all = result.get("n_queries")
        lines.append(f"Paired differences over the same queries, all {n_all} unless said (bootstrap of {unit}, "
                     f"10,000 resamples): mean [95% interval] p")
        for pair, ms in result["paired"].items():
            cells = [f"{_short(k)} {v['diff']:+.3f} [{v['ci95_low']:+.3f}, {v['ci95_high']:+.3f}] {_p(v['p'])}"
                     for k, v in upgrade_metric_names(ms).items()]
            n = next(iter(ms.values()), {}).get("n")
            label = pair + (f" (n={n})" if n is not None and n != n_all else "")  # the re-ranker's subset, say
            for i in range(0, len(cells), 3):  # three metrics a line
                lines.append(f"  {label if i == 0 else '':<30}" + "  ".join(cells[i:i + 3]))
        lines.append("")
    if result.get("runs"):
        lines.append(f"TREC runs and qrels written to {result['runs']['dir']}")
        lines.append("")
    if "reader" in result:
        r = result["reader"]
        lines.append(f"Reader Token F1 ({r['reader']}, top-1 passage, {r['n']} answerable queries)")
        for n, m in r["systems"].items():  # the re-ranker ran on its own subset: say so where n differs
            fewer = f"  (on {m['n']} of them: the re-ranker's queries)" if m.get("n", r["n"]) != r["n"] else ""
            lines.append(f"  {n:<22}{m['token_f1']:>8.3f}{fewer}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- CLI
def add_parser(subparsers) -> None:
    p = subparsers.add_parser("eval", help="evidence retrieval metrics of bi-encoders vs BM25, the base student and an LLM re-ranker",
                              description="Success@1/5, Recall@1/5, MAP, MRR and per-query latency on QASPER-style evidence "
                                          "retrieval (or BEIR / SQuAD / JSONL data); --save-runs writes TREC runs and qrels.")
    p.add_argument("--data", default=None, help="evaluation data: QASPER or SQuAD JSON(.gz), the JSONL schema, or a BEIR folder "
                   "(its qrels/test.tsv; DIR/qrels/dev.tsv picks another split) (default: QASPER dev)")
    p.add_argument("--model", nargs="*", default=[], help="trained bi-encoder folder(s) (sentence-transformers format)")
    p.add_argument("--name", nargs="*", default=None, help="row names for the --model folders (default: folder names)")
    p.add_argument("--baselines", default="bm25,base,rerank",
                   help="comma list of bm25, base, rerank, hybrid ('' for none; default: bm25,base,rerank)")
    p.add_argument("--fusion", nargs="+", default=None, metavar="JSON",
                   help="hybrid rows' fusion configs: 'default' or a JSON file from uae calibrate-fusion, one row each "
                        "(default: the built-in default config only)")
    p.add_argument("--embedding-cache", default=None, metavar="DIR",
                   help="keep passage embeddings in DIR and reuse them on the next run (default: none)")
    p.add_argument("--student", default=None, help="the untrained student for 'base' (default: all-MiniLM-L6-v2)")
    p.add_argument("--teacher", default=None, help="LM for the re-ranker (default: SmolLM2-135M-Instruct)")
    p.add_argument("--rerank-limit", type=int, default=100, help="queries the (slow) LLM re-ranker runs on")
    p.add_argument("--rerank-depth", type=int, default=20, help="first-stage passages the re-ranker re-scores")
    p.add_argument("--reader", action="store_true", help="also answer Token F1 with a reader LM on each system's top-1")
    p.add_argument("--reader-model", default=None, help="reader LM folder (default: the teacher)")
    p.add_argument("--reader-limit", type=int, default=100, help="answerable queries the reader runs on")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N queries with gold evidence (default: all)")
    p.add_argument("--batch-size", type=int, default=64, help="texts per encoder forward when embedding passages")
    p.add_argument("--device", default=None, help="torch device, e.g. cpu, cuda, cuda:1 (default: CUDA if available, else CPU)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads for passage encoding and the re-ranker (default: torch's, one per core)")
    p.add_argument("--query-threads", type=int, default=1,
                   help="torch threads per query for bi-encoders (latency; default 1 = one query per core)")
    p.add_argument("--json", default=None, help="write the results here as JSON (default: none, the table only)")
    p.add_argument("--save-runs", default=None, metavar="DIR",
                   help="write DIR/qrels.txt and a TREC run per system, DIR/NAME.run, with every ranked candidate "
                   "(scores = depth - rank + 1) for ir-measures/ranx/trec_eval (default: none written)")
    p.add_argument("--depth", type=int, default=None, metavar="K",
                   help="keep each ranking's first K passages, in the metrics and the --save-runs files alike (1000 is "
                        "TREC's custom; for BEIR, whose pools are the whole corpus; default: every candidate)")
    p.add_argument("--paired-by", choices=("question", "document"), default="question",
                   help="unit the paired bootstrap resamples: questions, or whole documents (papers), whose "
                        "questions are not independent: wider intervals (default: question)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_main)


def _main(args) -> int:
    from .cli import check_output_path, set_threads

    set_threads(args.threads)
    check_output_path(args.json, "--json")  # fail before the evaluation, not after it
    check_output_path(args.save_runs, "--save-runs", folder=True)
    ds = load_dataset(args.data or default_qasper_path("dev"))
    baselines = [b.strip() for b in args.baselines.split(",") if b.strip()]
    result = evaluate(ds, args.model, names=args.name, baselines=baselines, student=args.student, teacher=args.teacher,
                      rerank_limit=args.rerank_limit, rerank_depth=args.rerank_depth, reader=args.reader,
                      reader_model=args.reader_model, reader_limit=args.reader_limit, limit=args.limit,
                      batch_size=args.batch_size, device=args.device, query_threads=args.query_threads,
                      progress=not args.no_progress, save_runs=args.save_runs, fusion=args.fusion or (None,),
                      embedding_cache=args.embedding_cache, paired_by=args.paired_by, depth=args.depth)
    print(format_table(result))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        from .data import atomic_write

        with atomic_write(args.json) as f:  # a kill never leaves half a report
            json.dump(result, f, indent=2)
        print(f"results written to {args.json}")
    return 0
