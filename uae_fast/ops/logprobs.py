"""Per-token target log-probabilities through an LM head, without [tokens x vocab] logits.

``token_logprobs`` computes ``log softmax(h @ W.T + b)[target]`` for each row of ``hidden``.
Both paths walk the vocabulary in blocks and keep an online log-sum-exp per row (running max
``m`` and running ``sum exp(z - m)``), so only one [tokens x vocab-block] tile of logits exists
at a time:

* ``impl="torch"``: pure torch, the CPU implementation and the reference for the kernel.
  Outer loop over vocabulary blocks (the block of ``W`` stays in cache and, for bf16/fp16, is
  upcast once), inner loop over token chunks; on CPU the tokens are split across worker threads.
* ``impl="triton"``: ``_logprobs_triton.py``; tiles tokens x vocab, ``tl.dot`` with fp32
  accumulators, a split over the vocabulary when there are too few token blocks to fill the GPU,
  and a small second kernel that merges the splits.

Forward-only: teacher scoring needs no gradient, so both functions raise if a grad is asked for.
"""
from __future__ import annotations

import math
import numbers
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import torch

from .._checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_finite,
    check_no_grad,
    check_result,
    check_scalar,
    check_tensor,
    resolve_impl,
)

# Torch path tile: logits of one [token chunk x vocab block] live at once. 16 MiB of fp32 is
# ~1% of the naive [N, V] matrices at SmolLM2's shape (N=4096, V=49152: 2 x 805 MB) and, being
# small, its max / exp / sum passes run from cache. The vocab block is sized so that one block
# of W (D x block x 4 B) is ~2 MiB (L2-sized): the GEMM then reuses it across all token chunks.
_TORCH_TILE_BYTES = 16 * 2**20
_TORCH_WBLOCK_BYTES = 2 * 2**20
# Below this many rows per worker thread, thread start-up outweighs the split.
_MIN_ROWS_PER_WORKER = 64

# Finite-ness of a weight is checked once per (storage, version): the LM head is passed on every
# call and scanning V x D values each time would cost as much as a small call itself. The
# post-hoc check on the log-sum-exp (see _check_result) catches anything the cache misses.
_CHECKED_WEIGHTS: dict = {}


def _transform_logits_(z: torch.Tensor, softcap: Optional[float], temperature: float) -> torch.Tensor:
    """In place: soft-cap the raw logits, then apply the sampling temperature (Gemma-2/3 order)."""
    if softcap is not None:
        z.div_(softcap).tanh_().mul_(softcap)
    if temperature != 1.0:
        z.mul_(1.0 / temperature)
    return z


def _torch_blocks(d: int, v: int, n: int, itemsize: int):
    vb = 1 << max(8, min(13, int(math.log2(max(1, _TORCH_WBLOCK_BYTES // (itemsize * max(d, 1)))))))
    vb = min(vb, v)
    nb = max(1, min(n, _TORCH_TILE_BYTES // (itemsize * vb)))
    return vb, nb


def _token_logprobs_torch(hidden, weight, targets, bias, ignore_index, softcap, temperature, with_greedy):
    """Chunked torch path. fp64 inputs compute in fp64 (the reference dtype); everything else in fp32.

    bf16/fp16: each block of W is upcast to fp32 once per call (O(V*D) conversions, ~1-2% of the
    GEMM), and ``hidden`` once (O(N*D)). Logits are then fp32 sums of exact bf16 products -- the
    same numbers the Triton kernel's fp32 accumulators produce -- instead of bf16-rounded logits,
    which would be off by up to ~0.06 nats at |z| ~ 20, larger than many utility deltas.

    On a multi-core CPU the tokens are split across one Python worker thread per intra-op thread,
    each running single-threaded torch ops (they release the GIL). A plain loop of multi-threaded
    ops would meet an OpenMP barrier after every op -- ~300 per call at SmolLM2's shape -- and on a
    busy machine each barrier waits for a descheduled thread: measured 2-4x slower than the naive
    path under load, while the worker split stays ahead of it.
    """
    n = hidden.shape[0]
    cdt = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    dev = hidden.device
    h = hidden.to(cdt)
    b = None if bias is None else bias.to(cdt)
    t = targets.long()
    lse = torch.empty(n, dtype=cdt, device=dev)
    logp = torch.empty(n, dtype=cdt, device=dev)
    greedy = torch.empty(n, dtype=torch.bool, device=dev)
    workers = torch.get_num_threads() if dev.type == "cpu" else 1
    workers = max(1, min(workers, n // _MIN_ROWS_PER_WORKER))
    if workers == 1:
        _torch_rows(h, weight, t, b, ignore_index, softcap, temperature, logp, lse, greedy)
    else:
        bounds = [(i * n // workers, (i + 1) * n // workers) for i in range(workers)]
        nthreads = torch.get_num_threads()
        # Grad and inference modes are thread-local: workers must run in the caller's mode, or they
        # could not write into inference-mode outputs, nor use a requires-grad weight under no_grad.
        inference = torch.is_inference_mode_enabled()

        def run(r):
            torch.set_num_threads(1)  # this worker's ops run serially; the workers are the parallelism
            r0, r1 = r
            with torch.inference_mode(inference), torch.no_grad():
                _torch_rows(h[r0:r1], weight, t[r0:r1], b, ignore_index, softcap, temperature,
                            logp[r0:r1], lse[r0:r1], greedy[r0:r1])

        try:
            with ThreadPoolExecutor(workers, thread_name_prefix="uae_logprobs") as pool:
                list(pool.map(run, bounds))  # list(): re-raises a worker's exception here
        finally:
            torch.set_num_threads(nthreads)  # MKL's thread count is process-wide: restore it
    return logp, lse, (greedy if with_greedy else None)


def _torch_rows(h, weight, t, b, ignore_index, softcap, temperature, logp_out, lse_out, greedy_out):
    """Online log-sum-exp over vocabulary blocks for the rows of ``h``; writes the three outputs."""
    n, v = h.shape[0], weight.shape[0]
    cdt, dev = h.dtype, h.device
    vb, nb = _torch_blocks(h.shape[1], v, n, torch.finfo(cdt).bits // 8)
    m = torch.full((n,), -math.inf, dtype=cdt, device=dev)  # running max of the (transformed) logits
    s = torch.zeros(n, dtype=cdt, device=dev)  # running sum exp(z - m)
    tgt = torch.zeros(n, dtype=cdt, device=dev)  # target logit, filled by the block that holds it
    valid = t != ignore_index
    z_buf = torch.empty(nb * vb, dtype=cdt, device=dev)  # one tile buffer, reused: no allocator churn
    for v0 in range(0, v, vb):
        v1 = min(v, v0 + vb)
        w_blk = weight[v0:v1].to(cdt)
        b_blk = None if b is None else b[v0:v1]
        local = t - v0
        in_blk = valid & (local >= 0) & (local < v1 - v0)
        local.clamp_(0, v1 - v0 - 1)
        for r0 in range(0, n, nb):
            r1 = min(n, r0 + nb)
            z = z_buf[: (r1 - r0) * (v1 - v0)].view(r1 - r0, v1 - v0)
            if b_blk is None:
                torch.mm(h[r0:r1], w_blk.T, out=z)
            else:
                torch.addmm(b_blk, h[r0:r1], w_blk.T, out=z)
            _transform_logits_(z, softcap, temperature)
            # Gather the target logit before z is overwritten by exp(z - m) below.
            g = z.gather(1, local[r0:r1, None]).squeeze(1)
            tgt[r0:r1] = torch.where(in_blk[r0:r1], g, tgt[r0:r1])
            m_old = m[r0:r1]
            m_new = torch.maximum(m_old, z.amax(dim=1))
            z.sub_(m_new[:, None]).exp_()
            s[r0:r1] = s[r0:r1] * torch.exp(m_old - m_new) + z.sum(dim=1)
            m[r0:r1] = m_new
    torch.add(m, torch.log(s), out=lse_out)
    torch.where(valid, tgt - lse_out, torch.zeros_like(lse_out), out=logp_out)
    # m is the exact max of the same logits the target was gathered from, so ">=" is "target is
    # an argmax" (ties count as a match).
    torch.logical_and(valid, tgt >= m, out=greedy_out)


def _check_finite_lowmem(name: str, x: torch.Tensor) -> None:
    """check_finite without its ~6 bytes/element of temporaries (173 MB for SmolLM2's head).

    min and max propagate NaN and are +-inf when any value is, so both are finite exactly when
    every value is: one pass, no temporaries, one host sync.
    """
    if x.numel() == 0:
        return
    lo, hi = torch.aminmax(x.reshape(-1))
    if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
        check_finite(name, x)  # error path: counts the bad values and raises


def _check_weight_finite(weight: torch.Tensor) -> None:
    if weight.is_inference():  # no version counter to key on (torch.inference_mode): check every call
        _check_finite_lowmem("weight", weight)
        return
    key = (weight.data_ptr(), weight._version, tuple(weight.shape), tuple(weight.stride()), weight.dtype, str(weight.device))
    if key in _CHECKED_WEIGHTS:
        return
    _check_finite_lowmem("weight", weight)
    if len(_CHECKED_WEIGHTS) >= 16:
        _CHECKED_WEIGHTS.clear()
    _CHECKED_WEIGHTS[key] = True


def _validate(hidden, weight, targets, bias, ignore_index, softcap, temperature):
    check_tensor("hidden", hidden, dtypes=FLOAT_DTYPES)
    if hidden.dim() < 1:
        raise ValueError(f"hidden must have shape [..., D], got a 0-d tensor")
    dev = hidden.device
    check_tensor("weight", weight, ndim=2, dtypes=FLOAT_DTYPES, device=dev)
    check_tensor("targets", targets, dtypes=INDEX_DTYPES, device=dev)
    if weight.dtype != hidden.dtype:
        raise TypeError(
            f"hidden is {str(hidden.dtype)[6:]} but weight is {str(weight.dtype)[6:]}: pass both in one dtype "
            f"(e.g. hidden.to(weight.dtype)); the op computes in fp32 (fp64 for fp64 inputs) either way"
        )
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden has D={hidden.shape[-1]} but weight is [V, D] with D={weight.shape[1]}")
    if weight.shape[0] == 0:
        raise ValueError("weight has V=0 rows: the vocabulary is empty")
    if weight.shape[1] == 0:
        raise ValueError("hidden and weight have D=0 features: nothing to project")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"targets must have shape {tuple(hidden.shape[:-1])} (hidden without D), got {tuple(targets.shape)}")
    if targets.numel() == 0:
        raise ValueError("targets/hidden are empty (N = 0 tokens): nothing to score")
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=FLOAT_DTYPES, device=dev)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias has {bias.shape[0]} entries but weight has V={weight.shape[0]} rows")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not -(2**31) <= int(ignore_index) < 2**31:
        raise ValueError(f"ignore_index must fit in int32, got {ignore_index}")
    cdt = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    check_scalar("softcap", softcap, dtype=cdt, allow_none=True)
    check_scalar("temperature", temperature, dtype=cdt)
    v = weight.shape[0]
    t = targets.long()  # narrow dtypes would wrap v and ignore_index in the comparisons below
    bad = (t != ignore_index) & ((t < 0) | (t >= v))
    if bool(bad.any()):  # one host sync for the whole range check
        first = t[bad][0].item()
        raise ValueError(f"targets contains {first}, outside [0, V={v}) and not ignore_index={ignore_index}")
    _check_finite_lowmem("hidden", hidden)
    _check_weight_finite(weight)
    if bias is not None:
        _check_finite_lowmem("bias", bias)
    check_no_grad("token_logprobs", hidden=hidden, weight=weight, bias=bias)


def _check_result(lse, logp, hidden, weight, bias):
    # Cheap O(N) safety net: a non-finite input the pre-checks missed (the weight cache is keyed by address and
    # version: a new tensor at a freed one's address, or a write through .data, slips past it), or fp32
    # overflow of a logit, shows up as a non-finite log-sum-exp; a -inf weight entry only in the target's
    # log-probability (finite logits give a finite one). Name the culprit rather than return a wrong number.
    if bool(torch.isfinite(lse).all() & torch.isfinite(logp).all()):  # one host sync on the common path
        return
    try:
        check_result(lse, "the log-sum-exp overflowed (logits too large for fp32): check the scale of hidden and weight",
                     hidden=hidden, weight=weight, bias=bias)
        if not bool(torch.isfinite(logp).all()):
            _CHECKED_WEIGHTS.clear()
            _check_finite_lowmem("weight", weight)  # names the weight (or bias) when one of them holds the -inf
            if bias is not None:
                _check_finite_lowmem("bias", bias)
            raise ValueError("a target's log-probability is not finite although hidden, weight and bias are: "
                             "check the scale of the logits")
    except ValueError:
        _CHECKED_WEIGHTS.clear()  # the cached "weight is finite" may be what was wrong
        raise


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    softcap: Optional[float] = None,
    temperature: float = 1.0,
    return_lse: bool = False,
    return_greedy: bool = False,
    impl: str = "auto",
):
    """``log p(target)`` per row of ``hidden`` under the LM head ``weight``, shape ``targets.shape``.

    Computes ``log_softmax(transform(hidden @ weight.T + bias))[..., target]`` without ever holding
    the [N, V] logits: memory is O(N) plus one fixed-size tile.

    Args:
        hidden: [..., D] final hidden states (after the model's last norm), fp32/bf16/fp16/fp64.
        weight: [V, D] LM-head (unembedding) matrix, same dtype and device as ``hidden``.
        targets: [...] token ids in [0, V); rows equal to ``ignore_index`` give 0.
        bias: optional [V] LM-head bias (any float dtype; added in fp32).
        ignore_index: target value marking rows to skip (their log-prob is 0, greedy False).
        softcap: optional logit soft-capping ``c * tanh(z / c)`` (Gemma 2/3), applied first.
        temperature: logits are divided by it, after soft-capping.
        return_lse: also return the per-row log-sum-exp of the transformed logits.
        return_greedy: also return a bool tensor, True where the target is an argmax logit
            (ties count as a match). Free: it compares the target logit with the running max.
        impl: ``"auto"`` (Triton on CUDA for fp16/bf16/fp32, torch otherwise), ``"triton"``
            (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``) or ``"torch"``.

    Returns:
        ``logp`` or the tuple ``(logp, lse?, greedy?)`` in that order. ``logp``/``lse`` are
        float32 (float64 for float64 inputs, which compute in float64 on the torch path).

    Accumulation is fp32 for fp16/bf16/fp32 inputs (the Triton path uses IEEE fp32 dots for fp32
    inputs, not tf32). No backward: raises ``RuntimeError`` if any input requires grad while
    grad mode is on. Bad input raises ``TypeError``/``ValueError`` naming the argument.

    Example::

        h = model.model(input_ids).last_hidden_state[0, answer_pos - 1]   # [T, D]
        logp = token_logprobs(h, model.lm_head.weight, input_ids[0, answer_pos])
    """
    _validate(hidden, weight, targets, bias, ignore_index, softcap, temperature)
    if impl == "auto" and hidden.dtype == torch.float64:
        impl = "torch"  # the kernel has no fp64 tiles; fp64 is the reference dtype anyway
    impl = resolve_impl(impl, hidden.device, flatten=True)  # the LM-head kernel's K-loop uses tl.range(flatten=)
    shape = targets.shape
    for flag, v in (("return_lse", return_lse), ("return_greedy", return_greedy)):
        if not isinstance(v, bool):  # "no" would read as True
            raise TypeError(f"{flag} must be a bool, got {v!r}")
    h2 = hidden.reshape(-1, hidden.shape[-1])
    t1 = targets.reshape(-1)
    softcap = None if softcap is None else float(softcap)
    temperature = float(temperature)
    if impl == "torch":
        logp, lse, greedy = _token_logprobs_torch(h2, weight, t1, bias, int(ignore_index), softcap, temperature, return_greedy)
    else:
        from ._logprobs_triton import token_logprobs_triton

        logp, lse, greedy = token_logprobs_triton(h2, weight, t1, bias, int(ignore_index), softcap, temperature, return_greedy)
    _check_result(lse, logp, h2, weight, bias)
    outs = [logp.reshape(shape)]
    if return_lse:
        outs.append(lse.reshape(shape))
    if return_greedy:
        outs.append(greedy.reshape(shape))
    return outs[0] if len(outs) == 1 else tuple(outs)


def token_logprob_deltas(
    hidden_with: torch.Tensor,
    hidden_without: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    **options,
) -> torch.Tensor:
    """``log p(a_t | passage, q, a_<t) - log p(a_t | q, a_<t)`` for P passages at once, [P, T].

    Args:
        hidden_with: [P, T, D] hidden states at the T answer positions, one row per passage.
        hidden_without: [T, D] the no-passage baseline, computed once per query and broadcast.
        weight: [V, D] LM head.
        targets: [T] answer tokens (the same in both conditions) or [P, T] with identical rows.
        **options: those of :func:`token_logprobs` except the ``return_*`` flags.

    Returns float32 [P, T] (float64 for float64 inputs). Rows of ``targets`` equal to
    ``ignore_index`` give 0. The utility of a passage is the mean over its non-ignored tokens (a plain
    ``.mean(-1)`` would count the ignored positions' zeros: divide by the number of kept tokens).
    """
    for flag in ("return_lse", "return_greedy"):
        if options.get(flag):
            raise ValueError(f"token_logprob_deltas does not take {flag}; call token_logprobs directly")
    check_tensor("hidden_with", hidden_with, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor("hidden_without", hidden_without, ndim=2, dtypes=FLOAT_DTYPES, device=hidden_with.device)
    check_tensor("targets", targets, ndim=(1, 2), dtypes=INDEX_DTYPES, device=hidden_with.device)
    if hidden_without.dtype != hidden_with.dtype:
        raise TypeError(f"hidden_with is {hidden_with.dtype} but hidden_without is {hidden_without.dtype}: use one dtype")
    p, t, d = hidden_with.shape
    if p == 0 or t == 0 or d == 0:
        raise ValueError(f"hidden_with must have at least one passage, answer token and hidden unit, "
                         f"got shape {tuple(hidden_with.shape)}")
    if tuple(hidden_without.shape) != (t, d):
        raise ValueError(f"hidden_without must be [T, D] = {(t, d)} to match hidden_with {tuple(hidden_with.shape)}, got {tuple(hidden_without.shape)}")
    if targets.dim() == 2:
        if tuple(targets.shape) != (p, t):
            raise ValueError(f"targets must be [T]={t} or [P, T]={(p, t)}, got {tuple(targets.shape)}")
        if not bool((targets == targets[:1]).all()):
            raise ValueError("targets differ between passages: both conditions must score the same answer tokens")
        targets = targets[0]
    elif targets.shape[0] != t:
        raise ValueError(f"targets must be [T]={t} or [P, T]={(p, t)}, got {tuple(targets.shape)}")
    # errors under the caller's names, before the two are stacked into one "hidden"
    check_no_grad("token_logprob_deltas", hidden_with=hidden_with, hidden_without=hidden_without)
    _check_finite_lowmem("hidden_with", hidden_with)
    _check_finite_lowmem("hidden_without", hidden_without)
    # One call for both conditions: the baseline rows ride along with the passages' rows, so the
    # LM head is streamed once instead of twice.
    stacked = torch.cat([hidden_without[None], hidden_with], dim=0)
    lp = token_logprobs(stacked, weight, targets.expand(p + 1, t), **options)
    return lp[1:] - lp[:1]
