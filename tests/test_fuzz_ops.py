"""Hostile inputs for the three ops (#19): regressions for the defects found, then property tests
(hypothesis) over random shapes, dtypes, strides, magnitudes from 1e-40 to 1e40, temperatures and index
values. Every call either matches the float64 reference (to a tolerance derived from the compute dtype
and the input magnitudes) or raises one clear ValueError; never a NaN, an inf or a crash. The Triton
kernels run in the CPU interpreter (slow), so they get a handful of examples; the torch paths the rest.
"""
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from uae_fast import TopKIndex
from uae_fast.ops.infonce import utility_infonce
from uae_fast.ops.logprobs import token_logprobs

from conftest import TRITON_DEVICE

EMB = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
IDX = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64]
FUZZ = settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
FEW = settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _eps(dtype):
    return torch.finfo(_acc(dtype)).eps


def _temp_ok(t, dtype):
    fi = torch.finfo(_acc(dtype))
    return fi.tiny <= t <= fi.max


def _strided(t, layout):
    """The same values as ``t`` in a different memory layout: 0 contiguous, 1 column-major, 2 every other element."""
    if layout == 0 or t.dim() == 0:
        return t
    if layout == 1 and t.dim() == 2:
        return t.t().contiguous().t()
    big = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    big[..., ::2] = t
    return big[..., ::2]


# Exponents of magnitudes: half ordinary (where results must match), half anywhere in 1e-40..1e40.
EXP = st.one_of(st.integers(-2, 2), st.integers(-40, 40))
BAD_INDEX = st.sampled_from([None] * 6 + ["high", "low"])
TEMP = st.one_of(st.sampled_from([0.05, 1.0]), st.integers(-46, 44).map(lambda e: 10.0**e))


def _draw(gen, shape, exp, dtype):
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * 10.0**exp).to(dtype)


def _index_range(idx_dtype, n):
    """Indices this dtype can hold for an axis of length n: [0, hi); and whether it has -1 / negative values."""
    info = torch.iinfo(idx_dtype)
    return min(n, info.max + 1), info.min < 0


# ---- regressions -------------------------------------------------------------------------------------


@pytest.mark.parametrize("idx_dtype", IDX, ids=str)
def test_narrow_index_dtypes_are_range_checked_exactly(idx_dtype):
    """#19 defect 7: uint8 < -1 and int16 >= 49152 wrapped, rejecting valid indices (or accepting bad ones)."""
    hi, signed = _index_range(idx_dtype, 300)
    n = 300 if hi < 300 else 200  # uint8/int8: an N beyond the dtype; wider ones: an N they can reach
    q, p = torch.randn(4, 8, dtype=torch.float64), torch.randn(n, 8, dtype=torch.float64)
    hi = min(n, torch.iinfo(idx_dtype).max + 1)
    rows = [[hi - 1, 0], [1, hi - 1], [hi - 2, 3], [0, 0]]
    if signed:
        rows[3] = [0, -1]
    idx = torch.tensor(rows).to(idx_dtype)
    util = torch.randn(4, 2, dtype=torch.float64)
    gold = torch.tensor([hi - 1, 0, 2, -1 if signed else 1]).to(idx_dtype)
    ex = torch.tensor([[5], [6], [7], [8]]).to(idx_dtype)
    kw = dict(label_mix=0.5, reduction="none")
    got = utility_infonce(q, p, idx, util, gold_idx=gold, exclude_idx=ex, **kw)
    ref = utility_infonce(q, p, idx.long(), util, gold_idx=gold.long(), exclude_idx=ex.long(), **kw)
    assert torch.equal(got, ref)
    if hi == n:  # N itself is representable: it must be rejected, for each index argument
        with pytest.raises(ValueError, match=rf"target_idx\[0, 0\] = {n} is out of range"):
            utility_infonce(q, p, torch.full((4, 1), n).to(idx_dtype), util[:, :1])
        with pytest.raises(ValueError, match=rf"gold_idx\[0\] = {n} is out of range"):
            utility_infonce(q, p, idx, util, label_mix=0.5, gold_idx=torch.full((4,), n).to(idx_dtype))
        with pytest.raises(ValueError, match=rf"exclude_idx\[0, 0\] = {n} is out of range"):
            utility_infonce(q, p, idx, util, exclude_idx=torch.full((4, 1), n).to(idx_dtype))
    if signed:
        with pytest.raises(ValueError, match=r"target_idx\[0, 0\] = -2"):
            utility_infonce(q, p, torch.full((4, 1), -2).to(idx_dtype), util[:, :1])


@pytest.mark.parametrize("idx_dtype", IDX, ids=str)
@pytest.mark.parametrize("v", [200, 49152])
def test_narrow_token_targets_at_the_vocabulary_boundary(idx_dtype, v):
    """#19 defect 7: int16 targets were always rejected at V=49152, int8 ones at V=200."""
    hi, signed = _index_range(idx_dtype, v)
    h, w = torch.randn(4, 8, dtype=torch.float64), torch.randn(v, 8, dtype=torch.float64)
    t = torch.tensor([hi - 1, 0, hi // 2, -100 if signed and torch.iinfo(idx_dtype).min <= -100 else 1])
    got = token_logprobs(h, w, t.to(idx_dtype))
    assert torch.equal(got, token_logprobs(h, w, t))
    if hi == v:
        with pytest.raises(ValueError, match=f"targets contains {v}, outside"):
            token_logprobs(h, w, torch.tensor([0, v, 1, 2]).to(idx_dtype))


@pytest.mark.parametrize(
    "what,kwargs,match",
    [
        ("embeddings 1e20", dict(scale=1e20), "utility_infonce: the loss overflowed"),
        ("temperature 1e-39", dict(temperature=1e-39), r"temperature must be in \[1.18e-38"),
        ("teacher_temperature 1e39", dict(teacher_temperature=1e39), "teacher_temperature must be in"),
        ("teacher_temperature 1e-46", dict(teacher_temperature=1e-46), "teacher_temperature must be in"),
        ("utility beyond float32", dict(util_scale=1e300), r"target_utility\[0, 0\] = .* is not finite in float32"),
        ("meta tensors", dict(device="meta"), "q is a meta tensor"),
    ],
)
def test_infonce_extreme_inputs_raise_instead_of_nan(what, kwargs, match):
    """#19 defect 8: these returned a NaN loss; token_logprobs raised 'log-sum-exp overflowed'."""
    scale, util_scale, device = kwargs.pop("scale", 1.0), kwargs.pop("util_scale", 1.0), kwargs.pop("device", "cpu")
    q, p = torch.randn(4, 8) * scale, torch.randn(6, 8) * scale
    idx = torch.tensor([[1, 2], [2, 3], [3, 4], [5, 0]])
    util = torch.randn(4, 2, dtype=torch.float64) * util_scale
    args = [t.to(device) for t in (q, p, idx, util)]
    with pytest.raises(ValueError, match=match):
        utility_infonce(*args, **kwargs)
    if what.startswith("temperature") or what.startswith("teacher"):  # fp64 computes them fine, and right
        got = utility_infonce(q.double(), p.double(), idx, util, reduction="none", **kwargs)
        ref = _ref_infonce(q, p, idx, util, kwargs.get("temperature", 0.05), kwargs.get("teacher_temperature", 1.0),
                           0.0, None, None)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_infonce_gradient_overflow(reduction):
    """A finite loss can still have gradients beyond the accumulation dtype (1/temperature scales them): fp32
    scores ~3e36, dq ~ 100 / 1e-37 = 1e39, the same error as the loss's. An fp16 gradient that overflows only in
    its cast to fp16 (1e5 > 65504, or a GradScaler's 65536 x loss) comes back inf, as autograd's own ops give it:
    the scaler then skips the step; raising would stop fp16 training at its first scaled step."""
    q = (torch.randn(4, 8) * 1e-3).requires_grad_()
    p = (torch.randn(6, 8) * 100).requires_grad_()
    idx, util = torch.tensor([[1], [2], [3], [5]]), torch.zeros(4, 1)
    loss = utility_infonce(q, p, idx, util, temperature=1e-37, reduction=reduction)
    assert torch.isfinite(loss).all()
    with pytest.raises(ValueError, match="utility_infonce: the gradient overflowed"):
        loss.sum().backward()
    q16 = torch.randn(4, 8).half().requires_grad_()
    p16 = (torch.randn(6, 8) * 100).half().requires_grad_()
    loss = utility_infonce(q16, p16, idx, util, temperature=1e-3, reduction=reduction)
    assert torch.isfinite(loss).all()
    loss.sum().backward()
    assert not torch.isfinite(q16.grad).all() and q16.grad.dtype == torch.float16  # dq ~ |p| / temperature = 1e5
    ref_q = torch.randn(4, 8).half().requires_grad_()  # plain autograd agrees: its fp16 gradient is inf too
    (torch.nn.functional.cross_entropy((ref_q @ p16.detach().t()).float() / 1e-3, idx[:, 0], reduction="sum")
     * 65536).backward()
    assert not torch.isfinite(ref_q.grad).all()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_infonce_nonfinite_passthrough_returns_inf_instead_of_raising(reduction):
    """What ``uae train`` runs the loss in: an overflow, of the loss or only of a gradient, comes back non-finite
    (so a rank whose loss overflowed still reaches the collectives) and the trainer stops every rank."""
    from uae_fast.ops.infonce import nonfinite_passthrough

    idx, util = torch.tensor([[1], [2], [3], [5]]), torch.zeros(4, 1)
    q = (torch.randn(4, 8) * 1e-3).requires_grad_()
    p = (torch.randn(6, 8) * 100).requires_grad_()
    with nonfinite_passthrough():  # the gradient overflows, the loss does not (test above)
        loss = utility_infonce(q, p, idx, util, temperature=1e-37, reduction=reduction)
    assert torch.isfinite(loss).all()
    loss.sum().backward()  # outside the block: the choice was made in forward
    assert not (torch.isfinite(q.grad).all() and torch.isfinite(p.grad).all())
    big = torch.randn(4, 8) * 1e36  # scores ~1e36 * 100 / 0.05: beyond float32
    with nonfinite_passthrough():
        assert not torch.isfinite(utility_infonce(big, p.detach(), idx, util, reduction=reduction)).all()
    with pytest.raises(ValueError, match="the loss overflowed"):  # and strict again after the block
        utility_infonce(big, p.detach(), idx, util, reduction=reduction)


@pytest.mark.parametrize("idx_dtype", [torch.uint8, torch.int16], ids=str)
def test_gather_with_grad_takes_narrow_indices(idx_dtype):
    from uae_fast import gather_with_grad

    p = torch.randn(300, 4)
    idx = torch.tensor([[255, 0]]).to(idx_dtype)  # uint8 < -1 used to wrap and reject every index
    _, shifted = gather_with_grad(p, idx)
    assert shifted.tolist() == [[255, 0]]


def test_ops_reject_meta_and_sparse_tensors():
    h, w = torch.randn(3, 4), torch.randn(5, 4)
    with pytest.raises(ValueError, match="hidden is a meta tensor"):
        token_logprobs(h.to("meta"), w.to("meta"), torch.zeros(3, dtype=torch.long, device="meta"))
    with pytest.raises(TypeError, match="weight is a sparse_coo tensor"):
        token_logprobs(h, w.to_sparse(), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature must be in"):
        token_logprobs(h, w, torch.zeros(3, dtype=torch.long), temperature=1e-39)


# ---- token_logprobs ----------------------------------------------------------------------------------


def _ref_logprobs(h, w, t, temperature, ignore_index):
    z = h.double() @ w.double().T / temperature
    lse = torch.logsumexp(z, dim=1)
    valid = t.long() != ignore_index
    lp = z.gather(1, torch.where(valid, t.long(), 0)[:, None]).squeeze(1) - lse
    return torch.where(valid, lp, torch.zeros_like(lp))


def _logprobs_case(data, dtypes):
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    n, d = data.draw(st.integers(1, 5), label="n"), data.draw(st.integers(1, 7), label="d")
    v = data.draw(st.sampled_from([1, 2, 5, 37, 130, 300]), label="V")
    dtype = data.draw(st.sampled_from(dtypes), label="dtype")
    idx_dtype = data.draw(st.sampled_from(IDX), label="idx_dtype")
    h = _draw(gen, (n, d), data.draw(EXP, label="h exp"), dtype)
    w = _draw(gen, (v, d), data.draw(EXP, label="w exp"), dtype)
    temperature = data.draw(TEMP, label="temperature")
    hi, signed = _index_range(idx_dtype, v)
    t = torch.randint(0, hi, (n,), generator=gen)
    t[0], t[-1] = hi - 1, 0  # both ends of the representable range
    ignore = -100
    if signed and torch.iinfo(idx_dtype).min <= ignore and n > 2:
        t[1] = ignore
    bad = data.draw(BAD_INDEX, label="bad index")
    if bad == "high" and hi == v:
        t[0] = v
    elif bad == "low" and signed:
        t[0] = -5
    else:
        bad = None
    layout = data.draw(st.integers(0, 2), label="layout")
    return _strided(h, layout), _strided(w, 2 - layout), _strided(t.to(idx_dtype)[None], layout)[0], temperature, bad


def _expect_error(call, problems):
    """``problems``: the message of each thing wrong with the input; the op must raise one of them."""
    event("bad input: error")
    with pytest.raises(ValueError) as e:
        call()
    assert any(p in str(e.value) for p in problems), (str(e.value), problems)


def _check_logprobs(h, w, t, temperature, bad, impl):
    call = lambda: token_logprobs(h, w, t, temperature=temperature, impl=impl)  # noqa: E731
    problems = [m for m, wrong in [
        ("outside", bad),
        ("NaN or inf", not (torch.isfinite(h).all() and torch.isfinite(w).all())),
        ("temperature must be in", not _temp_ok(temperature, h.dtype)),
    ] if wrong]
    if problems:
        return _expect_error(call, problems)
    zabs = float((h.double().abs() @ w.double().abs().T).max())
    risky = _acc(h.dtype) == torch.float32 and max(zabs, zabs / temperature) > 1e37
    try:
        got = call()
    except ValueError as e:
        assert risky and "log-sum-exp overflowed" in str(e), str(e)
        event("overflow: error")
        return
    event("compared with float64")
    assert torch.isfinite(got).all()
    ref = _ref_logprobs(h, w, t, temperature, -100)
    atol = 8 * (h.shape[1] + 4) * _eps(h.dtype) * (zabs / temperature + 1.0) + 1e-30
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=atol)


@FUZZ
@given(data=st.data())
def test_token_logprobs_fuzz_torch(data):
    _check_logprobs(*_logprobs_case(data, EMB), impl="torch")


@FEW
@given(data=st.data())
def test_token_logprobs_fuzz_triton(data):
    h, w, t, temperature, bad = _logprobs_case(data, [torch.float32, torch.bfloat16])
    _check_logprobs(h.to(TRITON_DEVICE), w.to(TRITON_DEVICE), t.to(TRITON_DEVICE), temperature, bad, impl="triton")


# ---- utility_infonce ---------------------------------------------------------------------------------


def _ref_infonce(q, p, idx, util, temperature, teacher_temperature, label_mix, gold, ex):
    s = q.double() @ p.double().T / temperature
    if ex is not None:
        r, c = (ex.long() >= 0).nonzero(as_tuple=True)
        s[r, ex.long()[r, c]] = -math.inf
    lse = torch.logsumexp(s, dim=1)
    t = idx.long()
    valid = t >= 0
    u = util.double().masked_fill(~valid, -math.inf)
    wts = torch.softmax((u - u.amax(1, keepdim=True)) / teacher_temperature, dim=1).masked_fill(~valid, 0.0)
    tgt = (torch.where(wts > 0, wts * s.gather(1, t.clamp_min(0)), 0.0)).sum(1)
    if label_mix > 0:
        g = gold.long()
        alpha = (g >= 0).double() * label_mix  # float64 throughout (a float32 where() rounds label_mix)
        gold_s = s.gather(1, g.clamp_min(0)[:, None]).squeeze(1)
        tgt = torch.where(g >= 0, (1 - alpha) * tgt + alpha * gold_s, tgt)
    return lse - tgt


def _infonce_case(data, dtypes, allow_exclude=True):
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    b, n = data.draw(st.integers(1, 4), label="B"), data.draw(st.integers(1, 6), label="N")
    d, k = data.draw(st.integers(1, 5), label="d"), data.draw(st.integers(1, 3), label="K")
    dtype = data.draw(st.sampled_from(dtypes), label="dtype")
    idx_dtype = data.draw(st.sampled_from(IDX), label="idx_dtype")
    q = _draw(gen, (b, d), data.draw(EXP, label="q exp"), dtype)
    p = _draw(gen, (n, d), data.draw(EXP, label="p exp"), dtype)
    util_dtype = data.draw(st.sampled_from(EMB), label="util dtype")
    util = _draw(gen, (b, k), data.draw(EXP, label="util exp"), util_dtype)
    temperature = data.draw(TEMP, label="temperature")
    teacher_temperature = data.draw(TEMP, label="teacher_temperature")
    label_mix = data.draw(st.sampled_from([0.0, 0.3, 1.0]), label="label_mix")
    hi, signed = _index_range(idx_dtype, n)
    idx = torch.randint(0, hi, (b, k), generator=gen)
    idx[0, 0] = hi - 1
    if signed and k > 1:  # padding, but never a whole row
        idx[:, 1:] = torch.where(torch.rand(b, k - 1, generator=gen) < 0.4, -1, idx[:, 1:])
    gold = None
    if label_mix > 0:
        gold = torch.randint(0, hi, (b,), generator=gen)
        if signed:
            gold[-1] = -1
    ex = None
    if allow_exclude and signed and data.draw(st.booleans(), label="exclude"):
        ex = torch.full((b, 2), -1)
        for r in range(b):
            taken = set(idx[r].tolist()) | ({int(gold[r])} if gold is not None else set())
            free = [j for j in range(hi) if j not in taken][:2]
            ex[r, : len(free)] = torch.tensor(free, dtype=torch.long)
    bad = data.draw(BAD_INDEX, label="bad index")
    if bad == "high" and hi == n:
        idx[0, 0] = n
    elif bad == "low" and signed:
        idx[0, 0] = -3
    else:
        bad = None
    layout = data.draw(st.integers(0, 2), label="layout")
    cast = lambda t: None if t is None else t.to(idx_dtype)  # noqa: E731
    return (_strided(q, layout), _strided(p, 2 - layout), _strided(cast(idx), layout), _strided(util, layout),
            dict(temperature=temperature, teacher_temperature=teacher_temperature, label_mix=label_mix,
                 gold_idx=cast(gold), exclude_idx=cast(ex)), bad)


def _check_infonce(q, p, idx, util, kw, bad, impl, grad):
    def call():
        qq, pp = q.clone().requires_grad_(grad), p.clone().requires_grad_(grad)
        loss = utility_infonce(qq, pp, idx, util, reduction="none" if not grad else "sum", impl=impl, **kw)
        if grad:
            loss.backward()
        return loss.detach(), (qq.grad, pp.grad)

    valid = idx.long() >= 0
    problems = [m for m, wrong in [
        ("out of range", bad),
        ("NaN or inf", not (torch.isfinite(q).all() and torch.isfinite(p).all())),
        ("temperature must be in", not _temp_ok(kw["temperature"], q.dtype)),
        ("teacher_temperature must be in", not _temp_ok(kw["teacher_temperature"], q.dtype)),
        ("target_utility", not bool((torch.isfinite(util.to(_acc(q.dtype))) | ~valid).all())),
    ] if wrong]
    if problems:
        return _expect_error(call, problems)
    tau = kw["temperature"]
    sabs = float((q.double().abs() @ p.double().abs().T).max())
    # Gradients are ~ max|q|, max|p| times 1/temperature, summed over rows ("sum" reduction).
    gmax = 2 * max(float(p.double().abs().max()), float(q.double().abs().max())) / tau * q.shape[0]
    limit = 1e37 if _acc(q.dtype) == torch.float32 else 1e300
    risky = max(sabs, sabs / tau) > limit or (grad and gmax > min(limit, torch.finfo(q.dtype).max / 8))
    try:
        loss, grads = call()
    except ValueError as e:
        assert risky and "overflowed" in str(e), str(e)
        event("overflow: error")
        return
    event("compared with float64")
    ref = _ref_infonce(q, p, idx, util, tau, kw["teacher_temperature"], kw["label_mix"], kw["gold_idx"], kw["exclude_idx"])
    if grad:
        ref = ref.sum()
        if not all(g is None or torch.isfinite(g).all() for g in grads):
            # finite in the fp32 accumulation, beyond fp16 only in the cast: inf, as autograd gives it (GradScaler)
            assert risky and q.dtype == torch.float16
            event("overflow: inf fp16 gradient")
    assert torch.isfinite(loss).all()
    err = 8 * (q.shape[1] + idx.shape[1] + 4) * _eps(q.dtype) * (sabs / tau + 1.0)
    atol = err * (q.shape[0] if grad else 1) + 1e-30
    torch.testing.assert_close(loss.double(), ref, rtol=0, atol=atol)
    if grad and all(torch.isfinite(g).all() for g in grads):  # both gradients against float64 autograd
        q64, p64 = q.double().requires_grad_(), p.double().requires_grad_()
        _ref_infonce(q64, p64, idx, util, tau, kw["teacher_temperature"], kw["label_mix"], kw["gold_idx"],
                     kw["exclude_idx"]).sum().backward()
        fi = torch.finfo(q.dtype)  # + the rounding of the cast to the inputs' dtype (subnormals: absolute)
        for g, want in zip(grads, (q64.grad, p64.grad)):
            torch.testing.assert_close(g.double(), want, rtol=fi.eps, atol=err * gmax + fi.tiny * fi.eps)


@FUZZ
@given(data=st.data(), grad=st.booleans())
def test_utility_infonce_fuzz_torch(data, grad):
    q, p, idx, util, kw, bad = _infonce_case(data, EMB)
    _check_infonce(q, p, idx, util, kw, bad, "torch", grad)


@FEW
@given(data=st.data())
def test_utility_infonce_fuzz_triton(data):
    q, p, idx, util, kw, bad = _infonce_case(data, [torch.float32, torch.bfloat16], allow_exclude=False)
    dev = TRITON_DEVICE
    kw = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    _check_infonce(q.to(dev), p.to(dev), idx.to(dev), util.to(dev), kw, bad, "triton", grad=False)


# ---- TopKIndex.search --------------------------------------------------------------------------------


@FUZZ
@given(data=st.data())
def test_topk_search_fuzz(data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    n, d = data.draw(st.integers(1, 40), label="n"), data.draw(st.integers(1, 12), label="d")
    dtype = data.draw(st.sampled_from(["float32", "bfloat16", "int8"]), label="dtype")
    metric = data.draw(st.sampled_from(["ip", "cosine"]), label="metric")
    near_overflow = st.integers(16, 22)  # |q| |x| around float32's 3.4e38
    ex, eq = data.draw(st.one_of(EXP, near_overflow), label="x exp"), data.draw(st.one_of(EXP, near_overflow), label="q exp")
    x64 = rng.standard_normal((n, d)) * 10.0**ex
    q64 = rng.standard_normal((3, d)) * 10.0**eq
    kind = data.draw(st.sampled_from(["numpy64", "numpy16", "torch32", "torchbf16", "strided"]), label="input kind")
    conv = {
        "numpy64": lambda a: a,
        "numpy16": lambda a: a.astype(np.float16),
        "torch32": lambda a: torch.from_numpy(a).float(),
        "torchbf16": lambda a: torch.from_numpy(a).to(torch.bfloat16),
        "strided": lambda a: np.asfortranarray(a.astype(np.float32))[:, ::1],
    }[kind]
    x, q = conv(x64), conv(q64)
    k = data.draw(st.integers(1, n), label="k")
    ids = rng.choice(10**6, size=n, replace=False) if data.draw(st.booleans(), label="custom ids") else None
    index = TopKIndex(d, dtype=dtype, metric=metric, candidates=n)  # candidates=n: exact for what is stored

    def as64(a):
        a = a.float().numpy() if isinstance(a, torch.Tensor) else a
        with np.errstate(over="ignore"):
            return np.asarray(a, dtype=np.float32).astype(np.float64)

    x32, q32 = as64(x), as64(q)
    try:
        index.add(x, ids=ids)
        scores, got = (np.asarray(r) for r in index.search(q, k))  # torch queries give torch results
    except ValueError as e:
        msg = str(e)
        nonfinite = not (np.isfinite(x32).all() and np.isfinite(q32).all())
        beyond_bf16 = dtype == "bfloat16" and max(np.abs(x32).max(), np.abs(q32).max()) > 3.3895e38
        zero = metric == "cosine" and ((x32 == 0).all(1).any() or (q32 == 0).all(1).any())
        bound = np.linalg.norm(x32, axis=1).max() * np.linalg.norm(q32, axis=1).max()
        overflow = metric == "ip" and bound > 1e38
        assert (("NaN or inf" in msg and nonfinite) or ("bfloat16's range" in msg and beyond_bf16)
                or ("zero norm" in msg and zero) or ("could overflow" in msg and overflow)), msg
        event("error")
        return
    event("compared with float64")
    assert np.isfinite(scores).all() and (np.diff(scores, axis=1) <= 0).all()
    stored = index.reconstruct().astype(np.float64)  # what the index holds (rounded for compact dtypes)
    qn = q32 / np.linalg.norm(q32, axis=1, keepdims=True) if metric == "cosine" else q32
    true = qn @ stored.T
    bound = np.linalg.norm(qn, axis=1)[:, None] * np.linalg.norm(stored, axis=1).max()
    atol = 8 * (d + 2) * 2.0**-24 * bound + 1e-36 * d  # float32 scores; below ~1e-36 they underflow
    all_ids = np.arange(n) if ids is None else ids
    pos = np.array([[int(np.flatnonzero(all_ids == i)[0]) for i in row] for row in got])
    assert all(len(set(row)) == k for row in pos.tolist())
    got_true = np.take_along_axis(true, pos, 1)
    assert (np.abs(scores - got_true) <= atol).all()
    missed = true.copy()
    np.put_along_axis(missed, pos, -np.inf, 1)
    assert (missed.max(1, initial=-np.inf) <= got_true.min(1) + atol[:, 0]).all()  # no better vector left out
