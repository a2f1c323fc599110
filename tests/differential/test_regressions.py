"""Draws the differential fuzzer once failed on, kept as fixed examples on the target that failed (each names the
bug and its fix). tests/differential/test_differential.py's doc says how such a draw is found and printed."""
from __future__ import annotations

import pytest

from tests.differential.draws import Draw
from tests.differential.harness import check_draw
from tests.differential.test_differential import reproducer

REGRESSIONS = {
    # ONNX Runtime's GroupQueryAttention (onnx mode "contrib") takes only head sizes that are multiples of 8: a
    # head dim of 6 ran into "head_size must be a multiple of 8" at the first step. Fixed in
    # codegen/onnx/cache.py: attention_dims pads the contrib attention buffers to a multiple of 8 (zero columns).
    "onnx contrib, head dim 6": Draw(
        model={"family": "caramba", "config": dict(
            vocab_size=36, d_model=13, n_layers=2, n_heads=8, n_kv_heads=8, attention="standard", norm="rms",
            mlp="swiglu", d_ff=12, tie_embeddings=True, bias=True, max_seq_len=96, rope_base=37.5, head_dim=6)},
        seed=139, cache={"kind": "fp16", "qblock": 4, "residual_len": 0, "max_seq_len": 40, "partitions": 3},
        rows=[11, 33, 2], steps=[2], options={"onnx": {"mode": "contrib"}}, targets=["onnx"]),
}


@pytest.mark.parametrize("name", sorted(REGRESSIONS))
def test_a_draw_that_once_failed(name):
    draw = REGRESSIONS[name]
    outcome = check_draw(draw, draw.targets, reproducer)
    assert set(outcome.ran) == set(draw.targets), outcome.declined
