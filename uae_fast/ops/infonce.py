"""Utility-modulated InfoNCE (UAE's training loss) without the [B, N] similarity matrix.

For queries ``q`` [B, d], passages ``p`` [N, d] and, per query, target passages ``target_idx`` [B, K]
with teacher utilities ``target_utility`` [B, K]::

    w_i    = softmax_k(u_ik / teacher_temperature)             over the valid (>= 0) targets
    w_i    = (1 - label_mix) * w_i + label_mix * onehot(gold_i)  (optional)
    s_ij   = q_i . p_j / temperature
    loss_i = sum_k w_ik * (logsumexp_j s_ij - s_{i, t_ik})

i.e. the cross-entropy of the student's softmax over all N passages against the teacher distribution.
With one-hot targets it is InfoNCE / sentence-transformers' MultipleNegativesRankingLoss (scale = 1/temperature).

Because ``sum_k w_ik = 1`` the loss splits into a dense part, ``logsumexp_j s_ij``, and a sparse part,
``sum_k w_ik s_{i, t_ik}`` (B*K dot products). Only the dense part needs the B x N sweep:

* torch path (CPU implementation and reference): walks the queries in row chunks sized to a fixed memory
  budget. When the reduction is "mean"/"sum" every row's upstream gradient is the same scalar, so the
  gradients are computed *in the forward sweep* (as Liger's fused linear cross-entropy does) and only scaled
  in backward: 3 B*N*d matmul FLOPs in total, the same as the materialised loss, with O(chunk) extra memory.
  reduction="none" recomputes the chunks in backward.
* Triton path (``impl="triton"``: CUDA, or CPU tensors under ``TRITON_INTERPRET=1``; ``_infonce_gemm_triton.py``):
  a GEMM-shaped score-tile kernel reduces the tiles in its epilogue (LSE) or writes ``exp(s - M_i)`` for a
  chunk of query rows into a fixed workspace, and cuBLAS turns the chunk into dQ and dP (deterministic, no
  atomics; 3 B*N*d GEMMs for mean/sum, like the torch path). Not yet measured on a GPU, so not the default.
* ``impl="auto"`` follows the (device, dtype, precision) table in ``_infonce_auto.py``.

All math is fp32 (fp64 for fp64 inputs) whatever the embedding dtype; the loss is returned in that dtype and
the gradients in the embeddings' dtype.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import numbers
from typing import Optional

import torch

from .._checks import FLOAT_DTYPES, INDEX_DTYPES, check_finite, check_result, check_scalar, check_tensor, resolve_impl

try:  # Triton is a hard dependency on CUDA machines, optional for the torch path.
    import triton  # noqa: F401

    _HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only without triton
    _HAS_TRITON = False

# Bytes of fp32 similarities the torch path holds at once. 64 MiB is ~6% of the naive [B, N] matrix at
# B = N = 16384 (the naive path holds 3-4 such matrices) and keeps each chunk's matmuls large enough for BLAS.
_TORCH_CHUNK_BYTES = 64 * 2**20
# Rows of [rows, K, d] gathered passages the sparse (target) terms hold at once.
_SPARSE_CHUNK_BYTES = 32 * 2**20
_REDUCTIONS = ("mean", "sum", "none")
# Set by the trainer under torchrun: an overflow is returned as inf (loss, gradients), not raised, so that a rank
# whose loss or backward overflows still reaches the collectives the others wait in; the trainer then stops
# every rank at once. Read in forward and kept on the autograd context (backward may run on another thread).
_PASSTHROUGH = contextvars.ContextVar("uae_infonce_nonfinite_passthrough", default=False)


@contextlib.contextmanager
def nonfinite_passthrough():
    """Within the block, :func:`utility_infonce` returns an overflowing loss or gradient as inf instead of
    raising (for callers that check finiteness themselves, as ``uae train`` does on every rank)."""
    token = _PASSTHROUGH.set(True)
    try:
        yield
    finally:
        _PASSTHROUGH.reset(token)
_EMB_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------------
# validation and teacher distribution
# --------------------------------------------------------------------------------------------------
def _validate(q, p, target_idx, target_utility, temperature, teacher_temperature, label_mix, gold_idx, reduction):
    check_tensor("q", q, ndim=2, dtypes=_EMB_DTYPES)
    dev = q.device
    check_tensor("p", p, ndim=2, dtypes=_EMB_DTYPES, device=dev)
    if p.dtype != q.dtype:
        raise TypeError(f"p has dtype {p.dtype} but q has {q.dtype}; pass both embeddings in one dtype")
    if p.shape[1] != q.shape[1]:
        raise ValueError(f"q is [B, d] with d={q.shape[1]} but p is [N, d] with d={p.shape[1]}")
    b, n = q.shape[0], p.shape[0]
    if b == 0 or n == 0 or q.shape[1] == 0:
        raise ValueError(f"empty input: q is {tuple(q.shape)}, p is {tuple(p.shape)}; need B, N, d >= 1")
    check_tensor("target_idx", target_idx, ndim=2, dtypes=INDEX_DTYPES, device=dev)
    check_tensor("target_utility", target_utility, ndim=2, dtypes=FLOAT_DTYPES, device=dev)
    if target_idx.shape[0] != b or target_idx.shape[1] == 0:
        raise ValueError(f"target_idx must be [B, K] with B={b} (rows of q) and K >= 1, got {tuple(target_idx.shape)}")
    if target_utility.shape != target_idx.shape:
        raise ValueError(
            f"target_utility must have the shape of target_idx {tuple(target_idx.shape)}, got {tuple(target_utility.shape)}"
        )
    if target_utility.requires_grad:
        raise ValueError("target_utility requires grad, but teacher utilities are targets, not parameters; pass target_utility.detach()")
    for name, val in (("temperature", temperature), ("teacher_temperature", teacher_temperature)):
        check_scalar(name, val, dtype=_acc_dtype(q.dtype))
    if isinstance(label_mix, bool) or not isinstance(label_mix, numbers.Real) or not (0.0 <= label_mix <= 1.0):
        raise ValueError(f"label_mix must be a number in [0, 1], got {label_mix!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")

    t = target_idx.long()  # narrow dtypes would wrap -1 and N in the comparisons (uint8 < -1 is always True)
    valid = t >= 0
    bad = (t < -1) | (t >= n)
    if bool(bad.any()):
        r, k = (int(x) for x in bad.nonzero()[0])
        raise ValueError(
            f"target_idx[{r}, {k}] = {int(t[r, k])} is out of range: indices must be in [0, N={n}) or -1 for padding"
        )
    empty = ~valid.any(dim=1)
    if bool(empty.any()):
        r = int(empty.nonzero()[0, 0])
        raise ValueError(f"target_idx row {r} is all padding (-1): every query needs at least one valid target")
    # Checked in the compute dtype: float64 utilities beyond float32's range would become inf there.
    acc = _acc_dtype(q.dtype)
    finite = torch.isfinite(target_utility.to(acc)) | ~valid  # padded utilities are ignored, may hold anything
    if not bool(finite.all()):
        r, k = (int(x) for x in (~finite).nonzero()[0])
        raise ValueError(
            f"target_utility[{r}, {k}] = {float(target_utility[r, k])} is not finite in {str(acc)[6:]} (at a valid target)"
        )
    if gold_idx is not None:
        check_tensor("gold_idx", gold_idx, ndim=1, dtypes=INDEX_DTYPES, device=dev)
        if gold_idx.shape[0] != b:
            raise ValueError(f"gold_idx must be [B] with B={b}, got {tuple(gold_idx.shape)}")
        g = gold_idx.long()
        bad = (g < -1) | (g >= n)
        if bool(bad.any()):
            r = int(bad.nonzero()[0, 0])
            raise ValueError(f"gold_idx[{r}] = {int(g[r])} is out of range: must be in [0, N={n}) or -1 (no gold)")
    elif label_mix > 0:
        raise ValueError(f"label_mix={label_mix} > 0 mixes in the gold passage, so gold_idx ([B] indices into p) is required")
    check_finite("q", q)
    check_finite("p", p)


def _teacher_weights(target_idx, target_utility, teacher_temperature, label_mix, gold_idx, acc):
    """(idx [B, K'] long, w [B, K'] acc) with padding mapped to (0, 0.0) and rows summing to 1."""
    valid = target_idx >= 0
    u = target_utility.detach().to(acc).masked_fill(~valid, -math.inf)
    # Subtract the row max *before* dividing by the temperature: a tiny teacher_temperature then sends the
    # other utilities to -inf (weight 0) instead of overflowing everything to inf/inf = NaN.
    u = (u - u.amax(dim=1, keepdim=True)) / teacher_temperature
    w = torch.softmax(u, dim=1).masked_fill(~valid, 0.0)
    idx = target_idx.long().clamp_min(0)
    if label_mix > 0:
        has_gold = gold_idx >= 0  # rows without a gold passage keep the pure teacher distribution
        alpha = has_gold.to(acc) * label_mix  # in acc: a float32 where() would round float64's label_mix
        w = torch.cat([w * (1.0 - alpha)[:, None], alpha[:, None]], dim=1)
        idx = torch.cat([idx, gold_idx.long().clamp_min(0)[:, None]], dim=1)
    return idx.contiguous(), w.contiguous()


def _reduce(loss, reduction):
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def _row_grad(grad_out, reduction, b, acc):
    """Upstream gradient per row: a scalar for mean/sum, a vector for none."""
    g = grad_out.to(acc)
    if reduction == "mean":
        return g / b
    return g


# --------------------------------------------------------------------------------------------------
# sparse (target) terms, shared by both paths
# --------------------------------------------------------------------------------------------------
def _sparse_rows(n_rows, k, d, elsize):
    return max(1, _SPARSE_CHUNK_BYTES // max(1, k * d * elsize))


def _no_autocast(fn):
    """Run ``fn`` in its tensors' own precision (``w``'s), not an enclosing bf16 autocast's: its bmm calls are
    out of place, which autocast would lower."""
    @functools.wraps(fn)
    def run(q, *args):
        with torch.autocast(q.device.type, enabled=False):
            return fn(q, *args)

    return run


@_no_autocast
def _target_scores(q, p, idx, w, inv_tau):
    """sum_k w_ik * s_{i, t_ik}, [B], from B*K gathered dot products (chunked: never [B, K, d] at once)."""
    acc = w.dtype
    b, k = idx.shape
    out = torch.empty(b, dtype=acc, device=q.device)
    step = _sparse_rows(b, k, q.shape[1], torch.finfo(acc).bits // 8)  # fp64 chunks are twice as wide
    for s in range(0, b, step):
        e = min(b, s + step)
        pt = p[idx[s:e]].to(acc)  # [c, K, d]
        sc = torch.bmm(pt, q[s:e].to(acc)[:, :, None]).squeeze(2)  # [c, K]
        out[s:e] = (sc * w[s:e]).sum(1) * inv_tau
    return out


@_no_autocast
def _sparse_grads(q, p, idx, w, coef, dq, dp):
    """Subtract the target terms: dq_i -= coef_i sum_k w_ik p_{t_ik};  dp_{t_ik} -= coef_i w_ik q_i."""
    acc = w.dtype
    b, k = idx.shape
    step = _sparse_rows(b, k, q.shape[1], torch.finfo(acc).bits // 8)  # fp64 chunks are twice as wide
    for s in range(0, b, step):
        e = min(b, s + step)
        cw = w[s:e] * coef[s:e, None]  # [c, K]
        if dq is not None:
            dq[s:e] -= torch.bmm(cw[:, None, :], p[idx[s:e]].to(acc)).squeeze(1)
        if dp is not None:
            contrib = cw[:, :, None] * q[s:e].to(acc)[:, None, :]  # [c, K, d]
            dp.index_put_((idx[s:e].reshape(-1),), -contrib.reshape(-1, q.shape[1]), accumulate=True)


# --------------------------------------------------------------------------------------------------
# torch path
# --------------------------------------------------------------------------------------------------
def _torch_sweep(q, p, idx, w, inv_tau, row_grad, need_dq, need_dp, ex=None):
    """One pass over query chunks: per-row LSE and target score; optionally dq/dp.

    ``row_grad`` None means every row's upstream gradient is 1 (the caller scales later). ``ex`` [B, E]
    (-1 padded): passages set to -inf in that row's scores, i.e. out of its softmax (and gradient).
    """
    acc = w.dtype
    qa, pa = q.to(acc), p.to(acc)
    b, n = qa.shape[0], pa.shape[0]
    lse = torch.empty(b, dtype=acc, device=q.device)
    tgt = torch.empty(b, dtype=acc, device=q.device)
    dq = torch.empty_like(qa) if need_dq else None
    dp = torch.zeros_like(pa) if need_dp else None
    step = max(1, _TORCH_CHUNK_BYTES // (n * qa.element_size()))
    pt = pa.t()
    # The only [chunk, N] buffer, allocated once: a fresh one per chunk would briefly hold two (and page-fault).
    buf = torch.empty(min(step, b), n, dtype=acc, device=q.device)
    for s in range(0, b, step):
        e = min(b, s + step)
        ii, ww = idx[s:e], w[s:e]
        sim = torch.mm(qa[s:e], pt, out=buf[: e - s]).mul_(inv_tau)
        tgt[s:e] = (sim.gather(1, ii) * ww).sum(1)
        if ex is not None:  # masked in the chunk itself: exact even when the excluded passages hold ~all the mass
            # (after the target gather: padded targets point at passage 0 with weight 0, and 0 * -inf is NaN)
            r, c = (ex[s:e] >= 0).nonzero(as_tuple=True)
            sim[r, ex[s:e][r, c]] = -math.inf
        m = sim.amax(dim=1, keepdim=True)
        l = sim.sub_(m).exp_().sum(dim=1, keepdim=True)
        lse[s:e] = (m + l.log()).squeeze(1)
        if not (need_dq or need_dp):
            continue
        # sim now holds exp(s - m); turn it into dloss_i/ds_ij * tau = g_i * (softmax_ij - y_ij).
        coef = torch.full((e - s, 1), inv_tau, dtype=acc, device=q.device) if row_grad is None else row_grad[s:e, None] * inv_tau
        sim.mul_(coef / l)
        # index_put_ on the flat chunk, not scatter_add_: a passage repeated among a row's targets adds twice,
        # and CUDA's scatter_add_ orders those adds by atomics (not bit-reproducible); index_put_ sorts them.
        flat = (torch.arange(e - s, device=q.device)[:, None] * n + ii).reshape(-1)
        sim.view(-1).index_put_((flat,), (-(ww * coef)).reshape(-1), accumulate=True)
        if need_dq:
            torch.mm(sim, pa, out=dq[s:e])
        if need_dp:
            dp.addmm_(sim.t(), qa[s:e])
    return lse, tgt, dq, dp


def _scaled_unit_grads(ctx, grad_out):
    """Backward of a forward that computed the summed loss's gradients (``ctx.unit_grads``): scale them by
    the scalar upstream gradient, out of place, so a second backward (retain_graph=True, gradcheck) still
    sees the unit gradients. Returned in the inputs' dtypes."""
    inv_tau, reduction, q_dtype, p_dtype, b = ctx.meta
    dq, dp = ctx.unit_grads
    if not ctx.passthrough:
        _check_grads(dq, dp)
    g = _row_grad(grad_out, reduction, b, (dq if dq is not None else dp).dtype)
    return (None if dq is None else (dq * g).to(q_dtype)), (None if dp is None else (dp * g).to(p_dtype))


class _TorchInfoNCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, p, idx, w, inv_tau, reduction, ex=None):
        need_dq, need_dp = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.meta = (inv_tau, reduction, q.dtype, p.dtype, q.shape[0])
        ctx.passthrough = _PASSTHROUGH.get()
        if reduction != "none" and (need_dq or need_dp):
            # Every row gets the same upstream gradient: compute the gradients now, scale them in backward.
            lse, tgt, dq, dp = _torch_sweep(q, p, idx, w, inv_tau, None, need_dq, need_dp, ex)
            ctx.unit_grads = (dq, dp)  # gradients of the summed loss; backward only scales them
            ctx.precomputed = True
        else:
            lse, tgt, _, _ = _torch_sweep(q, p, idx, w, inv_tau, None, False, False, ex)
            ctx.save_for_backward(q, p, idx, w)
            ctx.ex = ex
            ctx.precomputed = False
        return _reduce(lse - tgt, reduction)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        inv_tau, reduction, q_dtype, p_dtype, b = ctx.meta
        if ctx.precomputed:
            dq, dp = _scaled_unit_grads(ctx, grad_out)
        else:
            q, p, idx, w = ctx.saved_tensors
            g = _row_grad(grad_out, reduction, b, w.dtype)
            _, _, dq, dp = _torch_sweep(q, p, idx, w, inv_tau, g, ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.ex)
            if not ctx.passthrough and bool(torch.isfinite(grad_out).all()):
                _check_grads(dq, dp)
            dq = None if dq is None else dq.to(q_dtype)
            dp = None if dp is None else dp.to(p_dtype)
        return dq, dp, None, None, None, None, None


# --------------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------------
def utility_infonce(
    q: torch.Tensor,
    p: torch.Tensor,
    target_idx: torch.Tensor,
    target_utility: torch.Tensor,
    *,
    temperature: float = 0.05,
    teacher_temperature: float = 1.0,
    label_mix: float = 0.0,
    gold_idx: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    impl: str = "auto",
    exclude_idx: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Utility-modulated InfoNCE: cross-entropy of the student's softmax over all passages against the
    teacher's utility distribution over each query's targets. Never materialises the [B, N] scores.

    Args:
        q: [B, d] query embeddings (fp32/bf16/fp16; fp64 on the torch path). Used as given: normalise in the model.
        p: [N, d] passage embeddings, same dtype and device: every candidate in the batch plus any extra negatives.
        target_idx: [B, K] integer indices into ``p`` of each query's target passages; -1 = padding.
            Every row needs at least one valid target. Repeated indices add their weights.
        target_utility: [B, K] teacher utilities (e.g. mean log-prob delta); ignored at padding. No gradient.
        temperature: student temperature, ``s_ij = q_i . p_j / temperature`` (``scale = 1 / temperature``).
        teacher_temperature: teacher distribution ``softmax(u / teacher_temperature)`` over the valid targets.
        label_mix: ``alpha`` in ``(1 - alpha) * teacher + alpha * onehot(gold)``.
        gold_idx: [B] index into ``p`` of each query's gold passage (-1: no gold, that row keeps the pure teacher
            distribution). Required when ``label_mix > 0``. It may or may not also appear in ``target_idx``.
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` ([B] per-query losses).
        impl: ``"auto"`` (the table in ``ops/_infonce_auto.py``, keyed on device, dtype and TF32: the chunked
            torch path until the Triton path is measured faster on a GPU), ``"triton"`` or ``"torch"``.
        exclude_idx: optional [B, E] indices into ``p`` removed from row ``i``'s softmax denominator (-1 =
            padding): passages known not to be negatives of that query (e.g. false negatives the teacher rates
            as useful as the gold). They must not be targets of that row. Masked to -inf inside each chunk of
            the torch path and inside each score tile of the Triton kernel (exact).

    Returns:
        The loss, float32 (float64 for float64 inputs). Differentiable in ``q`` and ``p`` (first order).

    Backward: torch path computes the gradients in the forward sweep for mean/sum when ``q`` or ``p`` requires
    grad (so a loss evaluated with grad enabled but never backpropagated still pays for them; use
    ``torch.no_grad()`` for evaluation), and recomputes for "none";
    the Triton path does the same (fp16: one extra LSE pass) and, for "none", recomputes the chunks in
    backward from the saved per-row LSE (deterministic, no atomics).
    With one-hot targets (one valid target per row, or ``label_mix=1``) this equals
    sentence-transformers' ``MultipleNegativesRankingLoss`` with ``scale = 1 / temperature`` and
    ``similarity_fct = dot_score``.

    Example::

        q = torch.nn.functional.normalize(torch.randn(8, 384), dim=-1).requires_grad_()
        p = torch.nn.functional.normalize(torch.randn(32, 384), dim=-1).requires_grad_()
        idx = torch.randint(0, 32, (8, 4))   # 4 candidates per query
        util = torch.randn(8, 4)              # teacher utilities
        loss = utility_infonce(q, p, idx, util, temperature=0.05)
        loss.backward()
    """
    _validate(q, p, target_idx, target_utility, temperature, teacher_temperature, label_mix, gold_idx, reduction)
    temperature, teacher_temperature, label_mix = float(temperature), float(teacher_temperature), float(label_mix)
    impl = _auto_impl(q.device, q.dtype) if impl == "auto" else resolve_impl(impl, q.device)
    if impl == "triton" and (q.dtype == torch.float64 or not _HAS_TRITON):
        if q.dtype == torch.float64:
            raise TypeError("q has dtype float64, which impl='triton' does not take; use impl='torch' or fp32/bf16/fp16")
        else:  # pragma: no cover
            raise ValueError("impl='triton' needs the triton package; use impl='torch'")
    if not torch.is_grad_enabled():  # no graph will be built (no_grad / inference_mode): skip the gradient sweep,
        q, p = q.detach(), p.detach()  # which needs_input_grad alone would still run for inputs requiring grad
    acc = _acc_dtype(q.dtype)
    idx, w = _teacher_weights(target_idx, target_utility, teacher_temperature, label_mix, gold_idx, acc)
    ex = None if exclude_idx is None else _check_exclude(exclude_idx, idx, w, q.device, p.shape[0])
    if impl == "triton":
        from ._infonce_gemm_triton import utility_infonce_triton

        return _checked(utility_infonce_triton(q, p, idx, w, 1.0 / temperature, reduction, ex), q, p)
    return _checked(_TorchInfoNCE.apply(q, p, idx, w, 1.0 / temperature, reduction, ex), q, p)


def _auto_impl(device, dtype):
    from ._infonce_auto import auto_impl

    return auto_impl(device, dtype)


def _overflow(what, dtype):
    return (f"utility_infonce: the {what} overflowed (q . p / temperature too large for {str(dtype)[6:]}): "
            f"check the scale of q and p and the temperature")


def _checked(loss, q, p):
    """The same contract as token_logprobs: a clear error, never a NaN/inf loss (finite inputs whose scores
    overflow fp32, e.g. embeddings ~1e20). Checked on the returned loss: one non-finite row makes it non-finite.
    Not within :func:`nonfinite_passthrough`."""
    if _PASSTHROUGH.get():
        return loss
    check_result(loss.detach(), _overflow("loss", _acc_dtype(q.dtype)), q=q, p=p)
    return loss


def _check_grads(*grads):
    """Gradients carry a 1/temperature factor and can overflow while the loss is finite: same error. Checked in
    the accumulation dtype, before the cast to the inputs' dtype: an fp16 gradient that overflows only in that
    cast (a GradScaler's large scale) comes back inf, as autograd's own ops give it, so the scaler skips the step."""
    for t in grads:
        if t is not None:
            check_result(t, _overflow("gradient", t.dtype))


def _check_exclude(exclude_idx, idx, w, dev, n):
    check_tensor("exclude_idx", exclude_idx, ndim=2, dtypes=INDEX_DTYPES, device=dev)
    if exclude_idx.shape[0] != idx.shape[0]:
        raise ValueError(f"exclude_idx must be [B, E] with B={idx.shape[0]}, got {tuple(exclude_idx.shape)}")
    ex = exclude_idx.long()
    bad = (ex < -1) | (ex >= n)
    if bool(bad.any()):
        r, k = (int(x) for x in bad.nonzero()[0])
        raise ValueError(f"exclude_idx[{r}, {k}] = {int(ex[r, k])} is out of range: must be in [0, N={n}) or -1")
    clash = (ex[:, :, None] == idx[:, None, :]) & (w[:, None, :] > 0) & (ex >= 0)[:, :, None]
    if bool(clash.any()):
        r, k, _ = (int(x) for x in clash.nonzero()[0])
        raise ValueError(f"exclude_idx[{r}, {k}] = {int(ex[r, k])} is a target of row {r}: a target cannot leave the softmax")
    return ex

