"""canonicalize: each fold and chain rule fires on its form, and near misses (rounding casts, real transposes,
dtype-promoting scalars, reversed subtraction) stay."""
from __future__ import annotations

import pytest

from caramba.ir.types import DType
from caramba.passes.canonicalize import canonicalize, exact_cast
from tests.passes.ir_helpers import assert_ir, graph, run

HEAD = """graph @f(%x: {xt}) {{
  symbol b in [1, 8]
  symbol seq in [1, 64]
"""


def g(xt: str, body: str):
    return graph(HEAD.format(xt=xt) + body + "\n}")


IDENTITY = [
    # (rule, input type, body whose result %y equals %x)
    ("cast_noop", "f16[b, seq]", "%y: f16[b, seq] = cast(%x) {dtype = f16}"),
    ("cast_pair", "f16[b, seq]", "%a: f32[b, seq] = cast(%x) {dtype = f32}\n%y: f16[b, seq] = cast(%a) {dtype = f16}"),
    ("cast_pair", "i8[b, seq]", "%a: f16[b, seq] = cast(%x) {dtype = f16}\n%y: i8[b, seq] = cast(%a) {dtype = i8}"),
    ("reshape_noop", "f32[b, seq, 4]", "%y: f32[b, seq, 4] = reshape(%x) {shape = [<b>, <seq>, -1]}"),
    ("expand_noop", "f32[b, 1, seq]", "%y: f32[b, 1, seq] = expand(%x) {shape = [<b>, -1, <seq>]}"),
    ("permute_noop", "f32[b, seq, 4]", "%y: f32[b, seq, 4] = transpose(%x) {dim0 = 1, dim1 = 1}"),
    ("permute_noop", "f32[b, seq, 4]", "%y: f32[b, seq, 4] = permute(%x) {dims = [0, 1, -1]}"),
    ("permute_noop", "f32[b, seq, 4]",
     "%t: f32[b, 4, seq] = transpose(%x) {dim0 = 1, dim1 = 2}\n"
     "%y: f32[b, seq, 4] = transpose(%t) {dim0 = -1, dim1 = -2}"),
    ("permute_noop", "f32[b, seq, 4]",
     "%t: f32[seq, 4, b] = permute(%x) {dims = [1, 2, 0]}\n%y: f32[b, seq, 4] = permute(%t) {dims = [2, 0, 1]}"),
    ("squeeze_pair", "f32[b, seq]",
     "%u: f32[b, 1, seq] = unsqueeze(%x) {dim = 1}\n%y: f32[b, seq] = squeeze(%u) {dims = [1]}"),
    ("squeeze_pair", "f32[b, 1, seq]",
     "%s: f32[b, seq] = squeeze(%x) {dims = [1]}\n%y: f32[b, 1, seq] = unsqueeze(%s) {dim = -2}"),
    ("slice_noop", "f32[b, seq]", "%y: f32[b, seq] = slice(%x) {dim = 1, start = 0, end = 9223372036854775807}"),
    ("slice_noop", "f32[b, seq]", "%y: f32[b, seq] = slice(%x) {dim = -1, end = <seq>}"),
    ("mul_one", "f32[b, seq]", "%y: f32[b, seq] = mul(%x) {scalar = 1.0}"),
    ("mul_one", "i64[b, seq]", "%y: i64[b, seq] = mul(%x) {scalar = 1, reverse = true}"),
    ("add_zero", "f32[b, seq]", "%y: f32[b, seq] = add(%x) {scalar = 0}"),
    ("sub_zero", "f32[b, seq]", "%y: f32[b, seq] = sub(%x) {scalar = 0.0}"),
    ("div_one", "f32[b, seq]", "%y: f32[b, seq] = div(%x) {scalar = 1.0}"),
    ("pow_one", "f32[b, seq]", "%y: f32[b, seq] = pow(%x) {scalar = 1}"),
]


@pytest.mark.parametrize("rule,xt,body", IDENTITY, ids=[f"{r}-{i}" for i, (r, _, _) in enumerate(IDENTITY)])
def test_identity_folds_to_input(rule, xt, body):
    before = g(xt, body + "\nreturn %y")
    after, counts = run(canonicalize, before)
    assert_ir(after, HEAD.format(xt=xt) + "return %x\n}")
    assert counts == {rule: 1}


NO_CHANGE = [
    # f32 -> f16 -> f32 rounds; f16 -> bf16 -> f16 rounds; i64 -> f32 -> i64 loses integers above 2**24
    ("f32[b, seq]", "%a: f16[b, seq] = cast(%x) {dtype = f16}\n%y: f32[b, seq] = cast(%a) {dtype = f32}"),
    ("f16[b, seq]", "%a: bf16[b, seq] = cast(%x) {dtype = bf16}\n%y: f16[b, seq] = cast(%a) {dtype = f16}"),
    ("i64[b, seq]", "%a: f32[b, seq] = cast(%x) {dtype = f32}\n%y: i64[b, seq] = cast(%a) {dtype = i64}"),
    # a real transpose whose type happens to be unchanged, and transposes that do not cancel
    ("f32[b, 4, 4]", "%y: f32[b, 4, 4] = transpose(%x) {dim0 = 1, dim1 = 2}"),
    ("f32[b, seq, 4]", "%t: f32[seq, b, 4] = transpose(%x) {dim0 = 0, dim1 = 1}\n"
                       "%y: f32[seq, 4, b] = transpose(%t) {dim0 = 1, dim1 = 2}"),
    ("f32[b, 1, seq]", "%y: f32[b, 3, seq] = expand(%x) {shape = [<b>, 3, <seq>]}"),
    ("f32[b, seq]", "%u: f32[b, 1, seq] = unsqueeze(%x) {dim = 1}\n%y: f32[b, 1, seq, 1] = unsqueeze(%u) {dim = 3}"),
    ("f32[b, seq]", "%y: f32[b, seq - 1] = slice(%x) {dim = 1, start = 1}"),
    ("f32[b, seq]", "%y: f32[b, Max(0, seq - 1)] = slice(%x) {dim = 1, end = -1}"),
    ("i64[b, seq]", "%y: f32[b, seq] = mul(%x) {scalar = 1.0}"),  # promotes to f32: not an identity
    ("bool[b, seq]", "%y: i64[b, seq] = add(%x) {scalar = 0}"),
    ("f32[b, seq]", "%y: f32[b, seq] = sub(%x) {scalar = 0.0, reverse = true}"),  # 0 - x
    ("f32[b, seq]", "%y: f32[b, seq] = div(%x) {scalar = 1.0, reverse = true}"),  # 1 / x
    ("f32[b, seq]", "%y: f32[b, seq] = mul(%x) {scalar = 2.0}"),
]


@pytest.mark.parametrize("xt,body", NO_CHANGE)
def test_near_misses_stay(xt, body):
    text = HEAD.format(xt=xt) + body + "\nreturn %y\n}"
    after, counts = run(canonicalize, graph(text))
    assert_ir(after, text)
    assert counts == {}


def test_symbolic_shapes_compare_under_symbol_ranges():
    # Min(seq, 64) is seq because seq <= 64 is declared: the reshape and the slice are no-ops
    before = g("f32[b, seq]", """
  %r: f32[b, Min(64, seq)] = reshape(%x) {shape = [<b>, <Min(64, seq)>]}
  %y: f32[b, Min(64, seq)] = slice(%r) {dim = 1, end = 64}
  return %y""")
    after, counts = run(canonicalize, before)
    assert_ir(after, HEAD.format(xt="f32[b, seq]") + "return %x\n}")
    assert counts == {"reshape_noop": 1, "slice_noop": 1}


def test_chains_compose_and_shared_inner_nodes_stay():
    before = g("f16[b, seq, 4]", """
  %c1: f32[b, seq, 4] = cast(%x) {dtype = f32}
  %c2: bf16[b, seq, 4] = cast(%c1) {dtype = bf16}
  %r1: f16[b, seq, 2, 2] = reshape(%x) {shape = [<b>, <seq>, 2, 2]}
  %r2: f16[b, 2, seq, 2] = transpose(%r1) {dim0 = 1, dim1 = 2}
  %p: f16[2, b, 2, seq] = permute(%r2) {dims = [1, 0, 3, 2]}
  %r3: f16[b, seq, 4] = reshape(%r1) {shape = [<b>, <seq>, 4]}
  %r4: f16[b, seq * 4] = reshape(%r3) {shape = [<b>, -1]}
  return %c2, %p, %r4, %r1""")
    after, counts = run(canonicalize, before)
    assert_ir(after, HEAD.format(xt="f16[b, seq, 4]") + """
  %cast: bf16[b, seq, 4] = cast(%x) {dtype = bf16}
  %r1: f16[b, seq, 2, 2] = reshape(%x) {shape = [<b>, <seq>, 2, 2]}
  %permute: f16[2, b, 2, seq] = permute(%r1) {dims = [2, 0, 3, 1]}
  %reshape_0: f16[b, seq * 4] = reshape(%x) {shape = [<b>, -1]}
  return %cast, %permute, %reshape_0, %r1
}""")
    assert counts == {"cast_chain": 1, "permute_chain": 1, "reshape_chain": 2}


def test_exact_cast_table():
    assert exact_cast(DType.f16, DType.f32) and exact_cast(DType.bf16, DType.f64) and exact_cast(DType.bool, DType.f16)
    assert not exact_cast(DType.f32, DType.f16) and not exact_cast(DType.f16, DType.bf16)
    assert not exact_cast(DType.i64, DType.f64) and not exact_cast(DType.i32, DType.f32)
