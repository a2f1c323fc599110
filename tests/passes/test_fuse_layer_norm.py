"""fuse_layer_norm: LayerNorm written out (rsqrt or sqrt/div, pow or x*x, fp32 casts, affine) -> layer_norm."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from caramba.compiler import cast_model
from caramba.frontend import import_model
from caramba.ir import print_graph
from caramba.ir.types import DType
from caramba.passes.base import PassContext
from caramba.passes.fuse_layer_norm import fuse_layer_norm
from tests.passes.test_fuse_rms_norm import assert_ir_modulo_names, assert_same_numerics, edit, fuse

# fp32, one centred value (after CSE), rsqrt, weight and bias
FP32 = """
graph @f(%x: f32[b, 5, 24]) {
  symbol b in [1, 8]
  param %w: f32[24]
  param %bias: f32[24]
  %mu: f32[b, 5, 1] = mean(%x) {dims = [-1], keepdim = true}
  %xc: f32[b, 5, 24] = sub(%x, %mu)
  %sq: f32[b, 5, 24] = pow(%xc) {scalar = 2}
  %var: f32[b, 5, 1] = mean(%sq) {dims = [-1], keepdim = true}
  %den: f32[b, 5, 1] = add(%var) {scalar = 1e-05}
  %r: f32[b, 5, 1] = rsqrt(%den)
  %y: f32[b, 5, 24] = mul(%xc, %r)
  %s: f32[b, 5, 24] = mul(%y, %w)
  %out: f32[b, 5, 24] = add(%bias, %s)
  return %out
}"""

# fp16 model, statistics in fp32, x - mean written twice (no CSE), sqrt and div, x*x
FP16 = """
graph @f(%x: f16[b, 5, 24]) {
  symbol b in [1, 8]
  param %w: f16[24]
  param %bias: f16[24]
  %x32: f32[b, 5, 24] = cast(%x) {dtype = f32}
  %mu: f32[b, 5, 1] = mean(%x32) {dims = [2], keepdim = true}
  %xc: f32[b, 5, 24] = sub(%x32, %mu)
  %sq: f32[b, 5, 24] = mul(%xc, %xc)
  %var: f32[b, 5, 1] = mean(%sq) {dims = [-1], keepdim = true}
  %xc2: f32[b, 5, 24] = sub(%x32, %mu)
  %den: f32[b, 5, 1] = add(%var) {scalar = 1e-06}
  %sd: f32[b, 5, 1] = sqrt(%den)
  %y32: f32[b, 5, 24] = div(%xc2, %sd)
  %y: f16[b, 5, 24] = cast(%y32) {dtype = f16}
  %s: f16[b, 5, 24] = mul(%w, %y)
  %out: f16[b, 5, 24] = add(%s, %bias)
  return %out
}"""


def test_fp32_form_with_affine():
    before, after, counts = fuse(fuse_layer_norm, FP32)
    assert_ir_modulo_names(after, """
    graph @f(%x: f32[b, 5, 24]) {
      symbol b in [1, 8]
      param %w: f32[24]
      param %bias: f32[24]
      %n: f32[b, 5, 24] = layer_norm(%x, %w, %bias) {normalized_shape = [24], eps = 1e-05}
      return %n
    }""")
    assert counts == {"layer_norm": 1}
    assert_same_numerics(before, after, tol=1e-6)  # F.layer_norm accumulates in its own order


def test_fp16_form_with_casts_and_duplicate_centering():
    before, after, counts = fuse(fuse_layer_norm, FP16)
    assert_ir_modulo_names(after, """
    graph @f(%x: f16[b, 5, 24]) {
      symbol b in [1, 8]
      param %w: f16[24]
      param %bias: f16[24]
      %n: f16[b, 5, 24] = layer_norm(%x, %w, %bias) {normalized_shape = [24], eps = 1e-06}
      return %n
    }""")
    assert counts == {"layer_norm": 1}
    # F.layer_norm scales and shifts in fp32 and rounds once; the written form rounds three times
    assert_same_numerics(before, after, tol=2 ** -9)


def test_without_affine_and_weight_only():
    affine = "  %s: f32[b, 5, 24] = mul(%y, %w)\n  %out: f32[b, 5, 24] = add(%bias, %s)\n"
    no_affine = edit(FP32, (affine, ""), ("return %out", "return %y"))
    before, after, counts = fuse(fuse_layer_norm, no_affine)
    assert [(n.op, len(n.inputs)) for n in after.nodes] == [("layer_norm", 1)]
    assert_same_numerics(before, after, tol=1e-6)
    weight_only = edit(FP32, ("  %out: f32[b, 5, 24] = add(%bias, %s)\n", ""), ("return %out", "return %s"))
    before, after, counts = fuse(fuse_layer_norm, weight_only)
    assert [(n.op, len(n.inputs)) for n in after.nodes] == [("layer_norm", 2)]
    assert_same_numerics(before, after, tol=1e-6)


NEAR_MISSES = {
    "mean reused": [("return %out", "return %out, %mu")],
    "centred value reused": [("return %out", "return %out, %xc")],
    "variance over another dim": [
        ("%var: f32[b, 5, 1] = mean(%sq) {dims = [-1]", "%var: f32[b, 1, 24] = mean(%sq) {dims = [1]"),
        ("%den: f32[b, 5, 1]", "%den: f32[b, 1, 24]"), ("%r: f32[b, 5, 1]", "%r: f32[b, 1, 24]")],
    "centred by another tensor's mean": [
        ("%mu: f32[b, 5, 1] = mean(%x)", "%mu: f32[b, 5, 1] = mean(%z)"),
        ("  %mu:", "  %z: f32[b, 5, 24] = neg(%x)\n  %mu:")],
    "squares of x, not of x - mean(x)": [("pow(%xc) {scalar = 2}", "pow(%x) {scalar = 2}")],
}


@pytest.mark.parametrize("case", NEAR_MISSES)
def test_near_misses_do_not_fuse(case):
    before, after, counts = fuse(fuse_layer_norm, edit(FP32, *NEAR_MISSES[case]))
    assert "layer_norm" not in after.op_counts() and counts == {}
    assert_same_numerics(before, after)


def test_bias_without_weight_and_mixed_dtype_weight_stay_outside():
    bias_only = edit(FP32, ("  %s: f32[b, 5, 24] = mul(%y, %w)\n", ""), ("add(%bias, %s)", "add(%bias, %y)"),
                     ("  param %w: f32[24]\n", ""))
    before, after, counts = fuse(fuse_layer_norm, bias_only)
    assert [n.op for n in after.nodes] == ["layer_norm", "add"] and counts == {"layer_norm": 1}
    assert_same_numerics(before, after, tol=1e-6)
    mixed = edit(FP32, ("param %w: f32[24]", "param %w: f64[24]"), ("%s: f32", "%s: f64"), ("%out: f32", "%out: f64"))
    before, after, counts = fuse(fuse_layer_norm, mixed)
    assert [n.op for n in after.nodes] == ["layer_norm", "mul", "add"]
    assert_same_numerics(before, after, tol=1e-6)


def test_imported_layer_norm_is_no_change():
    text = """
    graph @f(%x: f32[3, 24]) {
      param %w: f32[24]
      %n: f32[3, 24] = layer_norm(%x, %w) {normalized_shape = [24], eps = 1e-05}
      return %n
    }"""
    before, after, counts = fuse(fuse_layer_norm, text)
    assert counts == {} and print_graph(after) == print_graph(before)


class HandWrittenLayerNorm(nn.Module):
    """LayerNorm as some models write it: fp32 statistics, sqrt and div, affine in the model dtype."""

    def __init__(self, dim: int = 24) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, dim)
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(dim))
        self.bias = nn.Parameter(0.1 * torch.randn(dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        x32 = x.float()
        mu = x32.mean(-1, keepdim=True)
        var = ((x32 - mu) ** 2).mean(-1, keepdim=True)
        y = (x32 - mu) / torch.sqrt(var + 1e-5)
        return y.to(x.dtype) * self.weight + self.bias


@pytest.mark.parametrize("dtype, tol", [(DType.f32, 1e-6), (DType.f16, 2 ** -9)])
def test_captured_hand_written_layer_norm(dtype, tol):
    torch.manual_seed(0)
    graph, _ = import_model(cast_model(HandWrittenLayerNorm(), dtype))
    before = graph.copy()
    ctx = PassContext()
    fuse_layer_norm(graph, ctx)
    assert ctx.counts == {"layer_norm": 1}
    assert [n.op for n in graph.nodes] == ["embedding", "layer_norm"]
    assert_same_numerics(before, graph, tol=tol, batch=2, seq=9)
