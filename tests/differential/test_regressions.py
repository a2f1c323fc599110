"""Draws the differential fuzzer once failed on, kept as fixed examples on the target that failed (each names the
bug and its fix). tests/differential/test_differential.py's doc says how such a draw is found and printed."""
from __future__ import annotations

import pytest

from tests.differential.draws import Draw
from tests.differential.harness import check_draw
from tests.differential.test_differential import reproducer, targets  # noqa: F401  (targets: the fixture)

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
    # Gemma 2 with attn_logit_softcapping 1.0: canonicalize folds the divide and the multiply by 1, leaving
    # tanh(q·kᵀ·scale) that the attention fusion did not recognise as a soft cap, so the model took no KV cache
    # (found 4 times in the 1,000-example run). Fixed in passes/attention_patterns.py: capped() matches a bare tanh
    # as a cap of 1.
    "gemma2, soft cap 1": Draw(
        model={"family": "gemma2", "config": dict(
            vocab_size=5, hidden_size=8, intermediate_size=3, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=2, max_position_embeddings=96, tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, head_dim=2,
            layer_types=["sliding_attention"], sliding_window=1, attn_logit_softcapping=1.0,
            final_logit_softcapping=None, query_pre_attn_scalar=2)},
        seed=0, cache={"kind": "fp32", "qblock": 32, "residual_len": 0, "max_seq_len": 2, "partitions": None},
        rows=[1], steps=[1], options={"onnx": {"mode": "scatter"}, "cuda": {"gemv": False}},
        targets=["eager", "onnx", "cuda", "metal"]),
    # A one-ulp rounding flip in layer 0's fp16 k (fp32 sums in another order: allowed) moved layer 1's k and v by
    # 6 ulps through a soft-max over large scores, on metal and cuda alike; the harness held every layer to one
    # code. Fixed in harness.py (compare_caches): where a flip below or before can reach, a tensor may move by the
    # reference's own drift from quantizing.
    "fp16 cache, a flip propagated to layer 1": Draw(
        model={"family": "llama", "config": dict(
            attention_bias=False, head_dim=10, hidden_size=42, intermediate_size=32, max_position_embeddings=96,
            mlp_bias=False, num_attention_heads=6, num_hidden_layers=2, num_key_value_heads=6,
            partial_rotary_factor=0.2, rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
            tie_word_embeddings=False, vocab_size=50)},
        seed=2, cache={"kind": "fp16", "max_seq_len": 18, "partitions": None, "qblock": 32, "residual_len": 0},
        rows=[17], steps=[1], options={"cuda": {"gemv": False}, "onnx": {"mode": "scatter"}},
        targets=["metal", "cuda"]),
}


@pytest.mark.parametrize("name", sorted(REGRESSIONS))
def test_a_draw_that_once_failed(name, targets):  # noqa: F811  (the fixture: metal emulated, cuda interpreted)
    draw = REGRESSIONS[name]
    outcome = check_draw(draw, draw.targets, reproducer)
    assert set(outcome.ran) == set(draw.targets), outcome.declined
