"""The reference interpreter: input validation by message, freeing of dead values, outputs that alias inputs/params."""
from __future__ import annotations

import dataclasses
import re
import weakref

import pytest
import torch

import caramba.ir.interpreter as interpreter_module
from caramba.errors import InputError
from caramba.ir import DType, Graph, Interpreter, TensorType, bind_symbols, get_op, interpret, symbolic, verify

BATCH = symbolic.symbol("batch")
SEQ = symbolic.symbol("seq")
PAST = symbolic.symbol("past")
F32 = DType.f32


def _lm_graph() -> Graph:
    """input_ids: i64[batch, seq], bias: f32[batch, seq, 4] -> embedding(ids) + bias."""
    g = Graph()
    g.add_symbol("batch", 1, 8)
    g.add_symbol("seq", 1, 16)
    ids = g.add_input("input_ids", TensorType((BATCH, SEQ), DType.i64))
    bias = g.add_input("bias", TensorType((BATCH, SEQ, 4), F32))
    weight = torch.randn(11, 4, generator=torch.Generator().manual_seed(0))
    w = g.add_param("embed.weight", TensorType((11, 4), F32), weight)
    e = g.add_node("embedding", [w, ids], [TensorType((BATCH, SEQ, 4), F32)]).output
    g.outputs = [g.add_node("add", [e, bias], [e.type]).output]
    verify(g)
    return g


def _input_error(g: Graph, *inputs) -> str:
    with pytest.raises(InputError) as info:
        Interpreter(g).run(*inputs)
    return str(info.value)


def test_valid_inputs_run():
    g = _lm_graph()
    ids, bias = torch.randint(0, 11, (2, 3)), torch.randn(2, 3, 4)
    (out,) = Interpreter(g, check_types=True).run(ids, bias)
    torch.testing.assert_close(out, g.weights["embed.weight"][ids] + bias)
    assert bind_symbols(g, [ids, bias]) == {"batch": 2, "seq": 3}


def test_float_token_ids_are_refused():
    msg = _input_error(_lm_graph(), torch.zeros(2, 3), torch.randn(2, 3, 4))
    assert "input_ids" in msg and "dtype" in msg
    assert "torch.int64" in msg and "torch.float32" in msg
    assert "long" in msg  # says what to pass


def test_wrong_float_dtype_is_refused():
    msg = _input_error(_lm_graph(), torch.zeros(2, 3, dtype=torch.long), torch.randn(2, 3, 4, dtype=torch.float16))
    assert "'bias'" in msg and "torch.float32" in msg and "torch.float16" in msg


def test_wrong_rank_is_refused():
    msg = _input_error(_lm_graph(), torch.zeros(6, dtype=torch.long), torch.randn(2, 3, 4))
    assert "'input_ids'" in msg and "2 dims" in msg and "[6]" in msg


def test_wrong_static_dim_is_refused():
    msg = _input_error(_lm_graph(), torch.zeros(2, 3, dtype=torch.long), torch.randn(2, 3, 5))
    assert "'bias'" in msg and "[2, 3, 4]" in msg and "[2, 3, 5]" in msg


@pytest.mark.parametrize("shape, name, size, hi", [((2, 17), "seq", 17, 16), ((9, 3), "batch", 9, 8)])
def test_symbol_outside_declared_range_is_refused(shape, name, size, hi):
    msg = _input_error(_lm_graph(), torch.zeros(shape, dtype=torch.long), torch.randn(*shape, 4))
    assert f"{name}={size}" in msg and f"[1, {hi}]" in msg


def test_inputs_disagreeing_on_a_symbol_are_refused():
    msg = _input_error(_lm_graph(), torch.zeros(2, 3, dtype=torch.long), torch.randn(3, 3, 4))
    assert re.search(r"batch\D+2\D+3", msg) and "'bias'" in msg, msg


@pytest.mark.parametrize("n", [0, 1, 3])
def test_wrong_number_of_inputs_is_refused(n):
    inputs = [torch.zeros(2, 3, dtype=torch.long), torch.randn(2, 3, 4), torch.randn(2, 3, 4)][:n]
    msg = _input_error(_lm_graph(), *inputs)
    assert f"expected 2 input(s) (input_ids, bias), got {n}" in msg


def test_non_tensor_input_is_refused():
    msg = _input_error(_lm_graph(), [[1, 2, 3]], torch.randn(1, 3, 4))
    assert "'input_ids'" in msg and "torch.Tensor" in msg and "list" in msg


def test_compound_dim_is_checked_once_symbols_are_bound():
    """k: f32[batch, past + seq] after x: f32[batch, seq] and cache: f32[batch, past]."""
    g = Graph()
    for s in ("batch", "seq", "past"):
        g.add_symbol(s, 0 if s == "past" else 1, 16)
    g.add_input("k", TensorType((BATCH, PAST + SEQ), F32))
    x = g.add_input("x", TensorType((BATCH, SEQ), F32))
    g.add_input("cache", TensorType((BATCH, PAST), F32))
    g.outputs = [x]
    verify(g)
    interp = Interpreter(g)
    interp.run(torch.zeros(2, 7), torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(InputError) as info:
        interp.run(torch.zeros(2, 8), torch.zeros(2, 3), torch.zeros(2, 4))
    assert "'k'" in str(info.value) and "[2, 7]" in str(info.value) and "[2, 8]" in str(info.value)


def test_missing_weight_is_reported_at_construction():
    g = _lm_graph()
    with pytest.raises(ValueError, match=r"no weight tensor for param\(s\) \['embed.weight'\]"):
        Interpreter(g, weights={})


def test_weights_argument_overrides_attached_weights():
    g = _lm_graph()
    ids, bias = torch.randint(0, 11, (1, 5)), torch.zeros(1, 5, 4)
    ones = torch.ones(11, 4)
    (out,) = Interpreter(g, weights={"embed.weight": ones}).run(ids, bias)
    assert torch.equal(out, torch.ones(1, 5, 4))


# ---------------------------------------------------------------------------------------------------------------
# Outputs that are inputs, params, or values used again later
# ---------------------------------------------------------------------------------------------------------------
def test_outputs_may_be_inputs_params_and_reused_values():
    g = Graph()
    g.add_symbol("batch", 1, 8)
    x = g.add_input("x", TensorType((BATCH, 3), F32))
    w = g.add_param("scale.weight", TensorType((3,), F32), torch.tensor([1.0, 2.0, 3.0]))
    a = g.add_node("exp", [x], [x.type]).output
    b = g.add_node("mul", [a, w], [x.type]).output
    c = g.add_node("neg", [b], [x.type]).output
    g.outputs = [x, w, a, c, a]  # x, w and a are all used by later nodes, a is returned twice
    verify(g)
    xs = torch.randn(2, 3)
    out = interpret(g, xs, check_types=True)
    assert out[0] is xs
    assert torch.equal(out[1], torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(out[2], xs.exp())
    torch.testing.assert_close(out[3], -(xs.exp() * torch.tensor([1.0, 2.0, 3.0])))
    assert out[4] is out[2]


def test_weights_survive_repeated_runs():
    g = _lm_graph()
    interp = Interpreter(g)
    ids, bias = torch.randint(0, 11, (2, 3)), torch.randn(2, 3, 4)
    first = interp.run(ids, bias)[0]
    for _ in range(2):
        assert torch.equal(interp.run(ids, bias)[0], first)


# ---------------------------------------------------------------------------------------------------------------
# Dead values are dropped after their last use
# ---------------------------------------------------------------------------------------------------------------
def test_values_are_freed_after_last_use(monkeypatch):
    """x -> a = exp(x) -> b = neg(a) -> c = sin(b) -> d = cos(c) + a2 where a2 = abs(x) stays live until the end.

    Spies record a weakref to each result; when cos runs, a and b (dead after neg and sin) must be gone while
    a2 (an input of the last node) must still be alive.
    """
    g = Graph()
    g.add_symbol("batch", 1, 8)
    x = g.add_input("x", TensorType((BATCH, 64), F32))
    a = g.add_node("exp", [x], [x.type], names=["a"]).output
    a2 = g.add_node("abs", [x], [x.type], names=["a2"]).output
    b = g.add_node("neg", [a], [x.type], names=["b"]).output
    c = g.add_node("sin", [b], [x.type], names=["c"]).output
    d = g.add_node("cos", [c], [x.type], names=["d"]).output
    g.outputs = [g.add_node("add", [d, a2], [x.type], names=["out"]).output]
    verify(g)

    refs: dict[str, weakref.ref] = {}
    alive_at_last_node: dict[str, bool] = {}

    def spy(op: str):
        opdef = get_op(op)

        def impl(*args, **attrs):
            if op == "add":
                alive_at_last_node.update({k: r() is not None for k, r in refs.items()})
            out = opdef.impl(*args, **attrs)
            refs[{"exp": "a", "abs": "a2", "neg": "b", "sin": "c", "cos": "d"}.get(op, op)] = weakref.ref(out)
            return out

        return dataclasses.replace(opdef, impl=impl)

    monkeypatch.setattr(interpreter_module, "get_op", spy)
    xs = torch.randn(2, 64)
    (out,) = Interpreter(g).run(xs)
    torch.testing.assert_close(out, torch.cos(torch.sin(-torch.exp(xs))) + xs.abs())
    assert alive_at_last_node == {"a": False, "b": False, "c": False, "a2": True, "d": True}


def test_segments_run_every_node_once_in_order_inside_their_contexts():
    """run(segments=k, segment=f): the nodes in k consecutive parts, part i inside f(i) (how target cuda
    captures the decode step as several CUDA graphs); the outputs are those of one run."""
    import contextlib

    g = Graph()
    g.add_symbol("batch", 1, 8)
    x = g.add_input("x", TensorType((BATCH, 4), F32))
    v = x
    for _ in range(5):
        v = g.add_node("neg", [v], [v.type]).output
    g.outputs = [v]
    seen: list[tuple[str, int]] = []
    interp = Interpreter(g)
    ran = []
    for st in interp._steps:  # record how many context events came before each node ran
        object.__setattr__(st, "impl", lambda *a, _impl=st.impl, **k: ran.append(len(seen)) or _impl(*a, **k))

    @contextlib.contextmanager
    def segment(i):
        seen.append(("enter", i))
        yield
        seen.append(("exit", i))

    inp = torch.randn(2, 4)
    (out,) = interp.run(inp, segments=3, segment=segment)
    torch.testing.assert_close(out, -inp)
    assert seen == [("enter", 0), ("exit", 0), ("enter", 1), ("exit", 1), ("enter", 2), ("exit", 2)]
    assert ran == [1, 3, 3, 5, 5]  # 5 nodes in parts of 1, 2, 2 (bounds 0, 1, 3, 5), each inside its context
