"""fuse_add_norm: residual add + fused norm -> add_rms_norm / add_layer_norm with both outputs; near misses stay."""
from __future__ import annotations

import pytest

from caramba.ir import print_graph
from caramba.passes.fuse_add_norm import fuse_add_norm
from tests.passes.test_fuse_rms_norm import assert_ir_modulo_names, assert_same_numerics, edit, fuse

# a pre-norm block: h = x + attn; n = norm(h); out = h + mlp(n)
BLOCK = """
graph @f(%x: f16[b, 5, 24], %attn: f16[b, 5, 24]) {
  symbol b in [1, 8]
  param %w: f16[24]
  param %up: f16[24, 24]
  %h: f16[b, 5, 24] = add(%x, %attn)
  %n: f16[b, 5, 24] = rms_norm_fp32(%h, %w) {eps = 1e-05, dtype = f16}
  %m: f16[b, 5, 24] = linear(%n, %up)
  %out: f16[b, 5, 24] = add(%h, %m)
  return %out
}"""


def test_residual_add_and_norm_give_both_outputs():
    before, after, counts = fuse(fuse_add_norm, BLOCK)
    assert_ir_modulo_names(after, """
    graph @f(%x: f16[b, 5, 24], %attn: f16[b, 5, 24]) {
      symbol b in [1, 8]
      param %w: f16[24]
      param %up: f16[24, 24]
      %h: f16[b, 5, 24], %n: f16[b, 5, 24] = add_rms_norm(%x, %attn, %w) {eps = 1e-05, dtype = f16}
      %m: f16[b, 5, 24] = linear(%n, %up)
      %out: f16[b, 5, 24] = add(%h, %m)
      return %out
    }""")
    assert counts == {"add_rms_norm": 1}
    assert_same_numerics(before, after)


def test_chained_blocks_and_a_final_norm_whose_sum_is_not_reused():
    before, after, counts = fuse(fuse_add_norm, """
    graph @f(%x: f32[b, 5, 24], %a1: f32[b, 5, 24]) {
      symbol b in [1, 8]
      param %w1: f32[24]
      param %w2: f32[24]
      param %up: f32[24, 24]
      %h1: f32[b, 5, 24] = add(%x, %a1)
      %n1: f32[b, 5, 24] = rms_norm_fp32(%h1, %w1) {eps = 1e-05}
      %m1: f32[b, 5, 24] = linear(%n1, %up)
      %h2: f32[b, 5, 24] = add(%h1, %m1)
      %n2: f32[b, 5, 24] = rms_norm_fp32(%h2, %w2) {eps = 1e-05}
      return %n2
    }""")
    assert [n.op for n in after.nodes] == ["add_rms_norm", "linear", "add_rms_norm"]
    first, _, final = after.nodes
    assert final.inputs[0] is first.outputs[0]  # the second add reads the fused residual stream
    assert after.outputs == [final.outputs[1]]
    assert counts == {"add_rms_norm": 2}
    assert_same_numerics(before, after)


def test_layer_norm_with_affine():
    before, after, counts = fuse(fuse_add_norm, """
    graph @f(%x: f32[b, 5, 24], %y: f32[b, 5, 24]) {
      symbol b in [1, 8]
      param %w: f32[24]
      param %bias: f32[24]
      %h: f32[b, 5, 24] = add(%y, %x)
      %n: f32[b, 5, 24] = layer_norm(%h, %w, %bias) {normalized_shape = [24], eps = 1e-06}
      return %n, %h
    }""")
    assert_ir_modulo_names(after, """
    graph @f(%x: f32[b, 5, 24], %y: f32[b, 5, 24]) {
      symbol b in [1, 8]
      param %w: f32[24]
      param %bias: f32[24]
      %h: f32[b, 5, 24], %n: f32[b, 5, 24] = add_layer_norm(%y, %x, %w, %bias) {normalized_shape = [24], eps = 1e-06}
      return %n, %h
    }""")
    assert counts == {"add_layer_norm": 1}
    assert_same_numerics(before, after)


def test_one_sum_read_by_two_norms_is_fused_once():
    before, after, counts = fuse(fuse_add_norm, """
    graph @f(%x: f32[b, 5, 24], %y: f32[b, 5, 24]) {
      symbol b in [1, 8]
      param %w: f32[24]
      %h: f32[b, 5, 24] = add(%x, %y)
      %n1: f32[b, 5, 24] = rms_norm_fp32(%h, %w) {eps = 1e-05}
      %n2: f32[b, 5, 24] = rms_norm_fp32(%h) {eps = 1e-06}
      return %n1, %n2
    }""")
    assert [n.op for n in after.nodes] == ["add_rms_norm", "rms_norm_fp32"]
    assert after.nodes[1].inputs[0] is after.nodes[0].outputs[0]
    assert counts == {"add_rms_norm": 1}
    assert_same_numerics(before, after)


NEAR_MISSES = {
    # the add broadcasts a bias vector: not a residual add of two streams
    "broadcast add": [("%attn: f16[b, 5, 24]) {", "%attn: f16[24]) {")],
    # the sum is read before the norm: the fused node (at the norm) would come too late for that reader
    "sum read before the norm": [("  %n: f16[b, 5, 24] = rms_norm_fp32",
                                  "  %early: f16[b, 5, 24] = neg(%h)\n  %n: f16[b, 5, 24] = rms_norm_fp32"),
                                 ("return %out", "return %out, %early")],
    # one operand promotes
    "promoting add": [("%attn: f16[b, 5, 24]) {", "%attn: f32[b, 5, 24]) {"), ("%h: f16", "%h: f32"),
                      ("%out: f16[b, 5, 24] = add(%h, %m)", "%out: f32[b, 5, 24] = add(%h, %m)")],
    # a scalar add, not a residual
    "scalar add": [("add(%x, %attn)", "add(%x) {scalar = 1.0}")],
}


@pytest.mark.parametrize("case", NEAR_MISSES)
def test_near_misses_do_not_fuse(case):
    before, after, counts = fuse(fuse_add_norm, edit(BLOCK, *NEAR_MISSES[case]))
    assert counts == {} and print_graph(after) == print_graph(before)
    assert_same_numerics(before, after)


def test_norm_of_something_else_is_no_change():
    before, after, counts = fuse(fuse_add_norm, edit(BLOCK, ("add(%x, %attn)", "mul(%x, %attn)")))
    assert counts == {} and print_graph(after) == print_graph(before)
