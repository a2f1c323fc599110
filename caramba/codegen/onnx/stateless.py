"""One ONNX model of a stateless graph (no KV cache): what target onnx runs for a model whose attention the cache
passes cannot take (caramba.passes.cache_fallback), recomputing the whole conversation each step.

    input_ids (batch, seq) i64 -> logits (batch, seq, vocab)

Besides the ops of ops.py it lowers what only a stateless graph holds: attention / decoupled_attention with their
own mask, causal flag, soft cap and window (spelled out as MatMul / Softmax exactly as the IR reference computes
them: fp32 scores, masked keys at -inf, a row that sees no key gives zeros), and the mask arithmetic models build
from positions (cumsum, diff, advanced indexing).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from caramba.codegen.onnx.emit import Builder
from caramba.codegen.onnx.model import OnnxModel, _transposed, check, lower_graph
from caramba.codegen.onnx.ops import OPS, Lowering, _axis
from caramba.errors import UnsupportedOpError
from caramba.ir.graph import Graph, Node
from caramba.ir.types import DType

OPSET = 23


def build_stateless_model(graph: Graph, opset: int = OPSET) -> OnnxModel:
    """The ONNX model of a graph with one token-id input and the logits as its first output."""
    if len(graph.inputs) != 1 or graph.inputs[0].type.rank != 2:
        raise UnsupportedOpError(f"a stateless ONNX model takes one token-id input (batch, seq), got "
                                 f"{[repr(v) for v in graph.inputs]}")
    b = Builder(opset)
    lw = Lowering(b, lambda v: _transposed(b, graph, v), graph)
    ids = b.add_input("input_ids", DType.i64, ["batch_size", "sequence_length"])
    lw.names[graph.inputs[0]] = ids
    batch, seq = graph.inputs[0].type.shape
    for i, sym in enumerate((batch, seq)):
        if not isinstance(sym, int):
            b.bind_dim(str(sym), b.op("Shape", [ids], str(sym), start=i, end=i + 1))
    vocab = lower_graph(lw, graph, {**OPS, **STATELESS_OPS})
    model = OnnxModel(b.model("caramba-stateless"), "stateless", opset, [], int(vocab))
    check(model.proto)
    return model


def stateless_runner(graph: Graph, threads: int | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """input_ids (B, T) -> logits (B, T, V) through ONNX Runtime on the CPU."""
    from caramba.codegen.onnx.runner import make_session

    session = make_session(build_stateless_model(graph), threads)

    def run(input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.to(torch.int64).cpu().contiguous().numpy()
        return torch.from_numpy(session.run(["logits"], {"input_ids": ids})[0])

    return run


# -- attention without a cache ----------------------------------------------------------------------------------------
def _attention(lw: Lowering, n: Node) -> list[str]:
    b, a = lw.b, n.attrs
    f32 = DType.f32
    if n.op == "attention":
        q, k, v = n.inputs[:3]
        scores = _scores(lw, lw.input_as(n, 0, f32), lw.input_as(n, 1, f32), q.type, k.type, float(a["scale"]))
        mask = n.inputs[3] if len(n.inputs) > 3 else None
    else:
        q, k, v = n.inputs[0], n.inputs[1], n.inputs[4]
        sem = _scores(lw, lw.input_as(n, 0, f32), lw.input_as(n, 1, f32), q.type, k.type, float(a["scale_sem"]))
        geo = _scores(lw, lw.input_as(n, 2, f32), lw.input_as(n, 3, f32), n.inputs[2].type, n.inputs[3].type,
                      float(a["scale_geo"]))
        scores = b.op("Add", [sem, geo], "scores")
        mask = n.inputs[5] if len(n.inputs) > 5 else None
    batch, heads, tq, _ = q.type.shape
    tk = k.type.shape[2]
    neg_inf = b.const(-np.inf, np.float32)
    cap = float(a.get("softcap", 0.0))
    if cap:
        c = b.const(cap, np.float32)
        scores = b.op("Mul", [b.op("Tanh", [b.op("Div", [scores, c])]), c], "capped")
    i = b.op("Unsqueeze", [b.op("Range", [b.const(0), b.op("Squeeze", [b.dim(tq)]), b.const(1)]), b.const([1])],
             "qpos")  # (Tq, 1)
    j = b.op("Range", [b.const(0), b.op("Squeeze", [b.dim(tk)]), b.const(1)], "kpos")  # (Tk,)
    diag = b.op("Add", [i, b.op("Sub", [b.dim(tk), b.dim(tq)])], "diag")  # key j <= i + Tk - Tq is not future
    window = int(a.get("window", 0))
    if window:
        old = b.op("LessOrEqual", [j, b.op("Sub", [diag, b.const([window])])], "old")
        scores = b.op("Where", [old, neg_inf, scores], "windowed")
    if mask is not None:
        m = lw[mask]
        if mask.type.dtype == DType.bool:
            scores = b.op("Where", [m, scores, neg_inf], "masked")
        else:
            scores = b.op("Add", [scores, lw.cast(m, mask.type.dtype, f32)], "masked")
    if a["causal"]:
        scores = b.op("Where", [b.op("Greater", [j, diag], "future"), neg_inf, scores], "causal")
    probs = b.op("Softmax", [scores], "probs", axis=-1)
    blind = b.op("Equal", [b.op("ReduceMax", [scores, b.const([-1])], keepdims=1), neg_inf], "blind")
    probs = b.op("Where", [blind, b.const(0.0, np.float32), probs], "probs")
    hkv, dv = v.type.shape[1], v.type.shape[3]
    g = heads // hkv
    p5 = b.op("Reshape", [probs, b.shape((batch, hkv, g, tq, tk))], "p5")
    v5 = b.op("Unsqueeze", [lw.input_as(n, 2 if n.op == "attention" else 4, f32), b.const([2])], "v5")
    y = b.op("Reshape", [b.op("MatMul", [p5, v5]), b.shape((batch, heads, tq, dv))], "attn")
    return [lw.cast(y, f32, n.outputs[0].type.dtype)]


def _scores(lw: Lowering, q: str, k: str, qt, kt, scale: float) -> str:
    """fp32 q·kᵀ·scale, (B, H, Tq, Tk), with query head h reading kv head h // (H / Hkv)."""
    b = lw.b
    batch, heads, tq, d = qt.shape
    hkv, tk = kt.shape[1], kt.shape[2]
    q5 = b.op("Reshape", [q, b.shape((batch, hkv, heads // hkv, tq, d))], "q5")
    kt5 = b.op("Unsqueeze", [b.op("Transpose", [k], perm=[0, 1, 3, 2]), b.const([2])], "kT5")
    s = b.op("MatMul", [q5, kt5], "qk")
    s = b.op("Mul", [s, b.const(scale, np.float32)], "scaled")
    return b.op("Reshape", [s, b.shape((batch, heads, tq, tk))], "scores")


# -- position arithmetic ----------------------------------------------------------------------------------------------
def _cumsum(lw: Lowering, n: Node) -> list[str]:
    x, out = n.inputs[0], n.outputs[0].type.dtype
    have = lw.cast(lw[x], x.type.dtype, out)  # bool counts as int64 (torch promotes it so)
    return [lw.b.op("CumSum", [have, lw.b.const(_axis(n.attrs["dim"], x.type.rank))], "cumsum")]


def _diff(lw: Lowering, n: Node) -> list[str]:
    b, x = lw.b, n.inputs[0]
    dim = _axis(n.attrs["dim"], x.type.rank)
    dt = n.outputs[0].type.dtype
    extra = [lw.input_as(n, i, x.type.dtype) for i in range(1, len(n.inputs))]
    parts = [lw[x]]
    if extra and n.attrs["has_prepend"]:
        parts.insert(0, extra.pop(0))
    parts += extra
    y = b.op("Concat", parts, "diff_in", axis=dim) if len(parts) > 1 else parts[0]
    for _ in range(int(n.attrs["n"])):
        hi = b.op("Slice", [y, b.const([1]), b.const([2**62]), b.const([dim])])
        lo = b.op("Slice", [y, b.const([0]), b.const([-1]), b.const([dim])])
        y = b.op("Xor", [hi, lo], "diff") if dt == DType.bool else b.op("Sub", [hi, lo], "diff")
    return [y]


def _index(lw: Lowering, n: Node) -> list[str]:
    """x[i0, i1, ...] with index tensors on the leading dims 0..k-1 (broadcast together), or one index tensor on
    any dim: Gather / GatherND."""
    b, x, dims = lw.b, n.inputs[0], list(n.attrs["dims"])
    idx = [lw.cast(lw[v], v.type.dtype, DType.i64) for v in n.inputs[1:]]
    if len(dims) == 1:
        return [b.op("Gather", [lw[x], idx[0]], "index", axis=_axis(dims[0], x.type.rank))]
    if dims != list(range(len(dims))):
        raise UnsupportedOpError(f"the ONNX codegen lowers advanced indexing on the leading dims only; {n.loc or 'a'} "
                                 f"index op uses dims {dims}: compile with target='eager' to run it")
    shape = n.outputs[0].type.shape[:_broadcast_rank(n)]
    target = b.shape(shape)
    stacked = [b.op("Unsqueeze", [b.op("Expand", [i, target]), b.const([-1])]) for i in idx]
    return [b.op("GatherND", [lw[x], b.op("Concat", stacked, "nd", axis=-1)], "index")]


def _broadcast_rank(n: Node) -> int:
    return max(v.type.rank for v in n.inputs[1:])


def _repeat(lw: Lowering, n: Node) -> list[str]:
    """torch's Tensor.repeat: Tile, after leading size-1 dims when there are more repeats than dims."""
    b, x = lw.b, lw[n.inputs[0]]
    reps = list(n.attrs["repeats"])
    extra = len(reps) - n.inputs[0].type.rank
    if extra > 0:
        x = b.op("Unsqueeze", [x, b.const(list(range(extra)))], "lead")
    return [b.op("Tile", [x, b.shape(reps)], "repeat")]


STATELESS_OPS = {"repeat": _repeat, "attention": _attention, "decoupled_attention": _attention, "cumsum": _cumsum, "diff": _diff,
                 "index": _index}
