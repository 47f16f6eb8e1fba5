"""gather_with_grad on two gloo processes: loss and gradients equal the single-process loss on the whole batch.

Includes the sentence-transformers PR #3453 regression: each rank's passages are [positives; hard negatives]
(``PN`` per rank, so ``PNPN`` gathered); shifting local indices by ``rank * batch_size`` (which assumes
``PPNN``) points rank 1's queries at rank 0's hard negatives.
"""
import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from conftest import spawn_with_deadline

WORLD = 2
GLOO_TIMEOUT = timedelta(seconds=120)  # a rank that dies mid-collective fails the test instead of hanging it
B_LOCAL = (5, 7)  # unequal local batches: the gather must not assume equal sizes
NEG_PER_QUERY = (1, 2)  # and unequal hard-negative counts
D, K, TAU = 16, 3, 0.1


def _global_batch():
    """Per-rank data, generated identically in every process."""
    g = torch.Generator().manual_seed(2024)
    ranks = []
    for r in range(WORLD):
        b, m = B_LOCAL[r], NEG_PER_QUERY[r]
        q = torch.randn(b, D, generator=g)
        pos = torch.randn(b, D, generator=g)
        neg = torch.randn(b * m, D, generator=g)
        # targets: own positive, own hard negatives (some padded), with teacher utilities
        idx = torch.full((b, K), -1, dtype=torch.long)
        idx[:, 0] = torch.arange(b)
        for j in range(min(m, K - 1)):
            idx[:, 1 + j] = b + torch.arange(b) * m + j
        idx[::2, K - 1] = -1
        util = torch.randn(b, K, generator=g)
        gold = torch.arange(b)
        ranks.append(dict(q=q, pos=pos, neg=neg, idx=idx, util=util, gold=gold))
    return ranks


def _worker(rank, init_file, out_dir):
    os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=GLOO_TIMEOUT)
    try:
        from uae_fast import UtilityInfoNCE, gather_with_grad, utility_infonce

        d = _global_batch()[rank]
        res = {}
        for red in ("sum", "mean"):
            q = d["q"].clone().requires_grad_()
            p_local = torch.cat([d["pos"], d["neg"]]).requires_grad_()  # [P; N] on this rank
            p_all, idx, gold = gather_with_grad(p_local, d["idx"], d["gold"])
            loss = utility_infonce(q, p_all, idx, d["util"], temperature=TAU, label_mix=0.25, gold_idx=gold, reduction=red)
            loss.backward()
            res[red] = (loss.detach(), q.grad, p_local.grad)
        # the module's gather_across_devices path gives the same loss
        q = d["q"].clone().requires_grad_()
        p_local = torch.cat([d["pos"], d["neg"]]).requires_grad_()
        mod = UtilityInfoNCE(temperature=TAU, label_mix=0.25, reduction="sum", gather_across_devices=True)
        res["module"] = mod(q, p_local, d["idx"], d["util"], d["gold"]).detach()
        # the pre-#3453 offset: rank * local batch size instead of the passages on lower ranks
        p_all = gather_with_grad(p_local.detach())
        buggy = torch.where(d["idx"] >= 0, d["idx"] + rank * B_LOCAL[0], -1)
        res["buggy"] = utility_infonce(q.detach(), p_all, buggy, d["util"], temperature=TAU, label_mix=0.25,
                                       gold_idx=d["gold"] + rank * B_LOCAL[0], reduction="sum")
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _single_process_reference(reduction):
    """Whole batch in one process, laid out PPPP NNNN (all positives, then all negatives): a different order
    from the gathered PN PN, so index bookkeeping is checked, not copied."""
    from uae_fast import utility_infonce

    ranks = _global_batch()
    pos_off, neg_off, n_pos = [], [], sum(B_LOCAL)
    for r in range(WORLD):
        pos_off.append(sum(B_LOCAL[:r]))
        neg_off.append(n_pos + sum(B_LOCAL[i] * NEG_PER_QUERY[i] for i in range(r)))

    def to_global(r, local):
        b = B_LOCAL[r]
        return torch.where(local < 0, -1, torch.where(local < b, local + pos_off[r], local - b + neg_off[r]))

    q = torch.cat([d["q"] for d in ranks]).requires_grad_()
    p = torch.cat([d["pos"] for d in ranks] + [d["neg"] for d in ranks]).requires_grad_()
    idx = torch.cat([to_global(r, d["idx"]) for r, d in enumerate(ranks)])
    gold = torch.cat([to_global(r, d["gold"]) for r, d in enumerate(ranks)])
    util = torch.cat([d["util"] for d in ranks])
    loss = utility_infonce(q, p, idx, util, temperature=TAU, label_mix=0.25, gold_idx=gold, reduction=reduction)
    loss.backward()
    # split gradients back per rank, in each rank's local [P; N] order
    q_grads = list(q.grad.split(B_LOCAL))
    p_grads = [torch.cat([p.grad[pos_off[r]: pos_off[r] + B_LOCAL[r]],
                          p.grad[neg_off[r]: neg_off[r] + B_LOCAL[r] * NEG_PER_QUERY[r]]]) for r in range(WORLD)]
    return loss.detach(), q_grads, p_grads


@pytest.fixture(scope="module")
def gathered(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gloo")
    spawn_with_deadline(_worker, (str(tmp / "init"), str(tmp)), WORLD)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


def test_gathered_sum_equals_single_process(gathered):
    ref_loss, ref_q, ref_p = _single_process_reference("sum")
    loss = sum(g["sum"][0] for g in gathered)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for r in range(WORLD):
        torch.testing.assert_close(gathered[r]["sum"][1], ref_q[r], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gathered[r]["sum"][2], ref_p[r], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gathered[r]["module"], gathered[r]["sum"][0], rtol=0, atol=0)


def test_gathered_mean_with_ddp_averaging_equals_global_mean(gathered):
    # Each rank's loss is its local mean; DDP averages gradients over ranks. Equal local batches make the
    # average of local means the global mean; here they are unequal, so weight by local batch size instead.
    ref_loss, ref_q, ref_p = _single_process_reference("mean")
    total = sum(B_LOCAL)
    loss = sum(g["mean"][0] * B_LOCAL[r] for r, g in enumerate(gathered)) / total
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for r in range(WORLD):
        # d(local mean)/dq = total / b_r * d(global mean)/dq for this rank's queries
        torch.testing.assert_close(gathered[r]["mean"][1] * B_LOCAL[r] / total, ref_q[r], rtol=1e-5, atol=1e-7)


def test_label_offset_regression_st_3453(gathered):
    # The buggy rank*B offset gives a different loss on rank 1 (it targets rank 0's hard negatives) ...
    ref_loss, _, _ = _single_process_reference("sum")
    buggy = sum(g["buggy"] for g in gathered)
    assert (buggy - ref_loss).abs() > 1e-2 * ref_loss.abs()
    # ... while rank 0 is unaffected by any offset, so the difference comes from rank 1 alone.
    torch.testing.assert_close(gathered[0]["buggy"], gathered[0]["sum"][0], rtol=1e-6, atol=1e-6)


def test_single_process_passthrough():
    from uae_fast import gather_with_grad

    p = torch.randn(4, 3, requires_grad=True)
    idx = torch.tensor([[0, -1], [3, 2]])
    out, shifted, none = gather_with_grad(p, idx, None)
    assert out is p and none is None and torch.equal(shifted, idx)
    with pytest.raises(ValueError, match="LOCAL passages"):
        gather_with_grad(p, torch.tensor([4]))
