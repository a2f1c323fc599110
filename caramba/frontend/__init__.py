"""Frontend: capture a torch model with torch.export and import the ATen graph into caramba's IR."""
from __future__ import annotations

import torch

from caramba.frontend.capture import Capture, LogitsAdapter, capture
from caramba.frontend.importer import import_capture
from caramba.ir.graph import Graph


def supported_aten_ops() -> list[str]:
    from caramba.frontend.aten_table import supported_aten_ops as ops

    return ops()


def import_model(model: torch.nn.Module, **capture_kw) -> tuple[Graph, Capture]:
    """Capture `model` and import it: the IR graph (weights attached) and the capture record (program, time)."""
    cap = capture(model, **capture_kw)
    return import_capture(cap), cap


__all__ = ["Capture", "LogitsAdapter", "capture", "import_capture", "import_model", "supported_aten_ops"]
