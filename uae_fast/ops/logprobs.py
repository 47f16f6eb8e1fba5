"""Per-token target log-probabilities through an LM head, without [tokens x vocab] logits.

``token_logprobs`` computes ``log softmax(h @ W.T + b)[target]`` for each row of ``hidden``.
The torch path walks the tokens in chunks sized to a fixed memory budget (the CPU
implementation and the test reference); the Triton path tiles tokens x vocab with an
online log-sum-exp in fp32 and never writes a logit to memory.

Forward-only: teacher scoring needs no gradient, so both functions raise if a grad is asked for.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._checks import FLOAT_DTYPES, INDEX_DTYPES, check_finite, check_no_grad, check_tensor, resolve_impl

# Bytes of fp32 logits the torch path holds at once. 32 MiB keeps the chunk in L2/L3-friendly sizes
# on CPU and is < 5% of the naive path's [N, V] matrix at the shapes teacher scoring uses.
_TORCH_CHUNK_BYTES = 32 * 2**20


def _transform_logits(z: torch.Tensor, softcap: Optional[float], temperature: float) -> torch.Tensor:
    # Order matches Gemma-style models: soft-cap the raw logits, then apply sampling temperature.
    if softcap is not None:
        z = torch.tanh(z / softcap) * softcap
    if temperature != 1.0:
        z = z / temperature
    return z


def _token_logprobs_torch(hidden, weight, targets, bias, ignore_index, softcap, temperature, with_greedy):
    n, v = hidden.shape[0], weight.shape[0]
    # fp32 math throughout: logits near 20 rounded to bf16 would lose ~0.06 nats, larger than many deltas.
    w = weight if weight.dtype == torch.float32 else weight.float()
    b = None if bias is None else bias.float()
    out = torch.zeros(n, dtype=torch.float32, device=hidden.device)
    lse = torch.zeros(n, dtype=torch.float32, device=hidden.device)
    greedy = torch.zeros(n, dtype=torch.bool, device=hidden.device) if with_greedy else None
    chunk = max(1, _TORCH_CHUNK_BYTES // (4 * v))
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        z = torch.nn.functional.linear(hidden[s:e].float(), w, b)
        z = _transform_logits(z, softcap, temperature)
        t = targets[s:e]
        valid = t != ignore_index
        safe_t = torch.where(valid, t, torch.zeros_like(t)).long()
        row_lse = torch.logsumexp(z, dim=-1)
        tgt = z.gather(1, safe_t[:, None]).squeeze(1)
        out[s:e] = torch.where(valid, tgt - row_lse, torch.zeros_like(tgt))
        lse[s:e] = row_lse
        if with_greedy:
            # "target is the argmax" = no logit strictly larger than the target's.
            greedy[s:e] = valid & (z.max(dim=-1).values <= tgt)
    return out, lse, greedy


def _validate(hidden, weight, targets, bias, ignore_index, softcap, temperature):
    check_tensor("hidden", hidden, dtypes=FLOAT_DTYPES)
    if hidden.dim() < 1:
        raise ValueError(f"hidden must have shape [..., D], got {tuple(hidden.shape)}")
    dev = hidden.device
    check_tensor("weight", weight, ndim=2, dtypes=FLOAT_DTYPES, device=dev)
    check_tensor("targets", targets, dtypes=INDEX_DTYPES, device=dev)
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden has D={hidden.shape[-1]} but weight is [V, D] with D={weight.shape[1]}")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"targets must have shape {tuple(hidden.shape[:-1])} (hidden without D), got {tuple(targets.shape)}")
    if targets.numel() == 0:
        raise ValueError("targets/hidden are empty (N = 0 tokens): nothing to score")
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=FLOAT_DTYPES, device=dev)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias has {bias.shape[0]} entries but weight has V={weight.shape[0]} rows")
    if softcap is not None and not (softcap > 0):
        raise ValueError(f"softcap must be > 0 or None, got {softcap}")
    if not (temperature > 0):
        raise ValueError(f"temperature must be > 0, got {temperature}")
    valid = targets != ignore_index
    if bool(((targets < 0) & valid).any()) or bool(((targets >= weight.shape[0]) & valid).any()):
        bad = targets[valid & ((targets < 0) | (targets >= weight.shape[0]))][0].item()
        raise ValueError(f"targets contains {bad}, outside [0, V={weight.shape[0]}) and not ignore_index={ignore_index}")
    check_finite("hidden", hidden)
    check_finite("weight", weight)
    if bias is not None:
        check_finite("bias", bias)
    check_no_grad("token_logprobs", hidden=hidden, weight=weight, bias=bias)


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
    """``log p(target)`` per row of ``hidden`` under the LM head ``weight`` (float32, shape ``targets.shape``).

    Args:
        hidden: [..., D] final hidden states (fp32/bf16/fp16).
        weight: [V, D] LM-head (unembedding) matrix; same device as ``hidden``.
        targets: [...] token ids; rows equal to ``ignore_index`` give 0.
        bias: optional [V] LM-head bias.
        softcap: optional logit soft-capping ``c * tanh(z / c)`` (Gemma 2/3).
        temperature: logits are divided by it (after soft-capping).
        return_lse: also return the per-row log-sum-exp (float32).
        return_greedy: also return a bool tensor, True where the target is the argmax logit.
        impl: ``"auto"`` (Triton on CUDA, torch otherwise), ``"triton"`` or ``"torch"``.

    Returns ``logp`` or a tuple ``(logp, lse?, greedy?)`` in that order.
    Never materialises the [N, V] logits; no backward (raises if a grad is requested).
    """
    _validate(hidden, weight, targets, bias, ignore_index, softcap, temperature)
    impl = resolve_impl(impl, hidden.device)
    shape = targets.shape
    h2 = hidden.reshape(-1, hidden.shape[-1])
    t1 = targets.reshape(-1)
    if impl == "torch":
        logp, lse, greedy = _token_logprobs_torch(h2, weight, t1, bias, ignore_index, softcap, temperature, return_greedy)
    else:
        from ._logprobs_triton import token_logprobs_triton

        logp, lse, greedy = token_logprobs_triton(h2, weight, t1, bias, ignore_index, softcap, temperature, return_greedy)
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
    """``log p(a_t | passage, q, a_<t) - log p(a_t | q, a_<t)`` for P passages at once, [P, T] float32.

    ``hidden_with`` is [P, T, D] (hidden states at the T answer positions, one row per passage),
    ``hidden_without`` is [T, D] (the no-passage baseline, computed once per query and broadcast).
    ``targets`` is [T] (the same answer tokens in both conditions) or [P, T].
    Options are those of :func:`token_logprobs` except the ``return_*`` flags.
    """
    for flag in ("return_lse", "return_greedy"):
        if options.get(flag):
            raise ValueError(f"token_logprob_deltas does not take {flag}; call token_logprobs directly")
    check_tensor("hidden_with", hidden_with, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor("hidden_without", hidden_without, ndim=2, dtypes=FLOAT_DTYPES, device=hidden_with.device)
    check_tensor("targets", targets, ndim=(1, 2), dtypes=INDEX_DTYPES, device=hidden_with.device)
    p, t, d = hidden_with.shape
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
    lp_without = token_logprobs(hidden_without, weight, targets, **options)
    lp_with = token_logprobs(hidden_with, weight, targets.expand(p, t), **options)
    return lp_with - lp_without[None, :]
