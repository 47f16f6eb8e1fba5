"""GEMM-shaped Triton path of :func:`uae_fast.ops.infonce.utility_infonce` (``impl="triton"``).

One kernel, ``_score_tile_kernel``, built like a GEMM (the ``token_logprobs`` structure): each program owns a
BLOCK_B x BLOCK_N tile of scores ``s = q p^T / tau`` (or a run of such tiles along N), computes it with a
K-loop of ``tl.dot`` over d with an fp32 accumulator, and reduces it in the epilogue; scores never reach
memory unless asked. Program order is grouped (GROUP_B row blocks x all column tiles) so the programs resident
at one time share P tiles through L2. Excluded passages (``exclude_idx``) and the ragged N edge are set to -inf
in the epilogue, as the torch path does inside its chunks, so the masking is exact. Two modes:

* ``WRITE=False`` (LSE pass): online log-sum-exp over the program's tiles; per-(split, row) partials (max, sum)
  are merged on the host into the row's LSE. Used for the loss without gradients / with reduction="none", and
  as the first pass for fp16 (below).
* ``WRITE=True`` (gradient pass, one chunk of query rows): stores ``E_ij = exp(s_ij - M_i)`` in the input dtype
  into a fixed workspace [rows, N] and the per-(tile, row) sum and max of the tile. ``M_i`` is an upper bound
  of the row's scores known before the pass (Cauchy-Schwarz: ``|q_i| max_j |p_j| / tau``), so one pass gives
  both the LSE (``M_i + log sum_j E_ij``) and the softmax numerators; then cuBLAS finishes the chunk:
  ``dQ = diag(c / l) E P`` and ``dP += E^T diag(c / l) Q`` (fp32 accumulation, deterministic, no atomics).
  Together: 3 B*N*d GEMMs for forward + backward, as many as the materialised loss, with O(rows * N) memory.
  If the bound is so loose that a row's largest ``E`` would lose range (``M_i - max_j s_ij`` over 80 in
  base 2; the pass measures the row max), the sweep is redone with exact offsets from an LSE pass (one host
  sync per call, none per chunk). fp16's range is too small for the bound, so fp16 runs the LSE pass first
  and uses ``M_i = LSE_i`` (4 GEMMs).

The sparse target terms (B*K gathers) stay in ``infonce.py`` (``_target_scores``, ``_sparse_grads``).
Under ``TRITON_INTERPRET=1`` (CPU tensors) small tiles are used and the cuBLAS steps are torch matmuls with an
fp32 upcast of 16-bit operands (exact products, as on the GPU).
"""
from __future__ import annotations

import contextlib
import os
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ._infonce_auto import tf32_matmul
from .infonce import _PASSTHROUGH, _check_grads, _reduce, _row_grad, _scaled_unit_grads, _sparse_grads, _target_scores

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
# Workspace for E: this many bytes, but at least _MIN_ROWS rows (the dP update is a GEMM with K = rows; below
# ~1000 rows re-reading the fp32 dP each chunk costs as much as the multiply-adds).
_WS_BYTES = 64 * 2**20
_MIN_ROWS = 1024
# Largest gap (base 2) between the bound M_i and the row max for which E keeps the row's mass in range: the
# top E is >= 2^-80 and everything within 2^-40 of it (all that counts next to it) stays above fp32/bf16's
# smallest normal, 2^-126. Normalised embeddings never reach it unless tau < ~0.01 (the bound is 1/tau nats).
_MAX_GAP2 = 80.0
# Tests set this: every buffer the kernels or GEMMs write starts as NaN, so an unwritten element shows.
_POISON = False


def _empty(*shape, dtype, device):
    if _POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(*shape, dtype=dtype, device=device)


@triton.jit
def _score_tile_kernel(
    Q, P, MOFF, EX, WS, PART_M, PART_S,
    R, N, D, row0,
    stride_q, stride_p, stride_ws, stride_ex, n_ex,
    scale_log2, num_splits, tiles_per_split,
    WRITE: tl.constexpr, HAS_EX: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_B: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    num_rb = tl.cdiv(R, BLOCK_B)
    # Grouped order: consecutive pids walk the splits of GROUP_B row blocks (shared P tiles stay in L2).
    per_group = GROUP_B * num_splits
    group = pid // per_group
    first_rb = group * GROUP_B
    group_size = tl.minimum(num_rb - first_rb, GROUP_B)
    rb = first_rb + (pid % per_group) % group_size
    split = (pid % per_group) // group_size

    rloc = rb * BLOCK_B + tl.arange(0, BLOCK_B)  # row within this launch's [row0, row0 + R)
    row_ok = rloc < R
    rows_c = (row0 + tl.where(row_ok, rloc, 0)).to(tl.int64)  # clamped: unmasked K-loop loads
    offs_d = tl.arange(0, BLOCK_D)
    q_ptrs = Q + rows_c[:, None] * stride_q + offs_d[None, :]
    if WRITE:
        moff = tl.load(MOFF + rloc, mask=row_ok, other=float("inf"))  # rows past R: E = 0, never stored

    n_tiles = tl.cdiv(N, BLOCK_N)
    lo = split * tiles_per_split
    hi = tl.minimum(lo + tiles_per_split, n_tiles)
    m = tl.full([BLOCK_B], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_B], tl.float32)
    for tile in range(lo, hi):
        cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        cols_c = tl.where(col_ok, cols, 0).to(tl.int64)
        p_ptrs = P + cols_c[None, :] * stride_p + offs_d[:, None]  # [BLOCK_D, BLOCK_N]
        acc = tl.zeros([BLOCK_B, BLOCK_N], tl.float32)
        for k in range(0, D, BLOCK_D):
            if EVEN_D:
                a = tl.load(q_ptrs + k)
                b = tl.load(p_ptrs + k)
            else:
                a = tl.load(q_ptrs + k, mask=(offs_d[None, :] + k) < D, other=0.0)
                b = tl.load(p_ptrs + k, mask=(offs_d[:, None] + k) < D, other=0.0)
            if UPCAST:  # interpreter only: its tl.dot multiplies bf16 bit patterns as integers
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        z = tl.where(col_ok[None, :], acc * scale_log2, float("-inf"))  # base-2 scores
        if HAS_EX:  # exclusions: -inf inside the tile (exact; -1 padding never matches a column)
            for e in range(n_ex):
                xe = tl.load(EX + rows_c * stride_ex + e)
                z = tl.where(cols[None, :] == xe[:, None], float("-inf"), z)
        tmax = tl.max(z, axis=1)
        if WRITE:
            ev = tl.exp2(z - moff[:, None])
            w_ptrs = WS + rloc.to(tl.int64)[:, None] * stride_ws + cols[None, :]
            tl.store(w_ptrs, ev.to(WS.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
            s += tl.sum(ev, axis=1)
            m = tl.maximum(m, tmax)
        else:
            m_new = tl.maximum(m, tmax)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a fully masked run: no -inf - -inf
            s = s * tl.exp2(m - m_safe) + tl.sum(tl.exp2(z - m_safe[:, None]), axis=1)
            m = m_new
    part = split.to(tl.int64) * R + rloc
    tl.store(PART_M + part, m, mask=row_ok)
    tl.store(PART_S + part, s, mask=row_ok)


# --------------------------------------------------------------------------------------------------
# configurations
# --------------------------------------------------------------------------------------------------
class Config(NamedTuple):
    block_b: int
    block_n: int
    block_d: int
    num_warps: int
    num_stages: int
    group_b: int = 8


# Hopper bf16/fp16: the Triton matmul tutorial's H100 shapes. Compiled ahead of time for sm_90a with Triton
# 3.9, no GPU (benchmarks/aot_infonce_kernel.py): all pipelined (cp.async, 3-4 stages) with wgmma. The
# WRITE pass at 128x128 w8 needs 166 registers (252 with exclusions), no spills; at 128x256 it needs 255 and
# spills (4 B; 384 B with exclusions), so 128x128 leads for WRITE and 128x256 (199 registers) for the LSE
# pass. Not yet timed on a GPU: the rest are autotune candidates (UAE_INFONCE_AUTOTUNE=1).
_CONFIGS_HALF_SM90 = [
    Config(128, 128, 64, 8, 4),
    Config(128, 256, 64, 8, 3),
    Config(64, 256, 64, 8, 4),
    Config(128, 128, 64, 4, 4),
]
_CONFIGS_HALF_SM80 = [Config(128, 128, 64, 8, 3), Config(128, 128, 32, 4, 4), Config(64, 128, 32, 4, 4)]
# fp32 with TF32 tensor cores: fp32 operands take twice the shared memory per K step, hence BLOCK_D=32.
# Same compile check: 128x128 WRITE 198 registers (254 with exclusions), no spills; 128x256 spills.
_CONFIGS_TF32 = [
    Config(128, 128, 32, 8, 3),
    Config(128, 256, 32, 8, 3),
    Config(128, 64, 32, 4, 4),
    Config(64, 128, 32, 4, 4),
]
# fp32 IEEE (allow_tf32=False): CUDA-core FMAs, the math units are the limit (168-220 registers, no spills).
_CONFIGS_IEEE = [Config(64, 64, 32, 4, 3), Config(64, 128, 32, 8, 3), Config(128, 64, 32, 8, 3)]
# Interpreter: small tiles so tests at B, N, d of a few dozen still have ragged row, column and d edges.
_INTERPRET_CONFIG = Config(16, 32, 16, 4, 1, group_b=2)

_TUNED: dict = {}
# Last compiled kernel's resources per mode ("lse"/"write"): config, registers, spills (benchmarks report it).
KERNEL_INFO: dict = {}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: follows torch's own switch, so Triton and cuBLAS steps agree (and so does the
    comparison with torch paths). 16-bit operands ignore it."""
    if dtype == torch.float32 and not tf32_matmul():
        return "ieee"
    return "tf32"


def candidates(dtype: torch.dtype, device: torch.device, write: bool = True):
    """Configs to try, the default first (the LSE pass has no store epilogue: it affords the wider tile)."""
    if device.type != "cuda":
        return [_INTERPRET_CONFIG]
    if dtype == torch.float32:
        return _CONFIGS_TF32 if precision(dtype) == "tf32" else _CONFIGS_IEEE
    major, _ = torch.cuda.get_device_capability(device)
    if major < 9:
        return _CONFIGS_HALF_SM80
    return _CONFIGS_HALF_SM90 if write else [_CONFIGS_HALF_SM90[1]] + [c for c in _CONFIGS_HALF_SM90 if c != _CONFIGS_HALF_SM90[1]]


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # interpreter: small, so the multi-split merge is exercised on CPU too


# --------------------------------------------------------------------------------------------------
# launches
# --------------------------------------------------------------------------------------------------
def _launch(q, p, row0, rows, inv_tau, ex, cfg, *, moff=None, ws=None, splits=None):
    """One launch over query rows [row0, row0 + rows). Returns partials (max, sum) [splits, rows] in base 2."""
    n, d = p.shape
    dev = q.device
    n_tiles = triton.cdiv(n, cfg.block_n)
    write = ws is not None
    if write:  # one program per score tile: a plain GEMM grid
        per = 1
    else:
        row_blocks = triton.cdiv(rows, cfg.block_b)
        waves = 4 if dev.type == "cuda" else 1
        want = splits or max(1, triton.cdiv(_num_sms(dev) * waves, row_blocks))
        per = triton.cdiv(n_tiles, min(n_tiles, want))
    num_splits = triton.cdiv(n_tiles, per)
    part_m = _empty(num_splits, rows, dtype=torch.float32, device=dev)
    part_s = _empty(num_splits, rows, dtype=torch.float32, device=dev)
    upcast = dev.type != "cuda" and q.dtype == torch.bfloat16
    grid = (triton.cdiv(rows, cfg.block_b) * num_splits,)
    kern = _score_tile_kernel[grid](
        q, p, moff if write else part_m, ex if ex is not None else part_m, ws if write else part_m, part_m, part_s,
        rows, n, d, row0,
        q.stride(0), p.stride(0), ws.stride(0) if write else 0, ex.stride(0) if ex is not None else 0,
        ex.shape[1] if ex is not None else 0,
        inv_tau * _LOG2E, num_splits, per,
        WRITE=write, HAS_EX=ex is not None, EVEN_D=d % cfg.block_d == 0,
        BLOCK_B=cfg.block_b, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d, GROUP_B=cfg.group_b,
        PRECISION="ieee" if upcast else precision(q.dtype), UPCAST=upcast,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if dev.type == "cuda" and kern is not None:
        KERNEL_INFO["write" if write else "lse"] = dict(
            config=cfg._asdict(), n_regs=getattr(kern, "n_regs", None), n_spills=getattr(kern, "n_spills", None)
        )
    return part_m, part_s


def _config(q, p, write, bench=None):
    """Default config, or the autotuned one (UAE_INFONCE_AUTOTUNE=1) for this (mode, N bucket, d, dtype,
    precision, device) key; ``bench`` runs one launch with a given config (for timing)."""
    cands = candidates(q.dtype, q.device, write)
    if q.device.type != "cuda" or os.environ.get("UAE_INFONCE_AUTOTUNE", "0") != "1" or len(cands) == 1 or bench is None:
        return cands[0]
    key = (write, triton.next_power_of_2(p.shape[0]), p.shape[1], q.dtype, precision(q.dtype),
           torch.cuda.get_device_capability(q.device))
    if key not in _TUNED:
        best, best_t = cands[0], float("inf")
        for cfg in cands:
            try:
                ms = triton.testing.do_bench(lambda: bench(cfg), warmup=5, rep=20)
            except Exception:  # a config that does not fit (shared memory) is skipped
                continue
            if ms < best_t:
                best, best_t = cfg, ms
        _TUNED[key] = best
    return _TUNED[key]


def _merge_lse2(part_m, part_s):
    mx = part_m.amax(0)
    safe = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    return safe + torch.log2((part_s * torch.exp2(part_m - safe)).sum(0))


def lse2_rows(q, p, inv_tau, ex=None, *, config: Optional[Config] = None, splits=None):
    """Per-row log2-sum-exp2 of the base-2 scores (``LSE * log2(e)``), [B] fp32; no workspace."""
    b = q.shape[0]
    run = lambda cfg: _launch(q, p, 0, b, inv_tau, ex, cfg, splits=splits)  # noqa: E731
    cfg = config or _config(q, p, False, run)
    return _merge_lse2(*run(cfg))


def _ws_rows(b, n, elsize, cfg):
    ld = triton.cdiv(n, 16) * 16  # 16-element rows keep cuBLAS on its aligned paths
    rows = max(_MIN_ROWS, _WS_BYTES // (ld * elsize))
    rows = max(cfg.block_b, rows // cfg.block_b * cfg.block_b)
    return min(b, rows), ld


_OUT_DTYPE_OK = {}


def _out_dtype_ok(dev) -> bool:
    """Whether this torch/cuBLAS takes 16-bit operands with an fp32 output (``out_dtype``), probed once and
    recorded in ``KERNEL_INFO["fp32_out_gemm"]`` (the benchmark rows say which dQ/dP path ran)."""
    if dev not in _OUT_DTYPE_OK:
        try:
            a = torch.ones(16, 16, dtype=torch.bfloat16, device=dev)
            c = torch.ones(16, 16, dtype=torch.float32, device=dev)
            torch.addmm(c, a, a, out_dtype=torch.float32, alpha=2.0, out=c)  # alpha: dP's fp16 rescaling uses it
            m = torch.mm(a, a, out_dtype=torch.float32)
            _OUT_DTYPE_OK[dev] = bool((c == 33).all()) and m.dtype == torch.float32
        except Exception:  # any refusal (dtype mix, unknown keyword, cuBLAS) means: use the fallback
            _OUT_DTYPE_OK[dev] = False
    KERNEL_INFO["fp32_out_gemm"] = _OUT_DTYPE_OK[dev]
    return _OUT_DTYPE_OK[dev]


def _mm(a, b, out, accumulate, alpha: float = 1.0):
    """``out (fp32) = a @ b`` or ``out += alpha * (a @ b)`` with fp32 accumulation whatever the operands' dtype."""
    if a.dtype == torch.float32:
        if accumulate:
            out.addmm_(a, b, alpha=alpha)
        else:
            torch.mm(a, b, out=out)
    elif a.is_cuda and _out_dtype_ok(a.device):
        if accumulate:
            torch.addmm(out, a, b, out_dtype=torch.float32, alpha=alpha, out=out)
        else:
            torch.mm(a, b, out_dtype=torch.float32, out=out)
    elif a.is_cuda:  # older torch: 16-bit result per chunk, then added in fp32
        if accumulate:
            out.add_((a @ b).float(), alpha=alpha)
        else:
            out.copy_(a @ b)
    else:  # interpreter tests on CPU: exact products of the 16-bit values, fp32 sums
        if accumulate:
            out.addmm_(a.float(), b.float(), alpha=alpha)
        else:
            torch.mm(a.float(), b.float(), out=out)


def dense_grads(q, p, inv_tau, ex, coef, need_dq, need_dp, lse2=None, *, config: Optional[Config] = None):
    """Dense parts of the gradients, ``dq_i = c_i sum_j softmax_ij p_j`` and ``dp_j = sum_i c_i softmax_ij q_i``
    (fp32), and the per-row base-2 LSE. ``coef`` [B] is ``c_i`` (upstream gradient / tau). With ``lse2`` None
    the rows' offsets are the Cauchy-Schwarz bound (one pass gives the LSE); else they are ``lse2``."""
    b, d = q.shape
    n = p.shape[0]
    dev = q.device
    wdt = q.dtype
    bound = lse2 is None
    if bound:
        # fp32 norms without an fp32 copy of p (N x d) or q
        pmax = torch.linalg.vector_norm(p, dim=1, dtype=torch.float32).amax()
        moff_all = (torch.linalg.vector_norm(q, dim=1, dtype=torch.float32) * pmax * (inv_tau * _LOG2E)).contiguous()
        # a norm that overflowed fp32 times a zero one is NaN: an infinite bound sends the row to the exact redo
        moff_all = torch.nan_to_num(moff_all, nan=float("inf"))
    else:
        # fp16 stores E in fp16: with the exact LSE as offset E is the softmax (<= 1), whose entries below 2**-24
        # flush to 0 and below 2**-14 keep few bits; 15 (base 2) lower keeps E <= 2**15 < 65504 and l absorbs it
        moff_all = (lse2 - (15.0 if wdt == torch.float16 else 0.0)).contiguous()
    cfg0 = config or candidates(q.dtype, dev, True)[0]
    rows, ld = _ws_rows(b, n, q.element_size(), cfg0)
    ws_buf = _empty(rows * ld, dtype=wdt, device=dev)
    dq = _empty(b, d, dtype=torch.float32, device=dev) if need_dq else None
    dp = torch.zeros(n, d, dtype=torch.float32, device=dev) if need_dp else None
    lse2_out = _empty(b, dtype=torch.float32, device=dev)
    # A row's max score is >= -moff, so the gap to the bound is <= 2 moff: with normalised embeddings and
    # tau >= ~0.036 no chunk can lose its range and the per-chunk check (a host sync) is skipped.
    check = bound and float(moff_all.max()) * 2 > _MAX_GAP2
    cfg = lse_cfg = None
    for r0 in range(0, b, rows):
        r = min(rows, b - r0)
        ws = ws_buf[: r * ld].view(r, ld)
        moff = moff_all[r0 : r0 + r]

        def run(c, moff=moff, ws=ws, r0=r0, r=r):
            return _launch(q, p, r0, r, inv_tau, ex, c, moff=moff, ws=ws)

        if cfg is None:
            cfg = config or _config(q, p, True, run)
        part_m, part_s = run(cfg)
        if check and bool(((moff - part_m.amax(0)) > _MAX_GAP2).any()):
            # Rare (unnormalised embeddings, tiny tau): some row's E lost its range. Exact offsets for this
            # chunk's rows, and only this chunk redone.
            lse_run = lambda c, r0=r0, r=r: _launch(q, p, r0, r, inv_tau, ex, c)  # noqa: E731
            lse_cfg = lse_cfg or _config(q, p, False, lse_run)
            moff = _merge_lse2(*lse_run(lse_cfg))
            part_m, part_s = run(cfg, moff=moff)
        l = part_s.sum(0)
        lse2_out[r0 : r0 + r] = moff + torch.log2(l)
        scale = coef[r0 : r0 + r] / l  # softmax_ij = E_ij / l_i
        e = ws[:, :n]
        if need_dq:
            _mm(e, p, dq[r0 : r0 + r], accumulate=False)
            dq[r0 : r0 + r].mul_(scale[:, None])
        if need_dp:
            # fp16: q_i c_i / l_i can pass 65504 although dp is finite; the chunk's largest |c_i / l_i| is taken
            # out before the cast and put back in the fp32 accumulation (one host read per chunk, fp16 only)
            smax = max(float(scale.abs().max()), 1e-30) if wdt == torch.float16 else 1.0
            _mm(e.t(), (q[r0 : r0 + r].float() * (scale / smax)[:, None]).to(wdt), dp, accumulate=True, alpha=smax)
    return lse2_out, dq, dp


# --------------------------------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------------------------------
def _fused_pass(q, p, inv_tau, ex, coef, need_dq, need_dp):
    """LSE (natural log) and dense gradients in one sweep; fp16 gets an exact LSE pass first (its range is
    too small for the bound)."""
    lse2 = lse2_rows(q, p, inv_tau, ex) if q.dtype == torch.float16 else None
    lse2, dq, dp = dense_grads(q, p, inv_tau, ex, coef, need_dq, need_dp, lse2)
    return lse2 * _LN2, dq, dp


class GemmInfoNCE(torch.autograd.Function):
    """Triton path of utility_infonce on validated inputs: q, p [B|N, d]; idx, w [B, K'] (teacher weights,
    padding = (0, 0.0)); ex [B, E] long or None."""

    @staticmethod
    def forward(ctx, q, p, idx, w, inv_tau, reduction, ex=None):
        q, p = q.contiguous(), p.contiguous()
        ex = None if ex is None else ex.contiguous()
        need_dq, need_dp = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        b = q.shape[0]
        ctx.meta = (inv_tau, reduction, q.dtype, p.dtype, b)
        ctx.passthrough = _PASSTHROUGH.get()
        tgt = _target_scores(q, p, idx, w, inv_tau)
        if reduction != "none" and (need_dq or need_dp):
            # Every row's upstream gradient is the same scalar: gradients of the summed loss now, scaled later.
            coef = torch.full((b,), inv_tau, dtype=torch.float32, device=q.device)
            lse, dq, dp = _fused_pass(q, p, inv_tau, ex, coef, need_dq, need_dp)
            _sparse_grads(q, p, idx, w, coef, dq, dp)
            ctx.unit_grads = (dq, dp)
            ctx.precomputed = True
        else:
            lse = lse2_rows(q, p, inv_tau, ex) * _LN2
            ctx.save_for_backward(q, p, idx, w, lse)
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
            q, p, idx, w, lse = ctx.saved_tensors
            g = _row_grad(grad_out, reduction, b, torch.float32).expand(b)
            coef = (g * inv_tau).contiguous()
            need_dq, need_dp = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            # The saved LSE is the exact offset: E is the softmax itself.
            _, dq, dp = dense_grads(q, p, inv_tau, ctx.ex, coef, need_dq, need_dp, lse * _LOG2E)
            _sparse_grads(q, p, idx, w, coef, dq, dp)
            if not ctx.passthrough and bool(torch.isfinite(grad_out).all()):  # as the torch path: fp32 overflow raises; the cast may give inf
                _check_grads(dq, dp)
            dq = None if dq is None else dq.to(q_dtype)
            dp = None if dp is None else dp.to(p_dtype)
        return dq, dp, None, None, None, None, None


def utility_infonce_triton(q, p, idx, w, inv_tau, reduction, ex=None):
    if q.device.type != "cuda" and not _interpreting():
        raise ValueError("impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before import)")
    # launch on the inputs' GPU, not the current one (autograd's backward does the same)
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        return GemmInfoNCE.apply(q, p, idx, w, inv_tau, reduction, ex)


__all__ = ["utility_infonce_triton", "lse2_rows", "dense_grads", "Config", "KERNEL_INFO", "candidates", "precision"]
