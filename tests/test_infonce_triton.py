"""utility_infonce(impl="triton"): the GEMM-shaped kernel against float64 references at small odd shapes.

On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, conftest) with small tiles (16 x 32 x 16),
so every shape below has ragged row, column and d edges; on a CUDA machine the same tests run the real
kernels with their GPU tiles. The impl="auto" table is tested at the end.
"""
import math

import pytest
import torch

from uae_fast import utility_infonce
from uae_fast.ops import _infonce_auto as A
from uae_fast.ops import _infonce_gemm_triton as G

# Relative to max|reference|: the loss is fp32 math on exact 16-bit products; the gradients are rounded to
# the input dtype on return and, for 16-bit inputs, pass through E = exp(s - M) stored in that dtype.
_TOL = {torch.float32: (2e-6, 2e-5), torch.float16: (2e-6, 4e-3), torch.bfloat16: (2e-6, 2.5e-2)}


def _case(b, n, d, k, e, dtype, dev, scale=0.4, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(b, d, generator=g) * scale).to(dtype)
    p = (torch.randn(n, d, generator=g) * scale).to(dtype)
    idx = torch.randint(0, n, (b, k), generator=g)
    if k > 1:
        idx[::3, 1:] = -1  # padded slots (they point at passage 0 with weight 0 inside)
    util = torch.randn(b, k, generator=g)
    util[idx < 0] = math.nan  # ignored at padding
    gold = torch.randint(0, n, (b,), generator=g)
    gold[::4] = -1
    ex = torch.full((b, max(e, 1)), -1, dtype=torch.long)
    for i in range(b):  # the row's highest-scoring non-targets (real softmax mass), 0..e of them per row
        taken = set(idx[i][idx[i] >= 0].tolist()) | {int(gold[i])}
        order = (q[i].double() @ p.double().T).argsort(descending=True).tolist()
        free = [j for j in order if j not in taken][: i % (e + 1)]
        ex[i, : len(free)] = torch.tensor(free, dtype=torch.long)
    to = lambda t: t.to(dev)  # noqa: E731
    return to(q), to(p), to(idx), to(util), to(gold), (to(ex) if e else None)


def _reference(q, p, idx, util, gold, ex, tau, tau_t, mix, reduction):
    """Materialised float64 loss: -sum_j y_ij log_softmax_j(s_ij), excluded scores at -inf."""
    qd = q.detach().cpu().double().requires_grad_()
    pd = p.detach().cpu().double().requires_grad_()
    idx, util = idx.cpu(), util.cpu()
    b, n = qd.shape[0], pd.shape[0]
    valid = idx >= 0
    w = torch.softmax(torch.where(valid, util.double() / tau_t, -math.inf), 1).masked_fill(~valid, 0.0)
    a = torch.where(gold.cpu() >= 0, mix, 0.0).double() if mix else torch.zeros(b, dtype=torch.float64)
    y = torch.zeros(b, n, dtype=torch.float64).scatter_add_(1, idx.clamp_min(0), w * (1 - a)[:, None])
    if mix:
        y.scatter_add_(1, gold.cpu().clamp_min(0)[:, None], a[:, None])
    s = qd @ pd.T / tau
    mask = torch.zeros(b, n, dtype=torch.bool)
    if ex is not None:
        r, c = (ex.cpu() >= 0).nonzero(as_tuple=True)
        mask[r, ex.cpu()[r, c]] = True
    ls = torch.log_softmax(s.masked_fill(mask, -math.inf), 1).masked_fill(mask, 0.0)
    loss = -(y * ls).sum(1)
    loss = {"mean": loss.mean(), "sum": loss.sum(), "none": loss}[reduction]
    return loss, qd, pd


def _upstream(loss, seed=3):
    return (torch.rand(loss.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.5)


def _close(a, b, tol, what):
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    err = (a - b).abs().max().item()
    ref = max(b.abs().max().item(), 1e-12)
    assert err <= tol * ref, f"{what}: max|diff| {err:.3g} > {tol:g} * max|ref| {ref:.3g}"


def _run(q, p, idx, util, gold, ex, *, reduction, mix, tau=0.07, tau_t=0.8):
    q, p = q.detach().requires_grad_(), p.detach().requires_grad_()
    kw = dict(temperature=tau, teacher_temperature=tau_t, label_mix=mix, gold_idx=gold if mix else None,
              reduction=reduction, exclude_idx=ex)
    loss = utility_infonce(q, p, idx, util, impl="triton", **kw)
    go = _upstream(loss).to(device=loss.device, dtype=loss.dtype)
    gq, gp = torch.autograd.grad(loss, (q, p), go)
    return loss, gq, gp


def _check_against_reference(case, *, reduction, mix, dtype, tau=0.07):
    q, p, idx, util, gold, ex = case
    loss, gq, gp = _run(q, p, idx, util, gold, ex, reduction=reduction, mix=mix, tau=tau)
    assert loss.dtype == torch.float32 and gq.dtype == dtype and gp.dtype == dtype
    ref, qd, pd = _reference(q, p, idx, util, gold, ex, tau, 0.8, mix, reduction)
    rq, rp = torch.autograd.grad(ref, (qd, pd), _upstream(ref))
    tl_, tg = _TOL[dtype]
    _close(loss, ref, tl_, f"{dtype} {reduction} loss")
    _close(gq, rq, tg, f"{dtype} {reduction} dq")
    _close(gp, rp, tg, f"{dtype} {reduction} dp")


# (B, N, d, K, E, dtype, reduction, label_mix): every option at least once per dtype, odd shapes throughout.
_GRID = [
    (37, 70, 40, 4, 3, torch.float32, "mean", 0.3),
    (5, 7, 12, 1, 0, torch.float32, "sum", 0.0),
    (23, 61, 33, 3, 2, torch.float32, "none", 0.3),
    (29, 50, 24, 2, 2, torch.bfloat16, "mean", 0.3),
    (19, 45, 17, 3, 0, torch.bfloat16, "none", 0.0),
    (31, 53, 36, 4, 1, torch.float16, "sum", 0.5),
    (11, 39, 20, 2, 2, torch.float16, "none", 0.3),
]


@pytest.mark.parametrize("b,n,d,k,e,dtype,reduction,mix", _GRID, ids=lambda v: str(v).replace("torch.", ""))
def test_matches_float64_reference(b, n, d, k, e, dtype, reduction, mix, triton_device):
    case = _case(b, n, d, k, e, dtype, triton_device)
    _check_against_reference(case, reduction=reduction, mix=mix, dtype=dtype)


def _one_tile_workspace(monkeypatch, device, n):
    """Shrink the E workspace to one tile of rows for n passages; returns the rows (the device's fp32 tile: 16 in
    the interpreter, 64-128 on a GPU), so chunking tests hold on either."""
    cfg = G.candidates(torch.float32, torch.device(device))[0]
    _, ld = G._ws_rows(1, n, 4, cfg)  # the workspace's padded row length
    monkeypatch.setattr(G, "_MIN_ROWS", 1)
    monkeypatch.setattr(G, "_WS_BYTES", cfg.block_b * ld * 4)
    return cfg.block_b


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_many_chunks_and_splits(reduction, triton_device, monkeypatch):
    # A one-tile workspace: 3 chunks of the gradient pass, the last one ragged; and the LSE pass over 4 splits.
    blk = _one_tile_workspace(monkeypatch, triton_device, 75)
    b = 2 * blk + 5
    real = G._launch
    seen = []

    def spy(*args, **kw):
        out = real(*args, **kw)
        seen.append((kw.get("ws") is not None, out[0].shape))
        return out

    monkeypatch.setattr(G, "_launch", spy)
    case = _case(b, 75, 24, 3, 2, torch.float32, triton_device)
    # tau = 0.5 keeps the bound tight enough that no chunk is recomputed (the next test covers that)
    _check_against_reference(case, reduction=reduction, mix=0.0, dtype=torch.float32, tau=0.5)
    assert [s[1] for w, s in seen if w] == [blk, blk, 5], seen
    q, p = case[0], case[1]
    full = G.lse2_rows(q, p, 1 / 0.07, splits=4)
    one = G.lse2_rows(q, p, 1 / 0.07, splits=1)
    ref = torch.logsumexp(q.cpu().double() @ p.cpu().double().T / 0.07, 1) * G._LOG2E
    _close(full, ref.to(full.device), 1e-6, "4-split lse")
    _close(one, ref.to(one.device), 1e-6, "1-split lse")


def test_loose_bound_recomputes_the_chunk(triton_device, monkeypatch):
    # One passage with a huge norm orthogonal to every query: the Cauchy-Schwarz bound is ~2^200 above the
    # real row maxima, E would underflow to 0, so the sweep must be redone with exact offsets.
    q, p, idx, util, gold, _ = _case(13, 40, 16, 2, 0, torch.float32, "cpu")
    q[:, 0] = 0.0
    p[5] = 0.0
    p[5, 0] = 10.0
    case = tuple(t.to(triton_device) for t in (q, p, idx, util, gold)) + (None,)
    calls = []
    real = G._launch
    monkeypatch.setattr(G, "_launch", lambda *a, **kw: calls.append(kw.get("ws") is not None) or real(*a, **kw))
    _check_against_reference(case, reduction="mean", mix=0.3, dtype=torch.float32, tau=0.02)
    assert calls == [True, False, True], calls  # the bound pass, an exact LSE pass, the pass redone



def test_loose_bound_redoes_only_its_chunk(triton_device, monkeypatch):
    # Three one-tile chunks; only the middle one's queries have a norm that makes the bound loose (the others are
    # tiny, so their bound stays within range): only that chunk gets an exact LSE pass and is redone.
    blk = _one_tile_workspace(monkeypatch, triton_device, 40)
    q, p, idx, util, gold, _ = _case(2 * blk + 8, 40, 16, 2, 0, torch.float32, "cpu")
    q[:, 0] = 0.0
    q[:blk] *= 0.01
    q[2 * blk:] *= 0.01
    p[5] = 0.0
    p[5, 0] = 10.0
    case = tuple(t.to(triton_device) for t in (q, p, idx, util, gold)) + (None,)
    calls = []
    real = G._launch
    monkeypatch.setattr(G, "_launch", lambda *a, **kw: calls.append((a[2], kw.get("ws") is not None)) or real(*a, **kw))
    _check_against_reference(case, reduction="mean", mix=0.3, dtype=torch.float32, tau=0.02)
    assert calls == [(0, True), (blk, True), (blk, False), (blk, True), (2 * blk, True)], calls

def test_exclusion_of_passage_zero_with_padded_targets(triton_device):
    # Padded target slots point at passage 0 with weight 0; excluding passage 0 must not give 0 * -inf = NaN
    # (the torch path's GPU bug fixed in 070abc9).
    q, p, idx, util, gold, _ = _case(9, 20, 8, 3, 0, torch.float32, "cpu")
    idx[idx == 0] = 1
    idx[:3, 2] = -1
    ex = torch.zeros(9, 1, dtype=torch.long)
    case = tuple(t.to(triton_device) for t in (q, p, idx, util, gold, ex))
    for reduction in ("mean", "none"):
        _check_against_reference(case, reduction=reduction, mix=0.0, dtype=torch.float32)


def test_deterministic_and_poison_free(triton_device, monkeypatch):
    # Two runs give bitwise-identical gradients; with every kernel/GEMM buffer pre-filled with NaN (including
    # the workspace's padding columns) nothing unwritten leaks into the results.
    case = _case(21, 47, 20, 3, 2, torch.bfloat16, triton_device)
    clean = {r: _run(*case, reduction=r, mix=0.3) for r in ("mean", "none")}
    for a, b in zip(clean["mean"], _run(*case, reduction="mean", mix=0.3)):
        assert torch.equal(a, b)
    monkeypatch.setattr(G, "_POISON", True)
    for r in ("mean", "none"):
        for a, b in zip(_run(*case, reduction=r, mix=0.3), clean[r]):
            assert torch.isfinite(a).all() and torch.equal(a, b), r


def test_one_side_requires_grad(triton_device):
    q, p, idx, util, gold, ex = _case(17, 33, 12, 2, 1, torch.float32, triton_device)
    ref, qd, pd = _reference(q, p, idx, util, gold, ex, 0.05, 1.0, 0.0, "mean")
    rq, rp = torch.autograd.grad(ref, (qd, pd))
    qg = q.detach().requires_grad_()
    (gq,) = torch.autograd.grad(utility_infonce(qg, p, idx, util, impl="triton", exclude_idx=ex), (qg,))
    pg = p.detach().requires_grad_()
    (gp,) = torch.autograd.grad(utility_infonce(q, pg, idx, util, impl="triton", exclude_idx=ex), (pg,))
    _close(gq, rq, 2e-5, "dq alone")
    _close(gp, rp, 2e-5, "dp alone")
    with torch.no_grad():
        _close(utility_infonce(q, p, idx, util, impl="triton", exclude_idx=ex), ref, 2e-6, "no-grad loss")


def test_precision_follows_torch_tf32_switch(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    assert G.precision(torch.float32) == "ieee" and A.key(torch.device("cpu"), torch.float32)[2] == "ieee"
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    assert G.precision(torch.float32) == "tf32" and A.key(torch.device("cpu"), torch.float32)[2] == "tf32"
    assert A.key(torch.device("cpu"), torch.bfloat16) == ("cpu", "bfloat16", "-")
    # on CUDA 16-bit inputs are keyed by the switch too: the chunked path upcasts them to fp32 GEMMs
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert A.key(torch.device("cuda"), torch.bfloat16) == ("sm90", "bfloat16", "tf32")
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    assert A.key(torch.device("cuda"), torch.float16) == ("sm90", "float16", "ieee")


# ---------------------------------------------------------------------------- impl="auto"
def test_auto_table_and_its_update_from_results(capsys, tmp_path):
    assert A.auto_impl(torch.device("cpu"), torch.float32) == "torch"
    assert set(A.AUTO_TABLE.values()) <= {"torch", "triton"}
    rows = [
        dict(device_key="sm90", dtype="bfloat16", precision="-", B=16384, d=768, impl="naive", ms=10.0),
        dict(device_key="sm90", dtype="bfloat16", precision="ieee", B=16384, d=768, impl="chunked", ms=12.0),
        dict(device_key="sm90", dtype="bfloat16", precision="-", B=16384, d=768, impl="triton", ms=6.0),
        dict(device_key="sm90", dtype="bfloat16", precision="tf32", B=16384, d=768, impl="chunked", ms=5.0),
        dict(device_key="sm90", dtype="float32", precision="tf32", B=16384, d=768, impl="chunked", ms=20.0),
        dict(device_key="sm90", dtype="float32", precision="tf32", B=16384, d=768, impl="triton", ms=None),
        dict(device_key="sm90", dtype="float32", precision="tf32", B=4096, d=768, impl="triton", ms=1.0),
        # fast but marked wrong by the benchmark (failed its float64 check): never chosen
        dict(device_key="sm90", dtype="float32", precision="tf32", B=16384, d=768, impl="triton", ms=0.5,
             problem="failed the float64 accuracy check"),
    ]
    table = A.table_from_results(rows)
    # a 16-bit triton row stands for both switch settings; the chunked path is timed under each
    assert table == {("sm90", "bfloat16", "ieee"): "triton", ("sm90", "bfloat16", "tf32"): "torch",
                     ("sm90", "float32", "tf32"): "torch"}
    # a file from before 16-bit rows were keyed by the switch: its chunked row ("-", timed with TF32 on) counts
    # for tf32 only, its triton row for both
    old = [dict(device_key="sm90", dtype="float16", precision="-", B=16384, d=768, impl=i, ms=ms)
           for i, ms in (("chunked", 1.0), ("triton", 2.0))]
    assert A.table_from_results(old) == {("sm90", "float16", "ieee"): "triton", ("sm90", "float16", "tf32"): "torch"}
    path = tmp_path / "r.json"
    path.write_text(__import__("json").dumps({"results": rows}))
    assert A.main([str(path)]) == 0
    assert "('sm90', 'bfloat16', 'ieee'): 'triton'," in capsys.readouterr().out
    # Several files pool; an autotuned file's triton rows are left out (impl="auto" runs the default config).
    ieee = [dict(device_key="sm90", dtype="float32", precision="ieee", B=16384, d=768, impl=i, ms=ms)
            for i, ms in (("chunked", 30.0), ("triton", 25.0))]
    tuned = [dict(rows[1], ms=11.0), dict(rows[2], ms=1.0), dict(rows[4], impl="triton", ms=1.0)]
    (tmp_path / "ieee.json").write_text(__import__("json").dumps({"results": ieee}))
    (tmp_path / "tuned.json").write_text(__import__("json").dumps({"autotune": True, "results": tuned}))
    assert A.main([str(path), str(tmp_path / "ieee.json"), str(tmp_path / "tuned.json")]) == 0
    out = capsys.readouterr()
    assert "('sm90', 'float32', 'ieee'): 'triton'," in out.out and "('sm90', 'float32', 'tf32'): 'torch'," in out.out
    assert "('sm90', 'bfloat16', 'ieee'): 'triton'," in out.out and "autotuned triton rows left out" in out.err
    assert A.main([]) == 2
    capsys.readouterr()
    assert A.main([str(tmp_path / "infonce-gpu*.json")]) == 1  # a glob that matched nothing: one line, no traceback
    assert "not a bench_infonce_gpu.py results file" in capsys.readouterr().err


def test_auto_falls_back_to_torch_without_triton(monkeypatch):
    # a measured table that names triton, on a machine where triton does not import: the torch path runs
    import uae_fast.ops.infonce as I

    monkeypatch.setattr(A, "key", lambda device, dtype: ("gpu", "bfloat16", "-"))
    monkeypatch.setitem(A.AUTO_TABLE, ("gpu", "bfloat16", "-"), "triton")
    cuda = torch.device("cuda")
    monkeypatch.setattr(I, "_HAS_TRITON", True)
    assert A.auto_impl(cuda, torch.bfloat16) == "triton"
    monkeypatch.setattr(I, "_HAS_TRITON", False)
    assert A.auto_impl(cuda, torch.bfloat16) == "torch"


def test_fully_excluded_tile_in_a_split(triton_device):
    # Row 0 excludes every passage of the last (ragged) tile: that split's online LSE sees only -inf.
    cfg = G.candidates(torch.float32, torch.device(triton_device), write=False)[0]
    n = cfg.block_n + 8
    q = torch.randn(5, 16, device=triton_device) * 0.3
    p = torch.randn(n, 16, device=triton_device) * 0.3
    ex = torch.full((5, 8), -1, dtype=torch.long, device=triton_device)
    ex[0] = torch.arange(cfg.block_n, n, device=triton_device)
    got = G.lse2_rows(q, p, 10.0, ex, splits=2)
    s = (q.cpu().double() @ p.cpu().double().T) * 10.0
    s[0, cfg.block_n:] = -math.inf
    _close(got, torch.logsumexp(s, 1) * G._LOG2E, 1e-6, "lse with a fully excluded tile")


def _bench_module():
    """benchmarks/bench_infonce_gpu.py as a module (benchmarks/ is not a package)."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "bench_infonce_gpu.py"
    spec = importlib.util.spec_from_file_location("bench_infonce_gpu", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench

def test_gpu_benchmark_smoke_writes_the_json_fields(tmp_path, monkeypatch):
    # The GPU benchmark's CPU smoke mode: tiny shapes, torch paths; its rows carry what the auto table reads.
    import json

    bench = _bench_module()
    out = tmp_path / "r.json"
    # the benchmark switches TF32 per setting: restored afterwards, so later fp32 tests on a GPU stay IEEE
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", torch.backends.cuda.matmul.allow_tf32)
    assert bench.main(["--quick", "--device", "cpu", "--sizes", "24", "--dims", "16", "--impls", "naive", "chunked",
                       "--settings", "tf32", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = data["results"]
    assert [r["impl"] for r in rows] == ["naive", "chunked"]
    for r in rows:
        for field in ("device", "device_key", "dtype", "precision", "B", "N", "d", "impl", "ms", "peak_mib",
                      "speedup_vs_naive", "memory_vs_naive"):
            assert field in r, field
        assert r["ms"] > 0 and r["dtype"] == "float32" and r["precision"] == "tf32" and r["device_key"] == "cpu"
    assert abs(rows[0]["loss"] - rows[1]["loss"]) < 1e-5 * abs(rows[0]["loss"])
    assert all(a["loss_err"] < 1e-5 for a in data["accuracy"])


def test_gpu_benchmark_keeps_its_rows_through_failures_and_interruption(tmp_path, monkeypatch):
    # A GPU lease is short: a method that fails in the accuracy check is recorded and the grid runs on, and a
    # `timeout --signal=INT` mid-grid leaves a valid JSON with every case measured before it (NaN as null).
    import json

    bench = _bench_module()
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", torch.backends.cuda.matmul.allow_tf32)
    make_step, time_ms, calls = bench.make_step, bench.time_ms, []

    def flaky_make_step(impl, q, *a):
        if impl == "chunked" and q.shape[0] == 64:  # the accuracy check's shape on a CPU
            raise RuntimeError("compile error\nsecond line")
        return make_step(impl, q, *a)

    def interrupted_time_ms(step, dev):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return time_ms(step, dev)

    monkeypatch.setattr(bench, "make_step", flaky_make_step)
    monkeypatch.setattr(bench, "time_ms", interrupted_time_ms)
    out = tmp_path / "r.json"
    rc = bench.main(["--quick", "--device", "cpu", "--sizes", "24", "32", "--dims", "16", "--impls", "naive", "chunked",
                     "--settings", "tf32", "--json", str(out)])
    assert rc == 130 and not (tmp_path / "r.json.tmp").exists()
    data = json.loads(out.read_text())
    assert data["complete"] is False
    acc = {a["impl"]: a for a in data["accuracy"]}
    assert acc["chunked"]["skipped"] == "failed: RuntimeError: compile error" and acc["naive"]["loss_err"] < 1e-5
    assert [(r["B"], r["impl"]) for r in data["results"]] == [(24, "naive"), (24, "chunked")]
    assert all(r["ms"] > 0 for r in data["results"]) and data["results"][1]["speedup_vs_naive"] > 0
    assert bench._finite({"a": [float("nan"), 1.0, float("inf")]}) == {"a": [None, 1.0, None]}


def test_gpu_benchmark_fails_when_ours_is_broken_or_wrong():
    # The device run must not read as a success when our paths failed, ran out of memory, were inaccurate or
    # disagreed with the naive loss; a peer's failure or naive running out of memory is only recorded.
    bench = _bench_module()
    row = dict(B=64, d=32, dtype="float32", precision="tf32")
    acc_ok = [dict(setting="tf32", impl=i, loss_err=1e-7, dq_err=1e-6, dp_err=1e-6) for i in ("naive", "chunked")]
    good = [dict(row, impl="naive", loss=2.0), dict(row, impl="chunked", loss=2.0 + 1e-6),
            dict(row, impl="infcl", skipped="failed: ImportError"), dict(row, B=65536, impl="naive", skipped="out of memory")]
    assert bench.problems(acc_ok, good) == []
    wrong = [dict(row, impl="naive", loss=2.0), dict(row, impl="triton", loss=2.5)]
    assert "loss 2.5 vs naive 2" in bench.problems(acc_ok, wrong)[0]
    assert "out of memory" in bench.problems(acc_ok, [dict(row, B=65536, impl="chunked", skipped="out of memory")])[0]
    bad_acc = acc_ok + [dict(setting="bf16", impl="triton", loss_err=1e-3, dq_err=0.5, dp_err=1e-3)]
    assert "accuracy bf16 triton" in bench.problems(bad_acc, good)[0]
    nan = float("nan")  # NaN compares false to every limit: it must still count as wrong
    assert bench.problems(acc_ok + [dict(setting="bf16", impl="triton", loss_err=nan, dq_err=nan, dp_err=nan)], good)
    assert bench.problems(acc_ok, [dict(row, impl="naive", loss=2.0), dict(row, impl="triton", loss=nan)])


@pytest.mark.cuda
@pytest.mark.parametrize("d", [200, 256])  # 256: d a multiple of the K block (EVEN_D), as d = 768 / 1024 are
@pytest.mark.parametrize("setting", ["bf16", "fp16", "ieee", "tf32"])
def test_cuda_multi_tile_grid(setting, d, monkeypatch):
    # On a GPU the small shapes above fit one 64/128 tile: here many row/column tiles, the grouped program
    # order, several workspace chunks (ragged last), LSE splits, a bf16 K loop over d > 64, and TF32 (torch's
    # default is IEEE). CUDA only: under the interpreter this size is too slow for the suite.
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", setting == "tf32")
    monkeypatch.setattr(G, "_MIN_ROWS", 1)
    monkeypatch.setattr(G, "_WS_BYTES", 128 * 704 * 2)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(setting, torch.float32)
    case = _case(300, 700, d, 4, 2, dtype, "cuda")
    for reduction, mix in (("mean", 0.3), ("none", 0.0)):
        q, p, idx, util, gold, ex = case
        loss, gq, gp = _run(q, p, idx, util, gold, ex, reduction=reduction, mix=mix)
        ref, qd, pd = _reference(q, p, idx, util, gold, ex, 0.07, 0.8, mix, reduction)
        rq, rp = torch.autograd.grad(ref, (qd, pd), _upstream(ref))
        # TF32 rounds inputs to 10 mantissa bits: at this case's score spread (sd ~32) that alone moves the
        # softmax weights enough for a 5e-3-1e-2 max relative gradient error (emulated against float64)
        tl_, tg = _TOL[dtype] if setting != "tf32" else (2e-3, 3e-2)
        _close(loss, ref, max(tl_, 1e-5), f"{setting} {reduction} loss")
        _close(gq, rq, tg, f"{setting} {reduction} dq")
        _close(gp, rp, tg, f"{setting} {reduction} dp")


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_fp16_sharp_softmax_keeps_its_small_probabilities(reduction, triton_device):
    # fp16 stores E in fp16: as the softmax itself (offset = the exact LSE) 90% of these entries (< 2**-24) were 0,
    # and a quarter of the negatives' dp rows came back all zero (max-normalised errors did not show it)
    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(16, 32, generator=g), dim=-1)
    p = torch.nn.functional.normalize(torch.randn(2048, 32, generator=g), dim=-1)
    idx, util = torch.arange(16)[:, None], torch.zeros(16, 1)

    def dp(dtype, impl):
        pp = p.to(dtype).to(triton_device).requires_grad_()
        loss = utility_infonce(q.to(dtype).to(triton_device), pp, idx.to(triton_device), util.to(triton_device),
                               temperature=0.02, reduction=reduction, impl=impl)
        loss.sum().backward()
        return pp.grad.double().cpu()[16:]  # passages no row targets: softmax terms only

    ref = dp(torch.float64, "torch")
    rel = lambda got: ((got - ref).norm(dim=1) / ref.norm(dim=1)).median()  # noqa: E731
    got, torch_path = dp(torch.float16, "triton"), dp(torch.float16, "torch")
    assert int((got.abs().sum(1) == 0).sum()) <= int((torch_path.abs().sum(1) == 0).sum()) + 5
    assert rel(got) <= 1.3 * rel(torch_path) + 1e-4, (rel(got), rel(torch_path))


@pytest.mark.parametrize("case", ["big q, zero p", "zero q, big p"])
def test_an_overflowing_norm_times_a_zero_one_is_not_a_nan_bound(case, triton_device):
    # |q| overflows fp32 (entries 1e20) and every |p| is 0 (or the reverse): the bound inf * 0 was NaN, the row's
    # workspace NaN and the call raised; it takes the exact-LSE redo, as the torch path computes it
    g = torch.Generator().manual_seed(0)
    big, zero = torch.randn(3, 8, generator=g) * 1e20, torch.zeros(5, 8)
    q, p = (big, zero) if case == "big q, zero p" else (torch.zeros(3, 8), torch.randn(5, 8, generator=g) * 1e20)
    idx, util = torch.tensor([[0], [1], [2]]), torch.zeros(3, 1)
    out = {}
    for impl in ("torch", "triton"):
        qq, pp = q.clone().to(triton_device).requires_grad_(), p.clone().to(triton_device).requires_grad_()
        loss = utility_infonce(qq, pp, idx.to(triton_device), util.to(triton_device), temperature=0.05, impl=impl)
        loss.backward()
        out[impl] = (loss.detach().cpu(), qq.grad.cpu(), pp.grad.cpu())
    for a, b in zip(out["triton"], out["torch"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=0)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_fp16_gradient_overflow_is_inf_for_the_grad_scaler(reduction, triton_device):
    # The torch path's contract (test_fuzz_ops), on both the precomputed (sum) and the recomputed (none)
    # backward: gradients finite in fp32 that overflow only in the fp16 cast come back inf (a GradScaler skips
    # the step), matching the torch path's values where they are finite.
    q = torch.randn(4, 8).half().to(triton_device).requires_grad_()
    p = (torch.randn(6, 8) * 100).half().to(triton_device).requires_grad_()
    idx, util = torch.tensor([[1], [2], [3], [5]], device=triton_device), torch.zeros(4, 1, device=triton_device)
    loss = utility_infonce(q, p, idx, util, temperature=1e-3, reduction=reduction, impl="triton")
    assert torch.isfinite(loss).all()
    loss.sum().backward()
    assert not torch.isfinite(q.grad).all()  # dq ~ |p| / temperature = 1e5 > 65504
    assert not torch.isnan(q.grad).any() and not torch.isnan(p.grad).any()  # inf, never NaN
    qt, pt = q.detach().clone().requires_grad_(), p.detach().clone().requires_grad_()
    utility_infonce(qt, pt, idx, util, temperature=1e-3, reduction=reduction, impl="torch").sum().backward()
    for g, want in ((q.grad, qt.grad), (p.grad, pt.grad)):
        assert torch.equal(torch.isinf(g), torch.isinf(want)) and torch.equal(g.sign(), want.sign())
        fin = torch.isfinite(want)
        torch.testing.assert_close(g[fin].float(), want[fin].float(), rtol=2e-2, atol=1e-2)


@pytest.mark.parametrize("case", ["large-q-sum", "scaled-upstream-none", "scaled-upstream-soft"])
def test_fp16_dp_operand_does_not_overflow_when_dp_is_finite(case, triton_device):
    # dP's fp16 operand q_i c_i / l_i can pass 65504 while dP itself is finite (even zero): the chunk's scale is
    # taken out before the cast, so triton returns what the torch path does instead of inf/NaN (and an error)
    h = lambda x: torch.tensor(x, dtype=torch.float16, device=triton_device)  # noqa: E731
    if case == "large-q-sum":
        q, p, tau, red, up = h([[100.0, 0.0]]), h([[1.0, 0.0], [0.0, 1.0]]), 1e-3, "sum", 1.0
    elif case == "scaled-upstream-none":  # unit vectors, a GradScaler-sized upstream gradient
        q, p, tau, red, up = h([[0.6, 0.8]]), h([[0.6, 0.8], [0.8, -0.6]]), 0.05, "none", 8192.0
    else:  # the same scale with a soft softmax (0.69 / 0.31): gradients of the operand's size, not cancelled
        q, p, tau, red, up = h([[0.6, 0.8]]), h([[0.6, 0.8], [0.8, 0.6]]), 0.05, "none", 8192.0
    idx, util = torch.tensor([[0]], device=triton_device), torch.zeros(1, 1, device=triton_device)
    grads = {}
    for impl in ("triton", "torch"):
        qi, pi = q.clone().requires_grad_(), p.clone().requires_grad_()
        (utility_infonce(qi, pi, idx, util, temperature=tau, reduction=red, impl=impl) * up).sum().backward()
        grads[impl] = (qi.grad.float(), pi.grad.float())
    # both gradients are differences of terms of size up / tau (softmax - target): fp16's E (2^-11 relative)
    # bounds the triton path's error by that scale, not by the (cancelled) result's. In the first two cases
    # the result is ~0 (cancelled, or a softmax weight of e^-20 that fp16 flushes, as a naive fp16 loss
    # does): they check that nothing overflows. The soft case checks values ~100x above that bound.
    term = up / tau * float(q.float().abs().max() * p.float().abs().max())
    for g, want in zip(grads["triton"], grads["torch"]):
        assert torch.isfinite(g).all()  # it used to be inf/NaN in the fp16 operand, and an error
        torch.testing.assert_close(g, want, rtol=0, atol=2.0 ** -10 * term)
        if case == "scaled-upstream-soft":
            assert want.abs().min() > 50 * 2.0 ** -10 * term


def test_an_enclosing_autocast_does_not_lower_the_target_terms(triton_device):
    # Under a trainer's bf16 autocast the gathered target scores and their gradients stay in fp32 for fp32
    # inputs (the kernels are Triton; the sparse terms are torch ops that autocast would run in bf16).
    q, p, idx, util, gold, ex = _case(13, 29, 24, 3, 1, torch.float32, triton_device, scale=1.0)
    plain = _run(q, p, idx, util, gold, ex, reduction="mean", mix=0.2, tau=0.02)
    with torch.autocast(torch.device(triton_device).type, dtype=torch.bfloat16):
        cast = _run(q, p, idx, util, gold, ex, reduction="mean", mix=0.2, tau=0.02)
    for a, b in zip(plain, cast):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_an_old_triton_leaves_auto_on_torch(monkeypatch):
    # a triton without tl.dot(input_precision=) (2.x) or without tl.range(flatten=) (3.2, which torch 2.6 pins)
    # cannot compile the kernels: auto keeps the torch path, an explicit impl="triton" says why
    from uae_fast import _checks

    assert _checks.triton_usable() and _checks.triton_usable(flatten=True)  # this machine's triton has both
    monkeypatch.setattr(_checks, "_TRITON_USABLE", {False: False, True: False})
    assert _checks.resolve_impl("auto", torch.device("cuda")) == "torch"
    with pytest.raises(ValueError, match="input_precision"):
        _checks.resolve_impl("triton", torch.device("cuda"))
    # triton 3.2 (torch 2.6): input_precision, no flatten: the InfoNCE kernel runs, the LM-head kernel does not
    monkeypatch.setattr(_checks, "_TRITON_USABLE", {False: True, True: False})
    assert _checks.resolve_impl("auto", torch.device("cuda")) == "triton"
    assert _checks.resolve_impl("auto", torch.device("cuda"), flatten=True) == "torch"
