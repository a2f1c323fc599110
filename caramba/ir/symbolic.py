"""Symbolic dimensions: an int or a sympy expression over named symbols (batch, seq, past, ...)."""
from __future__ import annotations

import functools
import math
import random
import re
from typing import Mapping, Union

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
    """Parse the text form written by `to_str`; names become symbols."""
    text = text.strip()
    if _INT.fullmatch(text):
        return int(text)
    names = {n: symbol(n) for n in _IDENT.findall(text) if n not in _FUNCS}
    expr = sympy.sympify(text, locals={**names, **_FUNCS})
    return canonical(expr)


@functools.lru_cache(maxsize=4096)
def _compiled(expr: sympy.Expr):
    names = sorted(s.name for s in expr.free_symbols)
    fn = sympy.lambdify([symbol(n) for n in names], expr, modules=[{"floor": math.floor, "Max": max, "Min": min}, "math"])
    return names, fn


def evaluate(d: Dim, bindings: Mapping[str, int]) -> int:
    """The concrete value of `d` once the symbols are bound (at run time)."""
    if isinstance(d, int):
        return d
    names, fn = _compiled(d)
    try:
        return int(fn(*(bindings[n] for n in names)))
    except KeyError as e:
        raise KeyError(f"symbol {e.args[0]!r} of dimension {d} is not bound") from None


def equal(a: Dim, b: Dim, ranges: Mapping[str, tuple[int, int]] | None = None) -> bool:
    """Whether two dims are the same for every admissible symbol value.

    Structural equality first; otherwise sample the declared symbol ranges (a Min(seq, 2048) equals seq when
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
_IDENT = re.compile(r"[A-Za-z_][A-Za-z_0-9]*")
_FUNCS = {"floor": sympy.floor, "Max": sympy.Max, "Min": sympy.Min, "Mod": sympy.Mod, "ceiling": sympy.ceiling}
