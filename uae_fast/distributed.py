"""Cross-device negatives for :func:`uae_fast.utility_infonce` under ``torch.distributed``.

Every rank keeps its own queries and scores them against the passages of *all* ranks::

    p_all, target_idx, gold_idx = gather_with_grad(p, target_idx, gold_idx)
    loss = utility_infonce(q, p_all, target_idx, target_utility, gold_idx=gold_idx, label_mix=0.1)

The gathered passages are rank-major: rank 0's whole local ``p`` (positives, candidates *and* hard negatives,
in the caller's order), then rank 1's, and so on. Local indices are therefore shifted by the number of
passages on the lower ranks - not by ``rank * batch_size``. (sentence-transformers shipped exactly that bug:
its labels assumed ``PPPP NNNN`` while the gather produced ``PN PN PN PN``, training anchors towards other
ranks' hard negatives; fixed in their PR #3453.) Ranks may hold different numbers of passages.

Gradient: backward sums the gathered passages' gradient over ranks (every rank's queries saw every
passage) and hands each rank the slice of its own passages. With DDP, which averages gradients over ranks,
reduction="mean" and equal local batch sizes this gives exactly the gradient of the mean loss over the global
batch; the loss value on each rank is its local mean.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from ._checks import FLOAT_DTYPES, INDEX_DTYPES, check_tensor


def _world(group) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _all_sizes(n: int, device, group, world: int) -> list[int]:
    size = torch.tensor([n], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    return [int(s) for s in sizes]


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes, rank, group):
        # all_gather needs equal shapes: pad every rank to the largest local size, then drop the padding.
        n_max = max(sizes)
        padded = x.new_zeros((n_max,) + tuple(x.shape[1:]))
        padded[: x.shape[0]] = x
        chunks = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(chunks, padded.contiguous(), group=group)
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group
        return torch.cat([c[:n] for c, n in zip(chunks, sizes)], dim=0)

    @staticmethod
    def backward(ctx, grad):
        # Each rank holds d(its local loss)/d(all passages); a passage's total gradient is the sum over ranks.
        # all_reduce (not reduce_scatter) because gloo has no reduce_scatter and sizes may differ.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None, None, None


def gather_with_grad(passages: torch.Tensor, *indices: Optional[torch.Tensor], group=None):
    """All-gather ``passages`` [N_local, d] across ranks, keeping the gradient; shift ``indices`` to match.

    Args:
        passages: this rank's passage embeddings (every candidate and hard negative, any order).
        *indices: index tensors into the local ``passages`` (e.g. ``target_idx`` [B, K], ``gold_idx`` [B]);
            ``-1`` (padding) stays ``-1``, everything else is shifted by the passages on lower ranks.
            ``None`` passes through.
        group: process group (default: the world).

    Returns:
        ``passages_all`` [sum_r N_r, d] (rank-major), or ``(passages_all, *shifted_indices)`` when indices are
        given. Without an initialised process group (single process) the inputs come back unchanged.

    Do not gather the queries: each rank scores its own queries against all passages (the loss is per query).

    Example::

        p_all, t_idx, g_idx = gather_with_grad(p, target_idx, gold_idx)
        loss = uae_fast.utility_infonce(q, p_all, t_idx, target_utility, gold_idx=g_idx, label_mix=0.1)
    """
    check_tensor("passages", passages, dtypes=FLOAT_DTYPES)
    if passages.dim() < 1:
        raise ValueError("passages must have at least one dimension (rows to gather)")
    for i, t in enumerate(indices):
        if t is not None:
            check_tensor(f"indices[{i}]", t, dtypes=INDEX_DTYPES, device=passages.device)
            if t.numel() and bool(((t.long() < -1) | (t.long() >= passages.shape[0])).any()):  # long: no uint8/int16 wrap
                raise ValueError(
                    f"indices[{i}] has values outside [-1, {passages.shape[0]}): they must index the LOCAL passages "
                    "(gather_with_grad shifts them to the gathered tensor itself)"
                )
    rank, world = _world(group)
    if world == 1:
        out = passages
        offset = 0
    else:
        sizes = _all_sizes(passages.shape[0], passages.device, group, world)
        out = _AllGatherWithGrad.apply(passages, sizes, rank, group)
        offset = sum(sizes[:rank])
    if not indices:
        return out
    shifted = tuple(None if t is None else torch.where(t >= 0, t.long() + offset, -1) for t in indices)
    return (out,) + shifted
