"""How target "cuda" launches (codegen/backend.py Launch): programmatic dependent launch around every step, and
the decode step captured as CUDA graphs.

Captures keep PDL's programmatic edges. graph_segments > 1 captures the step as that many graphs sharing one
memory pool, replayed in order: the GPU starts on the first while the host still launches the rest. Measured on an
H100 (e2e_decode.py --variants full,onegraph, 2026-11-22): 4 segments against 1 changed tokens/s by -5% to +5%
across the 1b presets and kinds (the host's launch was not what the GPU waited for), so one graph is the default.
"""
from __future__ import annotations

from typing import Callable, ContextManager

import torch

from caramba.codegen.backend import Launch
from caramba.codegen.triton.jit_helpers import pdl_enabled
from caramba.errors import InputError

GRAPH_SEGMENTS = 1


class CudaLaunch(Launch):
    def __init__(self, device: torch.device, *, cuda_graphs: bool | None = None, pdl: bool = True,
                 graph_segments: int = GRAPH_SEGMENTS) -> None:
        if graph_segments < 1:
            raise InputError(f"target option graph_segments must be >= 1, got {graph_segments}")
        on_gpu = device.type == "cuda"
        self.graphs = on_gpu if cuda_graphs is None else cuda_graphs
        self.asynchronous = on_gpu
        self.pdl = pdl  # kernels launched with programmatic dependent launch where supported (jit_helpers.pdl)
        self.graph_segments = graph_segments

    def scope(self) -> ContextManager[None]:
        return pdl_enabled(self.pdl)

    def capture(self, run: Callable[..., list[torch.Tensor]]) -> tuple[Callable[[], None], torch.Tensor]:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up on a side stream, as capture requires
            run()
        torch.cuda.current_stream().wait_stream(stream)
        graphs = [torch.cuda.CUDAGraph() for _ in range(self.graph_segments)]
        pool = torch.cuda.graph_pool_handle()
        logits = run(segments=self.graph_segments, segment=lambda i: torch.cuda.graph(graphs[i], pool=pool))[0]

        def replay() -> None:
            for graph in graphs:
                graph.replay()
        return replay, logits
