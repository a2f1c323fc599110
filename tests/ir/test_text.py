"""The IR text form: print -> parse -> print is the identity, the parsed graph computes the same, bad text fails."""
from __future__ import annotations

import math
import re

import pytest
import sympy
import torch

import caramba
from caramba.errors import ParseError
from caramba.ir import (DType, Graph, Interpreter, Node, TensorType, Value, get_op, parse_graph, print_graph, symbolic,
                        verify)

BATCH = symbolic.symbol("batch")
SEQ = symbolic.symbol("seq")
PAST = symbolic.symbol("past")
F32 = DType.f32


def round_trip(g: Graph) -> Graph:
    """Parse `g`'s text, check the reprint is identical, and return the parsed graph."""
    text = print_graph(g)
    parsed = parse_graph(text)
    assert print_graph(parsed) == text
    return parsed


def _attr_graph(value) -> Graph:
    g = Graph()
    g.add_symbol("seq", 1, 64)
    g.add_symbol("batch", 1, 8)
    x = g.add_input("x", TensorType((SEQ,), F32))
    g.outputs = [g.add_node("exp", [x], [x.type], {"a": value}).output]
    return g


def _same_attr(a, b) -> bool:
    if isinstance(a, (list, tuple)):
        return isinstance(b, tuple) and len(a) == len(b) and all(_same_attr(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    if isinstance(a, float):
        return isinstance(b, float) and math.copysign(1, a) == math.copysign(1, b) and a == b
    if isinstance(a, sympy.Expr):
        return a == b
    return type(a) is type(b) and a == b


ATTRS = [
    (0, "0"), (7, "7"), (-3, "-3"), (2**40, str(2**40)), (2**63 - 1, "9223372036854775807"),
    (1.5, "1.5"), (-0.25, "-0.25"), (1e-06, "1e-06"), (1e-05, "1e-05"), (1e20, "1e+20"), (2.0, "2.0"),
    (-0.0, "-0.0"), (0.1, "0.1"), (float("inf"), "inf"), (float("-inf"), "-inf"), (float("nan"), "nan"),
    (True, "true"), (False, "false"), (None, "none"),
    ("tanh", '"tanh"'), ("", '""'), ('say "hi"', r'"say \"hi\""'), ("back\\slash", r'"back\\slash"'),
    ("a, b = [c]", '"a, b = [c]"'), ('x} loc("y")', r'"x} loc(\"y\")"'), ("<seq>", '"<seq>"'),
    ("line\nbreak\ttab", r'"line\nbreak\ttab"'), ("f32", '"f32"'), ("true", '"true"'),
    (DType.f16, "f16"), (DType.bool, "bool"), (DType.bf16, "bf16"),
    (SEQ + 1, "<seq + 1>"), (2 * SEQ, "<2*seq>"), (sympy.floor(SEQ / 2), "<floor(seq/2)>"),
    (sympy.Min(SEQ, 2048), "<Min(2048, seq)>"), (BATCH * SEQ, "<batch*seq>"),
    ((), "[]"), (((),), "[[]]"), ((1, (2, 3), ()), "[1, [2, 3], []]"), ([4, 5], "[4, 5]"),
    ((BATCH, -1, SEQ + 1), "[<batch>, -1, <seq + 1>]"),
    ((1.5, "a,b", None, True, DType.f32, float("-inf")), '[1.5, "a,b", none, true, f32, -inf]'),
]


@pytest.mark.parametrize("value, text", ATTRS, ids=[f"attr{i}-{t[:20]}" for i, (_, t) in enumerate(ATTRS)])
def test_attribute_round_trip(value, text):
    g = _attr_graph(value)
    assert f"{{a = {text}}}" in print_graph(g)
    parsed = round_trip(g)
    assert _same_attr(value, parsed.nodes[0].attrs["a"]), parsed.nodes[0].attrs["a"]


def _structural_graph() -> Graph:
    """Types and statements the op registry does not need: multi-output nodes, 0-d, dotted names, locs, exprs."""
    g = Graph("decode_step")
    g.add_symbol("batch", 1, 8)
    g.add_symbol("seq", 1, 4096)
    g.add_symbol("past", 0, 4096)
    ids = g.add_input("input_ids", TensorType((BATCH, SEQ), DType.i64))
    cache = g.add_input("cache", TensorType((BATCH, 4, PAST + SEQ, 8), DType.bf16))
    scale = g.add_param("layers.0.attn.scale", TensorType((), F32))
    w = g.add_param("layers.0.attn.q-proj.weight", TensorType((16, 8), DType.f16))
    parts = [TensorType((BATCH, 2 * SEQ), F32), TensorType((sympy.floor(SEQ / 2), sympy.Max(0, SEQ - 1)), F32),
             TensorType((), DType.bool)]
    split = g.add_node("split3", [ids, cache], parts, {"sizes": (3, 4), "mode": "even"},
                       loc='layers.0.attn "quoted" \\ {braces} (parens)', names=["a", "b", "c"])
    g.add_node("use", [split.outputs[2], scale, w], [TensorType((), F32)], loc="layers.0")
    g.add_node("no_inputs", [], [TensorType((sympy.Min(SEQ, 2048),), DType.u8)], {"n": -1})
    g.append(Node("explicit", (split.outputs[0],), (Value("named.out-1", TensorType((BATCH, 2 * SEQ), F32)),)))
    g.outputs = [split.outputs[1], cache, scale, g.nodes[-1].outputs[0]]
    return g


def test_structural_round_trip():
    g = _structural_graph()
    text = print_graph(g)
    assert "%a: f32[batch, 2*seq], %b: f32[floor(seq/2), Max(0, seq - 1)], %c: bool[] = split3(" in text
    assert "param %layers.0.attn.scale: f32[]" in text
    parsed = round_trip(g)
    assert parsed.name == "decode_step"
    assert [v.name for v in parsed.inputs] == ["input_ids", "cache"]
    assert list(parsed.params) == ["layers.0.attn.scale", "layers.0.attn.q-proj.weight"]
    ranges = {k: (r.lo, r.hi) for k, r in parsed.symbols.items()}
    assert ranges == {"batch": (1, 8), "seq": (1, 4096), "past": (0, 4096)}
    assert [n.loc for n in parsed.nodes] == [n.loc for n in g.nodes]
    assert [len(n.outputs) for n in parsed.nodes] == [3, 1, 1, 1]
    assert [v.type for v in parsed.outputs] == [v.type for v in g.outputs]
    assert parsed.outputs[1] is parsed.inputs[1] and parsed.outputs[2] is parsed.params["layers.0.attn.scale"]
    assert parsed.nodes[1].inputs[0] is parsed.nodes[0].outputs[2]  # uses link to the definition, not a copy


def test_graph_without_inputs_or_outputs_round_trips():
    g = Graph("empty")
    round_trip(g)
    g.add_node("arange", [], [TensorType((5,), DType.i64)], {"end": 5})
    assert round_trip(g).nodes[0].attrs == {"end": 5}


def test_comments_and_blank_lines_are_ignored():
    g = _computing_graph()
    text = print_graph(g)
    lines = text.splitlines()
    noisy = "\n".join([lines[0], "", "  // a comment", *lines[1:]]) + "\n"
    assert print_graph(parse_graph(noisy)) == text


# ---------------------------------------------------------------------------------------------------------------
# The parsed graph computes what the original computes
# ---------------------------------------------------------------------------------------------------------------
def _emit(g: Graph, op: str, inputs, loc: str = "", **attrs) -> Value:
    opdef = get_op(op)
    types = opdef.infer([v.type for v in inputs], opdef.full_attrs(attrs))
    return g.add_node(op, inputs, types, attrs, loc=loc).output


def _computing_graph() -> Graph:
    torch.manual_seed(0)
    g = Graph()
    g.add_symbol("batch", 1, 8)
    g.add_symbol("seq", 1, 32)
    x = g.add_input("x", TensorType((BATCH, SEQ, 8), F32))
    mask = g.add_input("mask", TensorType((1, SEQ, 1), DType.bool))
    norm_w = g.add_param("layers.0.norm.weight", TensorType((8,), F32), torch.randn(8))
    proj_w = g.add_param("layers.0.proj.weight", TensorType((6, 8), F32), torch.randn(6, 8))
    proj_b = g.add_param("layers.0.proj.bias", TensorType((6,), F32), torch.randn(6))
    h = _emit(g, "rms_norm", [x, norm_w], "layers.0.norm", normalized_shape=(8,), eps=1e-06)
    h = _emit(g, "linear", [h, proj_w, proj_b], "layers.0.proj")
    h = _emit(g, "gelu", [h], approximate="tanh")
    h = _emit(g, "clamp", [h], min=float("-inf"), max=2.5)
    h = _emit(g, "masked_fill", [h, mask], value=-1e9)
    h = _emit(g, "slice", [h], dim=-1, start=1, end=2**63 - 1, step=2)
    h = _emit(g, "reshape", [h], shape=(BATCH, SEQ * 3))
    h = _emit(g, "slice", [h], dim=1, start=0, end=SEQ + 1)
    h = _emit(g, "softmax", [h], dim=-1, dtype=DType.f64)
    h = _emit(g, "cast", [h], dtype=DType.f16)
    h = _emit(g, "mul", [h], scalar=0.5, reverse=True)
    total = _emit(g, "sum", [h], dims=(-1,), keepdim=False, dtype=None)
    big = _emit(g, "gt", [h], scalar=float("nan"))
    g.outputs = [h, total, big]
    verify(g)
    return g


@pytest.mark.parametrize("batch, seq", [(1, 1), (3, 5), (2, 7)])
def test_parsed_graph_computes_the_same(batch, seq):
    g = _computing_graph()
    parsed = round_trip(g)
    verify(parsed)
    parsed.weights.update(g.weights)
    x, mask = torch.randn(batch, seq, 8), torch.rand(1, seq, 1) < 0.3
    want = Interpreter(g, check_types=True).run(x, mask)
    got = Interpreter(parsed, check_types=True).run(x, mask)
    assert len(got) == 3
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert not got[2].any()  # comparisons with nan are false: the nan survived the text form


@pytest.fixture(scope="module")
def compiled_tiny():
    from caramba.models import Transformer, preset

    torch.manual_seed(0)
    return caramba.compile(Transformer(preset("tiny")).eval(), target="eager")


def test_compiled_model_graph_round_trips_and_computes_the_same(compiled_tiny):
    parsed = round_trip(compiled_tiny.graph)
    verify(parsed)
    parsed.weights.update(compiled_tiny.graph.weights)
    ids = torch.randint(0, 256, (2, 9))
    assert torch.equal(Interpreter(parsed).run(ids)[0], compiled_tiny(ids))


# ---------------------------------------------------------------------------------------------------------------
# Parse errors name the line and the problem
# ---------------------------------------------------------------------------------------------------------------
GOOD = """\
graph @forward(%x: f32[batch, 5]) {
  symbol batch in [1, 64]
  param %w.weight: f32[5]
  %y: f32[batch, 5] = mul(%x, %w.weight) loc("scale")
  %z: f32[batch, 5] = add(%y) {scalar = 1.5}
  return %z
}
"""


def _lines() -> list[str]:
    return GOOD.splitlines()


def _replace(lineno: int, new: str) -> str:
    lines = _lines()
    lines[lineno - 1] = new
    return "\n".join(lines) + "\n"


def _parse_error(text: str) -> str:
    with pytest.raises(ParseError) as info:
        parse_graph(text)
    return str(info.value)


def test_good_text_parses():
    g = parse_graph(GOOD)
    assert print_graph(g) == GOOD
    verify(g)


@pytest.mark.parametrize("lineno, line, problem", [
    (4, '  %y: f32[batch, 5] = mul(%x, %nope) loc("scale")', r"%nope is used before it is defined"),
    (5, "  %z: f32[batch, 5] = add(%z) {scalar = 1.5}", r"%z is used before it is defined"),
    (6, "  return %ghost", r"%ghost is used before it is defined"),
    (4, '  %y: q32[batch, 5] = mul(%x, %w.weight) loc("scale")', r"bad type 'q32\[batch, 5\]'"),
    (3, "  param %w.weight: f32[5", r"bad type 'f32\[5'"),
    (4, '  %y: f32[2.5] = mul(%x, %w.weight) loc("scale")', r"2\.5"),
    (4, '  %y: f32[-3] = mul(%x, %w.weight) loc("scale")', r"-3"),
    (1, "graph @forward(%x: f32[batch, five) {", r"bad type"),
    (5, "  %z: f32[batch, 5] = add(%y) {scalar = @@}", r"bad attribute value '@@'"),
    (5, "  %z: f32[batch, 5] = add(%y) {scalar = [1, 2}", r"attribute"),
    (5, '  %z: f32[batch, 5] = add(%y) {scalar = "open}', r'"open'),
    (5, "  %z: f32[batch, 5] = add(%y) {scalar = <seq +>}", r"seq \+"),
    (5, "  this is not ir", r"cannot parse 'this is not ir'"),
    (2, "  symbol batch in [1]", r"cannot parse 'symbol batch in \[1\]'"),
    (1, "grph @forward(%x: f32[batch, 5]) {", r"expected 'graph @name"),
    (5, "  %y: f32[batch, 5] = add(%y) {scalar = 1.5}", r"%y is defined twice"),
], ids=["undefined-value", "self-use", "undefined-output", "bad-dtype", "unclosed-type", "fractional-dim",
        "negative-dim", "bad-type-in-header", "bad-attribute", "unclosed-list-attribute", "unclosed-string-attribute",
        "bad-expression-attribute", "garbage-line", "bad-symbol-line", "bad-header", "defined-twice"])
def test_parse_error_names_line_and_problem(lineno, line, problem):
    msg = _parse_error(_replace(lineno, line))
    assert re.search(rf"\bline {lineno}\b", msg), msg
    assert re.search(problem, msg), msg


def test_missing_closing_brace_names_a_line():
    text = "\n".join(_lines()[:-1]) + "\n"
    msg = _parse_error(text)
    assert "'}'" in msg and "missing" in msg, msg
    assert re.search(r"\bline \d+\b", msg), msg


def test_empty_text_is_a_parse_error():
    assert "empty" in _parse_error("\n  \n")


def test_dims_are_arithmetic_not_python():
    """A dim is an integer expression over symbols; anything else in the text is an error, never evaluated."""
    msg = _parse_error(_replace(4, '  %y: f32[(lambda: 5)()] = mul(%x, %w.weight) loc("scale")'))
    assert "line 4" in msg, msg
