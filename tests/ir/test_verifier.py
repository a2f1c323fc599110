"""The verifier: a valid graph passes; each broken invariant is reported with the node, the op and what is wrong."""
from __future__ import annotations

import re

import pytest

from caramba.errors import VerificationError
from caramba.ir import DType, Graph, Node, TensorType, Value, symbolic, verify

BATCH = symbolic.symbol("batch")
SEQ = symbolic.symbol("seq")
F32 = DType.f32


def _graph() -> tuple[Graph, Value, Value]:
    """x: f32[batch, 5], param proj.weight: f32[3, 5]; nothing computed yet."""
    g = Graph()
    g.add_symbol("batch", 1, 64)
    x = g.add_input("x", TensorType((BATCH, 5), F32))
    w = g.add_param("proj.weight", TensorType((3, 5), F32))
    return g, x, w


def _valid() -> Graph:
    g, x, w = _graph()
    y = g.add_node("linear", [x, w], [TensorType((BATCH, 3), F32)], loc="proj").output
    z = g.add_node("softmax", [y], [y.type], {"dim": -1}).output
    g.outputs = [z, y]
    return g


def _error(g: Graph) -> str:
    with pytest.raises(VerificationError) as info:
        verify(g)
    return str(info.value)


def test_valid_graph_passes():
    verify(_valid())


def test_graph_returning_inputs_and_params_passes():
    g, x, w = _graph()
    g.outputs = [x, w, x]
    verify(g)


def test_unknown_op():
    g, x, _ = _graph()
    g.outputs = [g.add_node("frobnicate", [x], [x.type], {"k": 2}).output]
    msg = _error(g)
    assert "unknown op 'frobnicate'" in msg
    assert "= frobnicate(%x) {k = 2}" in msg


def test_use_before_definition():
    g, x, _ = _graph()
    late = Value("late", x.type)
    g.append(Node("exp", (late,), (Value("early", x.type),)))
    g.append(Node("neg", (x,), (late,)))
    g.outputs = [late]
    msg = _error(g)
    assert "%late is used before it is defined" in msg
    assert "%early: f32[batch, 5] = exp(%late)" in msg


def test_value_from_another_graph():
    other, stranger, _ = _graph()
    g, _, _ = _graph()
    g.outputs = [g.add_node("exp", [stranger], [stranger.type]).output]
    assert stranger.name == "x" and stranger is not g.inputs[0]  # same name, different value
    msg = _error(g)
    assert "%x is used before it is defined (or is not in this graph)" in msg
    assert "= exp(%x)" in msg


@pytest.mark.parametrize("first, second", [("y", "y"), ("x", None)], ids=["two-nodes", "node-redefines-input"])
def test_value_defined_twice(first, second):
    g, x, _ = _graph()
    g.nodes.append(Node("exp", (x,), (Value(first, x.type),)))
    if second is not None:
        g.nodes.append(Node("neg", (x,), (Value(second, x.type),)))
    msg = _error(g)
    assert f"%{first} is defined twice" in msg
    assert ("= neg(%x)" if second else "= exp(%x)") in msg


@pytest.mark.parametrize("op, n, expect", [
    ("exp", 2, r"exp takes 1\.\.1 tensor inputs \(x\), got 2"),
    ("add", 0, r"add takes 1\.\.2 tensor inputs \(a, b\?\), got 0"),
    ("add", 3, r"add takes 1\.\.2 tensor inputs \(a, b\?\), got 3"),
    ("layer_norm", 4, r"layer_norm takes 1\.\.3 tensor inputs \(x, weight\?, bias\?\), got 4"),
    ("where", 2, r"where takes 3\.\.3 tensor inputs"),
])
def test_wrong_number_of_inputs(op, n, expect):
    g, x, _ = _graph()
    attrs = {"normalized_shape": (5,)} if op == "layer_norm" else {}
    g.outputs = [g.add_node(op, [x] * n, [x.type], attrs).output]
    msg = _error(g)
    assert re.search(expect, msg), msg
    assert f"= {op}(" in msg


def test_wrong_number_of_outputs():
    g, x, _ = _graph()
    g.nodes.append(Node("exp", (x,), (Value("a", x.type), Value("b", x.type))))
    msg = _error(g)
    assert "exp has 1 outputs, node declares 2" in msg


def test_unknown_attribute():
    g, x, _ = _graph()
    g.outputs = [g.add_node("softmax", [x], [x.type], {"dim": -1, "axis": 1}).output]
    msg = _error(g)
    assert "unknown attribute(s) ['axis']" in msg
    assert "softmax takes ['dim', 'dtype']" in msg
    assert "= softmax(%x) {dim = -1, axis = 1}" in msg


def test_missing_required_attribute():
    g, x, _ = _graph()
    g.outputs = [g.add_node("softmax", [x], [x.type], loc="layers.3.attn").output]
    msg = _error(g)
    assert "missing required attribute(s) ['dim']" in msg
    assert "= softmax(%x)" in msg
    assert "layers.3.attn" in msg  # the module the node came from


@pytest.mark.parametrize("declared, wrong", [
    (TensorType((BATCH, 3), DType.f16), "f16[batch, 3]"),
    (TensorType((BATCH, 4), F32), "f32[batch, 4]"),
    (TensorType((2 * BATCH, 3), F32), "f32[2*batch, 3]"),
    (TensorType((BATCH, 3, 1), F32), "f32[batch, 3, 1]"),
], ids=["wrong-dtype", "wrong-static-dim", "wrong-symbolic-dim", "wrong-rank"])
def test_declared_type_disagrees_with_shape_rule(declared, wrong):
    g, x, w = _graph()
    g.outputs = [g.add_node("linear", [x, w], [declared], names=["proj"]).output]
    msg = _error(g)
    assert f"%proj is declared {wrong} but linear produces f32[batch, 3]" in msg


def test_shape_rule_rejects_inputs():
    g, x, _ = _graph()
    w = g.add_param("bad.weight", TensorType((3, 4), F32))
    g.outputs = [g.add_node("linear", [x, w], [TensorType((BATCH, 3), F32)]).output]
    msg = _error(g)
    assert "shape rule of linear rejects its inputs" in msg
    assert "does not match weight" in msg


def test_undeclared_symbol():
    g, x, _ = _graph()
    y = g.add_input("y", TensorType((BATCH, SEQ), F32))
    g.outputs = [g.add_node("exp", [y], [y.type]).output, x]
    msg = _error(g)
    assert "['seq']" in msg and "not declared" in msg


def test_undefined_graph_output():
    g = _valid()
    g.outputs = [g.outputs[0], Value("ghost", TensorType((BATCH, 3), F32))]
    msg = _error(g)
    assert "graph output %ghost is not defined" in msg


def test_param_bound_to_another_name():
    g, x, w = _graph()
    g.params["other.weight"] = w
    msg = _error(g)
    assert "'other.weight'" in msg and "%proj.weight" in msg


def _clamped_slice(hi: int) -> Graph:
    """x[:2048] on f32[seq, 5], declared f32[seq, 5]: right exactly when seq <= 2048."""
    g = Graph()
    g.add_symbol("seq", 1, hi)
    x = g.add_input("x", TensorType((SEQ, 5), F32))
    g.outputs = [g.add_node("slice", [x], [x.type], {"dim": 0, "end": 2048}).output]
    return g


def test_min_against_symbol_verifies_within_declared_range():
    verify(_clamped_slice(2048))


def test_min_against_symbol_fails_beyond_declared_range():
    msg = _error(_clamped_slice(4096))
    assert "declared f32[seq, 5] but slice produces f32[Min(2048, seq), 5]" in msg


def test_symbol_ranges_decide_equality_of_max():
    """x[1:] has length seq - 1 only when seq >= 1 is declared (at seq = 0 it is 0, not -1)."""
    for lo, ok in [(1, True), (0, False)]:
        g = Graph()
        g.add_symbol("seq", lo, 64)
        x = g.add_input("x", TensorType((SEQ,), F32))
        g.outputs = [g.add_node("slice", [x], [TensorType((SEQ - 1,), F32)], {"dim": 0, "start": 1}).output]
        if ok:
            verify(g)
        else:
            assert "%slice is declared f32[seq - 1] but slice produces f32[Max(0, " in _error(g)
