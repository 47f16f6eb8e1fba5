"""utility_infonce forward+backward on a GPU, in the precisions people train in (issue 17).

Settings: bf16 inputs (TF32 off, torch's default, plus the chunked path again with TF32 on: it upcasts bf16 to
fp32, so its speed follows the switch; rows say which in ``precision``); fp32 with TF32
(torch.backends.cuda.matmul.allow_tf32 = True); fp32 IEEE (TF32 off).
Shapes: B = N in {4096, 16384, 65536} x d in {384, 768, 1024}, K = 4 soft targets; largest shapes last.
Methods, on the same inputs:

* ``naive``     materialised [B, N] scores in the input dtype, fp32 ``log_softmax`` + gather (the benchmark's
                strongest plain-torch formulation, bench_infonce.py)
* ``chunked``   ``utility_infonce(impl="torch")``: cuBLAS row chunks, gradients in the forward sweep
* ``triton``    ``utility_infonce(impl="triton")``: the GEMM-shaped score-tile kernel + cuBLAS dQ/dP
* ``infcl``     Inf-CL's ``cal_inf_loss`` (pip ``inf-cl``; one-hot targets = the plain InfoNCE special case of
                the same size; it upcasts to fp32 and its ``tl.dot`` runs TF32 whatever torch's switch says, so
                it is skipped in the IEEE setting)
* ``st_cached`` sentence-transformers' ``CachedMultipleNegativesRankingLoss.calculate_loss`` at the embedding
                level (one-hot diagonal targets; its mini-batch = 1024 query rows, about our 64 MiB workspace;
                the model re-encoding that GradCache adds on top is not part of the loss and not timed)

Reported per case: median time (``triton.testing.do_bench``; cases slower than 50 ms per call use the median
of 3 CUDA-event-timed calls), peak extra memory (``max_memory_allocated`` during one step minus the
allocation before it, returned gradients included), effective TFLOP/s (6 B N d: the 3 GEMMs of the naive
loss), speed and memory relative to naive, and for ``triton`` the kernel's registers and spills (compiled
metadata). Before the grid, each method's relative error against float64 at B = N = 8192, d = 384 (64 / 32 in
the CPU smoke test).

    python benchmarks/bench_infonce_gpu.py                       # full grid on the GPU (~3 min on an H200)
    python benchmarks/bench_infonce_gpu.py --quick               # CPU smoke test (tiny shapes, torch paths)
    python benchmarks/bench_infonce_gpu.py --sizes 16384 --dims 768 --settings bf16 --autotune
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

sys.path.insert(0, HERE)
from _meta import run_meta  # noqa: E402  (date, commit, dirty tree, CPU, torch)

IMPLS = ("naive", "chunked", "triton", "infcl", "st_cached")
# bf16 runs with TF32 off, torch's default; the chunked path, which upcasts bf16 to fp32 for its GEMMs, is also
# timed with TF32 on (an extra row): the only method whose bf16 speed depends on the switch.
SETTINGS = {"bf16": ("bfloat16", False), "tf32": ("float32", True), "ieee": ("float32", False)}
OURS = ("chunked", "triton")  # a failure, a wrong answer or running out of memory here fails the run (exit 1)
# Relative errors a correct path stays far below (float64 reference on the same rounded inputs; the tests'
# tolerances are 10-100x tighter): what this catches is a wrong answer, not rounding.
MAX_ERR = {"loss": 1e-2, "grad": 1e-1}
TAU = 0.05


def _inputs(b, n, d, k, dtype, dev, seed=0):
    import torch
    import torch.nn.functional as F

    # drawn on the device: at B = N = 65536 a CPU draw plus copy costs seconds per case out of a short budget
    g = torch.Generator(device=dev).manual_seed(seed)
    q = F.normalize(torch.randn(b, d, generator=g, device=dev), dim=-1).to(dtype).requires_grad_()
    p = F.normalize(torch.randn(n, d, generator=g, device=dev), dim=-1).to(dtype).requires_grad_()
    idx = torch.randint(0, n, (b, k), generator=g, device=dev)
    idx[:, 0] = torch.arange(b, device=dev) % n  # the positive, MNRL-style
    util = torch.randn(b, k, generator=g, device=dev)
    return q, p, idx, util


def _naive(q, p, idx, util, tau):
    import torch

    valid = idx >= 0
    w = torch.softmax(util.masked_fill(~valid, float("-inf")), dim=1)
    # The strongest plain formulation: 1/tau folded into q (no extra [B, N] pass forward and backward) and
    # log_softmax computing in fp32 (fp64 for fp64) from the matmul's dtype, without a cast copy.
    s = (q * (1.0 / tau)) @ p.T
    logp = torch.log_softmax(s, dim=1, dtype=torch.float64 if s.dtype == torch.float64 else torch.float32)
    return -(w * logp.gather(1, idx.clamp_min(0))).sum(1).mean()


def _head_dim(d):
    return next(h for h in (256, 128, 64, 32, 16) if d % h == 0)


def make_step(impl, q, p, idx, util):
    """A callable running one forward + backward (gradients into q.grad / p.grad), or a skip reason (str)."""
    import torch

    from uae_fast import utility_infonce

    if impl == "naive":
        loss_fn = lambda: _naive(q, p, idx, util, TAU)  # noqa: E731
    elif impl in ("chunked", "triton"):
        which = "torch" if impl == "chunked" else "triton"
        loss_fn = lambda: utility_infonce(q, p, idx, util, temperature=TAU, impl=which)  # noqa: E731
    elif impl == "infcl":
        if q.device.type != "cuda":
            return "Inf-CL is CUDA-only"
        if q.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
            return "Inf-CL's tl.dot runs TF32 whatever allow_tf32 says: not an IEEE fp32 peer"
        try:
            from inf_cl import cal_inf_loss
        except ImportError:
            return "inf_cl not installed"
        labels = torch.arange(q.shape[0], device=q.device) % p.shape[0]
        hd = _head_dim(q.shape[1])
        loss_fn = lambda: cal_inf_loss(q * (1.0 / TAU), p, labels=labels, head_dim=hd)  # noqa: E731
    elif impl == "st_cached":
        if q.shape[0] != p.shape[0]:
            return "CachedMNRL needs one positive per query (N = B)"
        try:
            from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss
            from sentence_transformers.util import dot_score
        except ImportError:
            return "sentence-transformers (with the sentence_transformer.losses layout) not installed"
        # The model argument is only inspected for static embeddings; calculate_loss works on embeddings.
        st = CachedMultipleNegativesRankingLoss(torch.nn.Sequential(torch.nn.Identity()), scale=1.0 / TAU,
                                                similarity_fct=dot_score, mini_batch_size=1024)

        def step():
            q.grad = p.grad = None
            return st.calculate_loss([[q], [p]], with_backward=True)

        return step
    else:
        raise ValueError(impl)

    def step():
        q.grad = p.grad = None
        loss = loss_fn()
        loss.backward()
        return loss

    return step


def _sync(dev):
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize()


def time_ms(step, dev):
    """Median ms of one call: do_bench on CUDA (events), perf_counter on CPU; slow cases get 3 timed calls."""
    import torch

    _sync(dev)
    t0 = time.perf_counter()
    step()
    _sync(dev)
    est = (time.perf_counter() - t0) * 1e3
    if dev.type == "cuda" and est < 50:
        import triton

        # ~5-20 timed calls: the grid has ~135 cases and the device check ~2 minutes for them
        return float(triton.testing.do_bench(step, warmup=max(1, int(est)), rep=max(10, int(5 * est)),
                                             return_mode="median"))
    times = []
    for _ in range(3):
        if dev.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            step()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_mib(step, dev, q, p):
    import torch

    if dev.type != "cuda":
        return None
    q.grad = p.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


# ------------------------------------------------------------------------------------- accuracy
def accuracy(impls, setting, dev, b=512, d=384, k=4):
    """Relative max error of loss, dq, dp against float64 on the same inputs (each method's own problem:
    soft targets for naive/chunked/triton, one-hot for infcl/st_cached)."""
    import torch

    dtype = getattr(torch, SETTINGS[setting][0])
    out = []
    for impl in impls:
        try:
            out.append(_accuracy_one(impl, setting, dev, dtype, b, d, k))
        except Exception as e:  # a compile error or a peer's API change: recorded, the grid still runs
            out.append(dict(setting=setting, impl=impl, skipped=f"failed: {type(e).__name__}: {_first_line(e)}"))
    return out


def _version(module: str):
    """A peer's version for the JSON (None when it is not installed)."""
    try:
        from importlib.metadata import version

        return version({"inf_cl": "inf-cl", "sentence_transformers": "sentence-transformers"}.get(module, module))
    except Exception:
        return None


def _first_line(e) -> str:
    return str(e).splitlines()[0][:160] if str(e) else ""


def _accuracy_one(impl, setting, dev, dtype, b, d, k):
    import torch

    q, p, idx, util = _inputs(b, b, d, k, dtype, dev, seed=1)
    step = make_step(impl, q, p, idx, util)
    if isinstance(step, str):
        return dict(setting=setting, impl=impl, skipped=step)
    loss = step()
    gq, gp = q.grad.double(), p.grad.double()
    qd, pd = q.detach().double().requires_grad_(), p.detach().double().requires_grad_()
    if impl in ("infcl", "st_cached"):
        ref = torch.nn.functional.cross_entropy(qd @ pd.T / TAU, torch.arange(b, device=dev))
    else:
        ref = _naive(qd, pd, idx, util, TAU)
    ref.backward()
    rel = lambda a, r: float((a - r).abs().max() / r.abs().max())  # noqa: E731
    return dict(setting=setting, impl=impl, B=b, N=b, d=d, loss_err=rel(torch.as_tensor(float(loss.detach())).double(), ref.detach().cpu()),
                dq_err=rel(gq, qd.grad), dp_err=rel(gp, pd.grad))


# ------------------------------------------------------------------------------------- driver
def _device_key(dev):
    import torch

    if dev.type != "cuda":
        return dev.type
    major, minor = torch.cuda.get_device_capability(dev)
    return f"sm{major}{minor}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke test; on a GPU a 2-shape grid)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--sizes", type=int, nargs="*", help="B = N values (default 4096 16384 65536)")
    ap.add_argument("--dims", type=int, nargs="*", help="embedding dims (default 384 768 1024)")
    ap.add_argument("--settings", nargs="*", choices=list(SETTINGS), default=None)
    ap.add_argument("--impls", nargs="*", choices=IMPLS, default=None)
    ap.add_argument("--k", type=int, default=4, help="soft targets per query")
    ap.add_argument("--autotune", action="store_true", help="UAE_INFONCE_AUTOTUNE=1 for the triton path")
    ap.add_argument("--budget-s", type=float, default=1e9, help="start no new case after this many seconds")
    ap.add_argument("--json", default=os.path.join(HERE, "results", "infonce-gpu.json"))
    ap.add_argument("--no-accuracy", action="store_true", help="skip the float64 accuracy check (a second call's rows)")
    args = ap.parse_args(argv)
    if args.autotune:
        os.environ["UAE_INFONCE_AUTOTUNE"] = "1"

    import torch

    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = dev.type == "cuda"
    if not cuda and not args.quick:
        ap.error("the GPU grid needs CUDA; on a CPU use --quick (or bench_infonce.py for the CPU grid)")
    impls = args.impls or (list(IMPLS) if cuda else ["naive", "chunked", "st_cached"])
    if not cuda and "triton" in impls and os.environ.get("TRITON_INTERPRET") != "1":
        impls.remove("triton")
    settings = args.settings or (list(SETTINGS) if cuda else ["tf32"])
    if args.quick and not cuda:
        sizes, dims = args.sizes or [256, 512], args.dims or [64]
    elif args.quick:
        sizes, dims = args.sizes or [4096, 16384], args.dims or [768]
    else:
        sizes, dims = args.sizes or [4096, 16384, 65536], args.dims or [384, 768, 1024]
    start = time.time()
    device_name = torch.cuda.get_device_name(dev) if cuda else "cpu"
    print(f"device {device_name}, torch {torch.__version__}, impls {impls}, settings {settings}", flush=True)

    acc_rows, results = [], []
    meta = dict(run_meta(), benchmark="infonce-gpu", device=device_name, triton=_version("triton"),
                inf_cl=_version("inf_cl"), sentence_transformers=_version("sentence_transformers"),
                cuda=torch.version.cuda, quick=args.quick, autotune=args.autotune)
    try:
        _grid(args, torch, dev, cuda, device_name, impls, settings, sizes, dims, start, acc_rows, results, meta)
    except KeyboardInterrupt:  # `timeout --signal=INT` of the suite: keep every row measured so far
        print("\ninterrupted: the JSON holds the rows measured so far", flush=True)
        _write(args.json, meta, acc_rows, results, complete=False)
        return 130
    _write(args.json, meta, acc_rows, results, complete=True)  # also fills the ratios _table prints
    _table(results)
    print(f"\nwrote {args.json}")
    bad = problems(acc_rows, results)
    for line in bad:
        print(f"PROBLEM: {line}", flush=True)
    return 1 if bad else 0


def problems(acc_rows, results):
    """What makes this run a failure: one of our paths failed, ran out of memory, is inaccurate against float64,
    or its loss differs from the naive loss of the same case (fast and wrong must not read as fast)."""
    out, inaccurate = [], set()  # (impl, dtype) whose float64 check failed: every such row is marked
    for r in acc_rows:
        if r["impl"] not in OURS:
            continue
        if "skipped" in r:
            out.append(f"accuracy {r['setting']} {r['impl']}: {r['skipped']}")
            inaccurate.add((r["impl"], SETTINGS[r["setting"]][0]))
        elif not (r["loss_err"] <= MAX_ERR["loss"] and r["dq_err"] <= MAX_ERR["grad"] and r["dp_err"] <= MAX_ERR["grad"]):
            out.append(f"accuracy {r['setting']} {r['impl']}: loss {r['loss_err']:.1e}, dq {r['dq_err']:.1e}, "
                       f"dp {r['dp_err']:.1e} (limits {MAX_ERR})")
            inaccurate.add((r["impl"], SETTINGS[r["setting"]][0]))
    naive = {_case(r): r.get("loss") for r in results if r["impl"] == "naive"}
    for r in results:
        r.pop("problem", None)
        if r["impl"] not in OURS:
            continue
        case = f"{r['impl']} B={r['B']} d={r['d']} {r['dtype']} {r['precision']}"
        skipped = r.get("skipped") or ""
        if skipped.startswith("failed") or skipped == "out of memory":
            out.append(f"{case}: {skipped}")
        ref = naive.get(_case(r))
        if r.get("loss") is not None and ref is not None and not abs(r["loss"] - ref) <= MAX_ERR["loss"] * max(1.0, abs(ref)):
            out.append(f"{case}: loss {r['loss']:.6g} vs naive {ref:.6g}")
            r["problem"] = "loss differs from naive"
        elif (r["impl"], r["dtype"]) in inaccurate and r.get("ms") is not None:
            r["problem"] = "failed the float64 accuracy check"  # _infonce_auto skips marked rows
    return out


def _grid(args, torch, dev, cuda, device_name, impls, settings, sizes, dims, start, acc_rows, results, meta):
    # B = N = 8192 on a GPU: the chunked paths' 64 MiB budget holds 2048 fp32 rows there, so the check spans
    # several chunks (at 512 the whole problem was one chunk and chunk boundaries were never compared)
    for setting in settings if not args.no_accuracy else []:
        torch.backends.cuda.matmul.allow_tf32 = SETTINGS[setting][1]
        acc_rows += accuracy(impls, setting, dev, b=8192 if cuda else 64, d=384 if cuda else 32)
    _write(args.json, meta, acc_rows, results, complete=False)
    for r in acc_rows:
        if "skipped" in r:
            print(f"accuracy {r['setting']:>4} {r['impl']:>9}: skipped ({r['skipped']})")
        else:
            print(f"accuracy {r['setting']:>4} {r['impl']:>9}: loss {r['loss_err']:.1e}  dq {r['dq_err']:.1e}  dp {r['dp_err']:.1e}")

    for size in sizes:  # largest shapes last
        for d in dims:
            for setting in settings:
                dtype_name, tf32 = SETTINGS[setting]
                torch.backends.cuda.matmul.allow_tf32 = tf32
                dtype = getattr(torch, dtype_name)
                base = None  # one draw per (size, d, setting), shared by the impls as fresh leaves
                runs = [(impl, tf32) for impl in impls]
                if dtype_name != "float32" and "chunked" in impls:
                    runs.append(("chunked", True))
                for impl, tf32 in runs:
                    torch.backends.cuda.matmul.allow_tf32 = tf32
                    row = dict(device=device_name, device_key=_device_key(dev), dtype=dtype_name,
                               precision=_precision(dtype_name, impl, tf32),
                               B=size, N=size, d=d, K=args.k, impl=impl, ms=None, peak_mib=None)
                    if time.time() - start > args.budget_s:
                        results.append({**row, "skipped": "time budget spent"})
                        continue
                    q = p = step = None
                    try:
                        if base is None:
                            base = _inputs(size, size, d, args.k, dtype, dev)
                        q, p = (t.detach().requires_grad_() for t in base[:2])
                        idx, util = base[2:]
                        if impl == "triton" and cuda:
                            from uae_fast.ops._infonce_gemm_triton import KERNEL_INFO

                            KERNEL_INFO.clear()  # the spill counts reported are this case's kernels
                        step = make_step(impl, q, p, idx, util)
                        if isinstance(step, str):
                            results.append({**row, "skipped": step})
                            continue
                        loss = float(step().detach())  # warm-up: compilation, cuBLAS handles, autotuning
                        row["ms"] = time_ms(step, dev)
                        row["peak_mib"] = peak_mib(step, dev, q, p)
                        row["loss"] = loss
                        row["tflops"] = 6 * size * size * d / (row["ms"] * 1e-3) / 1e12
                        if impl == "triton" and cuda:
                            from uae_fast.ops._infonce_gemm_triton import KERNEL_INFO

                            info = KERNEL_INFO.get("write") or KERNEL_INFO.get("lse") or {}
                            row.update(n_regs=info.get("n_regs"), n_spills=info.get("n_spills"), config=info.get("config"),
                                       fp32_out_gemm=KERNEL_INFO.get("fp32_out_gemm"))
                    except torch.cuda.OutOfMemoryError:
                        row["skipped"] = "out of memory"
                    except Exception as e:  # one broken method must not stop the grid
                        row["skipped"] = f"failed: {type(e).__name__}: {_first_line(e)}"
                    finally:
                        del q, p, step
                        if cuda:
                            torch.cuda.empty_cache()
                    results.append(row)
                    _write(args.json, meta, acc_rows, results, complete=False)  # a killed run keeps its rows
                    what = row.get("skipped") or (
                        f"{row['ms']:.3f} ms, {row['tflops']:.0f} TFLOP/s, peak extra "
                        + (f"{row['peak_mib']:.0f} MiB" if row["peak_mib"] is not None else "n/a")
                        + (f", regs {row.get('n_regs')} spills {row.get('n_spills')}" if impl == "triton" and cuda else "")
                    )
                    tag = setting + ("+tf32" if dtype_name != "float32" and row["precision"] == "tf32" else "")
                    print(f"[{tag} B=N={size} d={d} {impl}] {what}", flush=True)
                del base
                if cuda:
                    torch.cuda.empty_cache()


def _precision(dtype_name, impl, tf32):
    """The TF32 switch where it changes the method's arithmetic: every fp32 method, and the chunked path on
    16-bit inputs (it upcasts them to fp32); "-" for the others on 16-bit inputs."""
    if dtype_name == "float32" or impl == "chunked":
        return "tf32" if tf32 else "ieee"
    return "-"


def _case(r):
    """The (shape, dtype, fp32 precision) a row is compared within: on 16-bit inputs every precision of the
    chunked path is compared with the one naive row."""
    return r["B"], r["d"], r["dtype"], r["precision"] if r["dtype"] == "float32" else "-"


def _relative(results):
    """speedup_vs_naive and memory_vs_naive against naive at the same shape and setting."""
    for r in results:
        nv = next((x for x in results if x["impl"] == "naive" and x["ms"] and _case(x) == _case(r)), None)
        r["speedup_vs_naive"] = nv["ms"] / r["ms"] if nv and r["ms"] else None
        r["memory_vs_naive"] = (r["peak_mib"] / nv["peak_mib"]) if nv and r["peak_mib"] and nv["peak_mib"] else None


def _finite(o):
    """NaN/inf as null: json.dump would write them as invalid JSON (its default= hook never sees floats)."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o


def _write(path, meta, acc_rows, results, *, complete):
    """The whole JSON again, atomically (tmp + rename), so a timeout or crash leaves the last complete file."""
    _relative(results)
    found = problems(acc_rows, results)  # marks the rows: a fast but wrong row never reaches the auto table
    out = _finite(dict(meta, complete=complete, accuracy=acc_rows, results=results, problems=found))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(out, f, indent=1, default=str)
    os.replace(path + ".tmp", path)


def _table(results):
    print("\n| setting | B = N | d | impl | ms | TFLOP/s | peak extra MiB | speed vs naive | memory vs naive |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|")
    for r in results:
        st = ("bf16" + ("+tf32" if r["precision"] == "tf32" else "")) if r["dtype"] == "bfloat16" else r["precision"]
        if r["ms"] is None:
            print(f"| {st} | {r['B']} | {r['d']} | {r['impl']} | {r.get('skipped', '')} | | | | |")
            continue
        sp = f"{r['speedup_vs_naive']:.2f}x" if r["speedup_vs_naive"] else "-"
        mm = f"{100 * r['memory_vs_naive']:.1f}%" if r["memory_vs_naive"] else "-"
        pk = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "-"
        print(f"| {st} | {r['B']} | {r['d']} | {r['impl']} | {r['ms']:.3f} | {r['tflops']:.0f} | {pk} | {sp} | {mm} |")


if __name__ == "__main__":
    sys.exit(main())
