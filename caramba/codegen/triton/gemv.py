"""Triton kernel for the linear op at decode: y = x @ w.T (+ bias) for one row of x.

At decode with batch 1 a linear is a matrix-vector product: its time is the weight's bytes over memory bandwidth.
This kernel streams the weight once, each program a block of BLOCK_N output features (rows of w, contiguous along
K) through the whole K loop, an fp32 (BLOCK_N, BLOCK_K) accumulator of w * x products summed over K once at the
end, the row of x re-read from L2. Bias added in fp32, one rounding to the output dtype (as cuBLAS's epilogue).

Measured (benchmarks/gemv.py, H100, CUDA-graph replays, cold L2): 51-105% of copy bandwidth against cuBLAS's
45-93% over the 1b presets' weights at one row; with 8 rows the best of 36 tensor-core configurations beat cuBLAS
by 0-7% and the default lost up to 15%, so more than one row goes to cuBLAS (torch's F.linear), as prefill does.

    linear(x, w, bias=None, *, config=None) -> Tensor   x (..., K) with one row (any layout with unit stride
                                                         along K), w (N, K) contiguous, bias (N,) or None;
                                                         anything else goes to F.linear
    choose(n, k): the launch configuration per shape
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from caramba.codegen.triton import source
from caramba.codegen.triton.jit_helpers import HELPERS, TL_DTYPE, next_pow2, round_f32, to_f32
from caramba.codegen.triton.swiglu import swiglu

_TEMPLATE = '''"""caramba gemv: $DTYPE, one row, x = $WHAT, BLOCK_N=$BLOCK_N, BLOCK_K=$BLOCK_K."""
import triton
import triton.language as tl
$HELPERS

@triton.jit
def $NAME(x_ptr, u_ptr, w_ptr, b_ptr, y_ptr, N, K, swn, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr):
    rn = tl.program_id(0) * $BLOCK_N + tl.arange(0, $BLOCK_N)
    nmask = rn < N
    rn_in = tl.where(nmask, rn, 0).to(tl.int64)  # rows past N read row 0 (never stored): unmasked weight loads
    rk = tl.arange(0, $BLOCK_K)
    w_ptrs = w_ptr + rn_in[:, None] * swn + rk[None, :]
    acc = tl.zeros([$BLOCK_N, $BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, $BLOCK_K):
        if EVEN_K:
            w = tl.load(w_ptrs)
$LOAD_X
        else:
            kmask = (k0 + rk) < K
            w = tl.load(w_ptrs, mask=kmask[None, :], other=0.0)
$LOAD_X_MASKED
        acc += w.to(tl.float32) * x[None, :]
        w_ptrs += $BLOCK_K
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(b_ptr + rn, mask=nmask, other=0.0).to(tl.float32)
    tl.store(y_ptr + rn, y.to($DTYPE), mask=nmask)


kernel = $NAME  # the name profilers show
'''

def _load_x(dtype: torch.dtype, swiglu: bool, mask: str) -> str:
    """Source for the row of x at the K tile k0 as fp32 (`x`): read as is, or the swiglu activation of gate and up
    computed here with the swiglu op's roundings (silu rounded to the dtype, then the product)."""
    def load(ptr: str) -> str:
        return to_f32(f"tl.load({ptr} + k0 + rk{mask})", dtype)
    if not swiglu:
        return f"            x = {load('x_ptr')}"
    return "\n".join([f"            g = {load('x_ptr')}", f"            u = {load('u_ptr')}",
                      f"            act = {round_f32('g / (1.0 + tl.exp(-g))', dtype)}",
                      f"            x = {round_f32('act * u', dtype)}"])


@dataclass(frozen=True)
class Config:
    block_n: int
    block_k: int
    warps: int = 4
    stages: int = 3


def choose(n: int, k: int) -> Config:
    """The launch configuration for an (N, K) weight, from the sweep of benchmarks/gemv.py on an H100 (2026-11-22,
    the best of 36 per shape over the 1b presets' weights): (8, 1024) tiles, 8 warps, 2 stages."""
    return Config(block_n=8, block_k=min(1024, max(64, next_pow2(k))), warps=8, stages=2)


@functools.lru_cache(maxsize=None)
def _kernel(dtype: torch.dtype, block_n: int, block_k: int, swiglu: bool = False):
    text = source.render(_TEMPLATE, DTYPE=TL_DTYPE[dtype], BLOCK_N=block_n, BLOCK_K=block_k,
                         WHAT="swiglu(gate, up)" if swiglu else "x", NAME="gemv_swiglu" if swiglu else "gemv",
                         HELPERS=HELPERS, LOAD_X=_load_x(dtype, swiglu, ""),
                         LOAD_X_MASKED=_load_x(dtype, swiglu, ", mask=kmask, other=0.0"))
    return source.load(text, "gemv").kernel


def supported(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether `linear` runs this product through the kernel (else it goes to F.linear)."""
    if x.dtype not in TL_DTYPE or w.dtype != x.dtype or w.dim() != 2 or not w.is_contiguous() or x.dim() < 1:
        return False
    if bias is not None and (bias.dtype != x.dtype or bias.dim() != 1 or not bias.is_contiguous()):
        return False
    k = w.shape[1]
    return x.shape[-1] == k and k > 0 and x.numel() == k and x.device == w.device


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, *,
           config: Config | None = None) -> torch.Tensor:
    """The linear op: x @ w.T (+ bias), shaped (..., N); through the kernel when `supported`, else F.linear."""
    if not supported(x, w, bias):
        return F.linear(x, w, bias)
    return _launch(x, None, w, bias, config)


def swiglu_linear(gate: torch.Tensor, up: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, *,
                  config: Config | None = None) -> torch.Tensor:
    """The swiglu_linear op: linear(swiglu(gate, up), w, bias). One row: the kernel computes the activation of
    each K tile as it streams w; otherwise the swiglu kernel, then linear."""
    if gate.shape != up.shape or gate.dtype != up.dtype or not supported(gate, w, bias):
        return linear(swiglu(gate, up), w, bias, config=config)
    return _launch(gate, up, w, bias, config)


def _launch(x: torch.Tensor, up: torch.Tensor | None, w: torch.Tensor, bias: torch.Tensor | None,
            config: Config | None) -> torch.Tensor:
    n, k = w.shape
    cfg = config or choose(n, k)
    row = x if x.is_contiguous() else x.contiguous()
    u = row if up is None else (up if up.is_contiguous() else up.contiguous())
    y = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    _kernel(x.dtype, cfg.block_n, cfg.block_k, up is not None)[(-(-n // cfg.block_n),)](
        row, u, w, bias if bias is not None else w, y, n, k, w.stride(0), HAS_BIAS=bias is not None,
        EVEN_K=k % cfg.block_k == 0, num_warps=cfg.warps, num_stages=cfg.stages)
    return y
