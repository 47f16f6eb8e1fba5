"""Triton kernels for :func:`uae_fast.ops.logprobs.token_logprobs` (forward only).

Kernel 1 (``_lse_partial_kernel``): one program owns a block of BLOCK_N tokens and a contiguous
range of vocabulary tiles (a "split"). For each BLOCK_V-wide tile it runs a K-loop of ``tl.dot``
over D with an fp32 accumulator (a plain GEMM main loop), then folds the tile into an online
log-sum-exp (running max ``m``, running ``sum exp(z - m)``) and picks out the target logit. The
logits never leave registers. It writes per-split partials ``m``, ``s`` ([splits, N] each) and the
target logit (the one split that holds the target writes it).

Kernel 2 (``_lse_merge_kernel``): merges the splits per token into ``lse``, ``logp = z_t - lse``
and ``greedy = z_t >= max z``.

Why splits: with few tokens (N=1024 -> 8 row blocks) a grid of row blocks cannot fill 132 SMs;
splitting the vocabulary gives rows x splits programs. The split count aims at ~32 waves of
programs so the last partial wave costs little; partials stay O(N * splits), a few MB at most.
Program order is grouped (GROUP_N row blocks x all splits) so the programs resident at one time
share hidden rows and weight tiles through L2, as in the Triton matmul tutorial.
"""
from __future__ import annotations

import contextlib
import os
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

@triton.jit
def _tanh(x):
    # tanh via exp of a non-positive argument: no overflow, no libdevice (keeps the interpreter happy).
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _lse_partial_kernel(
    H, W, B, T,  # hidden [N, D], weight [V, D], bias [V] (or dummy), targets [N]
    PART_M, PART_S, TGT,  # out: [splits, N] fp32, [splits, N] fp32, [N] fp32
    N, V, D,
    stride_hn, stride_hd, stride_wv, stride_wd,
    ignore_index, softcap, inv_temp,
    num_splits, tiles_per_split,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_TEMP: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, FLATTEN: tl.constexpr,
):
    pid = tl.program_id(0)
    num_row_blocks = tl.cdiv(N, BLOCK_N)
    # Grouped order: consecutive pids walk the splits of GROUP_N row blocks.
    pids_per_group = GROUP_N * num_splits
    group = pid // pids_per_group
    first_rb = group * GROUP_N
    group_size = tl.minimum(num_row_blocks - first_rb, GROUP_N)
    rb = first_rb + (pid % pids_per_group) % group_size
    split = (pid % pids_per_group) // group_size

    rows = rb * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    # Clamped rows keep the K-loop loads unmasked; their results are never stored.
    rows_c = tl.where(row_ok, rows, 0).to(tl.int64)
    t = tl.load(T + rows, mask=row_ok, other=ignore_index).to(tl.int32)
    offs_d = tl.arange(0, BLOCK_D)
    h_ptrs = H + rows_c[:, None] * stride_hn + offs_d[None, :] * stride_hd  # [BLOCK_N, BLOCK_D]

    num_v_tiles = tl.cdiv(V, BLOCK_V)
    tile_lo = split * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, num_v_tiles)

    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    tgt = tl.zeros([BLOCK_N], tl.float32)
    # FLATTEN lets the pipeliner run the tile and K loops as one (no drain/refill per vocab tile,
    # which matters when D/BLOCK_D is small, e.g. 9 steps at D=576); an autotune candidate.
    for tile in tl.range(tile_lo, tile_hi, flatten=FLATTEN):
        cols = tile * BLOCK_V + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        cols_c = tl.where(col_ok, cols, 0).to(tl.int64)
        w_ptrs = W + cols_c[None, :] * stride_wv + offs_d[:, None] * stride_wd  # [BLOCK_D, BLOCK_V]
        acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
        for k in range(0, D, BLOCK_D):
            if EVEN_D:
                a = tl.load(h_ptrs + k * stride_hd)
                b = tl.load(w_ptrs + k * stride_wd)
            else:
                a = tl.load(h_ptrs + k * stride_hd, mask=(offs_d[None, :] + k) < D, other=0.0)
                b = tl.load(w_ptrs + k * stride_wd, mask=(offs_d[:, None] + k) < D, other=0.0)
            if UPCAST_DOT:  # interpreter only: its tl.dot multiplies bf16 bit patterns as integers
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        z = acc
        if HAS_BIAS:
            z = z + tl.load(B + cols_c).to(tl.float32)[None, :]
        if HAS_SOFTCAP:
            z = softcap * _tanh(z / softcap)
        if HAS_TEMP:
            z = z * inv_temp
        z = tl.where(col_ok[None, :], z, float("-inf"))
        # Each tile has >= 1 valid column, so m_new is finite (for finite inputs) and no -inf - -inf.
        m_new = tl.maximum(m, tl.max(z, axis=1))
        # exp(x) as exp2(x * log2(e)): exp2 is the native MUFU op.
        p = tl.exp2((z - m_new[:, None]) * 1.4426950408889634)
        s = s * tl.exp2((m - m_new) * 1.4426950408889634) + tl.sum(p, axis=1)
        m = m_new
        hit = cols[None, :] == t[:, None]
        tgt += tl.sum(tl.where(hit, z, 0.0), axis=1)

    part = split.to(tl.int64) * N + rows
    tl.store(PART_M + part, m, mask=row_ok)
    tl.store(PART_S + part, s, mask=row_ok)
    in_split = (t >= tile_lo * BLOCK_V) & (t < tile_hi * BLOCK_V)
    tl.store(TGT + rows, tgt, mask=row_ok & in_split)


@triton.jit
def _lse_merge_kernel(
    PART_M, PART_S, TGT, T,
    LOGP, LSE, GREEDY,
    N, num_splits, ignore_index,
    BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < N
    sp = tl.arange(0, BLOCK_S)
    # Pass 1: global max per row. Pass 2: rescaled sum. Both read [BLOCK_S, BLOCK_R] tiles.
    mx = tl.full([BLOCK_R], float("-inf"), tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        ok = ((s0 + sp) < num_splits)[:, None] & row_ok[None, :]
        idx = (s0 + sp).to(tl.int64)[:, None] * N + rows[None, :]
        mx = tl.maximum(mx, tl.max(tl.load(PART_M + idx, mask=ok, other=float("-inf")), axis=0))
    mx_safe = tl.where(row_ok, mx, 0.0)
    tot = tl.zeros([BLOCK_R], tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        ok = ((s0 + sp) < num_splits)[:, None] & row_ok[None, :]
        idx = (s0 + sp).to(tl.int64)[:, None] * N + rows[None, :]
        mi = tl.load(PART_M + idx, mask=ok, other=float("-inf"))
        si = tl.load(PART_S + idx, mask=ok, other=0.0)
        tot += tl.sum(si * tl.exp2((mi - mx_safe[None, :]) * 1.4426950408889634), axis=0)
    lse = mx + tl.log2(tl.where(row_ok, tot, 1.0)) * 0.6931471805599453
    t = tl.load(T + rows, mask=row_ok, other=ignore_index).to(tl.int32)
    valid = t != ignore_index
    zt = tl.load(TGT + rows, mask=row_ok & valid, other=0.0)
    tl.store(LOGP + rows, tl.where(valid, zt - lse, 0.0), mask=row_ok)
    tl.store(LSE + rows, lse, mask=row_ok)
    tl.store(GREEDY + rows, (valid & (zt >= mx)).to(tl.int8), mask=row_ok)


class Config(NamedTuple):
    block_n: int
    block_v: int
    block_d: int
    num_warps: int
    num_stages: int
    group_n: int = 8
    flatten: bool = False


# Hopper (sm90) bf16/fp16: the shapes of the Triton matmul tutorial's best H100 configs.
# 128x256 is the default (highest reuse per loaded byte). Compiled ahead of time for sm_90a with
# Triton 3.9 (no GPU): 252 registers, no spills, 3-stage cp.async pipeline (144 KiB smem), HGMMA;
# with bias+softcap+temperature it spills 18 words in the epilogue (once per 64 K-steps), and
# flatten=True at 128x256 spills 52, hence flatten only at 128x128 (168-218 registers). The rest
# are candidates for the opt-in autotuner (UAE_LOGPROB_AUTOTUNE=1).
_CONFIGS_HALF_SM90 = [
    Config(128, 256, 64, 8, 3),
    Config(128, 128, 64, 8, 4),
    Config(128, 128, 64, 8, 4, flatten=True),
    Config(128, 128, 64, 4, 4),
    Config(64, 256, 64, 8, 4),
    Config(128, 256, 64, 8, 4, group_n=16),
]
# Ampere: 128x128x32 w4 spills 71 words on sm_80, so the 8-warp tile leads (228 registers, none).
_CONFIGS_HALF_SM80 = [Config(128, 128, 64, 8, 3), Config(64, 128, 32, 4, 4), Config(128, 128, 32, 4, 4)]
# fp32 uses IEEE fp32 FMAs (not tf32): smaller tiles, the math units are the limit.
_CONFIGS_FP32 = [Config(64, 64, 32, 4, 3), Config(64, 128, 32, 8, 3), Config(128, 64, 32, 8, 3)]
# Interpreter: every program and op runs in numpy with a fixed overhead, so few, large tiles are
# fastest (~8 vocab tiles per row); still small enough to leave ragged row/vocab/D edges.
def _interpret_config(v: int) -> Config:
    return Config(32, min(4096, max(128, triton.next_power_of_2(v) // 8)), 32, 4, 1, group_n=2)


_TUNED: dict = {}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _candidates(dtype: torch.dtype, device: torch.device, v: int):
    if device.type != "cuda":
        return [_interpret_config(v)]
    if dtype == torch.float32:
        return _CONFIGS_FP32
    major, _ = torch.cuda.get_device_capability(device)
    return _CONFIGS_HALF_SM90 if major >= 9 else _CONFIGS_HALF_SM80


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: small, so the split path is exercised on CPU too


def _grid_split(n: int, v: int, cfg: Config, sms: int, waves: int):
    """(num_splits, tiles_per_split): enough programs for ~`waves` waves, every split non-empty."""
    row_blocks = triton.cdiv(n, cfg.block_n)
    v_tiles = triton.cdiv(v, cfg.block_v)
    splits = max(1, min(v_tiles, triton.cdiv(sms * waves, row_blocks)))
    per = triton.cdiv(v_tiles, splits)
    return triton.cdiv(v_tiles, per), per


def _launch(hidden, weight, targets, bias, ignore_index, softcap, temperature, cfg, outs, poison, splits=None):
    n, d = hidden.shape
    v = weight.shape[0]
    if splits is None:
        # ~32 waves on a GPU (cheap tail); one "wave" of 4 fake SMs in the interpreter.
        waves = 32 if hidden.device.type == "cuda" else 1
        num_splits, per = _grid_split(n, v, cfg, _num_sms(hidden.device), waves)
    else:  # tests force a split count
        per = triton.cdiv(triton.cdiv(v, cfg.block_v), splits)
        num_splits = triton.cdiv(triton.cdiv(v, cfg.block_v), per)
    fill = torch.full if poison else (lambda shape, _v, **kw: torch.empty(shape, **kw))
    part_m = fill((num_splits, n), float("nan"), dtype=torch.float32, device=hidden.device)
    part_s = fill((num_splits, n), float("nan"), dtype=torch.float32, device=hidden.device)
    tgt = fill((n,), float("nan"), dtype=torch.float32, device=hidden.device)
    logp, lse, greedy = outs
    # IEEE (not tf32) for fp32 inputs, and for the interpreter's upcast bf16; 16-bit dots ignore it.
    upcast = hidden.device.type != "cuda" and hidden.dtype == torch.bfloat16
    dot_precision = "ieee" if hidden.dtype == torch.float32 or upcast else "tf32"
    grid = (triton.cdiv(n, cfg.block_n) * num_splits,)
    _lse_partial_kernel[grid](
        hidden, weight, bias if bias is not None else part_s, targets,
        part_m, part_s, tgt,
        n, v, d,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        ignore_index, float(softcap or 1.0), 1.0 / temperature,
        num_splits, per,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, HAS_TEMP=temperature != 1.0,
        EVEN_D=d % cfg.block_d == 0,
        BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d, GROUP_N=cfg.group_n,
        DOT_PRECISION=dot_precision, FLATTEN=cfg.flatten,
        # Exact: bf16 x bf16 products are exact in fp32 and the GPU accumulates in fp32 too.
        UPCAST_DOT=upcast,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    block_r = 64
    _lse_merge_kernel[(triton.cdiv(n, block_r),)](
        part_m, part_s, tgt, targets, logp, lse, greedy,
        n, num_splits, ignore_index,
        BLOCK_R=block_r, BLOCK_S=32, num_warps=4,
    )


def _autotune(key, args, outs, cands):
    """Time each candidate once (opt-in: UAE_LOGPROB_AUTOTUNE=1); cache the best per shape key."""
    best, best_t = None, float("inf")
    for cfg in cands:
        try:
            ms = triton.testing.do_bench(lambda: _launch(*args, cfg=cfg, outs=outs, poison=False), warmup=5, rep=20)
        except Exception:  # a config that does not compile (shared memory) is simply skipped
            continue
        if ms < best_t:
            best, best_t = cfg, ms
    _TUNED[key] = best or cands[0]
    return _TUNED[key]


def token_logprobs_triton(
    hidden, weight, targets, bias, ignore_index, softcap, temperature, with_greedy,
    *, config: Optional[Config] = None, splits: Optional[int] = None, poison: bool = False,
):
    """Triton path of ``token_logprobs`` on validated 2-D inputs. Returns (logp, lse, greedy|None).

    ``config``/``splits`` override the heuristics (tests); ``poison`` pre-fills every buffer the
    kernels write with NaN (tests check each element was written).
    """
    if hidden.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(
            f"impl='triton' supports float16/bfloat16/float32 hidden, got {str(hidden.dtype)[6:]}; "
            f"use impl='torch' (impl='auto' does) for float64"
        )
    if hidden.device.type != "cuda" and not _interpreting():
        raise ValueError("impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before import)")
    # Kernels index with strides; only a non-unit D stride would make loads slow, so fix just that.
    if hidden.stride(-1) != 1:
        hidden = hidden.contiguous()
    targets = targets.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    n = hidden.shape[0]
    dev = hidden.device
    if poison:
        outs = (
            torch.full((n,), float("nan"), dtype=torch.float32, device=dev),
            torch.full((n,), float("nan"), dtype=torch.float32, device=dev),
            torch.full((n,), 7, dtype=torch.int8, device=dev),
        )
    else:
        outs = (
            torch.empty(n, dtype=torch.float32, device=dev),
            torch.empty(n, dtype=torch.float32, device=dev),
            torch.empty(n, dtype=torch.int8, device=dev),
        )
    args = (hidden, weight, targets, bias, ignore_index, softcap, temperature)
    # Every launch (the autotune trials too) on the tensors' device: on cuda:1 with cuda:0 current, Triton
    # would launch on device 0's stream with device-1 pointers.
    with (torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext()):
        if config is None:
            cands = _candidates(hidden.dtype, dev, weight.shape[0])
            config = cands[0]
            if n <= 64:  # few tokens (one answer): a 64-row tile wastes half as much of each MMA
                config = next((c for c in cands if c.block_n <= 64), config)
            if dev.type == "cuda" and os.environ.get("UAE_LOGPROB_AUTOTUNE", "0") == "1" and len(cands) > 1:
                key = (triton.next_power_of_2(n), hidden.shape[1], weight.shape[0], hidden.dtype, bias is not None,
                       softcap is not None, torch.cuda.get_device_capability(dev))
                config = _TUNED.get(key) or _autotune(key, args, outs, cands)
        _launch(*args, cfg=config, outs=outs, poison=poison, splits=splits)
    logp, lse, greedy = outs
    if poison and bool((greedy > 1).any()):
        raise RuntimeError("greedy output not fully written by the Triton kernel")
    return logp, lse, (greedy.view(torch.bool) if with_greedy else None)
