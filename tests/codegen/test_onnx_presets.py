"""target "onnx" on every preset's shapes: ORT logits against the interpreter at every step (ragged prefill, decode,
two-token steps) in fp32. tiny is covered mode by mode in test_onnx.py; here small (DBA and GQA) whole, and the
1b presets with their real widths, heads and 128k vocabulary but one layer (every layer is the same graph; 16 of
them in fp32 would be 5 GB per copy on a CI machine)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("onnxruntime")

import caramba
from caramba.models import Transformer, preset
from tests.codegen.test_onnx import pair, run_both


@pytest.mark.parametrize("name, overrides", [
    ("small", {"attention": "decoupled"}), ("small", {"attention": "gqa"}),
    ("1b-dba", {"n_layers": 1}), ("1b-gqa", {"n_layers": 1}),
], ids=["small-dba", "small-gqa", "1b-dba", "1b-gqa"])
def test_preset_logits_match_the_interpreter_at_every_step(name, overrides):
    torch.manual_seed(0)
    model = Transformer(preset(name, **overrides)).eval()
    cm = caramba.compile(model, target="onnx", max_seq_len=64)
    ref, ex = pair(cm, "fp32", "shadow", max_seq_len=48)
    run_both(ref, ex, 1e-4)
