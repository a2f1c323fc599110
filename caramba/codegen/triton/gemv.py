"""Triton kernel for the linear op at decode: y = x @ w.T (+ bias) for a few rows of x (M <= MAX_ROWS).

At decode a linear is a matrix-vector product over a few rows (M = batch): its time is the weight's bytes over
memory bandwidth, and cuBLAS's small-M kernels reach ~45% of copy bandwidth on an H200 in caramba's decode step
(benchmarks/RESULTS.md). This kernel streams the weight once, each program a block of BLOCK_N output features
(rows of w, contiguous along K) through the whole K loop, with the M rows of x re-read from L2:

    FMA path (M == 1): an fp32 (BLOCK_N, BLOCK_K) accumulator of w * x products, summed over K once at the end;
    DOT path (M <= 16): tl.dot of the weight tile (BLOCK_N, BLOCK_K) with x's tile transposed (BLOCK_K, 16), rows
    of x past M masked to zero (the tensor cores' idle rows cost no bytes).

Accumulation in fp32, one rounding to the output dtype at the end, bias added in fp32 before it (as cuBLAS's
epilogue does). Larger M goes to cuBLAS (torch's F.linear), which is what prefill wants.

    linear(x, w, bias=None, *, out=None, config=None) -> Tensor   x (..., K) any layout with unit stride along K
                                                                   (rows with one stride: a view, else copied),
                                                                   w (N, K) contiguous, bias (N,) or None
    CONFIGS / choose(m, n, k): the launch configuration per shape (measured on the device: benchmarks/gemv.py)
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from caramba.codegen.triton import source
from caramba.codegen.triton.jit_helpers import TL_DTYPE, next_pow2

MAX_ROWS = 16

_TEMPLATE = '''"""caramba gemv: $DTYPE, M <= $BLOCK_M, $PATH path, BLOCK_N=$BLOCK_N, BLOCK_K=$BLOCK_K."""
import triton
import triton.language as tl


@triton.jit
def kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, sxm, swn, sym, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr):
    pid = tl.program_id(0)
    rn = pid * $BLOCK_N + tl.arange(0, $BLOCK_N)
    nmask = rn < N
    rn_in = tl.where(nmask, rn, 0).to(tl.int64)  # rows past N read row 0 (never stored): unmasked weight loads
    rk = tl.arange(0, $BLOCK_K)
    w_ptrs = w_ptr + rn_in[:, None] * swn + rk[None, :]
    if $DOT:
        rm = tl.arange(0, $BLOCK_M)
        mmask = rm < M
        x_ptrs = x_ptr + rm[None, :] * sxm + rk[:, None]  # (BLOCK_K, BLOCK_M): x transposed
        acc = tl.zeros([$BLOCK_N, $BLOCK_M], dtype=tl.float32)
    else:
        x_ptrs = x_ptr + rk
        acc = tl.zeros([$BLOCK_N, $BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, $BLOCK_K):
        if EVEN_K:
            w = tl.load(w_ptrs)
            if $DOT:
                x = tl.load(x_ptrs, mask=mmask[None, :], other=0.0)
            else:
                x = tl.load(x_ptrs)
        else:
            kmask = (k0 + rk) < K
            w = tl.load(w_ptrs, mask=kmask[None, :], other=0.0)
            if $DOT:
                x = tl.load(x_ptrs, mask=kmask[:, None] & mmask[None, :], other=0.0)
            else:
                x = tl.load(x_ptrs, mask=kmask, other=0.0)
        if $DOT:
            acc = $DOT_ACC
        else:
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        w_ptrs += $BLOCK_K
        x_ptrs += $BLOCK_K
    if $DOT:
        y = acc
        ym = rm
    else:
        y = tl.sum(acc, axis=1)[:, None]
        ym = tl.arange(0, 1)
    if HAS_BIAS:
        y += tl.load(b_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[:, None]
    tl.store(y_ptr + ym[None, :] * sym + rn[:, None], y.to($DTYPE), mask=nmask[:, None] & (ym < M)[None, :])
'''


@dataclass(frozen=True)
class Config:
    block_n: int
    block_k: int
    warps: int = 4
    stages: int = 3


def choose(m: int, n: int, k: int) -> Config:
    """The launch configuration for M rows of x against an (N, K) weight, from the sweep of benchmarks/gemv.py on
    an H100 (2026-11-22: the best configuration of 36 per shape for the 1b presets' weights): one row streams
    (8, 1024) tiles with 8 warps and 2 stages; 8 rows take (64, 256) tiles on the tensor cores, (16, 512) when K is
    long (fewer, longer programs starve the chip at N = 2048)."""
    if m == 1:
        return Config(block_n=8, block_k=min(1024, max(64, next_pow2(k))), warps=8, stages=2)
    if k >= 8192:
        return Config(block_n=16, block_k=512, warps=4, stages=5)
    return Config(block_n=64, block_k=min(256, max(32, next_pow2(k))), warps=4, stages=4)


@functools.lru_cache(maxsize=None)
def _kernel(dtype: torch.dtype, block_m: int, block_n: int, block_k: int, interpret: bool):
    dot = block_m > 1
    if dtype == torch.float32 or interpret:
        # fp32: IEEE products (Triton's default for fp32 is tf32). Interpreter: products of 16-bit values taken
        # in fp32 (exact either way; its bf16 dot multiplies the raw bits)
        dot_acc = 'tl.dot(w.to(tl.float32), x.to(tl.float32), acc, input_precision="ieee")'
    else:
        dot_acc = "tl.dot(w, x, acc)"
    text = source.render(_TEMPLATE, DTYPE=TL_DTYPE[dtype], BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                         PATH="dot" if dot else "fma", DOT=dot, DOT_ACC=dot_acc)
    return source.load(text, "gemv").kernel


def supported(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether `linear` runs this product through the kernel (else it goes to F.linear)."""
    if x.dtype not in TL_DTYPE or w.dtype != x.dtype or w.dim() != 2 or not w.is_contiguous() or x.dim() < 1:
        return False
    if bias is not None and (bias.dtype != x.dtype or bias.dim() != 1 or not bias.is_contiguous()):
        return False
    k = w.shape[1]
    return x.shape[-1] == k and k > 0 and 0 < x.numel() // k <= MAX_ROWS and x.device == w.device


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, *,
           config: Config | None = None) -> torch.Tensor:
    """The linear op: x @ w.T (+ bias), shaped (..., N); through the kernel when `supported`, else F.linear."""
    if not supported(x, w, bias):
        return F.linear(x, w, bias)
    n, k = w.shape
    rows = _rows(x, k)
    m = rows.shape[0]
    cfg = config or choose(m, n, k)
    block_m = 1 if m == 1 else MAX_ROWS
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    kern = _kernel(x.dtype, block_m, cfg.block_n, cfg.block_k, source.interpreting())
    kern[(-(-n // cfg.block_n),)](rows, w, bias if bias is not None else w, y, m, n, k, rows.stride(0), w.stride(0),
                                  y.stride(0), HAS_BIAS=bias is not None, EVEN_K=k % cfg.block_k == 0,
                                  num_warps=cfg.warps, num_stages=cfg.stages)
    return y.view(*x.shape[:-1], n)


def _rows(x: torch.Tensor, k: int) -> torch.Tensor:
    """x as (rows, K) with unit stride along K: a view when its layout allows, else a contiguous copy."""
    if x.stride(-1) == 1:
        try:
            return x.view(-1, k)
        except RuntimeError:
            pass
    return x.contiguous().view(-1, k)
