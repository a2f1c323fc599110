"""Symbolic dims, property-based: text round trips, evaluation against Python integer arithmetic, equality."""
from __future__ import annotations

from typing import Callable, Mapping

import pytest
import sympy
from hypothesis import given, settings, strategies as st

from caramba.ir import symbolic

NAMES = ("batch", "seq", "past")
RANGES = {"batch": (1, 64), "seq": (1, 4096), "past": (1, 4096)}

# derandomize: a run is reproducible; database=None: nothing is written outside tests/
PROPERTY = settings(max_examples=150, deadline=None, derandomize=True, database=None)

Fn = Callable[[Mapping[str, int]], int]


# An expression is generated twice over: as a sympy dim and as a Python function of the bindings, so `evaluate`
# is checked against plain integer arithmetic rather than against sympy.
def _leaf_symbol(name: str) -> tuple[sympy.Expr, Fn]:
    return symbolic.symbol(name), lambda b: b[name]


def _leaf_int(k: int) -> tuple[sympy.Expr, Fn]:
    return sympy.Integer(k), lambda b: k


def _add(pair):
    (x, f), (y, g) = pair
    return x + y, lambda b: f(b) + g(b)


def _sub(pair):
    (x, f), (y, g) = pair
    return x - y, lambda b: f(b) - g(b)


def _mul(pair):
    (x, f), (y, g) = pair
    return x * y, lambda b: f(b) * g(b)


def _floordiv(pair):
    (x, f), (d, g) = pair  # divisors are positive: ints >= 1 or symbols, which are bound to >= 1
    return sympy.floor(x / d), lambda b: f(b) // g(b)


leaves = st.sampled_from(NAMES).map(_leaf_symbol) | st.integers(-20, 20).map(_leaf_int)
divisors = st.sampled_from(NAMES).map(_leaf_symbol) | st.integers(1, 64).map(_leaf_int)


def _extend(children):
    return (st.tuples(children, children).map(_add) | st.tuples(children, children).map(_sub)
            | st.tuples(children, children).map(_mul) | st.tuples(children, divisors).map(_floordiv))


exprs = st.recursive(leaves, _extend, max_leaves=6)
polynomials = st.recursive(leaves, lambda c: st.tuples(c, c).map(_add) | st.tuples(c, c).map(_sub)
                           | st.tuples(c, c).map(_mul), max_leaves=6)
bindings = st.fixed_dictionaries({n: st.integers(*RANGES[n]) for n in NAMES})


def dim(pair) -> symbolic.Dim:
    return symbolic.canonical(pair[0])


@PROPERTY
@given(exprs)
def test_parse_inverts_to_str(pair):
    e = dim(pair)
    assert symbolic.parse(symbolic.to_str(e)) == e


@PROPERTY
@given(exprs, bindings)
def test_evaluate_agrees_with_python_arithmetic(pair, point):
    assert symbolic.evaluate(dim(pair), point) == pair[1](point)


@PROPERTY
@given(exprs, bindings)
def test_evaluate_of_parsed_text_agrees(pair, point):
    e = dim(pair)
    assert symbolic.evaluate(symbolic.parse(symbolic.to_str(e)), point) == symbolic.evaluate(e, point)


@PROPERTY
@given(exprs)
def test_equal_is_reflexive(pair):
    e = dim(pair)
    assert symbolic.equal(e, e, RANGES)
    assert symbolic.equal(e, symbolic.parse(symbolic.to_str(e)), RANGES)


@settings(PROPERTY, max_examples=60)
@given(exprs, st.integers(-5, 5).filter(bool), st.sampled_from(NAMES))
def test_equal_detects_a_shift(pair, k, name):
    e = dim(pair)
    assert not symbolic.equal(e, symbolic.canonical(e + k), RANGES)
    assert not symbolic.equal(e, symbolic.canonical(e + symbolic.symbol(name)), RANGES)  # symbols are >= 1 here


@settings(PROPERTY, max_examples=60)
@given(polynomials, polynomials)
def test_equal_decides_polynomials(p, q):
    a, b = dim(p), dim(q)
    assert symbolic.equal(a, b, RANGES) == (sympy.expand(sympy.sympify(a) - sympy.sympify(b)) == 0)


@settings(PROPERTY, max_examples=60)
@given(polynomials, polynomials)
def test_equal_sees_through_expansion(p, q):
    """(p + q)^2 and p^2 + 2pq + q^2 as separately built dims."""
    (x, _), (y, _) = p, q
    assert symbolic.equal(symbolic.canonical((x + y) * (x + y)), symbolic.canonical(x * x + 2 * x * y + y * y), RANGES)


# ---------------------------------------------------------------------------------------------------------------
# Fixed cases
# ---------------------------------------------------------------------------------------------------------------
SEQ = symbolic.symbol("seq")


def test_evaluate_floor_division_is_exact():
    """floor(seq/49) at seq = 49 is 1; evaluating 49 * (1/49) in floating point gives 0.9999999999999999."""
    e = sympy.floor(SEQ / 49)
    assert [symbolic.evaluate(e, {"seq": n}) for n in (48, 49, 98, 147)] == [0, 1, 2, 3]


def test_evaluate_slice_length_with_step_3():
    """The length of x[::3] along seq, as the slice shape rule writes it: floor(seq/3 + 2/3)."""
    length = symbolic.canonical(sympy.floor(SEQ / 3 + sympy.Rational(2, 3)))
    assert [symbolic.evaluate(length, {"seq": n}) for n in range(1, 30)] == [len(range(0, n, 3)) for n in range(1, 30)]


def test_equal_distinguishes_dims_that_differ_at_one_point():
    """floor(seq/3000) and floor(seq/3001) differ only at seq = 3000, inside the declared range [1, 4096]."""
    a, b = sympy.floor(SEQ / 3000), sympy.floor(SEQ / 3001)
    assert symbolic.evaluate(a, {"seq": 3000}) != symbolic.evaluate(b, {"seq": 3000})
    assert not symbolic.equal(a, b, {"seq": (1, 4096)})


def test_equal_uses_declared_ranges():
    assert symbolic.equal(sympy.Min(SEQ, 2048), SEQ, {"seq": (1, 2048)})
    assert not symbolic.equal(sympy.Min(SEQ, 2048), SEQ, {"seq": (1, 4096)})


def test_evaluate_names_an_unbound_symbol():
    with pytest.raises(KeyError, match="'past'"):
        symbolic.evaluate(SEQ + symbolic.symbol("past"), {"seq": 3})


def test_canonical_form():
    assert symbolic.canonical(sympy.Integer(7)) == 7 and type(symbolic.canonical(sympy.Integer(7))) is int
    assert symbolic.canonical(SEQ + 1 - SEQ) == 1
    assert symbolic.canonical(2 * (SEQ + 1)) == 2 * SEQ + 2
    with pytest.raises(TypeError):
        symbolic.canonical(True)
