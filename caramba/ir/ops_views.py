"""Views and data movement ops: reshape, transpose, permute, (un)squeeze, expand, slice, select, cat, stack,
index, gather, repeat, tril/triu. The reference makes copies; what is a view is a backend's business."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from caramba.ir import symbolic
from caramba.ir.registry import REQUIRED, register_op
from caramba.ir.shape_rules import INT_MAX, ShapeError, index_shape, norm_dim, promote, reshape_shape, same, slice_len
from caramba.ir.types import TensorType

Types = Sequence[TensorType]
Attrs = Mapping[str, Any]


@register_op("reshape", ["x"], lambda t, a: [t[0].with_shape(reshape_shape(t[0].shape, a["shape"]))],
             attrs={"shape": REQUIRED}, tags=["view"])
def _reshape(x, shape):
    return x.reshape(shape)


def _transpose_infer(t: Types, a: Attrs) -> list[TensorType]:
    s = list(t[0].shape)
    d0, d1 = norm_dim(a["dim0"], len(s)), norm_dim(a["dim1"], len(s))
    s[d0], s[d1] = s[d1], s[d0]
    return [t[0].with_shape(s)]


@register_op("transpose", ["x"], _transpose_infer, attrs={"dim0": REQUIRED, "dim1": REQUIRED}, tags=["view"])
def _transpose(x, dim0, dim1):
    return x.transpose(dim0, dim1)


def _permute_infer(t: Types, a: Attrs) -> list[TensorType]:
    dims = [norm_dim(d, t[0].rank) for d in a["dims"]]
    if sorted(dims) != list(range(t[0].rank)):
        raise ShapeError(f"permute dims {a['dims']} are not a permutation of rank {t[0].rank}")
    return [t[0].with_shape(t[0].shape[d] for d in dims)]


@register_op("permute", ["x"], _permute_infer, attrs={"dims": REQUIRED}, tags=["view"])
def _permute(x, dims):
    return x.permute(*dims)


def _unsqueeze_infer(t: Types, a: Attrs) -> list[TensorType]:
    s = list(t[0].shape)
    s.insert(norm_dim(a["dim"], len(s) + 1), 1)
    return [t[0].with_shape(s)]


@register_op("unsqueeze", ["x"], _unsqueeze_infer, attrs={"dim": REQUIRED}, tags=["view"])
def _unsqueeze(x, dim):
    return x.unsqueeze(dim)


def _squeeze_infer(t: Types, a: Attrs) -> list[TensorType]:
    s = t[0].shape
    dims = {norm_dim(d, len(s)) for d in a["dims"]} if a["dims"] else set(range(len(s)))
    if any(not symbolic.is_static(s[d]) for d in dims):
        # whether a symbolic dim is squeezed depends on its run-time value: the importer emits a reshape instead
        raise ShapeError(f"squeeze over symbolic dim(s) of {t[0]}; name static dims to squeeze")
    return [t[0].with_shape(d for i, d in enumerate(s) if not (i in dims and d == 1))]


@register_op("squeeze", ["x"], _squeeze_infer, attrs={"dims": ()}, tags=["view"])
def _squeeze(x, dims):
    return x.squeeze(tuple(dims)) if dims else x.squeeze()


def _expand_infer(t: Types, a: Attrs) -> list[TensorType]:
    src, target = t[0].shape, list(a["shape"])
    if len(target) < len(src):
        raise ShapeError(f"cannot expand rank {len(src)} to {target}")
    lead = len(target) - len(src)
    out = list(target[:lead])
    for d, want in zip(src, target[lead:]):
        if isinstance(want, int) and want == -1:
            out.append(d)
        elif isinstance(d, int) and d == 1:
            out.append(want)
        elif not symbolic.equal(want, d):
            raise ShapeError(f"cannot expand dim {d} to {want}")
        else:
            out.append(d)
    return [t[0].with_shape(out)]


@register_op("expand", ["x"], _expand_infer, attrs={"shape": REQUIRED}, tags=["view"])
def _expand(x, shape):
    return x.expand(*shape)


def _slice_infer(t: Types, a: Attrs) -> list[TensorType]:
    s = list(t[0].shape)
    d = norm_dim(a["dim"], len(s))
    if a["step"] < 1:
        raise ShapeError("slice step must be positive")
    s[d] = slice_len(s[d], a["start"], a["end"], a["step"])
    return [t[0].with_shape(s)]


@register_op("slice", ["x"], _slice_infer, attrs={"dim": REQUIRED, "start": 0, "end": INT_MAX, "step": 1},
             tags=["view"])
def _slice(x, dim, start, end, step):
    idx = [slice(None)] * x.dim()
    idx[dim] = slice(start, end, step)
    return x[tuple(idx)]


def _select_infer(t: Types, a: Attrs) -> list[TensorType]:
    s = list(t[0].shape)
    del s[norm_dim(a["dim"], len(s))]
    return [t[0].with_shape(s)]


@register_op("select", ["x"], _select_infer, attrs={"dim": REQUIRED, "index": REQUIRED}, tags=["view"])
def _select(x, dim, index):
    return x.select(dim, index)


def _cat_infer(t: Types, a: Attrs) -> list[TensorType]:
    parts = [x for x in t if not (x.rank == 1 and x.shape[0] == 0)]  # torch.cat skips legacy empty tensors
    rank = parts[0].rank
    d = norm_dim(a["dim"], rank)
    size = symbolic.canonical(sum((x.shape[d] for x in parts), 0))
    rest = [list(x.shape[:d]) + list(x.shape[d + 1:]) for x in parts]
    for r in rest[1:]:
        if len(r) != len(rest[0]) or not all(symbolic.equal(u, v) for u, v in zip(r, rest[0])):
            raise ShapeError(f"cat inputs differ outside dim {d}: {[str(x) for x in t]}")
    shape = list(parts[0].shape)
    shape[d] = size
    return [TensorType(shape, promote(*t))]


@register_op("cat", ["*xs"], _cat_infer, attrs={"dim": 0})
def _cat(*xs, dim):
    return torch.cat(xs, dim)


def _stack_infer(t: Types, a: Attrs) -> list[TensorType]:
    s = list(t[0].shape)
    s.insert(norm_dim(a["dim"], len(s) + 1), len(t))
    return [TensorType(s, promote(*t))]


@register_op("stack", ["*xs"], _stack_infer, attrs={"dim": 0})
def _stack(*xs, dim):
    return torch.stack(xs, dim)


def _index_infer(t: Types, a: Attrs) -> list[TensorType]:
    if len(a["dims"]) != len(t) - 1:
        raise ShapeError(f"index has {len(t) - 1} index tensors but dims={list(a['dims'])}")
    return [t[0].with_shape(index_shape(t[0].shape, a["dims"], [i.shape for i in t[1:]]))]


@register_op("index", ["x", "*indices"], _index_infer, attrs={"dims": REQUIRED})
def _index(x, *indices, dims):
    """Advanced indexing x[..., i0, ..., i1, ...] with index tensors at positions `dims`."""
    key: list[Any] = [slice(None)] * (max(dims) + 1)
    for d, i in zip(dims, indices):
        key[d] = i
    return x[tuple(key)]


def _gather_infer(t: Types, a: Attrs) -> list[TensorType]:
    return [t[1].with_dtype(t[0].dtype)]


@register_op("gather", ["x", "index"], _gather_infer, attrs={"dim": REQUIRED})
def _gather(x, index, dim):
    return torch.gather(x, dim, index)


def _repeat_infer(t: Types, a: Attrs) -> list[TensorType]:
    reps = list(a["repeats"])
    shape = [1] * (len(reps) - t[0].rank) + list(t[0].shape)
    return [t[0].with_shape(symbolic.canonical(d * r) for d, r in zip(shape, reps))]


@register_op("repeat", ["x"], _repeat_infer, attrs={"repeats": REQUIRED})
def _repeat(x, repeats):
    return x.repeat(*repeats)


@register_op("tril", ["x"], same, attrs={"diagonal": 0})
def _tril(x, diagonal):
    return torch.tril(x, diagonal)


@register_op("triu", ["x"], same, attrs={"diagonal": 0})
def _triu(x, diagonal):
    return torch.triu(x, diagonal)


