"""Compiled Metal libraries: rendered MSL, cached on disk like every generated source (codegen/source.py), compiled
once per process: by `torch.mps.compile_shader` on a Mac, by the CPU emulator (emulator.py) elsewhere.

Both return an object whose attribute `lib.name(*args, threads=, group_size=)` dispatches kernel `name` with
compile_shader's calling convention, so every launcher in this package is written once for both.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Any

import torch

from caramba.codegen.source import SourceCache

_LIBRARIES: dict[tuple[str, bool], Any] = {}
MSL_VERSION = "msl-3.1"  # the dialect the templates keep to (METAL.md); part of the source cache's salt


def emulated(device: torch.device) -> bool:
    """Kernels for tensors on `device` run in the emulator: CPU tensors, with CARAMBA_METAL_EMULATE=1 or not."""
    return device.type != "mps"


def library(source: str, name: str, device: torch.device) -> Any:
    """The compiled library of `source` for tensors on `device`; `name` names its file in the source cache."""
    emulate = emulated(device)
    key = (source, emulate)
    lib = _LIBRARIES.get(key)
    if lib is None:
        SourceCache("metal", MSL_VERSION, suffix=".metal").write(source, name)
        if emulate:
            from caramba.codegen.metal.emulator import compile_library

            lib = compile_library(source)
        else:
            lib = torch.mps.compile_shader(source)
        _LIBRARIES[key] = lib
    return lib


_LANE_ORDER: contextvars.ContextVar[int] = contextvars.ContextVar("caramba_metal_lane_order", default=0)


@contextlib.contextmanager
def lane_order(order: int):
    """Within the block, emulated simd reductions combine lanes in `order` (0: in order, 1: reversed): a kernel
    whose result depends on the hardware's order beyond rounding shows it (tests run both)."""
    token = _LANE_ORDER.set(order)
    try:
        yield
    finally:
        _LANE_ORDER.reset(token)


def max_threads(lib: Any, kernel: str) -> int:
    """The most threads a threadgroup of `kernel` may have: the compiled pipeline's maxTotalThreadsPerThreadgroup
    on a Mac (it drops below 1024 when a kernel needs many registers), 1024 in the emulator."""
    return int(getattr(getattr(lib, kernel), "max_threads_per_threadgroup", 1024))


class ThreadgroupTooLarge(RuntimeError):
    """A launch asked for more threads a threadgroup than the compiled pipeline allows."""


def dispatch(lib: Any, kernel: str, *args: Any, threads: Any, group_size: Any, device: torch.device) -> None:
    """Launch `kernel` of `lib` (compile_shader's convention; the emulator also takes the lane order). A
    threadgroup larger than the pipeline allows is refused here, with the numbers, instead of by Metal."""
    extra = {"lane_order": _LANE_ORDER.get()} if emulated(device) else {}
    group = group_size if isinstance(group_size, int) else int(torch.tensor(group_size).prod())
    limit = max_threads(lib, kernel)
    if group > limit:
        raise ThreadgroupTooLarge(f"metal kernel {kernel}: a threadgroup of {group} threads, but its compiled "
                                  f"pipeline allows {limit} (maxTotalThreadsPerThreadgroup)")
    getattr(lib, kernel)(*args, threads=threads, group_size=group_size, **extra)
