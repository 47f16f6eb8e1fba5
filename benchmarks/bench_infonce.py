"""Benchmark utility_infonce forward+backward: time and peak extra memory.

Side by side, on the same inputs (B queries x N passages, d dims, K soft targets per query):

* ``naive``   - materialised [B, N] scores, ``log_softmax`` + gather (the strongest plain-torch formulation we
                measured: faster than ``logsumexp`` + gather and than ``F.cross_entropy`` with dense soft targets)
* ``chunked`` - ``utility_infonce(impl="torch")``: row chunks, gradients computed in the forward sweep
* ``triton``  - ``utility_infonce(impl="triton")`` (CUDA only)
* ``infcl``   - Inf-CL's ``cal_inf_loss`` (CUDA only, when ``inf_cl`` is installed; one-hot labels only, so it
                solves the plain InfoNCE special case of the same size)

Every case runs in its own subprocess so peak memory is clean: on CPU the peak RSS during the call
(``/proc/self/clear_refs`` + ``VmHWM``) minus the RSS with inputs allocated, on CUDA
``max_memory_allocated`` minus the allocation before the call. Both include the returned gradients.
Naive cases whose estimated [B, N] buffers would not fit are reported as skipped.

    python benchmarks/bench_infonce.py --quick                 # < 2 min on a 2-core CPU
    python benchmarks/bench_infonce.py                         # full grid for the device
    python benchmarks/bench_infonce.py --sizes 16384 --dims 768 --impls naive chunked
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sibling _meta module, however this is run
from _meta import run_meta  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
IMPLS = ("naive", "chunked", "triton", "infcl")
NAIVE_BUFFERS = 3.2  # [B, N] fp32 buffers the naive fwd+bwd peaks at (measured: 789 MiB at B = N = 8192)


# ------------------------------------------------------------------------------------------- one case
def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _hwm_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _naive(q, p, idx, util, tau):
    import torch

    valid = idx >= 0
    w = torch.softmax(util.masked_fill(~valid, float("-inf")), dim=1)
    # The strongest plain formulation: 1/tau folded into q (no extra [B, N] pass forward and backward) and
    # log_softmax computing in fp32 from the matmul's dtype (no cast copy of the [B, N] scores).
    logp = torch.log_softmax((q * (1.0 / tau)) @ p.T, dim=1, dtype=torch.float32)
    return -(w * logp.gather(1, idx.clamp_min(0))).sum(1).mean()


def run_case(cfg: dict) -> dict:
    import torch
    import torch.nn.functional as F

    from uae_fast import utility_infonce

    b, n, d, k, impl = cfg["b"], cfg["n"], cfg["d"], cfg["k"], cfg["impl"]
    dev = torch.device(cfg["device"])
    dtype = getattr(torch, cfg["dtype"])
    torch.backends.cuda.matmul.allow_tf32 = bool(cfg.get("tf32"))  # each case is its own process: set it here
    tau = 0.05
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(b, d, generator=g), dim=-1).to(dev, dtype).requires_grad_()
    p = F.normalize(torch.randn(n, d, generator=g), dim=-1).to(dev, dtype).requires_grad_()
    idx = torch.randint(0, n, (b, k), generator=g)
    idx[:, 0] = torch.arange(b) % n  # the positive, MNRL-style
    idx = idx.to(dev)
    util = torch.randn(b, k, generator=g).to(dev)

    if impl == "naive":
        fn = lambda: _naive(q, p, idx, util, tau)  # noqa: E731
    elif impl in ("chunked", "triton"):
        which = "torch" if impl == "chunked" else "triton"
        fn = lambda: utility_infonce(q, p, idx, util, temperature=tau, impl=which)  # noqa: E731
    elif impl == "infcl":
        from uae_fast.ops._infonce_auto import tf32_matmul

        if dtype == torch.float32 and not tf32_matmul():
            # the other rows run IEEE fp32 (torch's default): Inf-CL would be timed at another precision
            return {**cfg, "skipped": "Inf-CL's tl.dot runs TF32 whatever allow_tf32 says: not an IEEE fp32 peer"}
        from inf_cl import cal_inf_loss

        fn = lambda: cal_inf_loss(q, p, scale=1.0 / tau).mean()  # noqa: E731
    else:
        raise ValueError(impl)

    cuda = dev.type == "cuda"

    def step():
        q.grad = p.grad = None
        loss = fn()
        loss.backward()
        return float(loss)

    small = b * n * d <= 4096 * 4096 * 1024
    step()  # warm-up (every case): allocator, kernel compilation, BLAS threads
    reps = max(3, cfg["reps"]) if (small or cuda) else 3
    q.grad = p.grad = None
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        import gc

        gc.collect()
        have_hwm = _reset_hwm()
        base = _rss_mib()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        loss = step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if cuda:
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        import resource

        hwm = _hwm_mib() if have_hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        peak = hwm - base
    from uae_fast.ops._infonce_auto import tf32_matmul

    precision = ("tf32" if tf32_matmul() else "ieee") if dtype == torch.float32 and cuda else "-"
    # the timed gradients, as two fixed random projections: every case runs in its own process, so the
    # implementations are compared on these (and the loss), not on tensors
    g = torch.Generator().manual_seed(1)
    grad_fp = {n: [float((t.grad.double().cpu() * torch.randn(t.shape, generator=g, dtype=torch.float64)).sum()),
                   float(t.grad.double().norm())] for n, t in (("q", q), ("p", p)) if t.grad is not None}
    return {**cfg, "precision": precision, "time_s": statistics.median(times), "times_s": times,
            "peak_extra_mib": peak, "loss": loss, "grad_fingerprint": grad_fp}


# ------------------------------------------------------------------------------------------- driver
def _mem_available_mib(device: str) -> float:
    if device == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info()
        return free / 2**20
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable")) / 1024


def _machine(device: str) -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def _grid(args, device):
    if args.sizes or args.dims:
        sizes = args.sizes or [4096]
        dims = args.dims or [768]
        return [(s, d) for s in sizes for d in dims]
    if device == "cuda":
        if args.quick:
            return [(4096, 768), (16384, 768)]
        return [(s, d) for s in (4096, 16384, 65536, 262144) for d in (384, 768, 1024)]
    if args.quick:
        return [(4096, 384), (4096, 768), (8192, 768)]
    return [(4096, 384), (4096, 768), (4096, 1024), (16384, 384), (16384, 768), (16384, 1024), (65536, 768)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small grid, < 2 min on CPU")
    ap.add_argument("--json", default=os.path.join(HERE, "results", "infonce.json"))
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--sizes", type=int, nargs="*", help="B = N values")
    ap.add_argument("--dims", type=int, nargs="*", help="embedding dims")
    ap.add_argument("--impls", nargs="*", choices=IMPLS, default=None)
    ap.add_argument("--k", type=int, default=4, help="soft targets per query")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions for small cases (the median is reported)")
    ap.add_argument("--tf32", action="store_true",
                    help="CUDA float32 with TF32 matmuls for every row (default: IEEE fp32, where Inf-CL is skipped: "
                         "its tl.dot always runs TF32)")
    ap.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case in this process
    args = ap.parse_args(argv)

    if args.case:
        print("RESULT " + json.dumps(run_case(json.loads(args.case))), flush=True)
        return 0

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    impls = args.impls or (list(IMPLS) if device == "cuda" else ["naive", "chunked"])
    if device != "cuda":
        impls = [i for i in impls if i not in ("triton", "infcl")]
    if "infcl" in impls:
        try:
            import inf_cl  # noqa: F401
        except ImportError:
            print("inf_cl not installed: skipping the Inf-CL baseline (pip install inf_cl)")
            impls.remove("infcl")

    results = []
    for size, d in _grid(args, device):
        for impl in impls:
            cfg = dict(b=size, n=size, d=d, k=args.k, impl=impl, device=device, dtype=args.dtype, reps=args.reps,
                       tf32=args.tf32)
            est = NAIVE_BUFFERS * size * size * 4 / 2**20
            if impl == "naive" and est > 0.9 * _mem_available_mib(device):
                results.append({**cfg, "skipped": f"needs ~{est / 1024:.0f} GiB"})
                print(f"[{impl} B=N={size} d={d}] skipped: naive needs ~{est / 1024:.0f} GiB", flush=True)
                continue
            cmd = [sys.executable, os.path.abspath(__file__), "--case", json.dumps(cfg)]
            t0 = time.time()
            # A fixed mmap threshold turns off glibc's adaptive one, so buffers freed by the warm-up go back
            # to the OS instead of staying resident and hiding from the peak-RSS measurement.
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
            r = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
            if r.returncode != 0 or line is None:
                why = "out of memory (killed)" if r.returncode in (-9, 137) else (r.stderr.strip().splitlines() or ["?"])[-1]
                results.append({**cfg, "skipped": f"failed: {why[:120]}"})
                print(f"[{impl} B=N={size} d={d}] failed: {why[:300]}", flush=True)
                continue
            res = json.loads(line[len("RESULT "):])
            results.append(res)
            if "skipped" in res:
                print(f"[{impl} B=N={size} d={d}] skipped: {res['skipped']}", flush=True)
                continue
            print(f"[{impl} B=N={size} d={d}] {res['time_s']:.3f} s, peak extra {res['peak_extra_mib']:.0f} MiB, "
                  f"loss {res['loss']:.5f} (case wall {time.time() - t0:.0f} s)", flush=True)

    # table
    unit, mul = ("ms", 1e3) if device == "cuda" else ("s", 1.0)
    print()
    print(f"| B = N | d | impl | fwd+bwd ({unit}) | peak extra (MiB) | time / naive | memory / naive |")
    print("|---:|---:|---|---:|---:|---:|---:|")
    for r in results:
        naive = next((x for x in results if x["impl"] == "naive" and x["b"] == r["b"] and x["d"] == r["d"] and "time_s" in x), None)
        if "skipped" in r:
            print(f"| {r['b']} | {r['d']} | {r['impl']} | {r['skipped']} | | | |")
            continue
        rt = f"{r['time_s'] / naive['time_s']:.2f}x" if naive else "-"
        rm = f"{100 * r['peak_extra_mib'] / max(naive['peak_extra_mib'], 1e-9):.1f}%" if naive else "-"
        print(f"| {r['b']} | {r['d']} | {r['impl']} | {r['time_s'] * mul:.3g} | {r['peak_extra_mib']:.0f} | {rt} | {rm} |")
    # the CPU targets, when measured
    for r in results:
        if device == "cpu" and r["impl"] == "chunked" and (r["b"], r["d"]) == (16384, 768) and "time_s" in r:
            naive = next((x for x in results if x["impl"] == "naive" and x["b"] == 16384 and x["d"] == 768 and "time_s" in x), None)
            if naive:
                tr, mr = r["time_s"] / naive["time_s"], r["peak_extra_mib"] / naive["peak_extra_mib"]
                print(f"\ntarget B=N=16384 d=768 fp32: time {tr:.2f}x naive (<= 1.2x: {'ok' if tr <= 1.2 else 'MISSED'}), "
                      f"memory {100 * mr:.1f}% of naive (<= 10%: {'ok' if mr <= 0.10 else 'MISSED'})")
        if device == "cpu" and r["impl"] == "chunked" and r["b"] == 65536 and "time_s" in r:
            print(f"target B=N=65536 d={r['d']} runs: ok ({r['time_s']:.0f} s, peak extra {r['peak_extra_mib']:.0f} MiB)")
    # agreement between implementations (same inputs: the loss and the timed gradients up to dtype noise)
    disagree = []
    for r in results:
        ref = next((x for x in results if x["impl"] == "chunked" and x["b"] == r["b"] and x["d"] == r["d"] and "loss" in x), None)
        if not (ref and "loss" in r and r["impl"] in ("naive", "triton")):
            continue
        tol = 1e-3 if r["dtype"] in ("float32", "float64") else 2e-2  # 16-bit inputs: their rounding
        pairs = [("loss", r["loss"], ref["loss"], abs(ref["loss"]))]
        for n, (proj, norm) in r.get("grad_fingerprint", {}).items():  # a projection is measured against the norm
            rproj, rnorm = ref.get("grad_fingerprint", {}).get(n, (proj, norm))
            pairs += [(f"grad {n} projection", proj, rproj, rnorm), (f"grad {n} norm", norm, rnorm, rnorm)]
        for what, a, b, scale in pairs:
            if not abs(a - b) <= tol * max(scale, 1e-12):
                disagree.append(f"{r['impl']} {what} {a:.6g} vs chunked {b:.6g} at B=N={r['b']} d={r['d']}")
    for line in disagree:
        print(f"FAILED: {line}")

    out = {
        "benchmark": "infonce",
        "device": device,
        "machine": _machine(device),
        "torch": torch.__version__,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "run": run_meta(),
        "quick": args.quick,
        "results": results,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1)
    print(f"\nwrote {args.json}")
    return 1 if disagree else 0


if __name__ == "__main__":
    sys.exit(main())
