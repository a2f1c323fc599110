"""Target "metal": MSL kernels on Apple GPUs through torch.mps.compile_shader, or on the CPU through the emulator
(CARAMBA_METAL_EMULATE=1), which runs the same rendered text so Linux CI proves its numerics."""
from __future__ import annotations

import shutil
from typing import Any, Mapping

import torch

from caramba import flags
from caramba.codegen.backend import Availability, Backend
from caramba.ir.graph import Node
from caramba.passes.base import GENERIC_FUSED_OPS, PassContext, TargetNeeds

NAME = "metal"
CACHE_KINDS = frozenset({"fp32", "fp16", "q8_0", "q4_0", "nf4"})  # no bf16: MSL 3.1 bfloat is not on every GPU


def mps() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
                and hasattr(torch.mps, "compile_shader"))


def availability() -> Availability:
    if mps():
        from caramba.codegen.metal.chunking import chip_name

        return Availability(True, f"Apple GPU ({chip_name() or 'MPS'}): MSL through torch.mps.compile_shader")
    if flags.metal_emulate():
        from caramba.codegen.metal.emulator import compiler

        cxx = compiler()
        if shutil.which(cxx[0]) is None:
            return Availability(False, f"CARAMBA_METAL_EMULATE=1 builds the MSL as C++, but the compiler `{cxx[0]}` "
                                       f"is not installed (install g++ or set $CXX)")
        return Availability(True, "no Apple GPU: CARAMBA_METAL_EMULATE=1 runs the same MSL on the CPU through "
                                  "caramba's emulator, slowly; target 'auto' never picks it", auto=False)
    why = ("torch has no torch.mps.compile_shader (torch >= 2.7 needed)"
           if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
           else "no Apple GPU (torch.backends.mps.is_available() is False)")
    return Availability(False, f"{why}; set CARAMBA_METAL_EMULATE=1 to run its MSL on the CPU through the emulator "
                               f"(needs a C++ compiler), slowly")


def device() -> torch.device:
    return torch.device("mps") if mps() else torch.device("cpu")


def partitions(node: Node, ctx: PassContext) -> int:
    """The decode entry's split-K partitions from the device's chunking plan for batch 1 at max_seq_len's bucket;
    the prefill entry 1. The executor refines the choice per batch (kernels.decode_chunking)."""
    if ctx.options.get("entry") != "decode":
        return 1
    from caramba.codegen.metal.chunking import device_plan

    return device_plan(device()).entry_partitions(node, int(ctx.options.get("max_seq_len", 4096)))


def kernels(dev: torch.device, options: Mapping[str, Any]):
    from caramba.codegen.metal.kernels import MetalKernels

    return MetalKernels()


BACKEND = Backend(
    name=NAME,
    summary="Metal Shading Language kernels on Apple GPUs (torch.mps.compile_shader); CARAMBA_METAL_EMULATE=1 runs "
            "them on the CPU",
    availability=availability,
    needs=TargetNeeds(fused_ops=GENERIC_FUSED_OPS, cache_kinds=CACHE_KINDS, residual_ring=True,
                      chunking=partitions),
    # check_values: when the cache append's error bits are read ("deferred" by the next call, "step", "off")
    options={"check_values": str},
    auto_rank=10,
    kernels=kernels,
    device=device,
)
