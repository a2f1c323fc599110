"""Graph analyses on networkx: the dataflow DiGraph, the verifier's order and cycle errors, live ranges and peak
activation memory against hand counts, and the critical path."""
from __future__ import annotations

import pytest
import torch

import caramba
from caramba.analysis import (check_acyclic, critical_path, live_ranges, peak_activation_memory, to_networkx,
                              topological_order)
from caramba.errors import VerificationError
from caramba.ir import DType, Graph, Node, TensorType, Value, symbolic, verify
from caramba.models import Transformer, preset

BATCH = symbolic.symbol("batch")
F32 = DType.f32


def chain() -> Graph:
    """x: f32[batch, 4] -> a = exp(x) -> b = linear(a, w: [8, 4]) -> c = relu(b) -> d = mul(b, c); returns d."""
    g = Graph()
    g.add_symbol("batch", 1, 64)
    x = g.add_input("x", TensorType((BATCH, 4), F32))
    w = g.add_param("w", TensorType((8, 4), F32))
    a = g.add_node("exp", [x], [x.type]).output
    b = g.add_node("linear", [a, w], [TensorType((BATCH, 8), F32)]).output
    c = g.add_node("relu", [b], [b.type]).output
    g.outputs = [g.add_node("mul", [b, c], [b.type]).output]
    return g


def test_to_networkx_has_a_node_per_ir_node_and_an_edge_per_producer_user_pair():
    g = chain()
    g.outputs = [g.add_node("mul", [g.outputs[0], g.outputs[0]], [g.outputs[0].type]).output]  # reads d twice
    dag = to_networkx(g)
    assert dag.number_of_nodes() == len(g.nodes) + len(g.inputs) + len(g.params)
    assert set(dag.edges) == {("%x", 0), (0, 1), ("%w", 1), (1, 2), (1, 3), (2, 3), (3, 4)}
    assert [dag.nodes[i]["op"] for i in range(len(g.nodes))] == [n.op for n in g.nodes]
    twice = dag.edges[3, 4]
    assert twice["value"] is g.nodes[3].output and twice["ports"] == ((0, 0), (0, 1))
    assert twice["bytes"] is None  # f32[batch, 8]: symbolic
    assert dag.edges["%w", 1]["bytes"] == 8 * 4 * 4
    assert to_networkx(g, sources=False).number_of_nodes() == len(g.nodes)


def test_verifier_names_a_node_out_of_topological_order_and_the_order_that_fixes_it():
    g = chain()
    g.nodes[1], g.nodes[2] = g.nodes[2], g.nodes[1]  # relu(b) now comes before linear defines b
    with pytest.raises(VerificationError) as e:
        verify(g)
    msg = str(e.value)
    assert "%linear is used before it is defined: node #1 reads it, node #2 (linear) defines it later" in msg
    assert "out of topological order" in msg and "topological_order(graph)" in msg
    assert "= relu(%linear)" in msg  # the reading node, as the verifier prints it
    g.nodes = topological_order(g)
    verify(g)
    assert [n.op for n in g.nodes] == ["exp", "linear", "relu", "mul"]


def test_verifier_names_a_cycle_that_no_order_can_fix():
    g = Graph()
    x = g.add_input("x", TensorType((4,), F32))
    a, b = Value("a", x.type), Value("b", x.type)
    g.append(Node("add", (x, b), (a,)))  # a = x + b
    g.append(Node("neg", (a,), (b,)))  # b = -a
    g.outputs = [b]
    with pytest.raises(VerificationError) as e:
        verify(g)
    assert "%b is used before it is defined" in str(e.value)
    assert "no order fixes it: the graph has a cycle %a -> %b -> %a" in str(e.value)
    with pytest.raises(VerificationError, match=r"the graph has a cycle: %a -> %b -> %a"):
        check_acyclic(g)
    with pytest.raises(VerificationError, match="cycle"):
        topological_order(g)


def test_live_ranges_follow_the_schedule():
    g = chain()
    ranges = live_ranges(g, {"batch": 2})
    assert {v.name: (r.start, r.end, r.bytes) for v, r in ranges.items()} == {
        "x": (0, 0, 32), "exp": (0, 1, 32), "linear": (1, 3, 64), "relu": (2, 3, 64), "mul": (3, 3, 64)}
    assert g.params["w"] not in ranges  # weights are not activations


def test_peak_activation_memory_of_a_hand_built_graph_equals_the_hand_count():
    g = chain()
    # batch 2, f32: x 32 B, a 32 B, b 64 B, c 64 B, d 64 B (the weight w is not counted).
    # node 0 exp:    x + a      =  64
    # node 1 linear: a + b      =  96
    # node 2 relu:   b + c      = 128
    # node 3 mul:    b + c + d  = 192  <- the peak
    peak = peak_activation_memory(g, {"batch": 2})
    size, at, live = peak
    assert (size, at) == (192, 3)
    assert sorted(v.name for v in live) == ["linear", "mul", "relu"]
    assert peak.bindings == {"batch": 2} and peak.assumed == ()
    worst = peak_activation_memory(g)  # batch unbound: its upper bound, 64 (32x the bytes)
    assert (worst.bytes, worst.assumed, worst.bindings) == (192 * 32, ("batch",), {"batch": 64})


def test_bindings_are_checked():
    g = chain()
    with pytest.raises(ValueError, match=r"bindings name \['seq'\], which the graph does not declare"):
        peak_activation_memory(g, {"seq": 8})
    with pytest.raises(ValueError, match=r"batch=0 is outside the symbol's range \[1, 64\]"):
        peak_activation_memory(g, {"batch": 0})


def test_peak_activation_memory_of_the_tiny_preset_equals_the_hand_count():
    torch.manual_seed(0)
    cm = caramba.compile(Transformer(preset("tiny")).eval(), target="eager")
    peak = peak_activation_memory(cm.graph, {"batch": 1, "seq": 8})
    # batch 1, seq 8, f32, d_model 64, d_ff 128. The peak is layer 0's swiglu, where live are:
    #   the residual stream (add_rms_norm's sum)   1*8*64 *4 =  2048
    #   gate and up linears                        1*8*128*4 =  4096 x 2
    #   the swiglu output                          1*8*128*4 =  4096
    #   cos and sin, unsqueezed once for both layers' rope (CSE): 1*1*8*16*4 = 512 x 2
    # = 2048 + 3 * 4096 + 2 * 512 = 15360. (The logits, 1*8*256*4 = 8192, peak later with the final norm's 2048.)
    assert peak.bytes == 2048 + 3 * 4096 + 2 * 512
    assert cm.graph.nodes[peak.node_index].op == "swiglu" and cm.graph.nodes[peak.node_index].loc == "layers.0.mlp"
    assert sorted(cm.graph.producers()[v].op for v in peak.live) == sorted(
        ["add_rms_norm", "linear", "linear", "swiglu", "unsqueeze", "unsqueeze"])


def diamond() -> Graph:
    """a = exp(x), then b = neg(a) and c = linear(a, w) side by side, then d = add(b, c)."""
    g = Graph()
    x = g.add_input("x", TensorType((2, 4), F32))
    w = g.add_param("w", TensorType((4, 4), F32))
    a = g.add_node("exp", [x], [x.type]).output
    b = g.add_node("neg", [a], [x.type]).output
    c = g.add_node("linear", [a, w], [x.type]).output
    g.outputs = [g.add_node("add", [b, c], [x.type]).output]
    return g


def test_critical_path_of_a_diamond_takes_the_costlier_branch():
    g = diamond()
    # bytes read + written: neg 32 + 32 = 64; linear 32 + 64 (w) + 32 = 128: the linear branch is longer
    assert [n.op for n in critical_path(g)] == ["exp", "linear", "add"]
    assert [n.op for n in critical_path(g, cost=lambda n: 10 if n.op == "neg" else 1)] == ["exp", "neg", "add"]
