"""The pass pipeline of every target: one list, in order, with the reason for each phase.

To add a pass: write `caramba/passes/<verb_noun>.py` with `def verb_noun(graph, ctx) -> graph` (count rewrites
with ctx.count), give it a `Pass` below and put it in the phase where its inputs exist and its outputs are
wanted. A pass that only some targets run is written `*_if(needs, "op", PASS)`: it runs when the target's backend
implements what the pass makes (TargetNeeds.fused_ops), and the list keeps its shape. Passes are referred to by
name (disable_passes, print_after, dumps), so a name says what it does.
"""
from __future__ import annotations

from caramba.passes.canonicalize import canonicalize
from caramba.passes.choose_chunking import choose_chunking
from caramba.passes.cse import cse
from caramba.passes.dce import dce
from caramba.passes.fold_constants import fold_constants
from caramba.passes.fold_tables import fold_tables
from caramba.passes.fuse_add_norm import fuse_add_norm
from caramba.passes.fuse_attention import fuse_attention
from caramba.passes.fuse_cached_attention import fuse_cached_attention
from caramba.passes.fuse_decoupled_attention import fuse_decoupled_attention
from caramba.passes.fuse_layer_norm import fuse_layer_norm
from caramba.passes.fuse_linears import fuse_linears
from caramba.passes.fuse_norm_linear import fuse_norm_linear
from caramba.passes.fuse_rms_norm import fuse_rms_norm
from caramba.passes.fuse_rope import fuse_rope
from caramba.passes.fuse_swiglu import fuse_swiglu
from caramba.passes.fuse_swiglu_linear import fuse_swiglu_linear
from caramba.passes.insert_kv_cache import insert_kv_cache
from caramba.passes.insert_kv_dequant import insert_kv_dequant
from caramba.passes.quantize_weights import quantize_weights
from caramba.passes.base import TargetNeeds
from caramba.passes.manager import Pass

CANONICALIZE = Pass("canonicalize", canonicalize)
FOLD_CONSTANTS = Pass("fold_constants", fold_constants)
FOLD_TABLES = Pass("fold_tables", fold_tables)
CSE = Pass("cse", cse)
DCE = Pass("dce", dce)
FUSE_RMS_NORM = Pass("fuse_rms_norm", fuse_rms_norm)
FUSE_LAYER_NORM = Pass("fuse_layer_norm", fuse_layer_norm)
FUSE_ADD_NORM = Pass("fuse_add_norm", fuse_add_norm)
FUSE_ROPE = Pass("fuse_rope", fuse_rope)
FUSE_ATTENTION = Pass("fuse_attention", fuse_attention)
FUSE_DECOUPLED_ATTENTION = Pass("fuse_decoupled_attention", fuse_decoupled_attention)
FUSE_SWIGLU = Pass("fuse_swiglu", fuse_swiglu)
QUANTIZE_WEIGHTS = Pass("quantize_weights", quantize_weights)
FUSE_LINEARS = Pass("fuse_linears", fuse_linears)
FUSE_SWIGLU_LINEAR = Pass("fuse_swiglu_linear", fuse_swiglu_linear)
FUSE_NORM_LINEAR = Pass("fuse_norm_linear", fuse_norm_linear)
INSERT_KV_CACHE = Pass("insert_kv_cache", insert_kv_cache)
INSERT_KV_DEQUANT = Pass("insert_kv_dequant", insert_kv_dequant)
FUSE_CACHED_ATTENTION = Pass("fuse_cached_attention", fuse_cached_attention)
CHOOSE_CHUNKING = Pass("choose_chunking", choose_chunking)


def _if(needs: TargetNeeds, product: str, p: Pass) -> list[Pass]:
    """[p] when the target implements what p makes, else []: the op stays as the ops it was made of."""
    return [p] if needs.implements(product) else []


def pipeline_for(needs: TargetNeeds) -> list[Pass]:
    """The passes `caramba.compile` runs for a target that needs `needs`, in order (names may repeat: dumps
    number them)."""
    return [
        # Phase 1: cleanup before fusion. Fusion patterns then see one form of each computation: no casts to the
        # same dtype, no reshape/transpose chains, no `* 1.0`, constant masks folded, fewer variants to match.
        # CSE waits for Phase 3: it shares per-layer intermediates (RoPE table views, causal masks) across
        # layers, and the rewriter's reused-intermediate guard then refuses any fusion whose pattern holds one
        # without `shared=True`. (Today's fusions fire the same either way; this order keeps it so.)
        CANONICALIZE,
        FOLD_CONSTANTS,
        DCE,
        # RoPE's cos/sin tables (and any table of positions and parameters) become slices of one table stored at
        # the longest sequence. After canonicalize (one form of the table's ops) and DCE (dead readers do not make
        # it store tables nobody needs); before fuse_rope, which then reads the tables as plain cos/sin operands.
        # Masks stay ops: fuse_attention proves them causal from their ops.
        FOLD_TABLES,
        # Phase 2: fusions, in this order (each needs what the one before it produced).
        # Norms first, since fuse_add_norm starts from a fused norm.
        *_if(needs, "rms_norm", FUSE_RMS_NORM),
        *_if(needs, "layer_norm", FUSE_LAYER_NORM),
        # The residual add that feeds a fused norm: one op, both outputs (the stream and the normed value).
        *_if(needs, "add_rms_norm", FUSE_ADD_NORM),
        # Rotary embedding of q and k, so the attention patterns see rope(q), rope(k) and no rotate-half.
        *_if(needs, "rope", FUSE_ROPE),
        # Scores, scale, mask, softmax, value product: standard/GQA, then DBA's two-score form.
        *_if(needs, "attention", FUSE_ATTENTION),
        *_if(needs, "decoupled_attention", FUSE_DECOUPLED_ATTENTION),
        # The MLP's gate, independent of the others.
        *_if(needs, "swiglu", FUSE_SWIGLU),
        # Weight-only quantization (compile(weights=...); nothing otherwise): linear -> qlinear over codes and
        # scales. Before the linear fusions, which treat qlinear as they treat linear (concatenated codes, the
        # activation or the norm folded in), so every fused form has a quantized twin and a quantized checkpoint's
        # tensors, found by their param names, are used as stored (never re-quantized).
        QUANTIZE_WEIGHTS,
        # Linears over one input (q/k/v projections, gate/up) become one product and column slices: at decode each
        # is a weight-bound matrix-vector product, and one launch over the concatenated weights replaces several
        # small ones. Only for targets whose kernels read the slices in place; others keep separate products.
        *_if(needs, "linear_slices", FUSE_LINEARS),
        # The down projection computes the activation it reads (e.g. in a GEMV kernel's prologue).
        *_if(needs, "swiglu_linear", FUSE_SWIGLU_LINEAR),
        # A norm read by one product is folded into it (a GEMV scales by the row's rstd). After fuse_linears,
        # which leaves the q|k|v and gate|up norms one reader each.
        *_if(needs, "rms_norm_linear", FUSE_NORM_LINEAR),
        # The KV cache comes after this list, once a cache kind is chosen: see cache_pipeline_for.
        # Phase 3: cleanup after fusion. Fusions leave dead tables and duplicated views behind; CSE is safe now
        # that nothing pattern-matches across layers, and canonicalize + DCE tidy what CSE exposes.
        CSE,
        CANONICALIZE,
        DCE,
    ]


def cache_pipeline_for(needs: TargetNeeds) -> list[Pass]:
    """The passes that put a KV cache behind the compiled graph, for one choice of cache kinds (ctx.options:
    max_seq_len, cache_kinds, cache_qblock, cache_residual_len). They run when a Generator picks its cache, not in
    compile(): "auto" picks the kind by measuring candidates, each lowered by these passes. The same for every
    target: what differs (kinds it stores, chunking) is checked and decided from `needs`."""
    return [
        # Appends and reads of the cache around every attention layer; attention now reads keys through the
        # cache at every step (SPEC §3 invariance). RoPE tables are re-indexed by position_ids.
        INSERT_KV_CACHE,
        # The storage kinds made explicit (quantize on write, dequantize on read), so dumps show them ...
        INSERT_KV_DEQUANT,
        # ... and then folded into the attention and append ops as attributes, which is what kernels implement.
        FUSE_CACHED_ATTENTION,
        DCE,
    ]


def entry_pipeline_for(needs: TargetNeeds) -> list[Pass]:
    """Per entry graph (prefill: seq symbolic; decode: seq = 1; ctx.options["entry"]): how work is chunked (the
    policy is the target's: needs.chunking)."""
    return [CHOOSE_CHUNKING]
