"""fuse_norm_linear: an rms norm read by one linear folds into it; two readers, a returned norm, layer norm stay."""
from __future__ import annotations

import torch

import caramba
from caramba.codegen import backend as targets
from caramba.ir import interpret
from caramba.models import Transformer, preset
from caramba.passes.base import PassContext
from caramba.passes.fuse_linears import fuse_linears
from caramba.passes.fuse_norm_linear import fuse_norm_linear
from caramba.passes.fuse_swiglu_linear import fuse_swiglu_linear
from caramba.passes.pipeline import pipeline_for
from tests.passes.ir_helpers import graph, run
from tests.passes.test_fuse_rms_norm import (assert_ir_modulo_names, assert_same_numerics, edit, fuse,
                                             with_weights)

# a pre-norm block after fuse_add_norm and fuse_linears: h, n = add_rms_norm(x, attn); out = h + up(n)
BLOCK = """
graph @f(%x: f16[b, 5, 24], %attn: f16[b, 5, 24]) {
  symbol b in [1, 8]
  param %g: f16[24]
  param %up: f16[40, 24]
  param %down: f16[24, 40]
  %h: f16[b, 5, 24], %n: f16[b, 5, 24] = add_rms_norm(%x, %attn, %g) {eps = 1e-05, dtype = f16}
  %m: f16[b, 5, 40] = linear(%n, %up)
  %d: f16[b, 5, 24] = linear(%m, %down)
  %out: f16[b, 5, 24] = add(%h, %d)
  return %out
}"""

# the first layer's norm (after the embedding) or the final norm before the head: no residual add
HEAD = """
graph @f(%x: bf16[b, 1, 24]) {
  symbol b in [1, 8]
  param %g: f32[24]
  param %head: bf16[50, 24]
  param %bias: bf16[50]
  %n: bf16[b, 1, 24] = rms_norm_fp32(%x, %g) {eps = 1e-06, dtype = bf16, weight_in_fp32 = true}
  %y: bf16[b, 1, 50] = linear(%n, %head, %bias)
  return %y
}"""


def test_add_rms_norm_read_by_one_linear_is_folded_into_it():
    before, after, counts = fuse(fuse_norm_linear, BLOCK)
    assert counts == {"add_rms_norm_linear": 1}
    attrs = "{eps = 1e-05, dtype = f16}"
    norm_and_linear = (f"  %h: f16[b, 5, 24], %n: f16[b, 5, 24] = add_rms_norm(%x, %attn, %g) {attrs}\n"
                       "  %m: f16[b, 5, 40] = linear(%n, %up)\n")
    fused = f"  %h: f16[b, 5, 24], %m: f16[b, 5, 40] = add_rms_norm_linear(%x, %attn, %g, %up) {attrs}\n"
    assert_ir_modulo_names(after, edit(BLOCK, (norm_and_linear, fused)))
    assert_same_numerics(before, after)  # the op's reference is the two ops'


def test_rms_norm_read_by_one_linear_with_bias_is_folded_into_it():
    before, after, counts = fuse(fuse_norm_linear, HEAD)
    assert counts == {"rms_norm_linear": 1}
    attrs = "{eps = 1e-06, dtype = bf16, weight_in_fp32 = true}"
    norm_and_linear = (f"  %n: bf16[b, 1, 24] = rms_norm_fp32(%x, %g) {attrs}\n"
                       "  %y: bf16[b, 1, 50] = linear(%n, %head, %bias)\n")
    fused = f"  %y: bf16[b, 1, 50] = rms_norm_linear(%x, %g, %head, %bias) {attrs}\n"
    assert_ir_modulo_names(after, edit(HEAD, (norm_and_linear, fused)))
    assert_same_numerics(before, after)


def test_norm_without_weight_reads_a_vector_of_ones():
    text = edit(HEAD, ("rms_norm_fp32(%x, %g)", "rms_norm_fp32(%x)"), ("  param %g: f32[24]\n", ""))
    before = with_weights(graph(text))
    after, counts = run(fuse_norm_linear, before)  # (not `fuse`: it would drop the pass's new const)
    assert counts == {"rms_norm_linear": 1}
    (node,) = after.nodes
    ones = node.inputs[1]
    assert ones.type.dtype == node.inputs[0].type.dtype  # the norm's output dtype: bf16 (the cast)
    assert torch.equal(after.weights[ones.name], torch.ones(24, dtype=torch.bfloat16))
    assert_same_numerics(before, after)  # times one: not a bit changes


def test_normed_value_with_another_reader_or_returned_is_not_fused():
    two_readers = edit(BLOCK, ("  %d: f16[b, 5, 24] = linear(%m, %down)\n",
                               "  %d0: f16[b, 5, 24] = linear(%m, %down)\n  %d: f16[b, 5, 24] = add(%d0, %n)\n"))
    two_linears = edit(BLOCK, ("  param %down", "  param %gate: f16[40, 24]\n  param %down"),
                       ("  %d: f16[b, 5, 24] = linear(%m, %down)\n",
                        ("  %k: f16[b, 5, 40] = linear(%n, %gate)\n  %mk: f16[b, 5, 40] = mul(%m, %k)\n"
                         "  %d: f16[b, 5, 24] = linear(%mk, %down)\n")))
    returned = edit(BLOCK, ("return %out", "return %out, %n"))
    layer_norm = edit(HEAD, ("rms_norm_fp32(%x, %g) {eps = 1e-06, dtype = bf16, weight_in_fp32 = true}",
                             "layer_norm(%x) {normalized_shape = [24]}"), ("  param %g: f32[24]\n", ""))
    for text in (two_readers, two_linears, returned, layer_norm):
        before, after, counts = fuse(fuse_norm_linear, text)
        assert not counts
        assert [n.op for n in after.nodes] == [n.op for n in before.nodes]


def test_cuda_pipeline_folds_every_norm_and_keeps_the_model():
    """Per layer the q|k|v (DBA: five weights) and gate|up products read their norms; the first layer's norm and
    the final one fold into their products too. The logits stay those of the graph before the pass."""
    names = [p.name for p in pipeline_for(targets.get("cuda").needs)]
    assert names.index("fuse_norm_linear") > max(names.index("fuse_linears"), names.index("fuse_swiglu_linear"))
    assert "fuse_norm_linear" not in {p.name for p in pipeline_for(targets.get("eager").needs)}
    for attention in ("decoupled", "gqa"):
        torch.manual_seed(0)
        model = Transformer(preset("tiny", attention=attention, n_layers=2)).eval()
        ctx = PassContext(target="cuda")
        before = fuse_swiglu_linear(fuse_linears(caramba.compile(model, target="eager").graph.copy(), ctx), ctx)
        after = fuse_norm_linear(before.copy(), ctx)
        counts = after.op_counts()
        assert "add_rms_norm" not in counts and "rms_norm_fp32" not in counts
        assert counts.get("rms_norm_linear", 0) + counts["add_rms_norm_linear"] == 2 * 2 + 1
        assert counts["linear"] == 2 * 1  # what is left: the output projections
        ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(interpret(after, ids)[0], interpret(before, ids)[0], rtol=1e-5, atol=1e-5)
