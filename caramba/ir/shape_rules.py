"""Shared shape/dtype rules: broadcasting, promotion, reductions, views, all over symbolic dims."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import sympy
import torch

from caramba.ir import symbolic
from caramba.ir.symbolic import Dim
from caramba.ir.types import DType, TensorType

INT_MAX = 2**63 - 1


class ShapeError(ValueError):
    """A shape rule found inputs it cannot accept; the verifier reports it with the node."""


def norm_dim(d: int, rank: int) -> int:
    if not -rank <= d < max(rank, 1):
        raise ShapeError(f"dim {d} out of range for rank {rank}")
    return d % rank if rank else 0


def broadcast(*shapes: Sequence[Dim]) -> tuple[Dim, ...]:
    rank = max((len(s) for s in shapes), default=0)
    out = []
    for i in range(rank):
        dims = [s[len(s) - rank + i] for s in shapes if len(s) - rank + i >= 0]
        out.append(_broadcast_dim(dims))
    return tuple(out)


def _broadcast_dim(dims: list[Dim]) -> Dim:
    real = [d for d in dims if not (isinstance(d, int) and d == 1)]
    if not real:
        return 1
    first = real[0]
    for d in real[1:]:
        if d != first and sympy.simplify(sympy.sympify(d) - sympy.sympify(first)) != 0:
            raise ShapeError(f"cannot broadcast dims {dims}")
    return first


def _probe(t: TensorType | Any) -> Any:
    # Zero-size stand-ins carry a dtype and whether the operand is a dimensioned tensor or a 0-d one,
    # which is all torch's promotion rules look at.
    if isinstance(t, TensorType):
        return torch.empty((0,) if t.rank else (), dtype=t.dtype.torch)
    if isinstance(t, sympy.Expr):
        return 1  # a symbolic size used as a scalar operand is an int
    return t


def promote(*operands: TensorType | Any) -> DType:
    """torch's type promotion over tensor types and Python scalars (at least one operand is a tensor type)."""
    acc = None
    for o in operands:
        p = _probe(o)
        if acc is None:
            acc = p if isinstance(p, torch.Tensor) else torch.tensor(p)
            continue
        dimensioned = acc.dim() > 0 or (isinstance(p, torch.Tensor) and p.dim() > 0)
        acc = torch.empty((0,) if dimensioned else (), dtype=torch.result_type(acc, p))
    return DType.from_torch(acc.dtype)


def same(types: Sequence[TensorType], attrs: Mapping[str, Any]) -> list[TensorType]:
    return [types[0]]


def float_of(types: Sequence[TensorType], attrs: Mapping[str, Any]) -> list[TensorType]:
    """Unary math ops: ints are computed in the default float dtype."""
    t = types[0]
    return [t if t.dtype.is_float else t.with_dtype(DType.f32)]


def reduce_shape(shape: Sequence[Dim], dims: Sequence[int] | None, keepdim: bool) -> tuple[Dim, ...]:
    rank = len(shape)
    axes = set(range(rank)) if dims is None or len(dims) == 0 else {norm_dim(d, rank) for d in dims}
    return tuple(1 if i in axes else d for i, d in enumerate(shape) if keepdim or i not in axes)


def reshape_shape(shape: Sequence[Dim], target: Sequence[Dim]) -> tuple[Dim, ...]:
    total = symbolic.product(shape)
    if sum(1 for d in target if isinstance(d, int) and d == -1) > 1:
        raise ShapeError(f"reshape target {list(target)} has more than one -1")
    known = symbolic.product(d for d in target if not (isinstance(d, int) and d == -1))
    out = []
    for d in target:
        if isinstance(d, int) and d == -1:
            inferred = symbolic.canonical(sympy.simplify(sympy.sympify(total) / sympy.sympify(known)))
            if not isinstance(inferred, int) and not inferred.is_integer:
                raise ShapeError(f"cannot reshape {list(shape)} to {list(target)}: {total} is not a multiple of {known}")
            out.append(inferred)
        else:
            out.append(d)
    return tuple(out)


def slice_len(size: Dim, start: Dim, end: Dim, step: int) -> Dim:
    """Length of x[start:end:step] along a dim of `size`, with Python's clamping."""
    if all(isinstance(v, int) for v in (size, start, end)):
        return len(range(*slice(start, end, step).indices(size)))
    start = _clamp_index(start, size)
    end = _clamp_index(end, size)
    if isinstance(end, int) and end >= INT_MAX // 2:
        end = size
    length = sympy.Max(0, sympy.floor((sympy.sympify(end) - start + step - 1) / step))
    return symbolic.canonical(sympy.simplify(length))


def _clamp_index(i: Dim, size: Dim) -> Dim:
    if isinstance(i, int) and i < 0:
        return sympy.Max(0, size + i)
    if isinstance(i, int) and i >= INT_MAX // 2:
        return size
    if isinstance(i, int) and i == 0:
        return 0
    return sympy.Min(i, size)


def index_shape(x: Sequence[Dim], dims: Sequence[int], index_shapes: Sequence[Sequence[Dim]]) -> tuple[Dim, ...]:
    """Advanced indexing: x[..., idx at `dims`, ...] (torch semantics, indices broadcast together)."""
    b = broadcast(*index_shapes)
    dims = sorted(dims)
    if dims == list(range(dims[0], dims[0] + len(dims))):
        return tuple(x[: dims[0]]) + b + tuple(x[dims[-1] + 1:])
    return b + tuple(d for i, d in enumerate(x) if i not in dims)
