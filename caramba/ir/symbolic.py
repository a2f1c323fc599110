"""Symbolic dimensions: an int or a sympy expression over named symbols (batch, seq, past, ...)."""
from __future__ import annotations

import functools
import math
import operator
import random
import re
from fractions import Fraction
from typing import Any, Callable, Mapping, Union

import sympy

Dim = Union[int, sympy.Expr]


def symbol(name: str) -> sympy.Symbol:
    return _symbol(name)


@functools.lru_cache(maxsize=None)
def _symbol(name: str) -> sympy.Symbol:
    return sympy.Symbol(name, integer=True, nonnegative=True)


def canonical(d: Dim) -> Dim:
    """Plain ints stay ints; expressions that simplify to a constant become ints."""
    if isinstance(d, bool):
        raise TypeError("a dimension cannot be a bool")
    if isinstance(d, int):
        return d
    if isinstance(d, sympy.Integer):
        return int(d)
    if isinstance(d, sympy.Expr):
        d = sympy.expand(d) if not d.has(sympy.floor, sympy.Max, sympy.Min, sympy.Mod) else d
        return int(d) if d.is_Integer else d
    raise TypeError(f"not a dimension: {d!r}")


def is_static(d: Dim) -> bool:
    return isinstance(d, int)


def free_symbols(d: Dim) -> set[str]:
    return set() if isinstance(d, int) else {s.name for s in d.free_symbols}


def to_str(d: Dim) -> str:
    return str(d)


def parse(text: str) -> Dim:
    """Parse the text form written by `to_str`; names become symbols. Only arithmetic on names and integers is
    accepted (sympify would otherwise evaluate arbitrary Python), and the result must be an integer expression."""
    text = text.strip()
    if _INT.fullmatch(text):
        return int(text)
    if not _SAFE.fullmatch(text):
        raise ValueError(f"bad dimension {text!r}: only integers, names, + - * / // ( ) and floor/ceiling/Max/Min/Mod "
                         "are allowed")
    names = {n: symbol(n) for n in _IDENT.findall(text) if n not in _FUNCS}
    expr = sympy.sympify(text, locals={**names, **_FUNCS})
    if not isinstance(expr, sympy.Expr) or expr.is_integer is False or (expr.is_number and not expr.is_Integer):
        raise ValueError(f"bad dimension {text!r}: not an integer expression")
    return canonical(expr)


@functools.lru_cache(maxsize=4096)
def _compiled(expr: sympy.Expr) -> Callable[[Mapping[str, int]], Any]:
    """A closure that evaluates `expr` exactly (ints and Fractions: floor(seq/49) at seq=49 is 1, not 0.99...)."""
    if expr.is_Integer:
        value = int(expr)
        return lambda b: value
    if expr.is_Rational:
        frac = Fraction(int(expr.p), int(expr.q))
        return lambda b: frac
    if expr.is_Symbol:
        name = expr.name
        return lambda b: b[name]
    args = [_compiled(a) for a in expr.args]
    if expr.is_Add:
        return lambda b: sum(f(b) for f in args)
    if expr.is_Mul:
        return lambda b: math.prod(f(b) for f in args)
    if expr.is_Pow and expr.exp.is_Integer:
        base, exp = args[0], int(expr.exp)
        return (lambda b: base(b) ** exp) if exp >= 0 else (lambda b: Fraction(1, base(b) ** -exp))
    fn = _EXACT_FUNCS.get(type(expr))
    if fn is None:
        raise ValueError(f"cannot evaluate dimension expression {expr} ({type(expr).__name__})")
    return lambda b: fn(*(f(b) for f in args))


_EXACT_FUNCS = {sympy.floor: math.floor, sympy.ceiling: math.ceil, sympy.Max: max, sympy.Min: min,
                sympy.Mod: operator.mod}


def evaluate(d: Dim, bindings: Mapping[str, int]) -> int:
    """The concrete value of `d` once the symbols are bound (at run time)."""
    if isinstance(d, int):
        return d
    try:
        value = _compiled(d)(bindings)
    except KeyError as e:
        raise KeyError(f"symbol {e.args[0]!r} of dimension {d} is not bound") from None
    if isinstance(value, Fraction) and value.denominator != 1:
        raise ValueError(f"dimension {d} is not an integer at {dict(bindings)}: {value}")
    return int(value)


def resolve(v: Any, bindings: Mapping[str, int]) -> Any:
    """An attribute value with every symbolic dim in it (also inside tuples) evaluated under `bindings`."""
    if isinstance(v, sympy.Expr):
        return evaluate(v, bindings)
    if isinstance(v, tuple):
        return tuple(resolve(x, bindings) for x in v)
    return v


def has_symbols(v: Any) -> bool:
    """Whether an attribute value holds a symbolic expression (also inside tuples)."""
    return isinstance(v, sympy.Basic) or (isinstance(v, tuple) and any(has_symbols(x) for x in v))


def equal(a: Dim, b: Dim, ranges: Mapping[str, tuple[int, int]] | None = None) -> bool:
    """Whether two dims are the same for every admissible symbol value.

    Structural equality first; otherwise check every value of a single symbol's declared range, or sample the
    ranges of several symbols (a Min(seq, 2048) equals seq when
    seq <= 2048 is declared: sympy alone cannot see that).
    """
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    if a == b:
        return True
    diff = sympy.simplify(sympy.sympify(a) - sympy.sympify(b))
    if diff == 0:
        return True
    names = sorted(free_symbols(a) | free_symbols(b))
    if len(names) == 1:
        lo, hi = (ranges or {}).get(names[0], (1, 4096))
        if hi - lo <= EXHAUSTIVE_LIMIT:
            return all(evaluate(a, {names[0]: v}) == evaluate(b, {names[0]: v}) for v in range(lo, hi + 1))
    rng = random.Random(0)
    for trial in range(12):
        point = {}
        for n in names:
            lo, hi = (ranges or {}).get(n, (1, 4096))
            point[n] = (lo, hi, max(lo, min(hi, 2)))[trial] if trial < 3 else rng.randint(lo, hi)
        if evaluate(a, point) != evaluate(b, point):
            return False
    return True


def product(dims) -> Dim:
    out: Dim = 1
    for d in dims:
        out = canonical(out * d)
    return out


_INT = re.compile(r"-?\d+")
_SAFE = re.compile(r"[A-Za-z_0-9+\-*/(), ]*")
EXHAUSTIVE_LIMIT = 65536
_IDENT = re.compile(r"[A-Za-z_][A-Za-z_0-9]*")
_FUNCS = {"floor": sympy.floor, "Max": sympy.Max, "Min": sympy.Min, "Mod": sympy.Mod, "ceiling": sympy.ceiling}
