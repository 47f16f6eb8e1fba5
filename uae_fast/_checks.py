"""Input validation shared by every public op.

Errors name the offending argument, so a user sees *which* tensor is wrong
instead of a shape error deep inside a kernel (or, worse, a silent wrong number).
"""
from __future__ import annotations

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
    """Type, rank, dtype and device checks with messages that name ``name``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
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
    return t


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


def resolve_impl(impl: str, device: torch.device) -> str:
    """``auto`` = Triton on CUDA (if installed), torch elsewhere. ``triton`` on CPU runs only under TRITON_INTERPRET=1."""
    if impl not in ("auto", "torch", "triton"):
        raise ValueError(f"impl must be 'auto', 'torch' or 'triton', got {impl!r}")
    # triton is optional (PyTorch's CUDA wheels bring it): without it, auto is the torch path everywhere.
    import importlib.util

    has_triton = importlib.util.find_spec("triton") is not None
    if impl == "auto":
        return "triton" if device.type == "cuda" and has_triton else "torch"
    if impl == "triton" and not has_triton:
        raise ValueError("impl='triton' needs the triton package (pip install triton; PyTorch's CUDA wheels bring it)")
    if impl == "triton" and device.type != "cuda":
        import os

        if os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise ValueError(
                "impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 to run the kernel in Triton's CPU interpreter)"
            )
    return impl
