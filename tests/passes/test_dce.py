"""dce: dead nodes (creation ops included) and dead params go; live ones and effectful ops stay."""
from __future__ import annotations

import torch

from caramba.ir import has_op, register_op
from caramba.ir.shape_rules import same
from caramba.passes.dce import dce
from tests.passes.ir_helpers import assert_ir, graph, run

if not has_op("test_effect"):  # an op that writes state (like a cache append): never dead
    register_op("test_effect", ["x"], same, tags=["effect"])(lambda x: x)


def test_removes_dead_chain_and_inputless_creation_op():
    before = graph("""
    graph @f(%x: f32[seq]) {
      symbol seq in [1, 64]
      %a: i64[seq] = arange() {end = <seq>}
      %b: f32[seq] = cast(%a) {dtype = f32}
      %e: f32[seq] = exp(%x)
      %n: f32[seq] = neg(%x)
      return %n
    }""")
    after, counts = run(dce, before)
    assert_ir(after, """
    graph @f(%x: f32[seq]) {
      symbol seq in [1, 64]
      %n: f32[seq] = neg(%x)
      return %n
    }""")
    assert counts == {"nodes": 3}
    assert len(before.nodes) == 4  # the pass got a copy


def test_removes_dead_params_and_their_weights():
    before = graph("""
    graph @f(%x: f32[4]) {
      param %w: f32[4]
      param %unused: f32[8]
      %y: f32[4] = mul(%x, %w)
      return %y
    }""", w=torch.ones(4), unused=torch.zeros(8))
    after, counts = run(dce, before)
    assert list(after.params) == ["w"] and list(after.weights) == ["w"]
    assert counts == {"params": 1}
    assert "unused" in before.weights


def test_keeps_effectful_ops_and_graph_inputs():
    text = """
    graph @f(%x: f32[4], %unused_input: f32[2]) {
      %s: f32[4] = test_effect(%x)
      return %x
    }"""
    after, counts = run(dce, graph(text))
    assert_ir(after, text)
    assert counts == {}


def test_no_change_when_everything_is_live():
    text = """
    graph @f(%x: f32[4]) {
      %a: f32[4] = exp(%x)
      %b: f32[4] = add(%a, %x)
      return %b, %a
    }"""
    after, counts = run(dce, graph(text))
    assert_ir(after, text)
    assert counts == {}
