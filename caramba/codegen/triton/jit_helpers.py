"""What the norm, RoPE, SwiGLU and cache-append kernels share: jit helpers spliced into their templates, dtype
spellings and launch sizing.

Conversions to and from bf16 are done on the bits (`to_bf16`, `bf16_to_f32`) rather than with `.to()`: Triton's
interpreter (TRITON_INTERPRET=1, how CI runs every kernel) truncates fp32 -> bf16 and flushes bf16 subnormals, so
a plain cast would round differently on the CPU than on the GPU. The integer form is round-to-nearest-even (torch's
rule) everywhere and costs a few integer ops in kernels that are bound by memory.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools

import torch

from caramba.codegen.triton import source

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

# Programmatic dependent launch (Hopper and later): a kernel launched with launch_pdl=True may start while the
# kernel before it on the stream is still running, once all of that kernel's programs have started (they all call
# gdc_launch_dependents first). Its programs wait in gdc_wait until the previous kernel has finished and its writes
# are visible, so what they do before the wait must touch nothing a previous kernel writes (address math, and the
# GEMV's first weight tile: weights are constants). Every kernel launched with PDL waits in every program before it
# returns, so the chain stays ordered: kernel n+2 waits for n+1, which waited for n. What it saves: the launch
# latency between a decode step's ~130 small kernels (each program's start-up overlaps the previous kernel's tail),
# and the GEMV's first weight bytes in flight before the previous kernel ends. A kernel launched without it (a
# torch op) waits for everything before it, as usual. Under TRITON_INTERPRET=1 and on older GPUs `PDL` is False:
# the branch is not compiled, the kernels are what they were.
PDL_PROLOGUE = """    if PDL:  # programmatic dependent launch: the next kernel may start; wait for the last one
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
"""
PDL_TRIGGER = """    if PDL:  # programmatic dependent launch: the next kernel may start (jit_helpers)
        tl.extra.cuda.gdc_launch_dependents()
"""
_PDL_ON: contextvars.ContextVar[bool] = contextvars.ContextVar("caramba_pdl", default=True)


@contextlib.contextmanager
def pdl_enabled(on: bool):
    """Within the block, kernels launch with programmatic dependent launch where the GPU and Triton support it
    (`on`), or never (the cuda target option pdl=False: e.g. to rule it out when chasing a race)."""
    token = _PDL_ON.set(bool(on))
    try:
        yield
    finally:
        _PDL_ON.reset(token)


def pdl(device: torch.device) -> bool:
    """Whether kernels on `device` launch with PDL now: enabled, a CUDA GPU of compute capability >= 9 and a Triton
    with gdc_wait and launch_pdl; never under TRITON_INTERPRET=1."""
    if not _PDL_ON.get() or device.type != "cuda":
        return False
    return _pdl_supported(device.index)  # a CUDA tensor's device has an index; None: the current device


def launch_kwargs(device: torch.device) -> dict:
    """The keywords every launch on `device` passes: the kernel's PDL constexpr and, when on, launch_pdl (left out
    when off: older Tritons do not know it); compiled (not interpreted) also enable_fp_fusion=True, a multiply and an
    add into one FMA as every Triton up to 3.9 does by default and as the kernels were checked on the GPU (Triton
    3.9 warns that 3.10 turns the default off)."""
    flag = pdl(device)
    fusion = {"enable_fp_fusion": True} if device.type == "cuda" and not source.interpreting() else {}
    return {"PDL": True, "launch_pdl": True, **fusion} if flag else {"PDL": False, **fusion}


@functools.lru_cache(maxsize=None)
def cuda_option(name: str) -> bool:
    """Whether this Triton's CUDA backend takes launch/compile option `name` (launch_pdl, maxnreg, ...)."""
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return name in {f.name for f in dataclasses.fields(CUDAOptions)}


@functools.lru_cache(maxsize=None)  # asked at every launch: the device and Triton do not change
def _pdl_supported(index: int | None) -> bool:
    if source.interpreting() or not torch.cuda.is_available() or torch.cuda.get_device_capability(index)[0] < 9:
        return False
    try:
        import triton.language.extra.cuda as tl_cuda
    except ImportError:
        return False
    return hasattr(tl_cuda, "gdc_wait") and cuda_option("launch_pdl")


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
