"""What the norm, RoPE, SwiGLU and cache-append kernels share: jit helpers spliced into their templates, dtype
spellings and launch sizing.

Conversions to and from bf16 are done on the bits (`to_bf16`, `bf16_to_f32`) rather than with `.to()`: Triton's
interpreter (TRITON_INTERPRET=1, how CI runs every kernel) truncates fp32 -> bf16 and flushes bf16 subnormals, so
a plain cast would round differently on the CPU than on the GPU. The integer form is round-to-nearest-even (torch's
rule) everywhere and costs a few integer ops in kernels that are bound by memory.
"""
from __future__ import annotations

import torch

# Spliced after `import triton.language as tl` in every template that converts dtypes.
HELPERS = '''
@triton.jit
def to_bf16(x):
    """fp32 -> bf16, round to nearest even (NaN stays NaN)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return tl.where(x == x, bits.to(tl.uint16).to(tl.bfloat16, bitcast=True), x.to(tl.bfloat16))


@triton.jit
def bf16_to_f32(x):
    """bf16 -> fp32, exact (subnormals included)."""
    return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
'''

TL_DTYPE: dict[torch.dtype, str] = {torch.float32: "tl.float32", torch.float16: "tl.float16",
                                    torch.bfloat16: "tl.bfloat16"}
FLOAT_DTYPES = tuple(TL_DTYPE)


def to_f32(expr: str, dtype: torch.dtype) -> str:
    """Source converting `expr`, a value of `dtype`, to fp32 exactly."""
    if dtype == torch.bfloat16:
        return f"bf16_to_f32({expr})"
    return expr if dtype == torch.float32 else f"({expr}).to(tl.float32)"


def from_f32(expr: str, dtype: torch.dtype) -> str:
    """Source rounding `expr`, an fp32 value, to `dtype` (round to nearest even)."""
    if dtype == torch.bfloat16:
        return f"to_bf16({expr})"
    return expr if dtype == torch.float32 else f"({expr}).to({TL_DTYPE[dtype]})"


def round_f32(expr: str, dtype: torch.dtype) -> str:
    """Source rounding an fp32 value to `dtype` and back: what torch computes in `dtype` (one rounding per op;
    an add or multiply of two values of a 16-bit float type done in fp32 and rounded once is correctly rounded)."""
    return expr if dtype == torch.float32 else to_f32(from_f32(expr, dtype), dtype)


def check_float(x: torch.Tensor, what: str) -> None:
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{what} must be fp32, fp16 or bf16, got {x.dtype}")


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def num_warps(elements: int) -> int:
    """Warps for a program holding `elements` values: about 16 per thread, 1 to 16 warps."""
    return min(16, max(1, next_pow2(elements // 512)))


def rows_per_program(block: int, target: int = 4096) -> int:
    """Rows a program handles when each row is a tile of `block`: narrow rows are batched up to ~target values."""
    return max(1, min(64, target // block))
