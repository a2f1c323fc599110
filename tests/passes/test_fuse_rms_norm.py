"""fuse_rms_norm: the Llama, fp32, x*x, sqrt/div and F.rms_norm forms become one rms_norm_fp32; near misses stay.

Also home of the small helpers the other fusion tests share (names modulo counters, random weights, numerics).
"""
from __future__ import annotations

import re

import pytest
import torch

from caramba.compiler import cast_model
from caramba.frontend import import_model
from caramba.ir import Graph, interpret, parse_graph, print_graph
from caramba.ir.types import DType
from caramba.passes.fuse_rms_norm import fuse_rms_norm
from tests.helpers import rel_err
from tests.passes.ir_helpers import graph, run


# -- shared helpers ---------------------------------------------------------------------------------------------
def canonical_text(g: Graph) -> str:
    """The printed graph with node outputs renamed %t0, %t1, ... in definition order (inputs, params keep names)."""
    names = {v.name: f"t{i}" for i, v in enumerate(v for n in g.nodes for v in n.outputs)}
    return re.sub(r"%([A-Za-z0-9_.\-]+)", lambda m: "%" + names.get(m.group(1), m.group(1)), print_graph(g))


def assert_ir_modulo_names(g: Graph, expected: str) -> None:
    """`g` is `expected` up to the names of computed values (fusions name new nodes after a counter)."""
    assert canonical_text(g) == canonical_text(parse_graph(expected)), print_graph(g)


def with_weights(g: Graph, seed: int = 0) -> Graph:
    """Random weights for every param (around 1, so a wrongly dropped weight or bias shows)."""
    gen = torch.Generator().manual_seed(seed)
    for name, v in g.params.items():
        shape = v.type.concrete({})
        g.weights[name] = (1 + 0.5 * torch.randn(shape, generator=gen)).to(v.type.dtype.torch)
    return g


def random_inputs(g: Graph, seed: int = 1, **sizes: int) -> list[torch.Tensor]:
    """Floats around 0 with some spread; integer inputs are token ids below 16 (every test vocab is larger)."""
    gen = torch.Generator().manual_seed(seed)
    return [(3 * torch.randn(v.type.concrete(sizes), generator=gen)).to(v.type.dtype.torch) if v.type.dtype.is_float
            else torch.randint(0, 16, v.type.concrete(sizes), generator=gen, dtype=v.type.dtype.torch)
            for v in g.inputs]


def assert_same_numerics(before: Graph, after: Graph, tol: float = 0.0, **sizes: int) -> None:
    """Every output of `after` equals `before`'s on random inputs: bitwise (tol 0) or within `tol` relative."""
    inputs = random_inputs(before, **(sizes or {"b": 3}))
    want = interpret(before, *inputs)
    got = interpret(after, *inputs, check_types=True)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        if tol == 0.0:
            assert torch.equal(g, w), f"max diff {(g.double() - w.double()).abs().max().item()}"
        else:
            assert rel_err(g, w) <= tol, rel_err(g, w)


def edit(text: str, *edits: tuple[str, str]) -> str:
    """`text` with each (old, new) replaced; every `old` must occur, so a near miss cannot quietly test nothing."""
    for old, new in edits:
        assert old in text, old
        text = text.replace(old, new)
    return text


def fuse(fn, text: str):
    """Parse, attach weights, run one pass; returns (before, after, counts)."""
    before = with_weights(graph(text))
    after, counts = run(fn, before)
    after.weights = before.weights
    return before, after, counts


# -- fusions ----------------------------------------------------------------------------------------------------
LLAMA_FP16 = """
graph @f(%x: f16[b, 5, 24]) {
  symbol b in [1, 8]
  param %w: f16[24]
  %x32: f32[b, 5, 24] = cast(%x) {dtype = f32}
  %sq: f32[b, 5, 24] = pow(%x32) {scalar = 2}
  %ms: f32[b, 5, 1] = mean(%sq) {dims = [-1], keepdim = true}
  %den: f32[b, 5, 1] = add(%ms) {scalar = 1e-06}
  %r: f32[b, 5, 1] = rsqrt(%den)
  %y32: f32[b, 5, 24] = mul(%x32, %r)
  %y: f16[b, 5, 24] = cast(%y32) {dtype = f16}
  %out: f16[b, 5, 24] = mul(%w, %y)
  return %out
}"""


def test_llama_form_with_casts_becomes_one_node():
    before, after, counts = fuse(fuse_rms_norm, LLAMA_FP16)
    assert_ir_modulo_names(after, """
    graph @f(%x: f16[b, 5, 24]) {
      symbol b in [1, 8]
      param %w: f16[24]
      %n: f16[b, 5, 24] = rms_norm_fp32(%x, %w) {eps = 1e-06, dtype = f16}
      return %n
    }""")
    assert counts == {"rms_norm": 1}
    assert_same_numerics(before, after)


def test_fp32_form_weight_on_the_right():
    before, after, counts = fuse(fuse_rms_norm, """
    graph @f(%x: f32[b, 5, 24]) {
      symbol b in [1, 8]
      param %w: f32[24]
      %sq: f32[b, 5, 24] = pow(%x) {scalar = 2}
      %ms: f32[b, 5, 1] = mean(%sq) {dims = [2], keepdim = true}
      %den: f32[b, 5, 1] = add(%ms) {scalar = 1e-05}
      %r: f32[b, 5, 1] = rsqrt(%den)
      %y: f32[b, 5, 24] = mul(%r, %x)
      %out: f32[b, 5, 24] = mul(%y, %w)
      return %out
    }""")
    assert [(n.op, [v.name for v in n.inputs], n.attrs) for n in after.nodes] == \
        [("rms_norm_fp32", ["x", "w"], {"eps": 1e-05})]
    assert counts == {"rms_norm": 1}
    assert_same_numerics(before, after)


def test_square_as_product_without_weight():
    before, after, counts = fuse(fuse_rms_norm, """
    graph @f(%x: f32[3, 7]) {
      %sq: f32[3, 7] = mul(%x, %x)
      %ms: f32[3, 1] = mean(%sq) {dims = [-1], keepdim = true}
      %den: f32[3, 1] = add(%ms) {scalar = 0.001}
      %r: f32[3, 1] = rsqrt(%den)
      %y: f32[3, 7] = mul(%x, %r)
      return %y
    }""")
    assert_ir_modulo_names(after, """
    graph @f(%x: f32[3, 7]) {
      %n: f32[3, 7] = rms_norm_fp32(%x) {eps = 0.001}
      return %n
    }""")
    assert counts == {"rms_norm": 1}
    assert_same_numerics(before, after)


def test_sqrt_and_div_form_is_fused_within_rounding():
    before, after, counts = fuse(fuse_rms_norm, """
    graph @f(%x: bf16[b, 5, 24]) {
      symbol b in [1, 8]
      param %w: bf16[24]
      %x32: f32[b, 5, 24] = cast(%x) {dtype = f32}
      %sq: f32[b, 5, 24] = pow(%x32) {scalar = 2.0}
      %ms: f32[b, 5, 1] = mean(%sq) {dims = [-1], keepdim = true}
      %den: f32[b, 5, 1] = add(%ms) {scalar = 1e-05}
      %s: f32[b, 5, 1] = sqrt(%den)
      %y32: f32[b, 5, 24] = div(%x32, %s)
      %y: bf16[b, 5, 24] = cast(%y32) {dtype = bf16}
      %out: bf16[b, 5, 24] = mul(%y, %w)
      return %out
    }""")
    assert [n.op for n in after.nodes] == ["rms_norm_fp32"]
    assert after.nodes[0].attrs == {"eps": 1e-05, "dtype": DType.bf16}
    assert counts == {"rms_norm": 1}
    assert_same_numerics(before, after, tol=2 ** -7)  # one bf16 ulp: rsqrt vs 1/sqrt may round differently


def test_weight_applied_in_fp32_before_the_cast():
    # the F.rms_norm order written out: scale in fp32 (the f16 weight promotes), then cast back
    before, after, counts = fuse(fuse_rms_norm, """
    graph @f(%x: f16[b, 5, 24]) {
      symbol b in [1, 8]
      param %w: f16[24]
      %x32: f32[b, 5, 24] = cast(%x) {dtype = f32}
      %sq: f32[b, 5, 24] = pow(%x32) {scalar = 2}
      %ms: f32[b, 5, 1] = mean(%sq) {dims = [-1], keepdim = true}
      %den: f32[b, 5, 1] = add(%ms) {scalar = 1e-06}
      %r: f32[b, 5, 1] = rsqrt(%den)
      %y32: f32[b, 5, 24] = mul(%x32, %r)
      %s32: f32[b, 5, 24] = mul(%y32, %w)
      %out: f16[b, 5, 24] = cast(%s32) {dtype = f16}
      return %out
    }""")
    assert [(n.op, n.attrs) for n in after.nodes] == \
        [("rms_norm_fp32", {"eps": 1e-06, "dtype": DType.f16, "weight_in_fp32": True})]
    assert_same_numerics(before, after)


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("with_weight", [True, False])
def test_imported_f_rms_norm_becomes_the_same_op(dtype, with_weight):
    w = ", %w" if with_weight else ""
    before, after, counts = fuse(fuse_rms_norm, f"""
    graph @f(%x: {dtype}[b, 5, 24]) {{
      symbol b in [1, 8]
      param %w: {dtype}[24]
      %n: {dtype}[b, 5, 24] = rms_norm(%x{w}) {{normalized_shape = [24], eps = none}}
      return %n
    }}""")
    (node,) = after.nodes
    assert node.op == "rms_norm_fp32" and len(node.inputs) == 1 + with_weight
    assert node.attrs["eps"] == torch.finfo(torch.float32).eps
    if dtype == "f32":
        assert set(node.attrs) == {"eps"}
    else:
        assert node.attrs["dtype"] == DType.parse(dtype)
        assert node.attrs.get("weight_in_fp32", False) == with_weight
    assert counts == {"rms_norm_from_aten": 1}
    # F.rms_norm's kernel may accumulate the mean in another order: equal within rounding of the model dtype
    assert_same_numerics(before, after, tol={"f32": 1e-6, "f16": 2 ** -10, "bf16": 2 ** -7}[dtype])


def test_shared_upcast_stays_outside_the_fused_norm():
    # the fp32 copy of x is also returned: the norm reads it instead of absorbing the cast
    before, after, counts = fuse(fuse_rms_norm, edit(LLAMA_FP16, ("return %out", "return %out, %x32")))
    assert [n.op for n in after.nodes] == ["cast", "rms_norm_fp32"]
    assert after.nodes[1].inputs[0] is after.nodes[0].output
    assert counts == {"rms_norm": 1}
    assert_same_numerics(before, after)


# -- near misses ------------------------------------------------------------------------------------------------
NEAR_MISSES = {
    "rsqrt reused": [("return %out", "return %out, %r")],
    "mean reused": [("return %out", "return %out, %ms")],
    "fourth power, not square": [("pow(%x32) {scalar = 2}", "pow(%x32) {scalar = 4}")],
    "mean over another dim": [
        ("%ms: f32[b, 5, 1] = mean(%sq) {dims = [-1]", "%ms: f32[b, 1, 24] = mean(%sq) {dims = [1]"),
        ("%den: f32[b, 5, 1]", "%den: f32[b, 1, 24]"), ("%r: f32[b, 5, 1]", "%r: f32[b, 1, 24]")],
    "scaled by another tensor": [
        ("%y32: f32[b, 5, 24] = mul(%x32, %r)", "%y32: f32[b, 5, 24] = mul(%z, %r)"),
        ("  %sq:", "  %z: f32[b, 5, 24] = neg(%x32)\n  %sq:")],
}


@pytest.mark.parametrize("case", NEAR_MISSES)
def test_near_misses_do_not_fuse(case):
    before, after, counts = fuse(fuse_rms_norm, edit(LLAMA_FP16, *NEAR_MISSES[case]))
    assert "rms_norm_fp32" not in after.op_counts() and "rsqrt" in after.op_counts()
    assert counts == {}
    assert_same_numerics(before, after)


def test_statistics_in_fp16_are_not_this_op():
    before, after, counts = fuse(fuse_rms_norm, """
    graph @f(%x: f16[3, 24]) {
      %sq: f16[3, 24] = pow(%x) {scalar = 2}
      %ms: f16[3, 1] = mean(%sq) {dims = [-1], keepdim = true}
      %den: f16[3, 1] = add(%ms) {scalar = 1e-05}
      %r: f16[3, 1] = rsqrt(%den)
      %y: f16[3, 24] = mul(%x, %r)
      return %y
    }""")
    assert counts == {} and print_graph(after) == print_graph(before)


def test_weight_that_is_not_a_vector_stays_a_mul():
    text = edit(LLAMA_FP16, ("param %w: f16[24]", "param %w: f16[5, 24]"), ("mul(%w, %y)", "mul(%y, %w)"))
    before, after, counts = fuse(fuse_rms_norm, text)
    assert [n.op for n in after.nodes] == ["rms_norm_fp32", "mul"]
    assert after.nodes[0].attrs == {"eps": 1e-06, "dtype": DType.f16}
    assert_same_numerics(before, after)


def test_multi_dim_f_rms_norm_is_left_alone():
    before, after, counts = fuse(fuse_rms_norm, """
    graph @f(%x: f32[3, 4, 6]) {
      %n: f32[3, 4, 6] = rms_norm(%x) {normalized_shape = [4, 6], eps = 1e-05}
      return %n
    }""")
    assert counts == {} and print_graph(after) == print_graph(before)


def test_no_norm_no_change():
    text = """
    graph @f(%x: f32[3, 24]) {
      %sq: f32[3, 24] = pow(%x) {scalar = 2}
      %y: f32[3, 24] = mul(%x, %sq)
      return %y
    }"""
    before, after, counts = fuse(fuse_rms_norm, text)
    assert counts == {} and print_graph(after) == print_graph(before)


class TorchRMSNorm(torch.nn.Module):
    """nn.RMSNorm (imported as aten rms_norm) after an embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(50, 24)
        self.norm = torch.nn.RMSNorm(24, eps=1e-6)
        torch.nn.init.normal_(self.norm.weight, 1.0, 0.3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.norm(self.embed(ids))


@pytest.mark.parametrize("dtype, tol", [(DType.f32, 1e-6), (DType.f16, 2 ** -10)])
def test_captured_nn_rms_norm(dtype, tol):
    torch.manual_seed(0)
    before, _ = import_model(cast_model(TorchRMSNorm(), dtype))
    after, counts = run(fuse_rms_norm, before)
    assert [n.op for n in after.nodes] == ["embedding", "rms_norm_fp32"]
    assert counts == {"rms_norm_from_aten": 1}
    assert_same_numerics(before, after, tol=tol, batch=2, seq=9)
