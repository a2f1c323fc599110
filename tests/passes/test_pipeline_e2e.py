"""The whole eager pipeline on every model family: one fused attention op per layer, fused norms, RoPE and SwiGLU,
no stray softmax / rsqrt / rotate-half arithmetic, and the same numbers as the unfused graph."""
from __future__ import annotations

import pytest
import torch

import caramba
from caramba.ir import interpret
from caramba.models import Transformer, preset
from tests.helpers import hf_model, rel_err

LEFTOVERS = ("softmax", "sdpa", "rsqrt", "pow", "neg", "silu", "matmul", "masked_fill", "triu", "tril", "cos",
             "sin")  # RoPE tables are stored (fold_tables); arange stays where a mask is kept (Mistral's window)
FAMILIES = {
    "tiny-standard": lambda: Transformer(preset("tiny", attention="standard")),
    "tiny-gqa": lambda: Transformer(preset("tiny", attention="gqa")),
    "tiny-decoupled": lambda: Transformer(preset("tiny", attention="decoupled")),
    "tiny-decoupled-gated": lambda: Transformer(preset("tiny", attention="decoupled", gate="dynamic",
                                                       learned_temp=True)),
    "llama": lambda: hf_model("llama"),
    "mistral": lambda: hf_model("mistral"),
    "qwen2": lambda: hf_model("qwen2"),
}
TOL = {"fp32": 1e-5, "fp16": 1e-2}


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_pipeline_fuses_every_layer_and_keeps_numerics(family, dtype):
    torch.manual_seed(0)
    model = FAMILIES[family]().eval()
    with torch.no_grad():  # gates and temperatures off their identity init
        for name, p in model.named_parameters():
            if "gate" in name or "tau" in name:
                p.add_(torch.randn_like(p) * 0.3)
    cm = caramba.compile(model, target="eager", dtype=dtype)
    counts = cm.graph.op_counts()
    layers = len(model.layers) if hasattr(model, "layers") else model.config.num_hidden_layers
    attention = "decoupled_attention" if "decoupled" in family else "attention"
    assert counts.get(attention) == layers
    assert counts.get("rms_norm_fp32", 0) + counts.get("add_rms_norm", 0) == 2 * layers + 1
    assert counts.get("add_rms_norm") == 2 * layers  # every norm but the first reads a residual sum
    assert counts.get("rope") == 2 * layers
    assert counts.get("swiglu") == layers
    assert not [op for op in LEFTOVERS if op in counts], counts
    stats = {r.name: r.counts for r in cm.stats.passes}
    assert stats["fuse_rope"] == {"rope": 2 * layers}

    vocab = 256 if family.startswith("tiny") else 97
    for b, t in [(1, 1), (2, 9)]:
        ids = torch.randint(0, vocab, (b, t))
        unfused = interpret(cm.imported_graph, ids)[0]
        assert rel_err(cm(ids), unfused) <= TOL[dtype], (b, t)
