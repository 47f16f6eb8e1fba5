"""Input validation shared by every public op.

Errors name the offending argument, so a user sees *which* tensor is wrong
instead of a shape error deep inside a kernel (or, worse, a silent wrong number).
"""
from __future__ import annotations

import math
import numbers
from typing import Iterable, Optional

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int16, torch.int32, torch.int64, torch.uint8, torch.int8)


def check_tensor(
    name: str,
    t,
    *,
    ndim: Optional[int | Iterable[int]] = None,
    dtypes: Optional[Iterable[torch.dtype]] = None,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """Type, rank, dtype and device checks with messages that name ``name``.

    Meta tensors (shapes without data) and sparse/quantised layouts are rejected: no op can read them.
    Index tensors of any width are fine; compare them via ``.long()`` (a uint8/int16 tensor compared with
    a Python int wraps the int to its own dtype: ``uint8 < -1`` and ``int16 >= 49152`` are wrong).
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(f"{name} is a {str(t.layout).replace('torch.', '')} tensor; pass a dense tensor (.to_dense())")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            raise ValueError(f"{name} must have {' or '.join(map(str, allowed))} dims, got shape {tuple(t.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise TypeError(f"{name} has dtype {str(t.dtype).replace('torch.', '')}; expected one of {names}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the other inputs are on {device}; move all inputs to one device")
    if t.device.type == "meta":
        raise ValueError(f"{name} is a meta tensor (shape only, no data): pass real CPU or CUDA tensors")
    return t


def check_scalar(name: str, value, *, dtype: torch.dtype = torch.float32, allow_none: bool = False) -> None:
    """A temperature-like number: real, finite, > 0, and a normal number of ``dtype`` (the compute dtype)
    so that neither it nor ``1 / value`` over- or underflows there (1e-46 is 0 in float32, 1e39 is inf)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number{' or None' if allow_none else ''}, got {type(value).__name__}")
    fi = torch.finfo(dtype)
    try:
        value = float(value)
    except OverflowError:  # an int beyond float range, e.g. 10**400
        raise ValueError(f"{name} must be a finite number > 0{' or None' if allow_none else ''}, got an int of "
                         f"{len(str(abs(value)))} digits") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0{' or None' if allow_none else ''}, got {value}")
    if not fi.tiny <= value <= fi.max:
        raise ValueError(
            f"{name} must be in [{fi.tiny:.3g}, {fi.max:.3g}] (the op computes in {str(dtype)[6:]}, where "
            f"{name} and 1/{name} must stay finite and nonzero), got {value}"
        )


def check_result(result: torch.Tensor, message: str, **inputs: Optional[torch.Tensor]) -> None:
    """Output safety net of the ops: from finite inputs a non-finite result means fp overflow (huge inputs
    or scales). Names a non-finite input if there is one (check_finite), else raises ``message``;
    never returns a silent NaN/inf. O(result) plus one host sync."""
    if bool(torch.isfinite(result).all()):
        return
    for name, t in inputs.items():
        if t is not None:
            check_finite(name, t)
    raise ValueError(message)


def check_finite(name: str, t: torch.Tensor) -> None:
    """Reject NaN/inf early: one bad embedding or hidden state poisons every score it touches."""
    if not t.numel() or not t.is_floating_point():
        return
    # A finite sum proves every element finite (NaN or inf would propagate) without an N-sized mask;
    # only a non-finite sum (a real NaN/inf, or a rare overflow) pays for the exact elementwise check.
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    if bool(torch.isfinite(t.sum(dtype=acc))):
        return
    bad = (~torch.isfinite(t)).sum().item()
    if bad:
        raise ValueError(f"{name} contains {bad} NaN or inf value(s)")


def check_no_grad(op: str, **tensors: torch.Tensor) -> None:
    """For forward-only ops: fail loudly instead of returning a result autograd cannot follow."""
    if not torch.is_grad_enabled():
        return
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.requires_grad:
            raise RuntimeError(
                f"{op} is forward-only (teacher scoring needs no gradient), but {name} requires grad; "
                f"call it under torch.no_grad() or pass {name}.detach()"
            )


def resolve_device(device=None) -> torch.device:
    """``device`` as a torch.device (None = CUDA when available, else CPU).

    A device this machine cannot use (``cuda`` on a CPU-only build or without a GPU, an index past the
    last GPU, a malformed string, ``meta``) is a ValueError here, not an assertion deep inside torch.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ValueError(f"device {device!r} is not a valid torch device ({e})") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "meta":
        raise ValueError("device 'meta' holds no data; use cpu or cuda")
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ValueError(f"device {str(device)!r}: no CUDA GPU is available on this machine (use cpu)")
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"device {str(device)!r}: this machine has {n} CUDA device(s) (cuda:0..cuda:{n - 1})")
        return dev
    try:  # other backends (mps, xpu, ...): usable iff a tensor can live there
        torch.empty(0, device=dev)
    except (RuntimeError, AssertionError) as e:
        why = " ".join(str(e).split())[:120]  # torch's dispatcher message lists every backend
        raise ValueError(f"device {str(device)!r} is not available on this machine ({why})") from None
    return dev


_TRITON_USABLE: dict = {}


def triton_usable(flatten: bool = False) -> bool:
    """Whether triton is installed and new enough for a kernel: ``tl.dot(input_precision=)`` (every kernel,
    triton 3.x) and, with ``flatten``, ``tl.range(flatten=)`` (the LM-head kernel; not in triton 3.2, which
    torch 2.6 pins). An older triton leaves ``auto`` on the torch path."""
    if flatten not in _TRITON_USABLE:
        import importlib.util
        import inspect

        ok = importlib.util.find_spec("triton") is not None
        if ok:
            try:
                import triton.language as tl

                ok = "input_precision" in inspect.signature(tl.dot).parameters and (
                    not flatten or "flatten" in inspect.signature(tl.range).parameters)
            except Exception:  # a broken install: the torch path
                ok = False
        _TRITON_USABLE[flatten] = ok
    return _TRITON_USABLE[flatten]


def resolve_impl(impl: str, device: torch.device, *, flatten: bool = False) -> str:
    """``auto`` = Triton on CUDA (if installed), torch elsewhere. ``triton`` on CPU runs only under TRITON_INTERPRET=1."""
    if impl not in ("auto", "torch", "triton"):
        raise ValueError(f"impl must be 'auto', 'torch' or 'triton', got {impl!r}")
    # triton is optional (PyTorch's CUDA wheels bring it): without it, auto is the torch path everywhere.
    if impl == "auto":
        return "triton" if device.type == "cuda" and triton_usable(flatten) else "torch"
    if impl == "triton" and not triton_usable(flatten):
        need = "tl.dot(input_precision=)" + (" and tl.range(flatten=)" if flatten else "")
        raise ValueError(f"impl='triton' needs the triton package, a version with {need} (pip install -U triton; "
                         f"PyTorch's CUDA wheels bring it)")
    if impl == "triton" and device.type != "cuda":
        import os

        if os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise ValueError(
                "impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 to run the kernel in Triton's CPU interpreter)"
            )
    return impl
