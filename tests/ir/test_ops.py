"""Every IR op against plain torch: one differential helper, one table of cases, and the dtype promotion rules.

Each case builds a one-node graph whose output type comes from the op's shape rule, verifies it, runs it through
the interpreter with types checked after every step, and compares with torch code written here (not the op's
`impl`). Cases use odd sizes (3, 5, 7), a symbolic batch (run at its traced size and again at 1), broadcasting,
scalar attributes, negative dims and symbolic attributes.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import pytest
import torch

from caramba.errors import VerificationError
from caramba.ir import DType, Graph, Interpreter, TensorType, all_ops, get_op, symbolic, verify

BATCH = symbolic.symbol("batch")
SEQ = symbolic.symbol("seq")
PAST = symbolic.symbol("past")
SYMBOL_RANGE = (1, 64)
INT_MAX = 2**63 - 1
INF = float("inf")

Axes = Sequence[str | None]  # names for an input's leading axes ("batch", "seq"); None keeps an axis static


# ---------------------------------------------------------------------------------------------------------------
# The differential helper
# ---------------------------------------------------------------------------------------------------------------
def check_op(op: str, inputs: Sequence[torch.Tensor], attrs: Mapping[str, Any], reference: Callable[..., Any],
             dims: Sequence[Axes | None] | None = None) -> Graph:
    """Check `op` on `inputs` against `reference` (plain torch; a tuple for multi-output ops); returns the graph.

    `dims[i]` names the leading axes of input i. By default axis 0 of every input with the first input's rank and
    leading size (> 1) is "batch". The graph is verified, then run on `inputs` and again with every batch axis cut
    to 1: the same graph at a second batch size.
    """
    dims = _default_dims(inputs) if dims is None else list(dims)
    g = Graph(op)
    for name in sorted({n for axes in dims if axes for n in axes if n}):
        g.add_symbol(name, *SYMBOL_RANGE)
    values = [g.add_input(f"x{i}", _input_type(x, axes)) for i, (x, axes) in enumerate(zip(inputs, dims))]
    opdef = get_op(op)
    out_types = opdef.infer([v.type for v in values], opdef.full_attrs(attrs))
    g.outputs = list(g.add_node(op, values, out_types, attrs).outputs)
    verify(g)
    interp = Interpreter(g, check_types=True)
    for xs in _runs(inputs, dims):
        got = interp.run(*xs)
        want = reference(*xs)
        want = want if isinstance(want, tuple) else (want,)
        assert len(got) == len(want) == opdef.num_outputs
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)
    return g


def _default_dims(inputs: Sequence[torch.Tensor]) -> list[Axes | None]:
    if not inputs or inputs[0].dim() == 0 or inputs[0].shape[0] == 1:
        return [None] * len(inputs)
    rank, lead = inputs[0].dim(), inputs[0].shape[0]
    return [("batch",) if x.dim() == rank and x.shape[0] == lead else None for x in inputs]


def _input_type(x: torch.Tensor, axes: Axes | None) -> TensorType:
    axes = list(axes or ())
    assert len(axes) <= x.dim(), f"{axes} names more axes than the input has: {list(x.shape)}"
    names = axes + [None] * (x.dim() - len(axes))
    return TensorType(tuple(symbolic.symbol(n) if n else s for n, s in zip(names, x.shape)), DType.from_torch(x.dtype))


def _runs(inputs: Sequence[torch.Tensor], dims: Sequence[Axes | None]) -> list[list[torch.Tensor]]:
    cut = []
    for x, axes in zip(inputs, dims):
        for axis, name in enumerate(axes or ()):
            if name == "batch":
                x = x.narrow(axis, 0, 1)
        cut.append(x)
    same = all(a is b for a, b in zip(cut, inputs))
    return [list(inputs)] if same else [list(inputs), cut]


# ---------------------------------------------------------------------------------------------------------------
# Inputs: deterministic, small, odd sizes
# ---------------------------------------------------------------------------------------------------------------
_gen = torch.Generator().manual_seed(0)


def randn(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=_gen).to(dtype)


def positive(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (torch.rand(shape, generator=_gen) * 2 + 0.25).to(dtype)


def ints(*shape: int, lo: int = -6, hi: int = 7, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    return torch.randint(lo, hi, shape, generator=_gen, dtype=dtype)


def nonzero(*shape: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    x = ints(*shape, lo=1, hi=7, dtype=dtype)
    return torch.where(ints(*shape, lo=0, hi=2) == 1, -x, x)


def bools(*shape: int) -> torch.Tensor:
    return torch.rand(shape, generator=_gen) < 0.5


@dataclass(frozen=True)
class Case:
    op: str
    inputs: tuple[torch.Tensor, ...]
    attrs: Mapping[str, Any]
    reference: Callable[..., torch.Tensor]
    dims: tuple | None = None


def case(id: str, op: str, inputs: Sequence[torch.Tensor], attrs: Mapping[str, Any], reference: Callable,
         dims: Sequence[Axes | None] | None = None):
    return pytest.param(Case(op, tuple(inputs), dict(attrs), reference, None if dims is None else tuple(dims)), id=id)


B = ("batch",)
BS = ("batch", "seq")


# ---------------------------------------------------------------------------------------------------------------
# References written from definitions
# ---------------------------------------------------------------------------------------------------------------
def floor_mod(x, y):
    return x - y * torch.div(x, y, rounding_mode="floor")


def softmax(x, dim):
    e = (x - x.amax(dim, keepdim=True)).exp()
    return e / e.sum(dim, keepdim=True)


def layer_norm(x, weight, bias, n, eps):
    dims = tuple(range(-n, 0))
    mu = x.mean(dims, keepdim=True)
    var = ((x - mu) ** 2).mean(dims, keepdim=True)
    y = (x - mu) / torch.sqrt(var + eps)
    return y * (1 if weight is None else weight) + (0 if bias is None else bias)


def rms_norm(x, weight, n, eps):
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    y = x / torch.sqrt((x * x).mean(tuple(range(-n, 0)), keepdim=True) + eps)
    return y if weight is None else y * weight


def attention(q, k, v, mask=None, causal=False, scale=None, gqa=False):
    if gqa:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
        v = v.repeat_interleave(q.shape[-3] // v.shape[-3], dim=-3)
    s = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if causal:
        s = s.masked_fill(~torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril(), -INF)
    if mask is not None:
        s = s.masked_fill(~mask, -INF) if mask.dtype == torch.bool else s + mask
    return softmax(s, -1) @ v


def fused_attention(q, k, v, mask=None, *, scale, causal, scores=None):
    """The fused ops' contract: native GQA, bottom-right causal, fp32 math, blind rows give zeros."""
    acc = torch.promote_types(q.dtype, torch.float32)
    heads = q.shape[1]
    k, v = (t.to(acc).repeat_interleave(heads // t.shape[1], dim=1) for t in (k, v))
    s = (q.to(acc) @ k.transpose(-1, -2)) * scale + (0 if scores is None else scores)
    tq, tk = s.shape[-2:]
    keep = torch.arange(tk) <= torch.arange(tq)[:, None] + (tk - tq) if causal else torch.ones(tq, tk, dtype=torch.bool)
    if mask is not None and mask.dtype == torch.bool:
        keep = keep & mask
    elif mask is not None:
        s = s + mask.to(acc)
    p = softmax(s.masked_fill(~keep, -INF), -1)
    p = torch.where(keep.any(-1, keepdim=True), p, 0.0)
    return (p @ v).to(q.dtype)


def decoupled(q_sem, k_sem, q_geo, k_geo, v, mask=None, *, scale_sem, scale_geo, causal):
    acc = torch.promote_types(q_sem.dtype, torch.float32)
    k_sem = k_sem.to(acc).repeat_interleave(q_sem.shape[1] // k_sem.shape[1], dim=1)
    sem = (q_sem.to(acc) @ k_sem.transpose(-1, -2)) * scale_sem
    return fused_attention(q_geo, k_geo, v, mask, scale=scale_geo, causal=causal, scores=sem)


def rms_fp32(x, weight=None, *, eps, dtype=None, weight_in_fp32=False):
    y = x.float() * torch.rsqrt((x.float() ** 2).mean(-1, keepdim=True) + eps)
    if weight is not None and weight_in_fp32:
        y = y * weight
    y = y if dtype is None else y.to(dtype)
    return y * weight if weight is not None and not weight_in_fp32 else y


def rope_half(x, cos, sin, r):
    """Llama/NeoX rotary on the first r features: y1 = x1 cos - x2 sin, y2 = x2 cos + x1 sin (per-half tables)."""
    x1, x2, rest = x[..., : r // 2], x[..., r // 2 : r], x[..., r:]
    c1, c2, s1, s2 = cos[..., : r // 2], cos[..., r // 2 :], sin[..., : r // 2], sin[..., r // 2 :]
    return torch.cat([x1 * c1 - x2 * s1, x2 * c2 + x1 * s2, rest.to(torch.result_type(x, cos))], -1)


def rope_pairs(x, cos, sin):
    """GPT-J rotary: pairs (x[2i], x[2i+1]) -> (x[2i] cos - x[2i+1] sin, x[2i+1] cos + x[2i] sin)."""
    even, odd = x[..., 0::2], x[..., 1::2]
    ce, co, se, so = cos[..., 0::2], cos[..., 1::2], sin[..., 0::2], sin[..., 1::2]
    return torch.stack([even * ce - odd * se, odd * co + even * so], -1).flatten(-2)


def rope_tables(t: int, r: int, pairs: bool = False, dtype: torch.dtype = torch.float32):
    angle = torch.arange(t)[:, None] * 10000.0 ** (-torch.arange(r // 2) / (r // 2))  # (T, r/2)
    angle = angle.repeat_interleave(2, -1) if pairs else torch.cat([angle, angle], -1)
    return angle.cos().to(dtype), angle.sin().to(dtype)


def gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def sdpa_mask(*shape):
    m = bools(*shape)
    m[..., 0] = True  # every query sees at least one key
    return m


# ---------------------------------------------------------------------------------------------------------------
# The table: every registered op at least once
# ---------------------------------------------------------------------------------------------------------------
UNARY = [
    case("exp", "exp", [randn(3, 5, 7)], {}, lambda x: torch.exp(x)),
    case("exp-int-to-f32", "exp", [ints(3, 5)], {}, lambda x: torch.exp(x.float())),
    case("log", "log", [positive(3, 5, 7)], {}, lambda x: torch.log(x)),
    case("sqrt", "sqrt", [positive(3, 5, 7)], {}, lambda x: x**0.5),
    case("sqrt-int-to-f32", "sqrt", [ints(3, 5, lo=0)], {}, lambda x: x.float() ** 0.5),
    case("rsqrt", "rsqrt", [positive(3, 5, 7)], {}, lambda x: 1 / x.sqrt()),
    case("rsqrt-f16", "rsqrt", [positive(3, 5, dtype=torch.float16)], {}, lambda x: 1 / x.sqrt()),
    case("sin", "sin", [randn(3, 5, 7)], {}, lambda x: torch.sin(x)),
    case("cos", "cos", [randn(3, 5, 7)], {}, lambda x: torch.cos(x)),
    case("tanh", "tanh", [randn(3, 5, 7)], {}, lambda x: torch.tanh(x)),
    case("sigmoid", "sigmoid", [randn(3, 5, 7)], {}, lambda x: 1 / (1 + torch.exp(-x))),
    case("erf", "erf", [randn(3, 5, 7)], {}, lambda x: torch.special.erf(x)),
    case("reciprocal", "reciprocal", [positive(3, 5, 7)], {}, lambda x: 1 / x),
    case("reciprocal-int-to-f32", "reciprocal", [nonzero(3, 5)], {}, lambda x: 1 / x.float()),
    case("neg", "neg", [randn(3, 5, 7)], {}, lambda x: 0 - x),
    case("neg-int", "neg", [ints(3, 5)], {}, lambda x: 0 - x),
    case("abs-int", "abs", [ints(3, 5)], {}, lambda x: torch.where(x < 0, -x, x)),
    case("abs", "abs", [randn(3, 5, 7)], {}, lambda x: torch.where(x < 0, -x, x)),
    case("silu", "silu", [randn(3, 5, 7)], {}, lambda x: x * torch.sigmoid(x)),
    case("relu", "relu", [randn(3, 5, 7)], {}, lambda x: torch.where(x > 0, x, 0.0)),
    case("relu-i32", "relu", [ints(3, 5, dtype=torch.int32)], {}, lambda x: torch.where(x > 0, x, 0)),
    case("logical_not", "logical_not", [ints(3, 5, 7, lo=-1, hi=2).float()], {}, lambda x: x == 0),
    case("gelu", "gelu", [randn(3, 5, 7)], {}, lambda x: 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))),
    case("gelu-tanh", "gelu", [randn(3, 5, 7)], {"approximate": "tanh"}, gelu_tanh),
    case("cast-f32-f16", "cast", [randn(3, 5)], {"dtype": DType.f16}, lambda x: x.half()),
    case("cast-f32-i64", "cast", [randn(3, 5) * 4], {"dtype": DType.i64}, lambda x: torch.trunc(x).long()),
    case("cast-f32-bool", "cast", [ints(3, 5, lo=-1, hi=2).float()], {"dtype": DType.bool}, lambda x: x != 0),
    case("cast-i64-f32", "cast", [ints(3, 5)], {"dtype": DType.f32}, lambda x: x.float()),
    case("clamp-min", "clamp", [randn(3, 5, 7)], {"min": -0.5}, lambda x: torch.where(x < -0.5, -0.5, x)),
    case("clamp-max", "clamp", [randn(3, 5, 7)], {"max": 0.5}, lambda x: torch.where(x > 0.5, 0.5, x)),
    case("clamp-int", "clamp", [ints(3, 5)], {"min": -1, "max": 2},
         lambda x: torch.where(x < -1, -1, torch.where(x > 2, 2, x))),
    case("clamp-int-float-bound-to-f32", "clamp", [ints(3, 5)], {"min": 0.5},
         lambda x: torch.where(x < 0.5, 0.5, x.float())),
    case("clamp-f16", "clamp", [randn(3, 5, dtype=torch.float16)], {"min": -0.5, "max": 0.5},
         lambda x: torch.where(x < -0.5, -0.5, torch.where(x > 0.5, 0.5, x))),
]

ARITH = [
    case("add-broadcast", "add", [randn(3, 5, 7), randn(5, 7)], {}, lambda x, y: x + y),
    case("add-broadcast-both", "add", [randn(3, 5, 1), randn(1, 7)], {}, lambda x, y: x + y),
    case("add-scalar", "add", [randn(3, 5)], {"scalar": 2.5}, lambda x: x + 2.5),
    case("add-scalar-reverse", "add", [randn(3, 5)], {"scalar": 2.5, "reverse": True}, lambda x: 2.5 + x),
    case("add-i32-i64", "add", [ints(3, 5, dtype=torch.int32), ints(3, 5)], {}, lambda x, y: x.long() + y),
    case("add-f16-f32", "add", [randn(3, 5, dtype=torch.float16), randn(5)], {}, lambda x, y: x.float() + y),
    case("add-f16-0d-f32", "add", [randn(3, 5, dtype=torch.float16), torch.tensor(0.75)], {},
         lambda x, y: x + y.half()),
    case("add-int-float-scalar", "add", [ints(3, 5)], {"scalar": 0.5}, lambda x: x.float() + 0.5),
    case("add-symbolic-scalar", "add", [ints(3, 5)], {"scalar": BATCH}, lambda x: x + x.shape[0]),
    case("sub", "sub", [randn(3, 5, 7), randn(3, 1, 7)], {}, lambda x, y: x - y),
    case("sub-scalar", "sub", [randn(3, 5)], {"scalar": 1.5}, lambda x: x - 1.5),
    case("sub-scalar-reverse", "sub", [randn(3, 5)], {"scalar": 2.0, "reverse": True}, lambda x: 2.0 - x),
    case("sub-int-reverse", "sub", [ints(3, 5)], {"scalar": 10, "reverse": True}, lambda x: 10 - x),
    case("mul", "mul", [randn(3, 5, 7), randn(7)], {}, lambda x, y: x * y),
    case("mul-f16-float-scalar", "mul", [randn(3, 5, dtype=torch.float16)], {"scalar": 0.5}, lambda x: x * 0.5),
    case("mul-symbolic-scalar", "mul", [randn(3, 5)], {"scalar": 2 * BATCH + 1},
         lambda x: x * (2 * x.shape[0] + 1)),
    case("div", "div", [randn(3, 5, 7), positive(5, 7)], {}, lambda x, y: x / y),
    case("div-int-int-to-f32", "div", [ints(3, 5), nonzero(3, 5)], {}, lambda x, y: x.float() / y.float()),
    case("div-int-scalar-to-f32", "div", [ints(3, 5)], {"scalar": 2}, lambda x: x.float() / 2),
    case("div-reverse", "div", [positive(3, 5)], {"scalar": 1.0, "reverse": True}, lambda x: 1.0 / x),
    case("div-reverse-f16", "div", [randn(3, 5, 7, dtype=torch.float16)], {"scalar": 0.1, "reverse": True},
         lambda x: 0.1 / x),
    case("sub-reverse-f16", "sub", [randn(3, 5, 7, dtype=torch.float16)], {"scalar": 0.1, "reverse": True},
         lambda x: 0.1 - x),
    case("pow-scalar", "pow", [randn(3, 5, 7)], {"scalar": 2}, lambda x: x * x),
    case("pow-reverse", "pow", [randn(3, 5)], {"scalar": 2.0, "reverse": True}, lambda x: torch.exp(x * math.log(2.0))),
    case("pow-tensor", "pow", [positive(3, 5), randn(5)], {}, lambda x, y: torch.exp(y * torch.log(x))),
    case("pow-int", "pow", [ints(3, 5)], {"scalar": 3}, lambda x: x * x * x),
    case("maximum", "maximum", [randn(3, 5, 7), randn(5, 1)], {}, lambda x, y: torch.where(x >= y, x, y)),
    case("minimum", "minimum", [randn(3, 5, 7), randn(7)], {}, lambda x, y: torch.where(x <= y, x, y)),
    case("remainder-int", "remainder", [ints(3, 5, 7), nonzero(5, 7)], {}, floor_mod),
    case("remainder-int-scalar", "remainder", [ints(3, 5)], {"scalar": 3}, lambda x: floor_mod(x, torch.tensor(3))),
    case("remainder-reverse", "remainder", [nonzero(3, 5)], {"scalar": 7, "reverse": True},
         lambda x: floor_mod(torch.full_like(x, 7), x)),
    case("remainder-float", "remainder", [randn(3, 5) * 4], {"scalar": 1.5},
         lambda x: x - 1.5 * torch.floor(x / 1.5)),
    case("floor_divide-int", "floor_divide", [ints(3, 5, 7), nonzero(7)], {},
         lambda x, y: torch.div(x, y, rounding_mode="floor")),
    case("floor_divide-int-float-scalar", "floor_divide", [ints(3, 5)], {"scalar": 2.5},
         lambda x: torch.floor(x / 2.5)),
    case("bitwise_and", "bitwise_and", [ints(3, 5, lo=0, hi=64), ints(5, lo=0, hi=64)], {}, lambda x, y: x & y),
    case("bitwise_and-scalar", "bitwise_and", [ints(3, 5, lo=0, hi=64)], {"scalar": 5}, lambda x: x & 5),
    case("bitwise_and-bool", "bitwise_and", [bools(3, 5), bools(3, 5)], {}, lambda x, y: x & y),
    case("bitwise_or", "bitwise_or", [ints(3, 5, lo=0, hi=64), ints(3, 5, lo=0, hi=64)], {}, lambda x, y: x | y),
    case("bitwise_or-reverse", "bitwise_or", [ints(3, 5, lo=0, hi=64)], {"scalar": 6, "reverse": True},
         lambda x: 6 | x),
    case("bitwise_xor", "bitwise_xor", [ints(3, 5, lo=0, hi=64), ints(3, 1, lo=0, hi=64)], {}, lambda x, y: x ^ y),
]

COMPARE = [
    case("eq-broadcast", "eq", [ints(3, 5, 7, lo=0, hi=3), ints(7, lo=0, hi=3)], {}, lambda x, y: x == y),
    case("ne-scalar", "ne", [ints(3, 5, lo=-1, hi=2)], {"scalar": 0}, lambda x: x != 0),
    case("lt-scalar-reverse", "lt", [randn(3, 5)], {"scalar": 0.0, "reverse": True}, lambda x: x > 0.0),
    case("le-f32-f16", "le", [randn(3, 5), randn(3, 5, dtype=torch.float16)], {}, lambda x, y: x <= y.float()),
    case("gt-int-float-scalar", "gt", [ints(3, 5)], {"scalar": 0.5}, lambda x: x > 0.5),
    case("ge-broadcast", "ge", [randn(3, 5, 1), randn(5, 7)], {}, lambda x, y: x >= y),
    case("logical_and", "logical_and", [bools(3, 5, 7), bools(5, 7)], {}, lambda x, y: x & y),
    case("logical_and-float-bool", "logical_and", [ints(3, 5, lo=-1, hi=2).float(), bools(3, 5)], {},
         lambda x, y: (x != 0) & y),
    case("logical_or", "logical_or", [bools(3, 5), bools(3, 1)], {}, lambda x, y: x | y),
    case("where", "where", [bools(3, 5, 1), randn(3, 5, 7), randn(7)], {}, lambda c, x, y: torch.where(c, x, y)),
    case("where-f16-0d-f32", "where", [bools(3, 5), randn(3, 5, dtype=torch.float16), torch.tensor(2.0)], {},
         lambda c, x, y: torch.where(c, x, y.half())),
    case("masked_fill", "masked_fill", [randn(3, 5, 7), bools(1, 5, 7)], {"value": -INF},
         lambda x, m: torch.where(m, -INF, x)),
    case("masked_fill-int", "masked_fill", [ints(3, 5, 7), bools(3, 5, 1)], {"value": 0},
         lambda x, m: torch.where(m, 0, x)),
    case("masked_fill-mask-broadcasts-x", "masked_fill", [randn(5, 7), bools(3, 5, 7)], {"value": 1.0},
         lambda x, m: torch.where(m, 1.0, x), dims=[None, B]),
]

REDUCE = [
    case("mean-last-keepdim", "mean", [randn(3, 5, 7)], {"dims": (-1,), "keepdim": True},
         lambda x: x.sum(-1, keepdim=True) / 7),
    case("mean-two-dims", "mean", [randn(3, 5, 7)], {"dims": (1, -1)}, lambda x: x.sum((1, 2)) / 35),
    case("mean-all", "mean", [randn(3, 5, 7)], {}, lambda x: x.sum() / x.numel()),
    case("mean-f16-in-f32", "mean", [randn(3, 5, 7, dtype=torch.float16)], {"dims": (-1,), "dtype": DType.f32},
         lambda x: x.float().sum(-1) / 7),
    case("sum-over-batch", "sum", [randn(3, 5, 7)], {"dims": (0,)},
         lambda x: torch.stack([x[i] for i in range(x.shape[0])]).sum(0)),
    case("sum-bool-to-i64", "sum", [bools(3, 5, 7)], {"dims": (-1,)}, lambda x: x.long().sum(-1)),
    case("sum-i32-all-to-i64", "sum", [ints(3, 5, dtype=torch.int32)], {}, lambda x: x.long().sum()),
    case("sum-dtype-f64", "sum", [randn(3, 5, 7)], {"dims": (1,), "keepdim": True, "dtype": DType.f64},
         lambda x: x.double().sum(1, keepdim=True)),
    case("amax-last-keepdim", "amax", [randn(3, 5, 7)], {"dims": (-1,), "keepdim": True},
         lambda x: x.max(-1, keepdim=True).values),
    case("amax-all", "amax", [randn(3, 5, 7)], {}, lambda x: x.flatten().sort().values[-1]),
    case("amin-two-dims", "amin", [randn(3, 5, 7)], {"dims": (0, 2)}, lambda x: x.min(2).values.min(0).values),
    case("argmax-all", "argmax", [randn(3, 5, 7)], {}, lambda x: x.flatten().sort().indices[-1]),
    case("argmax-last-keepdim", "argmax", [randn(3, 5, 7)], {"dim": -1, "keepdim": True},
         lambda x: x.max(-1, keepdim=True).indices),
    case("softmax", "softmax", [randn(3, 5, 7)], {"dim": -1}, lambda x: softmax(x, -1)),
    case("softmax-f16-in-f32", "softmax", [randn(3, 5, 7, dtype=torch.float16)], {"dim": 1, "dtype": DType.f32},
         lambda x: softmax(x.float(), 1)),
    case("log_softmax", "log_softmax", [randn(3, 5, 7)], {"dim": -1}, lambda x: x - x.logsumexp(-1, keepdim=True)),
    case("cumsum", "cumsum", [randn(3, 5, 7)], {"dim": 1},
         lambda x: torch.stack([x[:, : i + 1].sum(1) for i in range(5)], 1)),
    case("cumsum-bool-to-i64", "cumsum", [bools(3, 5, 7)], {"dim": -1},
         lambda x: x.long() @ torch.ones(7, 7).triu().long()),
    case("cumsum-i32-to-i64", "cumsum", [ints(3, 5, dtype=torch.int32)], {"dim": 1},
         lambda x: x.long() @ torch.ones(5, 5).triu().long()),
    case("cumsum-over-batch-f64", "cumsum", [randn(3, 5)], {"dim": 0, "dtype": DType.f64},
         lambda x: torch.ones(x.shape[0], x.shape[0]).tril().double() @ x.double()),
    case("diff", "diff", [randn(3, 5, 7)], {}, lambda x: x[..., 1:] - x[..., :-1]),
    case("diff-n2-dim1", "diff", [randn(3, 5, 7)], {"n": 2, "dim": 1},
         lambda x: (x[:, 2:] - x[:, 1:-1]) - (x[:, 1:-1] - x[:, :-2])),
    case("diff-over-batch", "diff", [randn(3, 5)], {"dim": 0}, lambda x: x[1:] - x[:-1]),
    case("diff-prepend", "diff", [randn(3, 5, 7), randn(3, 5, 2)], {"has_prepend": True},
         lambda x, p: torch.cat([p, x], -1)[..., 1:] - torch.cat([p, x], -1)[..., :-1]),
    case("diff-append", "diff", [randn(3, 5, 7), randn(3, 5, 2)], {},
         lambda x, a: torch.cat([x, a], -1)[..., 1:] - torch.cat([x, a], -1)[..., :-1]),
    case("diff-prepend-append", "diff", [randn(3, 5), randn(3, 1), randn(3, 3)], {"has_prepend": True},
         lambda x, p, a: torch.cat([p, x, a], -1)[..., 1:] - torch.cat([p, x, a], -1)[..., :-1]),
    case("diff-bool", "diff", [bools(3, 5, 7)], {}, lambda x: x[..., 1:] ^ x[..., :-1]),
]

VIEWS = [
    case("reshape-batch-minus1", "reshape", [randn(3, 5, 7)], {"shape": (BATCH, -1)},
         lambda x: x.reshape(x.shape[0], 35)),
    case("reshape-minus1-first", "reshape", [randn(3, 5, 7)], {"shape": (-1, 7)},
         lambda x: x.reshape(x.shape[0] * 5, 7)),
    case("reshape-symbolic-product", "reshape", [randn(3, 5, 7)], {"shape": (5 * BATCH, 7)},
         lambda x: x.reshape(x.shape[0] * 5, 7)),
    case("reshape-split-minus1-middle", "reshape", [randn(3, 35)], {"shape": (BATCH, -1, 7)},
         lambda x: x.reshape(x.shape[0], 5, 7)),
    case("reshape-to-0d", "reshape", [randn(1, 1)], {"shape": ()}, lambda x: x.sum()),
    case("transpose-negative", "transpose", [randn(3, 5, 7)], {"dim0": -1, "dim1": -2}, lambda x: x.mT),
    case("transpose-batch", "transpose", [randn(3, 5, 7)], {"dim0": 0, "dim1": 2},
         lambda x: x.permute(2, 1, 0)),
    case("permute", "permute", [randn(3, 5, 7)], {"dims": (2, 0, 1)}, lambda x: torch.einsum("bij->jbi", x)),
    case("permute-negative", "permute", [randn(3, 5, 7)], {"dims": (-1, 0, -2)}, lambda x: torch.einsum("bij->jbi", x)),
    case("unsqueeze-first", "unsqueeze", [randn(3, 5)], {"dim": 0}, lambda x: x[None]),
    case("unsqueeze-last", "unsqueeze", [randn(3, 5)], {"dim": -1}, lambda x: x[..., None]),
    case("unsqueeze-middle", "unsqueeze", [randn(3, 5)], {"dim": 1}, lambda x: x[:, None]),
    case("squeeze-dim", "squeeze", [randn(3, 1, 7)], {"dims": (1,)}, lambda x: x[:, 0]),
    case("squeeze-negative-dim", "squeeze", [randn(3, 5, 1)], {"dims": (-1,)}, lambda x: x[..., 0]),
    case("squeeze-not-one-is-noop", "squeeze", [randn(3, 5, 7)], {"dims": (1,)}, lambda x: x.clone()),
    case("squeeze-all-static", "squeeze", [randn(1, 5, 1, 7)], {}, lambda x: x[0, :, 0]),
    case("expand-minus1", "expand", [randn(3, 1, 7)], {"shape": (-1, 5, 7)},
         lambda x: x * torch.ones(5, 1)),
    case("expand-symbolic", "expand", [randn(3, 1, 7)], {"shape": (BATCH, 5, 7)}, lambda x: x * torch.ones(5, 1)),
    case("expand-new-leading", "expand", [randn(3, 1, 7)], {"shape": (2, BATCH, 5, 7)},
         lambda x: x * torch.ones(2, 1, 5, 1)),
    case("slice-negative-end", "slice", [randn(3, 5, 7)], {"dim": -1, "start": 1, "end": -1}, lambda x: x[..., 1:6]),
    case("slice-negative-start-huge-end", "slice", [randn(3, 5, 7)], {"dim": -1, "start": -3, "end": INT_MAX},
         lambda x: x[..., 4:7]),
    case("slice-end-past-size", "slice", [randn(3, 5, 7)], {"dim": 1, "start": 2, "end": 100}, lambda x: x[:, 2:5]),
    case("slice-start-before-begin", "slice", [randn(3, 5, 7)], {"dim": 1, "start": -100, "end": 2},
         lambda x: x[:, 0:2]),
    case("slice-step", "slice", [randn(3, 5, 7)], {"dim": 2, "start": 1, "step": 2},
         lambda x: torch.stack([x[..., 1], x[..., 3], x[..., 5]], -1)),
    case("slice-batch", "slice", [randn(3, 5)], {"dim": 0, "start": 1}, lambda x: x[1 : x.shape[0]]),
    case("slice-symbolic-end", "slice", [randn(3, 7, 5)], {"dim": 1, "start": 1, "end": SEQ - 1},
         lambda x: x[:, 1 : x.shape[1] - 1], dims=[BS]),
    case("slice-negative-start-symbolic-dim", "slice", [randn(3, 7, 5)], {"dim": 1, "start": -3},
         lambda x: x[:, x.shape[1] - 3 :], dims=[BS]),
    case("slice-huge-end-symbolic-dim", "slice", [randn(3, 7, 5)], {"dim": 1, "start": 2, "end": 100},
         lambda x: x[:, 2 : x.shape[1]], dims=[BS]),
    case("slice-symbolic-end-on-static-dim", "slice", [randn(3, 5)], {"dim": -1, "end": BATCH},
         lambda x: x[:, : x.shape[0]]),
    case("slice-step2-symbolic-dim", "slice", [randn(3, 7, 5)], {"dim": 1, "step": 2},
         lambda x: x[:, [0, 2, 4, 6]], dims=[BS]),
    case("slice-step3-symbolic-dim", "slice", [randn(3, 7, 5)], {"dim": 1, "step": 3},
         lambda x: x[:, [0, 3, 6]], dims=[BS]),
    case("select", "select", [randn(3, 5, 7)], {"dim": 1, "index": -1}, lambda x: x[:, 4]),
    case("select-negative-dim", "select", [randn(3, 5, 7)], {"dim": -1, "index": 2}, lambda x: x[:, :, 2]),
    case("select-symbolic-index", "select", [randn(3, 7, 5)], {"dim": 1, "index": SEQ - 1},
         lambda x: x[:, 6], dims=[BS]),
    case("cat-last", "cat", [randn(3, 5, 3), randn(3, 5, 4)], {"dim": -1},
         lambda x, y: torch.stack([*x.unbind(-1), *y.unbind(-1)], -1)),
    case("cat-batch", "cat", [randn(3, 5), randn(3, 5)], {}, lambda x, y: torch.stack([*x, *y])),
    case("cat-three-promotes", "cat", [randn(3, 2, dtype=torch.float16), randn(3, 5), randn(3, 1, dtype=torch.float16)],
         {"dim": 1}, lambda x, y, z: torch.stack([*x.float().T, *y.T, *z.float().T], 1)),
    case("cat-legacy-empty", "cat", [torch.zeros(0), randn(3, 5)], {}, lambda e, x: x.clone(), dims=[None, B]),
    case("cat-legacy-empty-promotes", "cat", [torch.zeros(0, dtype=torch.float64), randn(3, 5)], {},
         lambda e, x: x.double(), dims=[None, B]),
    case("stack", "stack", [randn(3, 5), randn(3, 5)], {}, lambda x, y: torch.cat([x[None], y[None]])),
    case("stack-last-promotes", "stack", [ints(3, 5, dtype=torch.int32), ints(3, 5)], {"dim": -1},
         lambda x, y: torch.cat([x[..., None].long(), y[..., None]], -1)),
    case("index", "index", [randn(3, 5, 7), ints(4, lo=-5, hi=5)], {"dims": (1,)},
         lambda x, i: torch.stack([x[:, int(j)] for j in i], 1), dims=[B, None]),
    case("index-2d-index", "index", [randn(3, 5, 7), ints(2, 3, lo=0, hi=5)], {"dims": (1,)},
         lambda x, i: x[:, i.flatten()].reshape(x.shape[0], 2, 3, 7), dims=[B, None]),
    case("index-consecutive", "index", [randn(3, 5, 7), ints(4, lo=0, hi=5), ints(4, lo=0, hi=7)], {"dims": (1, 2)},
         lambda x, i, j: torch.stack([x[:, int(a), int(b)] for a, b in zip(i, j)], 1), dims=[B, None, None]),
    case("index-consecutive-broadcast", "index", [randn(3, 5, 7), ints(4, 1, lo=0, hi=5), ints(3, lo=0, hi=7)],
         {"dims": (1, 2)}, lambda x, i, j: x[:, i.expand(4, 3).flatten(), j.expand(4, 3).flatten()].reshape(-1, 4, 3),
         dims=[B, None, None]),
    case("index-non-consecutive", "index", [randn(3, 5, 7, 2), ints(4, lo=0, hi=5), ints(4, lo=0, hi=2)],
         {"dims": (1, 3)}, lambda x, i, j: torch.stack([x[:, int(a), :, int(b)] for a, b in zip(i, j)], 0),
         dims=[B, None, None]),
    case("gather-last", "gather", [randn(3, 5, 7), ints(3, 5, 2, lo=0, hi=7)], {"dim": -1},
         lambda x, i: torch.take_along_dim(x, i, dim=-1)),
    case("gather-middle", "gather", [randn(3, 5, 7), ints(3, 2, 7, lo=0, hi=5)], {"dim": 1},
         lambda x, i: torch.take_along_dim(x, i, dim=1)),
    case("repeat-new-leading", "repeat", [randn(3, 5)], {"repeats": (2, 1, 3)}, lambda x: torch.tile(x, (2, 1, 3))),
    case("repeat", "repeat", [randn(3, 5)], {"repeats": (2, 1)}, lambda x: torch.cat([x, x])),
    case("tril", "tril", [randn(3, 5, 7)], {"diagonal": -1},
         lambda x: torch.where(torch.arange(5)[:, None] - 1 >= torch.arange(7), x, 0.0)),
    case("triu", "triu", [randn(3, 5, 7)], {"diagonal": 1},
         lambda x: torch.where(torch.arange(5)[:, None] + 1 <= torch.arange(7), x, 0.0)),
]

CREATE = [
    case("arange", "arange", [], {"start": 2, "end": 11, "step": 3}, lambda: torch.tensor([2, 5, 8])),
    case("arange-negative-step", "arange", [], {"start": 5, "end": -3, "step": -2},
         lambda: torch.tensor([5, 3, 1, -1])),
    case("arange-f32", "arange", [], {"end": 5, "dtype": DType.f32}, lambda: torch.tensor([0.0, 1, 2, 3, 4])),
    case("full", "full", [], {"shape": (3, 5), "value": 0.5, "dtype": DType.f16},
         lambda: torch.ones(3, 5, dtype=torch.float16) / 2),
    case("full-0d", "full", [], {"shape": (), "value": -INF, "dtype": DType.f32}, lambda: torch.tensor(-INF)),
    case("full-bool", "full", [], {"shape": (2,), "value": True, "dtype": DType.bool},
         lambda: torch.tensor([True, True])),
]

NN = [
    case("embedding", "embedding", [randn(11, 5), ints(3, 7, lo=0, hi=11)], {},
         lambda w, i: torch.stack([w[j] for j in i.flatten()]).reshape(*i.shape, 5), dims=[None, B]),
    case("embedding-i32-ids", "embedding", [randn(11, 5), ints(3, 7, lo=0, hi=11, dtype=torch.int32)], {},
         lambda w, i: torch.stack([w[j] for j in i.flatten()]).reshape(*i.shape, 5), dims=[None, B]),
    case("linear-bias", "linear", [randn(3, 5, 7), randn(3, 7), randn(3)], {},
         lambda x, w, b: torch.einsum("bti,oi->bto", x, w) + b, dims=[B, None, None]),
    case("linear-f16", "linear", [randn(3, 7, dtype=torch.float16), randn(5, 7, dtype=torch.float16)], {},
         lambda x, w: (x.float() @ w.float().T).half(), dims=[B, None]),
    case("matmul", "matmul", [randn(3, 5, 7), randn(7, 2)], {}, lambda x, y: torch.einsum("bij,jk->bik", x, y)),
    case("matmul-batched", "matmul", [randn(3, 5, 7), randn(3, 7, 2)], {},
         lambda x, y: torch.einsum("bij,bjk->bik", x, y)),
    case("matmul-vector-matrix", "matmul", [randn(7), randn(3, 7, 2)], {},
         lambda x, y: torch.einsum("j,bjk->bk", x, y), dims=[None, B]),
    case("matmul-matrix-vector", "matmul", [randn(3, 5, 7), randn(7)], {},
         lambda x, y: torch.einsum("bij,j->bi", x, y)),
    case("matmul-vector-vector", "matmul", [randn(7), randn(7)], {}, lambda x, y: (x * y).sum(), dims=[None, None]),
    case("matmul-broadcast-batch", "matmul", [randn(3, 1, 5, 7), randn(4, 7, 2)], {},
         lambda x, y: torch.einsum("bij,hjk->bhik", x[:, 0], y)),
    case("sdpa", "sdpa", [randn(3, 3, 5, 8), randn(3, 3, 7, 8), randn(3, 3, 7, 6)], {}, attention),
    case("sdpa-causal", "sdpa", [randn(3, 3, 5, 8), randn(3, 3, 7, 8), randn(3, 3, 7, 8)], {"is_causal": True},
         lambda q, k, v: attention(q, k, v, causal=True)),
    case("sdpa-bool-mask", "sdpa", [randn(3, 3, 5, 8), randn(3, 3, 7, 8), randn(3, 3, 7, 8), sdpa_mask(3, 1, 5, 7)], {},
         attention),
    case("sdpa-float-mask-scale", "sdpa", [randn(3, 3, 5, 8), randn(3, 3, 7, 8), randn(3, 3, 7, 8), randn(5, 7)],
         {"scale": 0.5}, lambda q, k, v, m: attention(q, k, v, m, scale=0.5)),
    case("sdpa-gqa", "sdpa", [randn(3, 3, 5, 8), randn(3, 1, 7, 8), randn(3, 1, 7, 8)], {"enable_gqa": True},
         lambda q, k, v: attention(q, k, v, gqa=True)),
    case("layer_norm", "layer_norm", [randn(3, 5, 7), randn(7), randn(7)], {"normalized_shape": (7,)},
         lambda x, w, b: layer_norm(x, w, b, 1, 1e-5)),
    case("layer_norm-two-dims-no-affine", "layer_norm", [randn(3, 5, 7)], {"normalized_shape": (5, 7), "eps": 1e-3},
         lambda x: layer_norm(x, None, None, 2, 1e-3)),
    case("layer_norm-weight-only", "layer_norm", [randn(3, 5, 7), randn(7)], {"normalized_shape": (7,)},
         lambda x, w: layer_norm(x, w, None, 1, 1e-5)),
    case("rms_norm", "rms_norm", [randn(3, 5, 7), randn(7)], {"normalized_shape": (7,)},
         lambda x, w: rms_norm(x, w, 1, None)),
    case("rms_norm-two-dims-eps", "rms_norm", [randn(3, 5, 7)], {"normalized_shape": (5, 7), "eps": 1e-6},
         lambda x: rms_norm(x, None, 2, 1e-6)),
]

_cos, _sin = rope_tables(5, 4)
_cos_pairs, _sin_pairs = rope_tables(5, 8, pairs=True)
_blind_mask = sdpa_mask(3, 1, 5, 7)
_blind_mask[:, :, 2] = False  # query 2 sees no key: its output row is zeros

FUSED = [
    case("attention-gqa-causal", "attention", [randn(3, 4, 5, 8), randn(3, 2, 7, 8), randn(3, 2, 7, 6)],
         {"scale": 0.3, "causal": True}, lambda q, k, v: fused_attention(q, k, v, scale=0.3, causal=True)),
    case("attention-blind-row", "attention", [randn(3, 2, 5, 8), randn(3, 2, 7, 8), randn(3, 2, 7, 8), _blind_mask],
         {"scale": 0.5, "causal": False}, lambda q, k, v, m: fused_attention(q, k, v, m, scale=0.5, causal=False)),
    case("attention-decode-step", "attention", [randn(3, 4, 1, 8), randn(3, 1, 7, 8), randn(3, 1, 7, 8)],
         {"scale": 0.35, "causal": True}, lambda q, k, v: fused_attention(q, k, v, scale=0.35, causal=True)),
    case("attention-f16-float-mask", "attention",
         [randn(3, 2, 5, 8, dtype=torch.float16), randn(3, 2, 5, 8, dtype=torch.float16),
          randn(3, 2, 5, 8, dtype=torch.float16), randn(5, 5, dtype=torch.float16)],
         {"scale": 0.35, "causal": True}, lambda q, k, v, m: fused_attention(q, k, v, m, scale=0.35, causal=True)),
    case("decoupled_attention", "decoupled_attention",
         [randn(3, 4, 5, 4), randn(3, 2, 7, 4), randn(3, 4, 5, 8), randn(3, 2, 7, 8), randn(3, 2, 7, 6)],
         {"scale_sem": 0.5, "scale_geo": 0.35, "causal": True},
         lambda *t: decoupled(*t, scale_sem=0.5, scale_geo=0.35, causal=True)),
    case("decoupled_attention-mask", "decoupled_attention",
         [randn(3, 2, 5, 4), randn(3, 2, 7, 4), randn(3, 2, 5, 8), randn(3, 2, 7, 8), randn(3, 2, 7, 8), _blind_mask],
         {"scale_sem": 0.5, "scale_geo": 0.35, "causal": False},
         lambda *t: decoupled(*t, scale_sem=0.5, scale_geo=0.35, causal=False)),
    case("rms_norm_fp32-f16-cast-then-scale", "rms_norm_fp32",
         [randn(3, 5, 8, dtype=torch.float16), randn(8, dtype=torch.float16)], {"eps": 1e-6, "dtype": DType.f16},
         lambda x, w: rms_fp32(x, w, eps=1e-6, dtype=torch.float16)),
    case("rms_norm_fp32-weight-in-fp32", "rms_norm_fp32", [randn(3, 5, 8, dtype=torch.bfloat16), randn(8)],
         {"eps": 1e-5, "dtype": DType.bf16, "weight_in_fp32": True},
         lambda x, w: rms_fp32(x, w, eps=1e-5, dtype=torch.bfloat16, weight_in_fp32=True)),
    case("rms_norm_fp32-no-weight", "rms_norm_fp32", [randn(3, 5, 8, dtype=torch.float16)], {"eps": 1e-6},
         lambda x: rms_fp32(x, eps=1e-6)),
    case("add_rms_norm", "add_rms_norm", [randn(3, 5, 8), randn(3, 5, 8), randn(8)], {"eps": 1e-6},
         lambda a, b, w: (a + b, rms_fp32(a + b, w, eps=1e-6))),
    case("add_layer_norm", "add_layer_norm", [randn(3, 5, 7), randn(3, 5, 7), randn(7), randn(7)],
         {"normalized_shape": (7,)}, lambda a, b, w, c: (a + b, layer_norm(a + b, w, c, 1, 1e-5))),
    case("rope-partial", "rope", [randn(3, 2, 5, 8), _cos, _sin], {"rotary_dim": 4},
         lambda x, c, s: rope_half(x, c, s, 4)),
    case("rope-f16-tables-f32", "rope", [randn(3, 2, 5, 4, dtype=torch.float16), _cos, _sin], {"rotary_dim": 4},
         lambda x, c, s: rope_half(x.float(), c, s, 4)),
    case("rope-interleaved", "rope", [randn(3, 2, 5, 8), _cos_pairs, _sin_pairs],
         {"rotary_dim": 8, "interleaved": True}, lambda x, c, s: rope_pairs(x, c, s)),
    case("swiglu", "swiglu", [randn(3, 5, 7), randn(3, 5, 7)], {}, lambda g, u: g * torch.sigmoid(g) * u),
    case("swiglu-promotes", "swiglu", [randn(3, 5, dtype=torch.float16), randn(3, 5)], {},
         lambda g, u: (g.float() * torch.sigmoid(g.float())).half().float() * u),  # silu rounds to f16 first
    case("swiglu_linear", "swiglu_linear", [randn(3, 5, 7), randn(3, 5, 7), randn(4, 7)], {},
         lambda g, u, w: (g * torch.sigmoid(g) * u) @ w.T),
    case("swiglu_linear-bias", "swiglu_linear", [randn(2, 7), randn(2, 7), randn(4, 7), randn(4)], {},
         lambda g, u, w, b: (g * torch.sigmoid(g) * u) @ w.T + b),
    case("rms_norm_linear", "rms_norm_linear", [randn(3, 5, 7), randn(7), randn(4, 7)], {"eps": 1e-6},
         lambda x, nw, w: rms_fp32(x, nw, eps=1e-6) @ w.T),
    case("rms_norm_linear-f16-bias", "rms_norm_linear",
         [randn(3, 7, dtype=torch.float16), randn(7, dtype=torch.float16), randn(4, 7, dtype=torch.float16),
          randn(4, dtype=torch.float16)], {"eps": 1e-5, "dtype": DType.f16},
         lambda x, nw, w, b: rms_fp32(x, nw, eps=1e-5, dtype=torch.float16) @ w.T + b),
    case("add_rms_norm_linear", "add_rms_norm_linear", [randn(3, 5, 7), randn(3, 5, 7), randn(7), randn(4, 7)],
         {"eps": 1e-6, "weight_in_fp32": True}, lambda a, b, nw, w: (a + b, rms_fp32(a + b, nw, eps=1e-6) @ w.T)),
    case("add_rms_norm_linear-bias", "add_rms_norm_linear", [randn(2, 7), randn(2, 7), randn(7), randn(4, 7),
         randn(4)], {"eps": 1e-6}, lambda a, b, nw, w, c: (a + b, rms_fp32(a + b, nw, eps=1e-6) @ w.T + c)),
]


# Weight-only quantized ops (ops_quant.py): the weight decoded by hand from the layout of ir/weight_quant.py (int8:
# codes * row scale; int4: nibbles low first, (u - zero) * group scale, padding dropped), then the float formula.
def _qw(spec: str, n: int, k: int):
    from caramba.ir.weight_quant import quantize_weight

    q = quantize_weight(randn(n, k), spec)
    return q, [t for t in (q.codes, q.scales, q.zeros) if t is not None], q.spec.attrs(k, DType.f32)


def _decode(codes, scales, zeros=None, *, group=0, k=0):
    if group == 0:
        return codes.float() * scales[:, None]
    u = torch.stack([codes & 15, codes >> 4], -1).flatten(-2).float()
    cols = torch.arange(u.shape[-1]) // group
    z = 8.0 if zeros is None else zeros[..., cols].float()
    return ((u - z) * scales[..., cols].float())[..., :k]


_q8, _q8t, _q8a = _qw("int8", 4, 7)
_q4, _q4t, _q4a = _qw("int4:g32:asym", 4, 40)  # K = 40: a padded second group
_q4s, _q4st, _q4sa = _qw("int4:g64:sym", 6, 7)
QUANT = [
    case("qlinear-int8", "qlinear", [randn(3, 5, 7), *_q8t], _q8a, lambda x, c, s: x @ _decode(c, s).T),
    case("qlinear-int4-asym-bias", "qlinear", [randn(3, 40), *_q4t, randn(4)], _q4a,
         lambda x, c, s, z, b: x @ _decode(c, s, z, group=32, k=40).T + b),
    case("swiglu_qlinear", "swiglu_qlinear", [randn(3, 5, 7), randn(3, 5, 7), *_q4st], _q4sa,
         lambda g, u, c, s: (g * torch.sigmoid(g) * u) @ _decode(c, s, group=64, k=7).T),
    case("rms_norm_qlinear", "rms_norm_qlinear", [randn(3, 5, 7), randn(7), *_q8t], {"eps": 1e-6, **_q8a},
         lambda x, nw, c, s: rms_fp32(x, nw, eps=1e-6) @ _decode(c, s).T),
    case("add_rms_norm_qlinear", "add_rms_norm_qlinear", [randn(3, 40), randn(3, 40), randn(40), *_q4t],
         {"eps": 1e-6, **_q4a},
         lambda a, b, nw, c, s, z: (a + b, rms_fp32(a + b, nw, eps=1e-6) @ _decode(c, s, z, group=32, k=40).T)),
    case("qembedding-int4", "qembedding", [torch.tensor([[3, 0, 1], [2, 2, 3]]), *_q4t], _q4a,
         lambda i, c, s, z: _decode(c[i], s[i], z[i], group=32, k=40)),
    case("qembedding-int8", "qembedding", [torch.tensor([1, 3, 0]), *_q8t], _q8a,
         lambda i, c, s: _decode(c, s)[i]),
]


# Stateless KV-cache ops. The storage formats' own reference (caramba.ir.quant, property-tested against
# SPEC §3 in tests/runtime/test_quant.py) is the reference here; these cases check the ops' shape rules and wiring.
def _quantized(kind: str):
    from caramba.ir.quant import quantize

    return lambda x: (lambda q: (q.codes, q.scales))(quantize(x, kind, 32))


def _dequantized(kind: str, features: int):
    from caramba.ir.quant import QTensor, dequantize, parse_kind

    return lambda c, s: dequantize(QTensor(parse_kind(kind), c, s, features, 32), torch.float32)


def _codes(kind: str, x: torch.Tensor):
    from caramba.ir.quant import quantize

    q = quantize(x, kind, 32)
    return [q.codes, q.scales]


_kvx = randn(3, 5, 40) * 3
CACHE = [
    case("position_mask", "position_mask", [torch.tensor([[0, 1, 2], [4, 5, 6], [2, 3, 4]])], {"ctx": 7},
         lambda p: (torch.arange(7)[None, None, :] <= p[:, :, None]).unsqueeze(1)),
    *[case(f"kv_quantize-{k}", "kv_quantize", [_kvx], {"kind": k, "qblock": 32}, _quantized(k))
      for k in ("q8_0", "q4_0", "nf4")],
    *[case(f"kv_dequantize-{k}", "kv_dequantize", _codes(k, _kvx),
           {"kind": k, "features": 40, "qblock": 32, "dtype": DType.f32}, _dequantized(k, 40)) for k in ("q8_0", "q4_0", "nf4")],
]

CASES = UNARY + ARITH + COMPARE + REDUCE + VIEWS + CREATE + NN + FUSED + QUANT + CACHE


@pytest.mark.parametrize("c", CASES)
def test_op_matches_torch(c: Case):
    check_op(c.op, c.inputs, c.attrs, c.reference, c.dims)


def test_every_registered_op_has_a_case():
    from tests.ir.test_ops_cache import STATEFUL_OPS_COVERED  # ops that need a KVCache: their own harness

    covered = {p.values[0].op for p in CASES} | STATEFUL_OPS_COVERED
    shipped = {name for name, op in all_ops().items() if op.impl.__module__.startswith("caramba.")}  # not test ops
    assert shipped - covered == set(), "ops registered without a case in tests/ir/test_ops.py"


def test_case_ids_are_unique():
    ids = [p.id for p in CASES]
    assert len(ids) == len(set(ids))


# ---------------------------------------------------------------------------------------------------------------
# Every binary op with a Python scalar, on either side
# ---------------------------------------------------------------------------------------------------------------
def _logical(fn):
    return lambda a, b: fn(torch.as_tensor(a) != 0, torch.as_tensor(b) != 0)


# op -> (reference on (left, right) where one side is a Python scalar, input, scalar)
BINARY_SCALAR = {
    "add": (operator.add, randn(3, 5, 7), 1.5),
    "sub": (operator.sub, randn(3, 5, 7), 1.5),
    "mul": (operator.mul, randn(3, 5, 7), 1.5),
    "div": (operator.truediv, positive(3, 5, 7), 1.5),
    "pow": (operator.pow, positive(3, 5, 7), 2.0),
    "remainder": (operator.mod, positive(3, 5, 7), 1.5),
    "floor_divide": (operator.floordiv, positive(3, 5, 7), 0.75),
    "maximum": (lambda a, b: torch.where(a >= b, a, b), randn(3, 5, 7), 0.25),
    "minimum": (lambda a, b: torch.where(a <= b, a, b), randn(3, 5, 7), 0.25),
    "bitwise_and": (operator.and_, ints(3, 5, 7, lo=0, hi=64), 5),
    "bitwise_or": (operator.or_, ints(3, 5, 7, lo=0, hi=64), 5),
    "bitwise_xor": (operator.xor, ints(3, 5, 7, lo=0, hi=64), 5),
    "eq": (operator.eq, ints(3, 5, 7, lo=0, hi=3), 1),
    "ne": (operator.ne, ints(3, 5, 7, lo=0, hi=3), 1),
    "lt": (operator.lt, randn(3, 5, 7), 0.5),
    "le": (operator.le, ints(3, 5, 7, lo=0, hi=3), 1),
    "gt": (operator.gt, randn(3, 5, 7), 0.5),
    "ge": (operator.ge, ints(3, 5, 7, lo=0, hi=3), 1),
    "logical_and": (_logical(operator.and_), bools(3, 5, 7), True),
    "logical_or": (_logical(operator.or_), bools(3, 5, 7), False),
}


def test_every_binary_op_has_a_scalar_case():
    binary = {name for name, op in all_ops().items() if "binary" in op.tags}
    assert binary - set(BINARY_SCALAR) == set()


@pytest.mark.parametrize("reverse", [False, True], ids=["scalar", "reverse"])
@pytest.mark.parametrize("op", sorted(BINARY_SCALAR))
def test_binary_op_with_scalar(op, reverse):
    fn, x, scalar = BINARY_SCALAR[op]
    check_op(op, [x], {"scalar": scalar, "reverse": reverse}, lambda x: fn(scalar, x) if reverse else fn(x, scalar))


# ---------------------------------------------------------------------------------------------------------------
# Dtype promotion: the declared type, not only the computed tensor
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("op, inputs, attrs, want", [
    ("mul", [randn(3, 5, dtype=torch.float16)], {"scalar": 0.5}, DType.f16),
    ("add", [randn(3, 5, dtype=torch.bfloat16)], {"scalar": 3}, DType.bf16),
    ("add", [ints(3, 5)], {"scalar": 0.5}, DType.f32),
    ("sub", [ints(3, 5, dtype=torch.int32)], {"scalar": 2.5, "reverse": True}, DType.f32),
    ("mul", [ints(3, 5, dtype=torch.int32)], {"scalar": 2}, DType.i32),
    ("mul", [ints(3, 5, dtype=torch.int32)], {"scalar": BATCH}, DType.i32),
    ("add", [randn(3, 5, dtype=torch.float16), randn(3, 5)], {}, DType.f32),
    ("add", [randn(3, 5, dtype=torch.float16), torch.tensor(1.5)], {}, DType.f16),
    ("add", [ints(3, 5, dtype=torch.int32), torch.tensor(1.5)], {}, DType.f32),
    ("div", [ints(3, 5), nonzero(3, 5)], {}, DType.f32),
    ("eq", [randn(3, 5), randn(3, 5)], {}, DType.bool),
    ("lt", [ints(3, 5)], {"scalar": 0.5}, DType.bool),
    ("ge", [randn(3, 5, dtype=torch.float16)], {"scalar": 0.0, "reverse": True}, DType.bool),
], ids=["f16*float", "bf16+int", "i64+float", "float-i32", "i32*int", "i32*batch", "f16+f32", "f16+0d-f32",
        "i32+0d-f32", "int/int", "eq", "lt-int-float", "ge-reverse"])
def test_promotion(op, inputs, attrs, want):
    fns = {"mul": torch.mul, "add": torch.add, "sub": torch.sub, "div": torch.div, "eq": torch.eq, "lt": torch.lt,
           "ge": torch.ge}

    def reference(*xs):
        if len(xs) == 2:
            return fns[op](*xs)
        scalar = attrs["scalar"]
        scalar = xs[0].shape[0] if scalar is BATCH else scalar
        return fns[op](torch.tensor(scalar), xs[0]) if attrs.get("reverse") else fns[op](xs[0], scalar)

    g = check_op(op, inputs, attrs, reference)
    assert g.outputs[0].type.dtype == want


# ---------------------------------------------------------------------------------------------------------------
# Symbolic attributes that need a symbol bound by another input, and one graph at several sizes
# ---------------------------------------------------------------------------------------------------------------
def _positions_graph() -> Graph:
    """cache: f32[batch, past, 4], x: f32[batch, seq] -> x + arange(past, past + seq), plus arange(0, seq, 3)."""
    g = Graph()
    g.add_symbol("batch", 1, 8)
    g.add_symbol("seq", 1, 64)
    g.add_symbol("past", 0, 64)
    g.add_input("cache", TensorType((BATCH, PAST, 4), DType.f32))
    x = g.add_input("x", TensorType((BATCH, SEQ), DType.f32))
    pos_attrs = {"start": PAST, "end": PAST + SEQ, "dtype": DType.f32}
    pos = g.add_node("arange", [], get_op("arange").infer([], get_op("arange").full_attrs(pos_attrs)), pos_attrs).output
    assert pos.type.shape == (SEQ,)
    out = g.add_node("add", [x, pos], [TensorType((BATCH, SEQ), DType.f32)]).output
    strided_attrs = {"end": SEQ, "step": 3}
    strided = g.add_node("arange", [], get_op("arange").infer([], get_op("arange").full_attrs(strided_attrs)),
                         strided_attrs).output
    g.outputs = [out, strided]
    verify(g)
    return g


@pytest.mark.parametrize("batch, past, seq", [(1, 0, 1), (2, 5, 3), (3, 4, 7), (1, 64, 64)])
def test_arange_with_symbolic_bounds(batch, past, seq):
    interp = Interpreter(_positions_graph(), check_types=True)
    x = randn(batch, seq)
    out, strided = interp.run(torch.zeros(batch, past, 4), x)
    torch.testing.assert_close(out, x + torch.arange(past, past + seq, dtype=torch.float32))
    assert strided.tolist() == list(range(0, seq, 3))


def test_full_with_symbolic_shape():
    g = Graph()
    g.add_symbol("batch", 1, 8)
    x = g.add_input("x", TensorType((BATCH, 5), DType.f16))
    attrs = {"shape": (BATCH, 1), "value": 1.5, "dtype": DType.f16}
    fill = g.add_node("full", [], [TensorType((BATCH, 1), DType.f16)], attrs).output
    g.outputs = [g.add_node("mul", [x, fill], [TensorType((BATCH, 5), DType.f16)]).output]
    verify(g)
    interp = Interpreter(g, check_types=True)
    for batch in (1, 3, 8):
        x = randn(batch, 5, dtype=torch.float16)
        torch.testing.assert_close(interp.run(x)[0], x * 1.5)


def _mlp_graph() -> Graph:
    """x: f32[batch, seq, 5] -> a = silu(linear(x)), and a's sum over all batch * seq rows."""
    g = Graph()
    g.add_symbol("batch", 1, 16)
    g.add_symbol("seq", 1, 16)
    x = g.add_input("x", TensorType((BATCH, SEQ, 5), DType.f32))
    w = g.add_param("proj.weight", TensorType((7, 5), DType.f32), randn(7, 5))
    h = g.add_node("linear", [x, w], [TensorType((BATCH, SEQ, 7), DType.f32)]).output
    a = g.add_node("silu", [h], [h.type]).output
    flat = g.add_node("reshape", [a], [TensorType((BATCH * SEQ, 7), DType.f32)], {"shape": (-1, 7)}).output
    total = g.add_node("sum", [flat], [TensorType((7,), DType.f32)], {"dims": (0,)}).output
    g.outputs = [a, total]
    verify(g)
    return g


def test_one_graph_runs_at_several_batch_and_seq_sizes():
    g = _mlp_graph()
    interp = Interpreter(g, check_types=True)
    w = g.weights["proj.weight"]
    for batch, seq in [(2, 3), (5, 1), (1, 7), (3, 3)]:
        x = randn(batch, seq, 5)
        a, total = interp.run(x)
        h = torch.einsum("bti,oi->bto", x, w)
        torch.testing.assert_close(a, h * torch.sigmoid(h))
        torch.testing.assert_close(total, (h * torch.sigmoid(h)).sum((0, 1)))


def test_squeeze_of_a_symbolic_dim_keeps_its_declared_type_at_size_1():
    """A verified graph must produce its declared types at every admissible symbol value (batch in [1, 8])."""
    g = Graph()
    g.add_symbol("batch", 1, 8)
    x = g.add_input("x", TensorType((BATCH, 1, 7), DType.f32))
    out_type = TensorType((BATCH, 7), DType.f32)  # what squeeze() has to mean when batch may be 1 or more
    g.outputs = [g.add_node("squeeze", [x], [out_type]).output]
    try:
        verify(g)
    except VerificationError:
        return  # refusing an ambiguous squeeze is a correct answer too
    (out,) = Interpreter(g, check_types=True).run(randn(1, 1, 7))
    assert list(out.shape) == [1, 7], f"declared {out_type}"
