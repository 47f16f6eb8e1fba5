"""Hybrid search latency: HybridIndex (dense TopKIndex + BM25 + fusion) against dense-only TopKIndex,
same data, same process, batch 1; plus the lexical side alone three ways (ours: one sparse product per
batch; a per-query-term bincount; bm25s if installed) and the lexical index's memory.

    python benchmarks/bench_hybrid.py --json benchmarks/results/hybrid-cpu.json     # N=200k, d=384, k=10

Data: synthetic passages of 40-160 words drawn from a Zipf(1.1) vocabulary of 50k words (so a few words
are in nearly every passage, as in real text) with random unit embeddings; queries of 4-12 words from
the same distribution. The indexes are built once; each method then answers the same queries.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench_topk import commit, cpu_model, run_meta  # noqa: E402
from uae_fast.bm25 import tokenize  # noqa: E402
from uae_fast.hybrid import HybridIndex  # noqa: E402


def synthetic(n: int, n_queries: int, vocab: int, seed: int):
    rng = np.random.default_rng(seed)
    words = np.array([f"w{i}" for i in range(vocab)])
    p = 1.0 / np.arange(1, vocab + 1) ** 1.1
    p /= p.sum()
    lens = rng.integers(40, 161, n)
    toks = rng.choice(vocab, size=int(lens.sum()), p=p)
    ends = np.cumsum(lens)
    texts = [" ".join(words[toks[e - l:e]]) for e, l in zip(ends.tolist(), lens.tolist())]
    qlens = rng.integers(4, 13, n_queries)
    queries = [" ".join(words[rng.choice(vocab, size=l, p=p)]) for l in qlens.tolist()]
    return texts, queries


def timed(fn, queries, reps: int):
    """Per-query latencies (ms) over ``reps`` passes of batch-1 calls, after one warm-up call."""
    fn(0)
    ms = []
    for _ in range(reps):
        for i in range(len(queries)):
            t0 = time.perf_counter()
            fn(i)
            ms.append((time.perf_counter() - t0) * 1e3)
    return ms


def timed_interleaved(fns: dict, queries, reps: int) -> dict:
    """:func:`timed` for several methods at once: per query, each method in turn, the order rotated from one query
    to the next, so load on a shared machine falls on all of them alike. ``{name: per-query latencies (ms)}``."""
    names = list(fns)
    for name in names:
        fns[name](0)
    ms = {name: [] for name in names}
    for r in range(reps):
        for i in range(len(queries)):
            shift = (r * len(queries) + i) % len(names)
            for name in names[shift:] + names[:shift]:
                t0 = time.perf_counter()
                fns[name](i)
                ms[name].append((time.perf_counter() - t0) * 1e3)
    return ms


def summary(ms):
    return {"ms_mean": statistics.fmean(ms), "ms_p50": statistics.median(ms), "ms_p95": float(np.percentile(ms, 95)),
            "qps": 1e3 / statistics.fmean(ms)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=200_000, help="passages (default: 200000)")
    ap.add_argument("--dim", type=int, default=384, help="embedding dimension (default: 384)")
    ap.add_argument("--k", type=int, default=10, help="results per query (default: 10)")
    ap.add_argument("--queries", type=int, default=100, help="distinct queries (default: 100)")
    ap.add_argument("--reps", type=int, default=2, help="passes over the queries per method (default: 2)")
    ap.add_argument("--vocab", type=int, default=50_000, help="synthetic vocabulary size (default: 50000)")
    ap.add_argument("--dtype", default="float32", help="dense storage dtype (default: float32)")
    ap.add_argument("--threads", type=int, default=None, help="dense search threads (default: all cores)")
    ap.add_argument("--no-bm25s", action="store_true", help="skip bm25s even when installed (default: measure it)")
    ap.add_argument("--json", default=None, help="write results here (default: print only)")
    a = ap.parse_args()

    t0 = time.perf_counter()
    texts, queries = synthetic(a.n, a.queries, a.vocab, 0)
    rng = np.random.default_rng(1)
    emb = rng.standard_normal((a.n, a.dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    qemb = rng.standard_normal((a.queries, a.dim)).astype(np.float32)
    qemb /= np.linalg.norm(qemb, axis=1, keepdims=True)
    t_data = time.perf_counter() - t0

    t0 = time.perf_counter()
    hybrid = HybridIndex(a.dim, dtype=a.dtype, threads=a.threads)
    hybrid.add(emb, texts)
    hybrid.lexical.search(queries[:1], 1)  # builds the BM25 weight matrix
    t_build = time.perf_counter() - t0
    dense = hybrid.dense  # the very index the hybrid searches: dense-only is the same object, k=10
    lex = hybrid.lexical
    each = hybrid.fusion["k_each"]
    # Alternative lexical scorer: per query term, gather its posting list and bincount into N scores.
    bm = lex._scorer()[0]
    w = bm._w

    def bincount(i):
        cols = [bm.vocab[t] for t in tokenize(queries[i]) if t in bm.vocab]
        idx = np.concatenate([w.indices[w.indptr[c]:w.indptr[c + 1]] for c in cols])
        val = np.concatenate([w.data[w.indptr[c]:w.indptr[c + 1]] for c in cols])
        s = np.bincount(idx, weights=val, minlength=bm.n_docs)
        top = np.argpartition(-s, each)[:each]
        return top[np.argsort(-s[top])]

    fns = {"dense": lambda i: dense.search(qemb[i:i + 1], a.k),
           "hybrid": lambda i: hybrid.search(qemb[i:i + 1], [queries[i]], a.k),
           "dense_k_each": lambda i: dense.search(qemb[i:i + 1], each),
           "lexical_ours": lambda i: lex.search([queries[i]], each),
           "lexical_bincount": bincount}
    bm25s_info = None
    if not a.no_bm25s:
        try:
            import bm25s
        except ImportError:
            bm25s_info = "not installed"
        else:
            t0 = time.perf_counter()
            corpus_tokens = [tokenize(t) for t in texts]
            model = bm25s.BM25(k1=1.2, b=0.75, method="lucene")
            model.index(corpus_tokens, show_progress=False)
            bm25s_info = {"version": bm25s.__version__, "build_s": round(time.perf_counter() - t0, 1)}
            qtok = [tokenize(q) for q in queries]
            fns["lexical_bm25s"] = lambda i: model.retrieve([qtok[i]], k=each, show_progress=False, n_threads=1)
    res = {name: summary(ms) for name, ms in timed_interleaved(fns, queries, a.reps).items()}

    def agreement(get, n=20):
        """Mean share of our lexical top-k_each that a peer also returns, on the first n queries: the peers are
        timed on the same work only if they score BM25 alike (ties at the cut can cost a little)."""
        shares = []
        for i in range(min(n, len(queries))):
            ours = {int(x) for x in np.asarray(lex.search([queries[i]], each)[1]).ravel() if int(x) >= 0}
            theirs = {int(x) for x in np.asarray(get(i)).ravel() if int(x) >= 0}
            shares.append(len(ours & theirs) / max(1, len(ours)))
        return round(float(np.mean(shares)), 4)

    agree = {"bincount": agreement(bincount)}
    if "lexical_bm25s" in fns:
        agree["bm25s"] = agreement(lambda i: fns["lexical_bm25s"](i)[0])
    lex_bytes = lex.nbytes
    vocab_bytes = sum(sys.getsizeof(t) for t in lex._vocab) + sys.getsizeof(lex._vocab)
    out = {
        "what": "hybrid (dense + BM25 + fusion) vs dense-only search latency, batch 1",
        "machine": f"{cpu_model()}, {os.cpu_count()} cores (shared dev CPU)", "python": platform.python_version(),
        "date": datetime.date.today().isoformat(), "commit": commit(), "run": run_meta(),
        "settings": {"n": a.n, "dim": a.dim, "k": a.k, "k_each": each, "queries": a.queries, "reps": a.reps,
                     "vocab": a.vocab, "dtype": a.dtype, "threads": a.threads, "fusion": hybrid.fusion},
        "data_s": round(t_data, 1), "build_s": round(t_build, 1), "bm25s": bm25s_info,
        "results": res, "lexical_topk_agreement_with_ours": agree, "ratio_hybrid_vs_dense": res["hybrid"]["ms_mean"] / res["dense"]["ms_mean"],
        "memory": {"dense_bytes": dense.nbytes, "lexical_bytes": lex_bytes, "lexical_vocab_dict_bytes": vocab_bytes,
                   "lexical_terms": lex.vocab_size, "lexical_postings": int(w.nnz)},
    }
    print(f"N={a.n} d={a.dim} k={a.k} (k_each={each}), batch 1: data {t_data:.0f} s, index build {t_build:.0f} s")
    for name, r in res.items():
        print(f"  {name:<18} {r['ms_mean']:8.2f} ms/query (p50 {r['ms_p50']:.2f}, p95 {r['ms_p95']:.2f})")
    print("  lexical top-k_each shared with ours: " + ", ".join(f"{k} {v:.3f}" for k, v in agree.items()))
    print(f"  hybrid / dense = {out['ratio_hybrid_vs_dense']:.2f}x; lexical index {lex_bytes / 2**20:.0f} MiB arrays "
          f"+ {vocab_bytes / 2**20:.1f} MiB vocabulary ({lex.vocab_size} terms, {w.nnz} postings); dense {dense.nbytes / 2**20:.0f} MiB")
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
