"""utility_infonce: torch path vs float64 materialised references, MNRL, gradcheck; Triton vs torch; bad input."""
import math

import pytest
import torch
import torch.nn.functional as F

import uae_fast
from uae_fast import UtilityInfoNCE, utility_infonce
from uae_fast.ops import infonce as M

# Block-unaligned on purpose: no dimension is a multiple of any tile size.
B, N, D, K = 37, 301, 72, 5


def _inputs(b=B, n=N, d=D, k=K, dtype=torch.float32, scale=0.35):
    q = (torch.randn(b, d) * scale).to(dtype).requires_grad_()
    p = (torch.randn(n, d) * scale).to(dtype).requires_grad_()
    idx = torch.randint(0, n, (b, k))
    idx[::3, 2:] = -1  # ragged rows
    idx[1, 0] = idx[1, 1]  # a repeated target (weights add)
    util = torch.randn(b, k) * 2
    util[idx < 0] = float("nan")  # padded utilities are ignored, whatever they hold
    gold = torch.randint(0, n, (b,))
    gold[::4] = -1
    return q, p, idx, util, gold


def _reference(q, p, idx, util, tau, tau_t=1.0, mix=0.0, gold=None, reduction="mean"):
    """Materialised float64 [B, N] loss via F.cross_entropy with soft targets, teacher built independently."""
    qd = q.detach().double().requires_grad_()
    pd = p.detach().double().requires_grad_()
    b, n = qd.shape[0], pd.shape[0]
    y = torch.zeros(b, n, dtype=torch.float64)
    for i in range(b):
        ks = [k for k in range(idx.shape[1]) if idx[i, k] >= 0]
        u = torch.tensor([float(util[i, k]) for k in ks], dtype=torch.float64) / tau_t
        w = torch.softmax(u, 0)
        a = mix if (gold is not None and gold[i] >= 0) else 0.0
        for k, wk in zip(ks, w):
            y[i, idx[i, k]] += (1 - a) * wk
        if a:
            y[i, gold[i]] += a
    loss = F.cross_entropy(qd @ pd.T / tau, y, reduction=reduction)
    return loss, qd, pd


def _grads(loss, q, p, seed=7):
    go = torch.rand(loss.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.5
    gq, gp = torch.autograd.grad(loss, (q, p), go.to(device=loss.device, dtype=loss.dtype))
    return gq.double(), gp.double()


def _close(a, b, tol, what):
    a, b = a.detach().double(), b.detach().double()
    err = (a - b).abs().max().item()
    ref = max(b.abs().max().item(), 1e-12)
    assert err <= tol * ref, f"{what}: max|diff| {err:.3g} > {tol:g} * max|ref| {ref:.3g}"


# ---------------------------------------------------------------------------- torch path vs references
def test_torch_path_is_deterministic_with_repeated_targets(triton_device):
    # Repeated target indices add twice into the gradient buffer; on CUDA that must not go through atomics
    # (scatter_add_): two runs give identical bits and torch's deterministic mode finds no op without a
    # deterministic implementation (cuBLAS's workspace warning aside). Those two checks bite on CUDA only
    # (benchmarks/gpu_suite.sh runs this file there): CPU ops are deterministic; here the float64 reference does.
    import warnings

    q, p, idx, util, gold = _inputs()
    idx[:, 1] = idx[:, 0]  # every row repeats a target
    q, p = (t.detach().to(triton_device).requires_grad_() for t in (q, p))
    idx, util, gold = idx.to(triton_device), util.to(triton_device), gold.to(triton_device)

    def run():
        loss = utility_infonce(q, p, idx, util, gold_idx=gold, label_mix=0.2, reduction="none", impl="torch")
        return (loss, *torch.autograd.grad(loss.sum(), (q, p)))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            first, second = run(), run()
        finally:
            torch.use_deterministic_algorithms(False)
    bad = [str(w.message) for w in caught if "does not have a deterministic implementation" in str(w.message)]
    assert not bad, bad
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    ref, qd, pd = _reference(q.cpu(), p.cpu(), idx.cpu(), util.cpu(), 0.05, mix=0.2, gold=gold.cpu(), reduction="none")
    _close(first[0], ref, 1e-5, "loss")
    _close(first[1], torch.autograd.grad(ref.sum(), qd)[0], 1e-5, "dq")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("mix", [0.0, 0.3])
def test_torch_matches_soft_target_cross_entropy(reduction, mix):
    q, p, idx, util, gold = _inputs()
    kw = dict(temperature=0.07, teacher_temperature=0.8, label_mix=mix, gold_idx=gold if mix else None)
    loss = utility_infonce(q, p, idx, util, reduction=reduction, impl="torch", **kw)
    ref, qd, pd = _reference(q, p, idx, util, 0.07, 0.8, mix, gold if mix else None, reduction)
    assert loss.dtype == torch.float32 and loss.shape == ref.shape
    _close(loss, ref, 2e-6, "loss")
    gq, gp = _grads(loss, q, p)
    rq, rp = _grads(ref, qd, pd)
    _close(gq, rq, 2e-5, "dq")
    _close(gp, rp, 2e-5, "dp")


def test_torch_chunked_never_materialises_bn(monkeypatch):
    # Force 8-row chunks and record the output of every aten op (mm, addmm, matmul, bmm, exp, ...): none may hold
    # more than 8 rows' worth of [., N] scores.
    from torch.utils._python_dispatch import TorchDispatchMode

    class Sizes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.seen.append((str(func), tuple(t.shape), t.numel()))
            return out

    q, p, idx, util, _ = _inputs()
    monkeypatch.setattr(M, "_TORCH_CHUNK_BYTES", 8 * N * 4)
    with Sizes() as mode:
        loss = utility_infonce(q, p, idx, util, impl="torch")
        gq, gp = torch.autograd.grad(loss, (q, p))
    assert any("mm" in f for f, _, _ in mode.seen)
    # a score buffer is [rows, N] (or its transpose); the only other N-sized tensors are p and dp, [N, D]
    big = [(f, s) for f, s, n in mode.seen if N in s and n > 8 * N and sorted(s) != sorted((N, D))]
    assert not big, big[:5]
    assert any(N in s and n == 8 * N for _, s, n in mode.seen)  # the chunks were seen
    ref, qd, pd = _reference(q, p, idx, util, 0.05)
    rq, rp = torch.autograd.grad(ref, (qd, pd))
    _close(loss, ref, 2e-6, "loss")
    _close(gq, rq, 2e-5, "dq")
    _close(gp, rp, 2e-5, "dp")


@pytest.mark.parametrize("reduction", ["mean", "none"])  # grads-in-forward and recompute-in-backward paths
def test_torch_gradcheck_float64(reduction):
    q, p, idx, util, gold = _inputs(b=5, n=11, d=6, k=3, dtype=torch.float64, scale=1.0)
    q, p = q.detach().requires_grad_(), p.detach().requires_grad_()
    fn = lambda a, b: utility_infonce(a, b, idx, util, temperature=0.5, label_mix=0.25, gold_idx=gold, reduction=reduction)
    assert torch.autograd.gradcheck(fn, (q, p), eps=1e-6, atol=1e-7)


def test_only_one_side_requires_grad():
    q, p, idx, util, _ = _inputs()
    ref, qd, pd = _reference(q, p, idx, util, 0.05)
    rq, rp = torch.autograd.grad(ref, (qd, pd))
    l1 = utility_infonce(q, p.detach(), idx, util, impl="torch")
    (gq,) = torch.autograd.grad(l1, (q,))
    l2 = utility_infonce(q.detach(), p, idx, util, impl="torch")
    (gp,) = torch.autograd.grad(l2, (p,))
    _close(gq, rq, 2e-5, "dq")
    _close(gp, rp, 2e-5, "dp")
    with torch.no_grad():
        _close(utility_infonce(q, p, idx, util), ref, 2e-6, "no-grad loss")


def test_no_grad_skips_the_gradient_sweep(monkeypatch):
    # needs_input_grad stays True for inputs that require grad even under no_grad: without the check an
    # evaluation would pay the 2 extra GEMMs and the fp32 dq/dp buffers for nothing.
    import uae_fast.ops.infonce as ops

    seen, real = [], ops._torch_sweep
    monkeypatch.setattr(ops, "_torch_sweep", lambda *a, **k: seen.append(a[6:8]) or real(*a, **k))
    q, p = torch.randn(5, 8, requires_grad=True), torch.randn(9, 8, requires_grad=True)
    idx, util = torch.randint(0, 9, (5, 2)), torch.randn(5, 2)
    with torch.no_grad():
        a = utility_infonce(q, p, idx, util, impl="torch")
    with torch.inference_mode():
        utility_infonce(q, p, idx, util, impl="torch")
    assert seen == [(False, False)] * 2 and not a.requires_grad
    b = utility_infonce(q, p, idx, util, impl="torch")
    assert seen[-1] == (True, True) and torch.equal(a, b.detach())


def test_padding_utility_and_teacher_temperature_edge_cases():
    q, p, idx, util, _ = _inputs()
    a = utility_infonce(q, p, idx, util, reduction="none")
    util2 = util.clone()
    util2[idx < 0] = 123.0  # changing padded utilities must not change anything
    b = utility_infonce(q, p, idx, util2, reduction="none")
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # A vanishing teacher temperature is a one-hot on the argmax utility, not NaN.
    tiny = utility_infonce(q, p, idx, util, teacher_temperature=1e-30, reduction="none")
    best = torch.where(idx >= 0, util.nan_to_num(-1e9), -math.inf).argmax(1)
    onehot_idx = torch.full_like(idx, -1)
    onehot_idx[:, 0] = idx.gather(1, best[:, None])[:, 0]
    ref = utility_infonce(q, p, onehot_idx, torch.zeros_like(util), reduction="none")
    _close(tiny, ref, 1e-6, "teacher_temperature -> 0")


# ---------------------------------------------------------------------------- MNRL oracle
def _mnrl(scale):
    pytest.importorskip("sentence_transformers")
    try:  # sentence-transformers >= 6 moved it; older releases (pyproject allows >= 3) keep it here
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    except ImportError:
        from sentence_transformers.losses import MultipleNegativesRankingLoss
    from sentence_transformers.util import dot_score

    if not hasattr(MultipleNegativesRankingLoss, "compute_loss_from_embeddings"):
        pytest.skip("this sentence-transformers has no MultipleNegativesRankingLoss.compute_loss_from_embeddings")
    # Its embedding-level entry point: the same score function and labels as the full loss, no model needed.
    return MultipleNegativesRankingLoss(None, scale=scale, similarity_fct=dot_score)


@pytest.mark.parametrize("onehot", ["single_target", "label_mix_1"])
def test_one_hot_equals_mnrl(onehot):
    b, d, tau = 29, 40, 0.05
    anchor = torch.nn.functional.normalize(torch.randn(b, d), dim=-1).requires_grad_()
    pos = torch.nn.functional.normalize(torch.randn(b, d), dim=-1).requires_grad_()
    neg = torch.nn.functional.normalize(torch.randn(b, d), dim=-1).requires_grad_()
    ref = _mnrl(1.0 / tau).compute_loss_from_embeddings([anchor, pos, neg], None)
    ref_g = torch.autograd.grad(ref, (anchor, pos, neg))

    a2, p2, n2 = (t.detach().clone().requires_grad_() for t in (anchor, pos, neg))
    passages = torch.cat([p2, n2])  # MNRL's candidate order: all positives, then all negatives
    if onehot == "single_target":
        idx = torch.full((b, 4), -1)
        idx[:, 2] = torch.arange(b)
        loss = utility_infonce(a2, passages, idx, torch.randn(b, 4), temperature=tau)
    else:  # arbitrary teacher targets, fully overridden by the gold label
        idx = torch.randint(0, 2 * b, (b, 4))
        loss = utility_infonce(a2, passages, idx, torch.randn(b, 4), temperature=tau, label_mix=1.0, gold_idx=torch.arange(b))
    g = torch.autograd.grad(loss, (a2, p2, n2))
    _close(loss, ref, 1e-6, "loss vs MNRL")
    for name, x, y in zip(("anchor", "positive", "negative"), g, ref_g):
        _close(x, y, 1e-5, f"d{name} vs MNRL")


def test_module_wraps_function():
    q, p, idx, util, gold = _inputs()
    mod = UtilityInfoNCE(temperature=0.1, teacher_temperature=0.5, label_mix=0.2)
    assert mod.scale == pytest.approx(10.0) and "label_mix=0.2" in repr(mod)
    out = mod(q, p, idx, util, gold)
    ref = utility_infonce(q, p, idx, util, temperature=0.1, teacher_temperature=0.5, label_mix=0.2, gold_idx=gold)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    ex = _exclusions(q, p, idx, gold)
    out = mod(q, p, idx, util, gold, exclude_idx=ex)
    ref = utility_infonce(q, p, idx, util, temperature=0.1, teacher_temperature=0.5, label_mix=0.2, gold_idx=gold,
                          exclude_idx=ex)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match="temperature"):
        UtilityInfoNCE(temperature=0.0)
    with pytest.raises(ValueError, match="label_mix"):
        UtilityInfoNCE(label_mix=1.5)
    with pytest.raises(ValueError, match="label_mix"):  # the op's rule at construction: a bool is not a weight
        UtilityInfoNCE(label_mix=True)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0, got an int of 401 digits"):
        UtilityInfoNCE(temperature=10**400)
    UtilityInfoNCE(label_mix=__import__("numpy").float32(0.1))  # a numpy scalar is a number
    assert uae_fast.utility_infonce is utility_infonce
    # numpy scalars are numbers; a bool is not a mixing weight
    import numpy as np

    ref = utility_infonce(q, p, idx, util, temperature=0.1, teacher_temperature=0.5, label_mix=0.25, gold_idx=gold)
    out = utility_infonce(q, p, idx, util, temperature=np.float32(0.1), teacher_temperature=np.float64(0.5),
                          label_mix=np.float32(0.25), gold_idx=gold)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="label_mix must be a number in"):
        utility_infonce(q, p, idx, util, label_mix=True, gold_idx=gold)


# ---------------------------------------------------------------------------- Triton vs torch
# Relative to max|reference|. fp32 differs from torch only in summation order; the 16-bit rows are bounded by
# the rounding of the returned gradients (and, on the Triton path, the 16-bit probabilities fed to tl.dot).
def _exclusions(q, p, idx, gold, e=3):
    """[B, e] per row: its highest-scoring non-target passages (they hold real softmax mass), -1 padded on
    some rows: the false negatives to drop."""
    order = (q.detach().double() @ p.detach().double().T).argsort(1, descending=True)
    ex = torch.full((idx.shape[0], e), -1, dtype=torch.long)
    for i in range(idx.shape[0]):
        taken = set(idx[i][idx[i] >= 0].tolist()) | ({int(gold[i])} if gold is not None and gold[i] >= 0 else set())
        free = [j for j in order[i].tolist() if j not in taken]
        ex[i, : (i % (e + 1))] = torch.tensor(free[: i % (e + 1)], dtype=torch.long)
    return ex


def _masked_reference(q, p, idx, util, ex, tau, mix, gold, reduction):
    """Float64 [B, N] reference with the excluded passages' scores at -inf."""
    qd = q.detach().double().requires_grad_()
    pd = p.detach().double().requires_grad_()
    y = torch.zeros(qd.shape[0], pd.shape[0], dtype=torch.float64)
    mask = torch.zeros_like(y, dtype=torch.bool)
    for i in range(qd.shape[0]):
        ks = [k for k in range(idx.shape[1]) if idx[i, k] >= 0]
        w = torch.softmax(torch.tensor([float(util[i, k]) for k in ks], dtype=torch.float64), 0)
        a = mix if gold[i] >= 0 else 0.0
        for k, wk in zip(ks, w):
            y[i, idx[i, k]] += (1 - a) * wk
        if a:
            y[i, gold[i]] += a
        for j in ex[i].tolist():
            if j >= 0:
                mask[i, j] = True
    ls = torch.log_softmax((qd @ pd.T / tau).masked_fill(mask, -math.inf), 1).masked_fill(mask, 0.0)
    loss = -(y * ls).sum(1)
    return M._reduce(loss, reduction), qd, pd


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_exclude_idx_matches_masked_reference(reduction):
    q, p, idx, util, gold = _inputs()
    ex = _exclusions(q, p, idx, gold)
    loss = utility_infonce(q, p, idx, util, temperature=0.07, label_mix=0.3, gold_idx=gold, reduction=reduction,
                           impl="torch", exclude_idx=ex)
    ref, qd, pd = _masked_reference(q, p, idx, util, ex, 0.07, 0.3, gold, reduction)
    _close(loss, ref, 2e-6, "loss")
    gq, gp = _grads(loss, q, p)
    rq, rp = _grads(ref, qd, pd)
    _close(gq, rq, 2e-5, "dq")
    _close(gp, rp, 2e-5, "dp")
    # it changes something, and all-padding exclusions change nothing
    plain = utility_infonce(q, p, idx, util, temperature=0.07, label_mix=0.3, gold_idx=gold, reduction=reduction, impl="torch")
    assert not torch.allclose(plain, loss)
    none = utility_infonce(q, p, idx, util, temperature=0.07, label_mix=0.3, gold_idx=gold, reduction=reduction,
                           impl="torch", exclude_idx=torch.full_like(ex, -1))
    _close(none, plain, 1e-6, "no exclusions")


def test_exclude_idx_float64_gradcheck():
    q, p, idx, util, gold = _inputs(b=5, n=11, d=6, k=3, dtype=torch.float64)
    ex = _exclusions(q, p, idx, None, e=2)
    f = lambda a, b: utility_infonce(a, b, idx, util, temperature=0.3, impl="torch", exclude_idx=ex, reduction="none")  # noqa: E731
    assert torch.autograd.gradcheck(f, (q, p))


def test_exclude_idx_errors():
    q, p, idx, util, gold = _inputs(b=4, n=9, d=8, k=3)
    ex = _exclusions(q, p, idx, gold, e=2)
    kw = dict(impl="torch", label_mix=0.5, gold_idx=gold)
    clash = ex.clone(); clash[1, 0] = idx[1, 0]
    with pytest.raises(ValueError, match=r"exclude_idx\[1, 0\] = .* is a target of row 1"):
        utility_infonce(q, p, idx, util, exclude_idx=clash, **kw)
    j = next(j for j in range(9) if j not in idx[2].tolist())
    g = gold.clone(); g[2] = j; far = ex.clone(); far[2, 0] = j
    with pytest.raises(ValueError, match="is a target of row 2"):  # the gold passage is a target too
        utility_infonce(q, p, idx, util, exclude_idx=far, impl="torch", label_mix=0.5, gold_idx=g)
    big = ex.clone(); big[0, 1] = 9
    with pytest.raises(ValueError, match=r"exclude_idx\[0, 1\] = 9 is out of range"):
        utility_infonce(q, p, idx, util, exclude_idx=big, **kw)
    with pytest.raises(ValueError, match="exclude_idx must be"):
        utility_infonce(q, p, idx, util, exclude_idx=ex[:2], **kw)
    with pytest.raises(TypeError, match="exclude_idx has dtype"):
        utility_infonce(q, p, idx, util, exclude_idx=ex.float(), **kw)


def test_exclude_idx_with_padded_targets_pointing_at_it():
    # Padded target slots point at passage 0 with weight 0; excluding passage 0 must not turn 0 * -inf into
    # NaN (found in a GPU training run). Rows 0-2 have padding, every row excludes passage 0.
    q, p, idx, util, gold = _inputs(b=6, n=20, d=8, k=3)
    idx[idx == 0] = 1
    idx[:3, 2] = -1
    ex = torch.zeros(6, 1, dtype=torch.long)
    for reduction in ("mean", "none"):
        loss = utility_infonce(q, p, idx, util, temperature=0.1, impl="torch", exclude_idx=ex, reduction=reduction)
        ref, qd, pd = _masked_reference(q, p, idx, util, ex, 0.1, 0.0, torch.full((6,), -1), reduction)
        assert loss.isfinite().all()
        _close(loss, ref, 2e-6, "loss")
        gq, gp = _grads(loss, q, p)
        rq, rp = _grads(ref, qd, pd)
        _close(gq, rq, 2e-5, "dq")
        _close(gp, rp, 2e-5, "dp")


def test_exclude_idx_dominant_false_negative_stays_exact():
    # The excluded passage holds ~all the mass (score 60 above the target): subtracting it from a full
    # log-sum-exp would cancel catastrophically; masking inside the sweep stays exact.
    q = torch.tensor([[1.0, 0.0]], requires_grad=True)
    p = torch.tensor([[0.0, 1.0], [3.0, 0.0], [0.2, 0.1]], requires_grad=True)
    idx, util = torch.tensor([[0]]), torch.zeros(1, 1)
    loss = utility_infonce(q, p, idx, util, temperature=0.05, impl="torch", exclude_idx=torch.tensor([[1]]))
    ref = -torch.log_softmax(torch.tensor([0.0, 0.2]).double() / 0.05, 0)[0]
    assert abs(loss.item() - ref.item()) < 1e-5 * ref.item()


_TOL = {torch.float32: (1e-5, 3e-5), torch.float16: (1e-5, 4e-3), torch.bfloat16: (1e-5, 2.5e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_matches_float64_reference(dtype, triton_device):
    q, p, idx, util, gold = _inputs(dtype=dtype)
    q, p = (t.detach().to(triton_device).requires_grad_() for t in (q, p))
    idx, util, gold = idx.to(triton_device), util.to(triton_device), gold.to(triton_device)
    red = "none" if dtype == torch.float32 else "mean"
    loss = utility_infonce(q, p, idx, util, temperature=0.07, label_mix=0.3, gold_idx=gold, reduction=red, impl="triton")
    gq, gp = _grads(loss, q, p)
    assert gq.isfinite().all() and gp.isfinite().all()
    ref, qd, pd = _reference(q.cpu(), p.cpu(), idx.cpu(), util.cpu(), 0.07, 1.0, 0.3, gold.cpu(), red)
    rq, rp = _grads(ref, qd, pd)
    tl_, tg = _TOL[dtype]
    _close(loss.cpu(), ref, tl_, f"{dtype} loss")
    _close(gq.cpu(), rq, tg, f"{dtype} dq")
    _close(gp.cpu(), rp, tg, f"{dtype} dp")
    # and against the torch path on the same inputs
    q2, p2 = q.detach().requires_grad_(), p.detach().requires_grad_()
    t_loss = utility_infonce(q2, p2, idx, util, temperature=0.07, label_mix=0.3, gold_idx=gold, reduction=red, impl="torch")
    tq, tp = _grads(t_loss, q2, p2)
    _close(loss, t_loss, tl_, "triton vs torch loss")
    _close(gq, tq, tg, "triton vs torch dq")
    _close(gp, tp, tg, "triton vs torch dp")


# The Triton kernels themselves (every option, poisoned buffers, chunking): tests/test_infonce_triton.py.


def test_triton_float64_rules(triton_device):
    q, p, idx, util, _ = (t.to(triton_device) for t in _inputs(b=4, n=9, d=8, k=2, dtype=torch.float64))
    with pytest.raises(TypeError, match="float64"):
        utility_infonce(q, p, idx, util, impl="triton")
    got = utility_infonce(q, p, idx, util, impl="auto")  # auto falls back to the exact torch path
    assert got.dtype == torch.float64 and torch.equal(got, utility_infonce(q, p, idx, util, impl="torch"))


# ---------------------------------------------------------------------------- bad input
def _bad_cases():
    q, p, idx, util, gold = _inputs(b=4, n=9, d=8, k=3)
    q, p = q.detach(), p.detach()
    cases = {}

    def case(name, exc, match, **over):
        args = dict(q=q, p=p, target_idx=idx, target_utility=util)
        kwargs = {k: over.pop(k) for k in list(over) if k not in args}
        args.update(over)
        cases[name] = (exc, match, args, kwargs)

    big = idx.clone(); big[2, 1] = 9
    neg = idx.clone(); neg[0, 0] = -2
    allpad = idx.clone(); allpad[3] = -1
    nan_u = util.clone(); nan_u[0, 0] = math.nan
    idx_ok = idx.clone(); idx_ok[0, 0] = 1
    nan_q = q.clone(); nan_q[1, 2] = math.nan
    inf_p = p.clone(); inf_p[5, 0] = math.inf
    case("index >= N", ValueError, r"target_idx\[2, 1\] = 9 is out of range", target_idx=big)
    case("index < -1", ValueError, r"target_idx\[0, 0\] = -2", target_idx=neg)
    case("all-padding row", ValueError, "target_idx row 3 is all padding", target_idx=allpad)
    case("nan utility", ValueError, r"target_utility\[0, 0\]", target_idx=idx_ok, target_utility=nan_u)
    case("nan q", ValueError, "q contains 1 NaN", q=nan_q)
    case("inf p", ValueError, "p contains 1 NaN or inf", p=inf_p)
    case("d mismatch", ValueError, "d=8 but p is", p=p[:, :7])
    case("B mismatch", ValueError, "target_idx must be", target_idx=idx[:3], target_utility=util[:3])
    case("utility shape", ValueError, "target_utility must have the shape", target_utility=util[:, :2])
    case("dtype mismatch", TypeError, "p has dtype", p=p.half())
    case("float index", TypeError, "target_idx has dtype", target_idx=idx.float())
    case("1-d targets", ValueError, "target_idx must have 2 dims", target_idx=idx[:, 0], target_utility=util[:, 0])
    case("device mismatch", ValueError, "p is on meta", p=p.to("meta"))
    case("not a tensor", TypeError, "q must be a torch.Tensor", q=q.tolist())
    case("int embeddings", TypeError, "q has dtype", q=q.long())
    case("label_mix needs gold", ValueError, "gold_idx", label_mix=0.5)
    case("gold out of range", ValueError, r"gold_idx\[1\] = 99", label_mix=0.5, gold_idx=torch.tensor([0, 99, 1, 2]))
    case("gold shape", ValueError, "gold_idx must be", label_mix=0.5, gold_idx=gold[:2])
    case("temperature", ValueError, "temperature must be", temperature=0.0)
    case("teacher_temperature", ValueError, "teacher_temperature must be", teacher_temperature=-1.0)
    case("label_mix range", ValueError, "label_mix must be", label_mix=1.5)
    case("reduction", ValueError, "reduction must be", reduction="avg")
    case("impl", ValueError, "impl must be", impl="cuda")
    case("utility grad", ValueError, "target_utility requires grad", target_utility=util.nan_to_num().requires_grad_())
    case("empty p", ValueError, "empty input", p=p[:0])
    return cases


_CASES = _bad_cases()


@pytest.mark.parametrize("name", list(_CASES))
def test_bad_input_names_the_argument(name):
    exc, match, args, kwargs = _CASES[name]
    with pytest.raises(exc, match=match):
        utility_infonce(args["q"], args["p"], args["target_idx"], args["target_utility"], **{"impl": "torch", **kwargs})


def test_fp64_label_mix_stays_fp64():
    # the mix weight was built as a float32 where() and rounded 0.3 -> 0.30000001192 before reaching float64
    from uae_fast.ops.infonce import _teacher_weights

    _, w = _teacher_weights(torch.tensor([[0]]), torch.tensor([[0.0]], dtype=torch.float64), 1.0, 0.3,
                            torch.tensor([1]), torch.float64)
    assert w.dtype == torch.float64 and w.tolist() == [[0.7, 0.3]]


def test_tf32_reading_follows_the_new_and_the_legacy_switch(monkeypatch):
    # torch >= 2.9 raises on reading allow_tf32 after matmul.fp32_precision was set; the table key must not
    from uae_fast.ops._infonce_auto import tf32_matmul

    m = torch.backends.cuda.matmul
    if not hasattr(m, "fp32_precision"):
        pytest.skip("this torch has only the legacy switch")
    old = m.fp32_precision
    try:
        m.fp32_precision = "tf32"
        assert tf32_matmul() is True
        from uae_fast.ops._infonce_auto import key  # read allow_tf32 directly before: a RuntimeError here

        assert key(torch.device("cpu"), torch.float32)[2] == "tf32"
        m.fp32_precision = "ieee"
        assert tf32_matmul() is False
    finally:
        m.fp32_precision = old
