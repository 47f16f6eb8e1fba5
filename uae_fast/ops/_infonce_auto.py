"""What ``utility_infonce(impl="auto")`` runs: a table keyed on (device, dtype, precision), filled from GPU
benchmarks (``benchmarks/results/infonce-gpu.json``).

Keys: device = ``"cpu"`` or ``"sm<major><minor>"`` (CUDA compute capability, e.g. ``"sm90"`` for H100/H200);
dtype = ``"bfloat16"``, ``"float16"``, ``"float32"``, ``"float64"``; precision = ``"tf32"`` or ``"ieee"``
(torch.backends.cuda.matmul.allow_tf32) on CUDA, for 16-bit inputs too: the chunked path upcasts them to fp32,
so its speed follows the switch; ``"-"`` elsewhere. A key that is not in the table runs the
chunked torch path: the one path measured to be within 1.4x of the naive loss's time on a GPU so far.

To update after a GPU run: ``python -m uae_fast.ops._infonce_auto benchmarks/results/infonce-gpu*.json``
prints the rows the measurements support (the faster of "torch" and "triton" at B = N = 16384, d = 768,
forward + backward); paste them into ``AUTO_TABLE``.
"""
from __future__ import annotations

import json
import sys

import torch

# (device, dtype, precision) -> impl. Measured rows say where their numbers are (BENCHMARKS.md).
AUTO_TABLE = {
    # H200, 2026-11-26: chunked 1.13x naive's time (medians), the old Triton kernels 30.6x (B=N=16384, d=768).
    ("sm90", "float32", "ieee"): "torch",
    # Not measured yet (issue 17): the GEMM-shaped Triton path waits for a GPU run; until then the chunked path.
    ("sm90", "float32", "tf32"): "torch",
    ("sm90", "bfloat16", "ieee"): "torch",
    ("sm90", "bfloat16", "tf32"): "torch",
    ("sm90", "float16", "ieee"): "torch",
    ("sm90", "float16", "tf32"): "torch",
}
_DEFAULT = "torch"
# The benchmark row the table is chosen at (the target shape).
_AT = dict(b=16384, d=768)


def tf32_matmul() -> bool:
    """Whether fp32 CUDA matmuls run in TF32: torch's new switch (``matmul.fp32_precision``) when set, else the
    legacy ``allow_tf32`` (reading it after the new API was used raises in torch >= 2.9)."""
    m = torch.backends.cuda.matmul
    new = getattr(m, "fp32_precision", None)
    if new in ("tf32", "ieee"):
        return new == "tf32"
    try:
        return bool(m.allow_tf32)
    except RuntimeError:  # the legacy flag refuses to be read after mixed use: then IEEE, the safe reading
        return False


def key(device: torch.device, dtype: torch.dtype) -> tuple:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        dev = f"sm{major}{minor}"
    else:
        dev = device.type
    name = str(dtype).replace("torch.", "")
    if dtype == torch.float32 or (device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)):
        prec = "tf32" if tf32_matmul() else "ieee"
    else:
        prec = "-"
    return dev, name, prec


def auto_impl(device: torch.device, dtype: torch.dtype) -> str:
    if device.type != "cuda" or dtype == torch.float64:
        return "torch"  # the Triton path is GPU-only and takes no float64
    choice = AUTO_TABLE.get(key(device, dtype), _DEFAULT)
    if choice == "triton":
        from .._checks import triton_usable
        from .infonce import _HAS_TRITON

        if not (_HAS_TRITON and triton_usable()):  # a table naming triton on a machine without a usable one
            return "torch"
    return choice


def table_from_results(results: list) -> dict:
    """{(device, dtype, precision): fastest of "torch"/"triton"} at the table's shape, from benchmark rows
    (fields: device_key, dtype, precision, B, d, impl, ms; rows without ms are skipped/failed)."""
    best: dict = {}
    for r in results:
        if r.get("ms") is None or r.get("B") != _AT["b"] or r.get("d") != _AT["d"] or r.get("problem"):
            continue
        impl = {"chunked": "torch", "triton": "triton"}.get(r.get("impl"))
        if impl is None:
            continue
        # a 16-bit triton row ("-": the switch does not change it) stands for both precisions; a chunked row
        # marked "-" (files from before 16-bit rows were keyed by the switch: timed with TF32 on) only for tf32
        if r["precision"] == "-":
            precs = ("ieee", "tf32") if impl == "triton" else ("tf32",)
        else:
            precs = (r["precision"],)
        for prec in precs:
            k = (r["device_key"], r["dtype"], prec)
            if k not in best or r["ms"] < best[k][1]:
                best[k] = (impl, r["ms"])
    return {k: v[0] for k, v in sorted(best.items())}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print("usage: python -m uae_fast.ops._infonce_auto RESULTS.json [RESULTS.json ...]", file=sys.stderr)
        return 2
    rows = []
    for path in argv:  # the grid and the tuned run: pooled, so the table has every key either one reached
        try:
            with open(path) as f:
                data = json.load(f)
            results = data["results"] if isinstance(data, dict) else data
        except (OSError, ValueError, KeyError) as e:  # e.g. an unexpanded glob before a GPU run wrote the files
            print(f"_infonce_auto: error: {path}: not a bench_infonce_gpu.py results file ({e})", file=sys.stderr)
            return 1
        if isinstance(data, dict) and data.get("autotune"):
            # impl="auto" runs the default Triton config; an autotuned time would flatter it
            print(f"# {path}: autotuned triton rows left out", file=sys.stderr)
            results = [r for r in results if r.get("impl") != "triton"]
        rows += results
    for k, v in table_from_results(rows).items():
        print(f"    {k!r}: {v!r},")
    return 0


if __name__ == "__main__":
    sys.exit(main())
