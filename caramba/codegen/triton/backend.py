"""Target "cuda": Triton kernels on NVIDIA GPUs (or on the CPU through Triton's interpreter, for tests)."""
from __future__ import annotations

import importlib.util
from typing import Any, Mapping

import torch

from caramba.codegen.backend import Availability, Backend
from caramba.ir.graph import Node
from caramba.passes.base import GENERIC_FUSED_OPS, PassContext, TargetNeeds

NAME = "cuda"


def availability() -> Availability:
    from caramba.codegen.triton.source import interpreting

    if importlib.util.find_spec("triton") is None:
        return Availability(False, "needs triton (pip install triton); `caramba targets` lists the others")
    if torch.cuda.is_available():
        return Availability(True, f"CUDA GPU: {torch.cuda.get_device_name()}")
    if interpreting():
        return Availability(True, "no CUDA GPU: Triton's interpreter runs the kernels on the CPU "
                                  "(TRITON_INTERPRET=1), slowly; target 'auto' never picks it", auto=False)
    return Availability(False, "no CUDA GPU (torch.cuda.is_available() is False); TRITON_INTERPRET=1 runs its "
                               "kernels on the CPU, slowly")


def device() -> torch.device:
    # TRITON_INTERPRET=1 without a GPU: the same kernels, run by Triton's interpreter on the CPU
    return torch.device(NAME) if torch.cuda.is_available() else torch.device("cpu")


def partitions(node: Node, ctx: PassContext) -> int:
    """The decode entry's split-K partitions: the device's chunking plan for batch 1 at max_seq_len's length
    bucket (cost model, or what was measured here); the prefill entry 1 (its kernel tiles queries instead). The
    executor refines the choice per batch when it launches (kernels.decode_chunking)."""
    if ctx.options.get("entry") != "decode":
        return 1
    from caramba.codegen.triton.chunking import device_plan

    return device_plan(device()).entry_partitions(node, int(ctx.options.get("max_seq_len", 4096)))


def kernels(dev: torch.device, options: Mapping[str, Any]):
    from caramba.codegen.triton.kernels import TritonKernels
    from caramba.codegen.triton.source import require_triton

    require_triton()
    return TritonKernels(gemv=options.get("gemv", True))


def launch(dev: torch.device, options: Mapping[str, Any]):
    from caramba.codegen.triton.launch import GRAPH_SEGMENTS, CudaLaunch

    return CudaLaunch(dev, cuda_graphs=options.get("cuda_graphs"), pdl=options.get("pdl", True),
                      graph_segments=options.get("graph_segments", GRAPH_SEGMENTS))


BACKEND = Backend(
    name=NAME,
    summary="Triton kernels on NVIDIA GPUs; CUDA-graph decode, programmatic dependent launch on Hopper",
    availability=availability,
    needs=TargetNeeds(fused_ops=GENERIC_FUSED_OPS | {"linear_slices", "swiglu_linear", "rms_norm_linear",
                                                     "add_rms_norm_linear", "swiglu_qlinear", "rms_norm_qlinear",
                                                     "add_rms_norm_qlinear"}, chunking=partitions),
    # cuda_graphs: the decode step as a CUDA graph (default on a GPU); gemv: one-row linears through the GEMV
    # kernel (else cuBLAS); graph_segments: graphs the decode step is captured as; check_values: when the cache
    # append's error bits are read ("deferred" by the next call, "step", "off"); pdl: programmatic dependent launch
    options={"cuda_graphs": bool, "gemv": bool, "graph_segments": int, "check_values": str, "pdl": bool},
    auto_rank=0,
    kernels=kernels,
    launch=launch,
    device=device,
)
