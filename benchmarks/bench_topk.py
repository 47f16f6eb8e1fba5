"""Exact top-k retrieval: uae_fast.TopKIndex (float32 / bfloat16 / int8) vs FAISS IndexFlatIP and
torch (matmul + topk), side by side on the same data and thread count. The baselines run as shipped
(``torch``: one [batch, N] matmul + topk; ``faiss_flat``: FAISS's default BLAS blocking) and tuned on
these inputs per batch and k (``torch_blocked``: block @ q.T (torch.mv at batch 1) or q @ block.T, topk per
row block, picked from 16k-256k rows x both layouts; ``faiss_tuned``: FAISS's defaults, or sgemm from batch 1 up with a database block of 1k-64k rows);
``numpy``: ``x @ q`` (gemv at batch 1) or ``q @ x.T``, then argpartition, timed in a process of its own
(OpenBLAS threads spin after each call and would slow whatever runs next in this one); "vs best baseline"
divides by the fastest of the five.

Reports QPS, index memory, recall@k against exact float32 (torch), and the fraction of the machine's
limit reached: for batch 1 (memory-bound) the bytes each method must read per query against the
read bandwidth measured here on an array of the same size (the same cache behaviour); for batch 256
(compute-bound) the multiply-adds against the sgemm rate measured here (torch, same threads).
int8/bf16 rows compare their own bytes, and their MACs against the *float32* sgemm rate, so values
above 1.0 mean "faster than float32 peak".

    python benchmarks/bench_topk.py --quick            # N=200k, d=384, < 2 min
    python benchmarks/bench_topk.py                    # N in {100k, 1M} x d in {384, 768}
    python benchmarks/bench_topk.py --data emb.npy     # real embeddings instead of random ones

Data: random Gaussian vectors, L2-normalised (the hardest case for quantised dtypes: the top scores
are packed closely together); queries drawn the same way.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sibling _meta module, however this is run
from _meta import commit, cpu_model, run_meta  # noqa: E402,F401 (bench_hybrid imports them from here)

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from uae_fast import TopKIndex  # noqa: E402
from uae_fast import _topk  # noqa: E402

try:
    import faiss
except ImportError:  # pragma: no cover
    faiss = None

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def best_time(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts)


def read_bandwidth(nbytes: int, threads: int) -> float:
    """Bytes/s of the fastest plain read we have (torch.sum, torch.mv, numpy sum) over an array of
    `nbytes`: the same size as the index, hence the same cache residency (L3 here is 260 MB)."""
    torch.set_num_threads(threads)
    cols = 384
    a = torch.rand(max(cols, nbytes // 4 // cols * cols))
    m, ones, an = a.view(-1, cols), torch.ones(cols), a.numpy()
    t = min(best_time(f, 5) for f in (lambda: a.sum(), lambda: m @ ones, lambda: an.sum()))
    return a.numel() * 4 / t


def sgemm_rate(threads: int) -> float:
    """FLOP/s of a large float32 matmul (torch's BLAS) on `threads` threads."""
    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    return 2 * 2048**3 / best_time(lambda: a @ b, 5)


def mem_available() -> int:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def unit_rows(rng, n, d, chunk=100_000):
    x = np.empty((n, d), np.float32)
    for s in range(0, n, chunk):
        blk = rng.standard_normal((min(chunk, n - s), d), dtype=np.float32)
        x[s : s + len(blk)] = blk / np.linalg.norm(blk, axis=1, keepdims=True)
    return x


BASELINES = ("torch", "torch_blocked", "faiss_flat", "faiss_tuned", "numpy")


def numpy_search(x, q, k):
    """Exact top-k as a numpy user writes it: one BLAS product, argpartition, then sort the k."""
    s = x @ q[0] if len(q) == 1 else q @ x.T
    s = s.reshape(len(q), -1)
    part = np.argpartition(-s, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(s, part, 1), axis=1)
    ids = np.take_along_axis(part, order, 1)
    return np.take_along_axis(s, ids, 1), ids


def numpy_worker(folder: str, min_time: float) -> None:
    """Child process: time numpy_search on folder/x.npy, q.npy for each (k, batch) in folder/plan.json."""
    x, queries = np.load(os.path.join(folder, "x.npy")), np.load(os.path.join(folder, "q.npy"))
    out = {}
    for k, b in json.load(open(os.path.join(folder, "plan.json"))):
        q = queries[:b]
        t0 = time.perf_counter()
        _, ids = numpy_search(x, q, k)  # warm-up, and the ids for the recall check
        first = time.perf_counter() - t0
        times = [first] if first > 3.0 else []
        for _ in range(0 if times else int(min(15, max(3, min_time / max(first, 1e-6))))):
            t = time.perf_counter()
            numpy_search(x, q, k)
            times.append(time.perf_counter() - t)
        out[f"{k},{b}"] = dict(times=times, ids=ids.tolist())
    with open(os.path.join(folder, "out.json"), "w") as f:
        json.dump(out, f)


def numpy_times(x, queries, plan, threads, min_time):
    """Run numpy_worker in a fresh process with OpenBLAS/OMP capped at ``threads``; {(k, b): (times, ids)}."""
    import subprocess
    import tempfile
    with tempfile.TemporaryDirectory(prefix="bench_topk_np_") as tmp:
        np.save(os.path.join(tmp, "x.npy"), x)
        np.save(os.path.join(tmp, "q.npy"), queries)
        with open(os.path.join(tmp, "plan.json"), "w") as f:
            json.dump(plan, f)
        env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads),
                   MKL_NUM_THREADS=str(threads))
        subprocess.run([sys.executable, os.path.abspath(__file__), "--numpy-worker", tmp,
                        "--min-time", str(min_time)], env=env, check=True)
        got = json.load(open(os.path.join(tmp, "out.json")))
    return {tuple(int(v) for v in key.split(",")): (r["times"], np.asarray(r["ids"])) for key, r in got.items()}
FAISS_DEFAULTS = None  # filled from faiss.cvar at the first search: the library's own settings


def faiss_search(index, q, k, setting):
    """IndexFlatIP.search with FAISS's global BLAS settings (threshold, query_bs, database_bs) = ``setting``.
    Below ``threshold`` queries FAISS scans query by query (SIMD dot products) instead of calling sgemm;
    its default in faiss 1.15 is large (128000), so batches of 16-256 take the scalar path."""
    global FAISS_DEFAULTS
    cv = faiss.cvar
    if FAISS_DEFAULTS is None:
        FAISS_DEFAULTS = (cv.distance_compute_blas_threshold, cv.distance_compute_blas_query_bs,
                          cv.distance_compute_blas_database_bs)
    (cv.distance_compute_blas_threshold, cv.distance_compute_blas_query_bs,
     cv.distance_compute_blas_database_bs) = setting or FAISS_DEFAULTS
    return index.search(q, k)


def torch_blocked(qt: torch.Tensor, xt: torch.Tensor, k: int, setting):
    """Exact top-k over ``rows``-row blocks of the database: matmul + topk per block, then one merge.
    ``left`` = "db": scores = block @ q.T (batch 1 is a gemv, torch.mv, at memory speed); "q": q @ block.T
    (the score rows contiguous for topk). numpy's BLAS is left out: its OpenBLAS threads spin after each
    call and slow whatever runs next on the 2 cores."""
    rows, left = setting
    b, n = len(qt), len(xt)
    vals, ids = [], []
    for s in range(0, n, rows):
        blk = xt[s:s + rows]
        if left == "db" or b == 1:
            sc = torch.mv(blk, qt[0]).view(-1, 1) if b == 1 else blk @ qt.T
            v, i = torch.topk(sc, min(k, len(blk)), dim=0)
            v, i = v.T, i.T
        else:
            v, i = torch.topk(qt @ blk.T, min(k, len(blk)), dim=1)
        vals.append(v)
        ids.append(i + s)
    v, pos = torch.topk(torch.cat(vals, 1), k, dim=1)
    return v, torch.gather(torch.cat(ids, 1), 1, pos)


def tune_baselines(tuned, methods, q, xt, k, flat):
    """Pick each baseline's block size for this (batch, k): the fastest of a few settings, one timed call
    each after a warm-up (the tuned rows then report the best of the timed rounds like every other row)."""
    def fastest(fn, settings):
        return min(settings, key=lambda st: best_time(lambda: fn(st), 1))

    qt = torch.from_numpy(q)
    tuned["torch_blocked"] = fastest(lambda st: torch_blocked(qt, xt, k, st),
                                     [(r, left) for r in (16384, 65536, 262144)
                                      for left in (("db",) if len(q) == 1 else ("db", "q"))])
    if flat is not None:
        faiss_search(flat, q[:1], 1, None)  # records the defaults
        _, qbs, dbs0 = FAISS_DEFAULTS
        tuned["faiss_tuned"] = fastest(lambda st: faiss_search(flat, q, k, st),
                                       [FAISS_DEFAULTS] + [(1, qbs, dbs) for dbs in (dbs0, 4096, 16384, 65536)])


def run_config(x, queries, batches, ks, threads, min_time, rows, dtypes, with_numpy=True):
    n, d = x.shape
    # numpy first, in its own process, so its spinning BLAS threads are gone before anything else is timed.
    np_res = numpy_times(x, queries, [(k, b) for k in ks for b in batches], threads, min_time) if with_numpy else {}
    torch.set_num_threads(threads)
    xt = torch.from_numpy(x)

    # name -> (search fn, index bytes in memory, bytes one query must scan)
    methods = {}
    methods["torch"] = (lambda q, k: torch.topk(torch.from_numpy(q) @ xt.T, k, dim=1), x.nbytes, x.nbytes)
    methods["torch_blocked"] = (lambda q, k: torch_blocked(torch.from_numpy(q), xt, k, tuned["torch_blocked"]),
                                x.nbytes, x.nbytes)
    # FAISS keeps its own float32 copy: skip it rather than swap when memory is short (said in the output).
    if faiss is not None and x.nbytes * 4 > mem_available():
        print(f"  skipping faiss_flat: {x.nbytes / 2**30:.1f} GiB copy does not fit next to the others", flush=True)
    elif faiss is not None:
        faiss.omp_set_num_threads(threads)
        flat = faiss.IndexFlatIP(d)
        flat.add(x)
        methods["faiss_flat"] = (lambda q, k: faiss_search(flat, q, k, FAISS_DEFAULTS), x.nbytes, x.nbytes)
        methods["faiss_tuned"] = (lambda q, k: faiss_search(flat, q, k, tuned["faiss_tuned"]), x.nbytes, x.nbytes)
    tuned = {}  # the baselines' block sizes, picked per (batch, k) below on these very inputs
    for dt in dtypes:
        t0 = time.perf_counter()
        ix = TopKIndex(d, dtype=dt.split("+")[0], refine=dt.endswith("+refine"), threads=threads)
        ix.add(x)
        scanned = -(-n // 16) * ix._panel_bytes + (8 * n if ix.dtype == "int8" else 0)  # panels (+ scale, row sum)
        print(f"  built {dt} index in {time.perf_counter() - t0:.1f}s ({ix.nbytes / 2**20:.0f} MiB)", flush=True)
        methods[f"uae_{dt}"] = (lambda q, k, ix=ix: ix.search(q, k), ix.nbytes, scanned)

    bw_cache = {}
    peak = sgemm_rate(threads)
    for k in ks:
        for b in batches:
            q = queries[:b]
            exact = torch.topk(torch.from_numpy(q) @ xt.T, k, dim=1).indices.numpy()
            tune_baselines(tuned, methods, q, xt, k, flat if "faiss_tuned" in methods else None)
            times = {name: [] for name in methods}
            results, warm = {}, {}
            for name, (fn, _, _) in methods.items():
                t = time.perf_counter()
                results[name] = fn(q, k)  # warm-up (and the recall check)
                warm[name] = time.perf_counter() - t
            # Interleave the methods over rounds so load changes on a shared machine hit all of them.
            # A call slower than 3 s (FAISS at large N x batch) is timed by its warm-up call alone.
            slow = {m for m, t in warm.items() if t > 3.0}
            for m in slow:
                times[m].append(warm[m])
            if (k, b) in np_res:  # timed in its own process above, not interleaved with the others
                times["numpy"], np_ids = np_res[(k, b)]
                results["numpy"] = (None, np_ids)
            fast_round = sum(t for m, t in warm.items() if m not in slow)
            rounds = int(min(15, max(3, min_time * len(methods) / max(fast_round, 1e-6))))
            for _ in range(rounds):
                for name, (fn, _, _) in methods.items():
                    if name in slow:
                        continue
                    t = time.perf_counter()
                    fn(q, k)
                    times[name].append(time.perf_counter() - t)
            base_qps = max(b / min(times[m]) for m in BASELINES if m in times)
            entries = list(methods.items()) + ([("numpy", (None, x.nbytes, x.nbytes))] if "numpy" in times else [])
            for name, (fn, mem, scanned) in entries:
                t = min(times[name])
                ids = np.asarray(results[name][1])
                recall = float(np.mean([len(set(a) & set(e)) / k for a, e in zip(ids.tolist(), exact.tolist())]))
                row = dict(N=n, d=d, batch=b, k=k, method=name, threads=threads, qps=b / t, sec_per_batch=t,
                           median_sec=statistics.median(times[name]), rounds=len(times[name]), recall=recall,
                           mem_mib=mem / 2**20,
                           speedup_vs_best_baseline=(b / t) / base_qps)
                if name in tuned:
                    row["tuned"] = tuned[name]
                if b == 1:
                    if scanned not in bw_cache:
                        bw_cache[scanned] = read_bandwidth(scanned, threads)
                    row["read_gbs"] = scanned / t / 1e9
                    row["limit_read_gbs"] = bw_cache[scanned] / 1e9
                    row["frac_limit"] = row["read_gbs"] / row["limit_read_gbs"]
                elif b >= 256:
                    row["gflops"] = 2 * n * d * b / t / 1e9
                    row["limit_sgemm_gflops"] = peak / 1e9
                    row["frac_limit"] = row["gflops"] / row["limit_sgemm_gflops"]
                rows.append(row)
                lim = f"{row['frac_limit']:.2f}" if "frac_limit" in row else "-"
                print(f"  N={n:>8} d={d:4} B={b:4} k={k:4} {name:15} {row['qps']:10.1f} QPS  x{row['speedup_vs_best_baseline']:5.2f}"
                      f"  recall {recall:.4f}  mem {row['mem_mib']:8.0f} MiB  limit {lim}", flush=True)


def markdown(rows) -> str:
    out = ["| N | d | batch | k | method | QPS | vs best baseline | recall@k | memory MiB | fraction of limit |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lim = f"{r['frac_limit']:.2f}" if "frac_limit" in r else "-"
        out.append(f"| {r['N']} | {r['d']} | {r['batch']} | {r['k']} | {r['method']} | {r['qps']:.1f} | "
                   f"{r['speedup_vs_best_baseline']:.2f}x | {r['recall']:.4f} | {r['mem_mib']:.0f} | {lim} |")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="N=200k, d=384 only (< 2 min)")
    p.add_argument("--sizes", default=None, help="comma list of N (default 100000,1000000)")
    p.add_argument("--dims", default=None, help="comma list of d (default 384,768)")
    p.add_argument("--batches", default="1,16,256")
    p.add_argument("--ks", default="10,100")
    p.add_argument("--dtypes", default="float32,bfloat16,int8,int8+refine")
    p.add_argument("--threads", type=int, default=_topk.max_threads())
    p.add_argument("--min-time", type=float, default=None, help="seconds per method and config (sets the rounds)")
    p.add_argument("--data", default=None, help=".npy [N, d] embeddings to use instead of random vectors")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=os.path.join(RESULTS, "bench_topk.json"))
    p.add_argument("--no-numpy", action="store_true", help="leave out the numpy baseline (its own process)")
    p.add_argument("--numpy-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.numpy_worker:
        return numpy_worker(args.numpy_worker, args.min_time or 2.0)

    if args.quick:
        sizes, dims, ks, min_time = [200_000], [384], [10], args.min_time or 0.6
    else:
        sizes = [int(v) for v in (args.sizes or "100000,1000000").split(",")]
        dims = [int(v) for v in (args.dims or "384,768").split(",")]
        ks, min_time = [int(v) for v in args.ks.split(",")], args.min_time or 2.0
    batches = [int(v) for v in args.batches.split(",")]
    dtypes = args.dtypes.split(",")
    rng = np.random.default_rng(args.seed)
    info = dict(cpu=cpu_model(), cores=os.cpu_count(), threads=args.threads, isa=_topk.isa(), torch=torch.__version__,
                faiss=getattr(faiss, "__version__", None), numpy=np.__version__, commit=commit(),
                date=datetime.datetime.now().isoformat(timespec="seconds"), load_avg=os.getloadavg(),
                data=args.data or "random unit Gaussian", run=run_meta())  # run: OpenMP wait policy, dirty tree
    print(json.dumps(info))
    rows = []
    t_start = time.perf_counter()
    if args.data:
        emb = np.load(args.data, mmap_mode="r")
        perm = rng.permutation(len(emb))
        queries = np.ascontiguousarray(emb[np.sort(perm[: max(batches)])], dtype=np.float32)
        x = np.ascontiguousarray(emb[np.sort(perm[max(batches):])], dtype=np.float32)
        run_config(x, queries, batches, ks, args.threads, min_time, rows, dtypes, not args.no_numpy)
    else:
        for d in dims:
            queries = unit_rows(rng, max(batches), d)
            for n in sizes:
                print(f"N={n} d={d}: generating data", flush=True)
                x = unit_rows(rng, n, d)
                run_config(x, queries, batches, ks, args.threads, min_time, rows, dtypes, not args.no_numpy)
                del x
    info["wall_s"] = round(time.perf_counter() - t_start, 1)
    info["load_avg_end"] = os.getloadavg()
    print()
    print(markdown(rows))
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"machine": info, "rows": rows}, f, indent=1)
    print(f"\nwrote {args.json} ({info['wall_s']} s)")


if __name__ == "__main__":
    main()
