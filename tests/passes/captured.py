"""Captured graphs of real models, shared by the pass and debug tests (each capture costs a second or two)."""
from __future__ import annotations

import functools

import torch

from caramba.frontend import import_model
from caramba.ir.graph import Graph
from caramba.models import Transformer, preset
from tests.helpers import hf_model

TINY_MODES = ("standard", "gqa", "decoupled")
MODELS = tuple(f"tiny-{m}" for m in TINY_MODES) + ("llama", "mistral", "qwen2")


def model(name: str) -> torch.nn.Module:
    if name.startswith("tiny-"):
        torch.manual_seed(0)
        return Transformer(preset("tiny", attention=name.removeprefix("tiny-"))).eval()
    return hf_model(name)


@functools.lru_cache(maxsize=None)
def _captured(name: str) -> tuple[Graph, torch.nn.Module]:
    m = model(name)
    graph, _ = import_model(m)
    return graph, m


def captured(name: str) -> tuple[Graph, torch.nn.Module]:
    """A fresh copy of the imported graph of `name` (callers may mutate it) and the eager model."""
    graph, m = _captured(name)
    return graph.copy(), m


def example_ids(graph: Graph, batch: int = 2, seq: int = 7) -> torch.Tensor:
    from caramba.debug.numerics import example_input

    return example_input(graph, batch, seq)[0]
