"""fuse_norm_linear: an RMSNorm read only by one linear -> rms_norm_linear / add_rms_norm_linear.

    before:
        %h, %n = add_rms_norm(%x, %attn, %g) {eps = 1e-05, dtype = f16}
        %qkv = linear(%n, %w_qkv)
    after:
        %h, %qkv = add_rms_norm_linear(%x, %attn, %g, %w_qkv) {eps = 1e-05, dtype = f16}

    and likewise rms_norm_fp32(%e, %g) read by linear(.., %w[, %b]) -> rms_norm_linear(%e, %g, %w[, %b]).

Why: at decode each layer runs two add_rms_norm launches, each read by one product (the fused q|k|v or DBA
projections, the fused gate|up: run after fuse_linears), plus the first layer's norm and the final norm before
the head. rms_norm's rstd is one scalar per row, so the GEMV (target cuda, gemv.py) streams s * norm_weight,
sums s² alongside its dot products and scales them by rsqrt(mean(s²) + eps) at the end; program 0 writes the
residual stream s. The norm costs neither a launch nor a round trip of the normed row. More rows (prefill,
batch > 1) run the norms kernel and cuBLAS, as before the fusion.

Rounding: the reference is the composition, bit for bit. The one-row kernel never forms the normed row, so its
rounding to the norm's dtype is skipped: results agree within the dtype's rounding, not bit for bit.

Not fused: a normed value also read by another node (or by two linears) or returned; a linear whose weight or
bias is computed after the norm (the fused node takes the norm's place, before every reader of s);
layer norms (their centring needs the mean before the products). A norm without weight is given a vector of
ones in its output dtype (one const per width and dtype): multiplying by one changes no bit. cuda only: other
targets have no kernel for the ops. A quantized projection (qlinear, compile(weights=...)) folds its norm the same
way into rms_norm_qlinear / add_rms_norm_qlinear (its codes, scales, zeros and bias after the norm weight, the
norm's attributes and the format's together), when the target implements those. Counts: `rms_norm_linear`,
`add_rms_norm_linear`, `rms_norm_qlinear`, `add_rms_norm_qlinear`.
"""
from __future__ import annotations

import torch

from caramba.ir.graph import Graph, Node, Value
from caramba.ir.registry import get_op
from caramba.ir.types import TensorType
from caramba.passes.base import PassContext
from caramba.passes.fold_constants import add_const

# norm -> the fused op, and how many of the norm's inputs are data (the norm weight, if any, comes next)
FUSED = {"rms_norm_fp32": ("rms_norm_linear", 1), "add_rms_norm": ("add_rms_norm_linear", 2)}
# the quantized product's twins
Q_FUSED = {"rms_norm_fp32": "rms_norm_qlinear", "add_rms_norm": "add_rms_norm_qlinear"}


def _norm_read_only_by(linear: Node, producers: dict[Value, Node], users: dict[Value, list[Node]],
                       outputs: set[Value]) -> Node | None:
    """The rms norm whose normed value is `linear`'s input and is read nowhere else, or None."""
    if linear.op not in ("linear", "qlinear"):
        return None
    normed = linear.inputs[0]
    norm = producers.get(normed)
    if norm is None or norm.op not in FUSED or normed is not norm.outputs[-1]:
        return None
    return norm if normed not in outputs and users[normed] == [linear] else None


class _Ones:
    """The norm weight of weight-less norms: one const of ones per (width, dtype, device)."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.made: dict[tuple, Value] = {}

    def __call__(self, width: int, type: TensorType, device: torch.device) -> Value:
        key = (width, type.dtype, device)
        if key not in self.made:
            self.made[key] = add_const(self.graph, TensorType((width,), type.dtype),
                                       torch.ones(width, dtype=type.dtype.torch, device=device))
        return self.made[key]


def fuse_norm_linear(graph: Graph, ctx: PassContext) -> Graph:
    """Fold each rms norm read only by one linear into that linear (see the module doc)."""
    producers, users, outputs = graph.producers(), graph.users(), set(graph.outputs)
    index = {n: i for i, n in enumerate(graph.nodes)}
    ones = _Ones(graph)
    fused_at: dict[Node, Node] = {}  # norm -> the fused node that takes its place
    folded: set[Node] = set()  # the linears it replaces
    for linear in graph.nodes:
        norm = _norm_read_only_by(linear, producers, users, outputs)
        if norm is None or any(v in producers and index[producers[v]] > index[norm] for v in linear.inputs[1:]):
            continue
        op, n_data = FUSED[norm.op]
        if linear.op == "qlinear":
            op = Q_FUSED[norm.op]
            if not ctx.needs.implements(op):
                continue
        data, weight = norm.inputs[:n_data], norm.inputs[n_data:]
        if not weight:
            width = data[0].type.shape[-1]
            if not isinstance(width, int):
                continue
            w = graph.weights.get(linear.inputs[1].name)
            weight = (ones(width, norm.outputs[-1].type, w.device if w is not None else torch.device("cpu")),)
        # s (add_rms_norm's first output) keeps its Value, the linear's output its own: no use needs rewiring
        fused = Node(op, (*data, *weight, *linear.inputs[1:]), (*norm.outputs[:-1], linear.output),
                     {**norm.attrs, **linear.attrs}, norm.loc)
        _check_types(fused)
        fused_at[norm] = fused
        folded.add(linear)
        ctx.count(op)
    graph.nodes = [fused_at.get(n, n) for n in graph.nodes if n not in folded]
    return graph


def _check_types(node: Node) -> None:
    opdef = get_op(node.op)
    want = opdef.infer([v.type for v in node.inputs], opdef.full_attrs(node.attrs))
    if list(want) != [v.type for v in node.outputs]:
        raise TypeError(f"fuse_norm_linear: {node.op} gives {want}, the fused nodes gave "
                        f"{[v.type for v in node.outputs]}")
