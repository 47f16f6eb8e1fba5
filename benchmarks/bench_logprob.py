"""Benchmark: per-token target log-probs through an LM head (``uae_fast.token_logprobs``).

Compares, side by side in one run:
  naive         log_softmax(h @ W.T) then gather (materialises [N, V] logits)
  torch         uae_fast, impl="torch" (vocab-blocked online log-sum-exp; the CPU path)
  triton        uae_fast, impl="triton" (GPU only)
  triton_tuned  same, with the opt-in per-shape autotuner (GPU, --autotune)
  liger         Liger-Kernel fused linear cross entropy, reduction="none" (-> -logp), if installed
  cce           Cut-Cross-Entropy linear_cross_entropy, reduction="none" (-> -logp), if installed

Reports median time, peak extra memory, TFLOP/s (2*N*D*V / time) and max |logp - float64 reference|.
CPU peak memory is the resident-set high-water mark of a fresh subprocess per case, reset
(/proc/self/clear_refs) after the inputs exist, so it counts exactly what the op allocates.
GPU peak memory is torch.cuda.max_memory_allocated above the inputs.

    python benchmarks/bench_logprob.py --quick            # CPU, SmolLM2 head, N=1024/4096 (<2 min)
    python benchmarks/bench_logprob.py --device cuda      # GPU, all teacher shapes, N=1k..32k
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone

import torch

SHAPES = {  # teacher LM heads: (D, V)
    "smollm2-135m": (576, 49152),
    "qwen2.5-0.5b": (896, 151936),
    "llama-3-8b": (4096, 128256),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ------------------------------------------------------------------------------------------ methods


def _naive(h, w, t):
    # log_softmax in fp32 from 16-bit logits, no explicit cast. On CUDA only fp16 has a fused half-to-float path;
    # for bf16 ATen still makes an fp32 copy of the [N, V] logits (in its peak memory)
    z = h @ w.T
    return torch.log_softmax(z, dim=-1, dtype=torch.float32).gather(1, t[:, None]).squeeze(1)


def _ours(impl):
    from uae_fast import token_logprobs

    return lambda h, w, t: token_logprobs(h, w, t, impl=impl)


def _liger():
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    def f(h, w, t):
        out = liger_fused_linear_cross_entropy(h, w, t, reduction="none")
        out = out[0] if isinstance(out, tuple) else getattr(out, "loss", out)
        return -out.float()

    return f


def _cce():
    from cut_cross_entropy import linear_cross_entropy

    return lambda h, w, t: -linear_cross_entropy(h, w, t, reduction="none").float()


def _available(device: str, autotune: bool = False):
    methods = {"naive": lambda: _naive, "torch": lambda: _ours("torch")}
    if device == "cuda":
        methods["triton"] = lambda: _ours("triton")
        if autotune:
            methods["triton_tuned"] = lambda: _ours("triton")
        for name, make in (("liger", _liger), ("cce", _cce)):
            try:
                make()
                methods[name] = make
            except ImportError:
                print(f"[skip] {name}: not installed", file=sys.stderr)
    return methods


def _inputs(n, d, v, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    # In place: no temporaries, so the CPU high-water mark after setup equals what is resident.
    h = torch.empty(n, d, device=device, dtype=dtype).normal_(0, 1, generator=g)
    w = torch.empty(v, d, device=device, dtype=dtype).normal_(0, 2.0 / d**0.5, generator=g)
    t = torch.randint(0, v, (n,), device=device, generator=g)
    return h, w, t


# --------------------------------------------------------------------------------------------- CPU


def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def _cpu_child(spec):
    """One case in a fresh process: peak extra RSS of the first call, then timed repeats."""
    torch.set_num_threads(spec["threads"])
    fn = _available("cpu")[spec["method"]]()
    dtype = DTYPES[spec["dtype"]]
    # Warm the libraries (OpenMP pool, MKL) on a tiny problem so their one-off buffers stay out.
    hs, ws, ts = _inputs(16, spec["d"], 512, dtype, "cpu")
    fn(hs, ws, ts)
    del hs, ws, ts
    h, w, t = _inputs(spec["n"], spec["d"], spec["v"], dtype, "cpu")
    with torch.no_grad():
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        rss0 = _status_kb("VmRSS")
        out = fn(h, w, t)
        peak_mb = (_status_kb("VmHWM") - rss0) / 1024
        times = []
        for _ in range(spec["reps"]):
            t0 = time.perf_counter()
            fn(h, w, t)
            times.append(time.perf_counter() - t0)
        ref = torch.log_softmax(h[:256].double() @ w.double().T, -1).gather(1, t[:256, None]).squeeze(1)
    err = (out[:256].double() - ref).abs().max().item()
    return {"ms": 1e3 * statistics.median(times), "ms_all": [1e3 * x for x in times], "peak_mb": peak_mb, "max_abs_err": err}


def _run_cpu_case(spec):
    cmd = [sys.executable, __file__, "--_child", json.dumps(spec)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        return {"error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"rc={r.returncode}"}
    return json.loads(r.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------- GPU


def _run_gpu_case(method, fn, n, d, v, dtype, ref_cache):
    import triton

    torch.cuda.empty_cache()
    h, w, t = _inputs(n, d, v, dtype, "cuda")
    with torch.no_grad():
        try:
            out = fn(h, w, t)  # first call: compiles/autotunes (its buffers are not the method's working set)
            del out
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            out = fn(h, w, t)  # the peak of a warm call, as bench_infonce_gpu measures it
            torch.cuda.synchronize()
            peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
            ms = triton.testing.do_bench(lambda: fn(h, w, t), warmup=25, rep=100, return_mode="median")
        except torch.OutOfMemoryError:
            return {"error": "OOM"}
        key = (n, d, v, str(dtype))
        if key not in ref_cache:  # accuracy vs fp64 on a slice of rows
            hs = h[:512].double()
            ref_cache[key] = torch.log_softmax(hs @ w.double().T, -1).gather(1, t[:512, None]).squeeze(1)
        err = (out[:512].double() - ref_cache[key]).abs().max().item()
    del h, w, t, out
    return {"ms": ms, "peak_mb": peak_mb, "max_abs_err": err}


# -------------------------------------------------------------------------------------------- main


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="CPU: SmolLM2 shape, N=1024/4096, fp32 (<2 min)")
    p.add_argument("--shapes", nargs="+", choices=list(SHAPES), help="default: all (quick: smollm2-135m)")
    p.add_argument("--n", nargs="+", type=int, help="token counts (default CPU 1024 4096, GPU 1024 4096 8192 32768)")
    p.add_argument("--dtype", nargs="+", choices=list(DTYPES), help="default: CPU fp32, GPU bf16")
    p.add_argument("--methods", nargs="+", help="subset of naive torch triton liger cce")
    p.add_argument("--reps", type=int, default=None, help="CPU timed repeats per case (median)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--autotune", action="store_true", help="GPU: also run triton with UAE_LOGPROB_AUTOTUNE=1")
    p.add_argument("--budget-s", type=float, default=None, help="stop starting new cases after this many seconds")
    p.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "bench_logprob.json"))
    p.add_argument("--_child", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a._child:
        print(json.dumps(_cpu_child(json.loads(a._child))))
        return 0

    cpu = a.device == "cpu"
    shapes = a.shapes or (["smollm2-135m"] if (a.quick or cpu) else list(SHAPES))
    ns = a.n or ([1024, 4096] if cpu else [1024, 4096, 8192, 32768])
    dtypes = a.dtype or (["fp32"] if cpu else ["bf16"])
    reps = a.reps or (3 if a.quick else 5)
    methods = _available(a.device, a.autotune)
    if a.methods:
        methods = {k: m for k, m in methods.items() if k in a.methods}

    rows = []
    ref_cache = {}
    t_start = time.perf_counter()
    interrupted = False
    meta = dict(
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        commit=_git_commit(),
        device=torch.cuda.get_device_name() if a.device == "cuda" else platform.processor() or platform.machine(),
        cpu_threads=a.threads,
        torch=torch.__version__,
        quick=a.quick,
        note="CPU timings on a shared machine are noisy; ratios come from one run, cases interleaved by N",
    )

    def write(complete):  # after every case, tmp + rename: a run killed by its timeout keeps its rows
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json + ".tmp", "w") as f:
            json.dump({"meta": dict(meta, complete=complete), "rows": rows}, f, indent=1)
        os.replace(a.json + ".tmp", a.json)

    cases = [(s, dt, n, name) for s in shapes for dt in dtypes for n in ns for name in methods]
    try:
        for shape, dt, n, name in cases:
            if a.budget_s is not None and time.perf_counter() - t_start > a.budget_s:
                print(f"[budget] {a.budget_s:.0f}s spent: skipping the remaining cases", file=sys.stderr)
                break
            d, v = SHAPES[shape]
            os.environ["UAE_LOGPROB_AUTOTUNE"] = "1" if name == "triton_tuned" else "0"
            if cpu:
                spec = dict(method=name, n=n, d=d, v=v, dtype=dt, reps=reps, threads=a.threads)
                res = _run_cpu_case(spec)
            else:
                try:
                    res = _run_gpu_case(name, methods[name](), n, d, v, DTYPES[dt], ref_cache)
                except Exception as e:  # a baseline that rejects a shape must not sink the table
                    res = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"}
            row = dict(shape=shape, N=n, D=d, V=v, dtype=dt, method=name, **res)
            if "ms" in res:
                row["tflops"] = 2 * n * d * v / (res["ms"] * 1e-3) / 1e12
            rows.append(row)
            _print_row(row, rows)
            write(complete=False)
    except KeyboardInterrupt:  # gpu_suite.sh's timeout sends SIGINT: keep what was measured
        interrupted = True

    print()
    _print_table(rows)
    write(complete=not interrupted)
    print(f"\nwrote {a.json}")
    return 130 if interrupted else 0


def _naive_of(row, rows):
    for r in rows:
        if r["method"] == "naive" and all(r[k] == row[k] for k in ("shape", "N", "dtype")) and "ms" in r:
            return r
    return None


def _ratios(row, rows):
    """(time / naive, memory / naive) of a row against the naive row of its case, '-' where there is none."""
    nv = _naive_of(row, rows)
    t = f"{row['ms'] / nv['ms']:.2f}x" if nv else "-"
    m = f"{100 * row['peak_mb'] / nv['peak_mb']:.1f}%" if nv and nv["peak_mb"] > 0 else "-"
    return t, m


def _fmt(row, rows):
    if "error" in row:
        return f"{row['shape']:<13} {row['dtype']:<5} {row['N']:>6} {row['method']:<13} {'-- ' + row['error']}"
    t_ratio, m_ratio = _ratios(row, rows)
    return (
        f"{row['shape']:<13} {row['dtype']:<5} {row['N']:>6} {row['method']:<13} {row['ms']:>10.2f} {row['tflops']:>8.2f}"
        f" {row['peak_mb']:>10.1f} {t_ratio:>9} {m_ratio:>9} {row['max_abs_err']:>9.1e}"
    )


_HEADER = (
    f"{'shape':<13} {'dtype':<5} {'N':>6} {'method':<13} {'ms(med)':>10} {'TFLOP/s':>8} {'peak MB':>10}"
    f" {'t/naive':>9} {'mem/naive':>9} {'max|err|':>9}"
)


def _print_row(row, rows):
    if len(rows) == 1:
        print(_HEADER)
    print(_fmt(row, rows), flush=True)


def _print_table(rows):
    """The final table in markdown (run_all.py copies it into BENCHMARKS.md)."""
    print("| shape | dtype | N | method | ms (median) | TFLOP/s | peak MB | time / naive | memory / naive | max abs err |")
    print("|---|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['shape']} | {r['dtype']} | {r['N']} | {r['method']} | {r['error']} | | | | | |")
            continue
        t, m = _ratios(r, rows)
        print(f"| {r['shape']} | {r['dtype']} | {r['N']} | {r['method']} | {r['ms']:.2f} | {r['tflops']:.2f} | "
              f"{r['peak_mb']:.1f} | {t} | {m} | {r['max_abs_err']:.1e} |")


def _git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except OSError:
        return None


if __name__ == "__main__":
    sys.exit(main())
