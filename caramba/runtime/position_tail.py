"""The position tail of a prefill graph: the LM head and the ops before it that compute each position's logits from
that position's activations alone. A prefill that samples one position per row (Executor.forward's logits_at)
gathers the tail's inputs at those positions and runs it on B rows instead of B·S (kernel_executor.py)."""
from __future__ import annotations

from caramba.ir import symbolic
from caramba.ir.graph import Graph, Node
from caramba.ir.ops_cache import STATEFUL
from caramba.ir.registry import get_op
from caramba.ir.shape_rules import norm_dim
from caramba.ir.types import TensorType

# ops that compute each position from that position alone when their outputs are (batch, seq, ..., D): the inputs
# that carry the activation (the others are weights: norm scales, projections, quantized codes, biases). Norms and
# projections act on the last dim(s), a slice on a dim past seq; ops tagged "elementwise" are added by position_tail
POSITIONWISE = {"linear": (0,), "qlinear": (0,), "rms_norm_fp32": (0,), "rms_norm": (0,), "layer_norm": (0,),
                "rms_norm_linear": (0,), "rms_norm_qlinear": (0,), "swiglu_linear": (0, 1), "swiglu_qlinear": (0, 1),
                "add_rms_norm": (0, 1), "add_layer_norm": (0, 1), "add_rms_norm_linear": (0, 1),
                "add_rms_norm_qlinear": (0, 1), "slice": (0,)}


def position_tail(g: Graph) -> dict[Node, tuple[int, ...]]:
    """The nodes that compute the logits (g.outputs[0], (batch, seq, V)) of each position from that position's
    activations alone: walking back from the logits, a node joins when its op is position-wise for its types
    (POSITIONWISE and elementwise ops, outputs (batch, seq, ...), no attribute that depends on a symbol, nothing
    stateful) and every value it makes is read only by nodes already in the tail (none is another graph output;
    add_rms_norm's residual sum, say, is in only if nothing else reads it). Attention, views that reshape the
    sequence, anything else ends it. Maps each tail node to the inputs it reads from outside the tail: the
    activations to gather at logits_at. Running the tail on those rows gives exactly those rows of the logits."""
    if not g.outputs or not g.inputs:
        return {}
    logits = g.outputs[0]
    lead = tuple(g.inputs[0].type.shape[:2])  # the token ids' (batch, seq)
    if logits.type.rank < 3 or len(lead) != 2 or symbolic.is_static(lead[1]) or tuple(logits.type.shape[:2]) != lead:
        return {}
    users, producers = g.users(), g.producers()
    others = {v for v in g.outputs if v is not logits}
    tail: dict[Node, tuple[int, ...]] = {}
    for node in reversed(g.nodes):  # every user of a node is decided before the node
        outs = node.outputs
        if any(v in others or not all(u in tail for u in users.get(v, ())) for v in outs) or \
                not any(v is logits or users.get(v) for v in outs):
            continue
        acts = _positionwise_inputs(node, lead)
        if acts is not None:
            tail[node] = acts
    return {n: tuple(i for i in acts if producers.get(n.inputs[i]) not in tail) for n, acts in tail.items()}


def _positionwise_inputs(node: Node, lead: tuple) -> tuple[int, ...] | None:
    """The inputs of `node` that carry the (batch, seq) activation if it acts on each position alone, else None.
    Conservative: an input neither (batch, seq, ...) like the outputs nor free of the lead dims (a weight, or
    a constant broadcast over them) ends the tail."""
    opdef = get_op(node.op)
    attrs = opdef.full_attrs(node.attrs)
    if STATEFUL in opdef.tags or any(symbolic.has_symbols(a) for a in attrs.values()):
        return None  # a symbolic attribute (a reshape to (batch, seq, ...)) would not fit the gathered rows
    rank = node.outputs[0].type.rank
    if rank < 3 or not all(v.type.rank == rank and _leads(v.type, lead) for v in node.outputs):
        return None
    inputs = [v.type for v in node.inputs]
    if node.op in POSITIONWISE:
        acts = POSITIONWISE[node.op]
        if "normalized_shape" in attrs and len(attrs["normalized_shape"]) > rank - 2:
            return None  # normalizes over seq too
        if node.op == "slice" and norm_dim(attrs["dim"], rank) < 2:
            return None
        if any(i >= len(inputs) or inputs[i].rank != rank or not _leads(inputs[i], lead) for i in acts) or \
                any(_symbolic(t) for i, t in enumerate(inputs) if i not in acts):
            return None
        return acts
    if "elementwise" not in opdef.tags:
        return None
    acts = []
    for i, t in enumerate(inputs):
        if t.rank == rank and _leads(t, lead):
            acts.append(i)
        elif _symbolic(t) or t.rank > rank or any(t.shape[d - rank + t.rank] != 1 for d in (0, 1)
                                                  if d - rank + t.rank >= 0):
            return None  # not one value for every position
    return tuple(acts) or None


def _leads(t: TensorType, lead: tuple) -> bool:
    return t.rank >= 2 and tuple(t.shape[:2]) == lead


def _symbolic(t: TensorType) -> bool:
    return any(not symbolic.is_static(d) for d in t.shape)
