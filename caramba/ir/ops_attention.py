"""Fused attention ops produced by fuse_attention and fuse_decoupled_attention.

Both ops share one contract, which every kernel (prefill, and later the KV-cache variants) implements:

- Layout: q (B, H, Tq, d); keys and values (B, Hkv, Tk, ·) with Hkv dividing H. Grouped-query attention is native:
  query head h reads kv head h // (H / Hkv); k and v are never repeated to H heads.
- causal: key j is visible to query i iff j <= i + (Tk - Tq), i.e. the query block sits at the *end* of the key
  sequence (bottom-right aligned). For Tq == Tk this is SDPA's is_causal; for one decode step it sees every key.
- window (0: none): with causal, a sliding window of that many keys: key j is visible to query i iff
  i + (Tk - Tq) - window < j <= i + (Tk - Tq) (Mistral's, Gemma 2's local layers).
- softcap (0: none): the scores are soft-capped, cap * tanh(scores / cap), after the scale and before any masking
  (Gemma 2's attn_logit_softcapping).
- mask (optional, SDPA's convention): bool, True = may attend; or float, added to the scores. It broadcasts to
  (B, H, Tq, Tk) and is combined with `causal`. It carries what is not plain causal or a window (padding).
- Numerics: scores, softmax and the weighted sum in fp32 (fp64 stays fp64), the result rounded once to q's dtype.
  A query row that sees no key at all yields zeros (as torch's SDPA does), not NaN.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch

from caramba.ir import symbolic
from caramba.ir.registry import REQUIRED, register_op
from caramba.ir.shape_rules import ShapeError, broadcast
from caramba.ir.types import DType, TensorType

Types = Sequence[TensorType]
Attrs = Mapping[str, Any]


# ---------------------------------------------------------------------------------------------------------------
# Shape rules
# ---------------------------------------------------------------------------------------------------------------
def _check_pair(q: TensorType, k: TensorType, what: str) -> None:
    """q (B, H, Tq, d) against k (B, Hkv, Tk, d): same batch and head dim, Hkv divides H."""
    if q.rank != 4 or k.rank != 4:
        raise ShapeError(f"{what}: q and k must be 4-D (B, heads, T, d), got {q} and {k}")
    if not symbolic.equal(q.shape[0], k.shape[0]):
        raise ShapeError(f"{what}: batch differs: {q} vs {k}")
    if not symbolic.equal(q.shape[3], k.shape[3]):
        raise ShapeError(f"{what}: q and k head dims differ: {q} vs {k}")
    h, hkv = q.shape[1], k.shape[1]
    if not (isinstance(h, int) and isinstance(hkv, int) and hkv > 0 and h % hkv == 0):
        raise ShapeError(f"{what}: kv heads ({hkv}) must be a static divisor of the query heads ({h})")


def _check_value(k: TensorType, v: TensorType, what: str) -> None:
    if v.rank != 4 or not all(symbolic.equal(a, b) for a, b in zip(k.shape[:3], v.shape[:3])):
        raise ShapeError(f"{what}: v must be (B, Hkv, Tk, dv) like k's first three dims, got k {k}, v {v}")


def _check_dtypes(types: Types, what: str) -> None:
    dtype = types[0].dtype
    if not dtype.is_float or any(t.dtype != dtype for t in types):
        raise ShapeError(f"{what}: q, k and v must share one float dtype, got {', '.join(str(t) for t in types)}")


def _check_mask(mask: TensorType, scores: tuple, what: str) -> None:
    """The mask is bool or float and broadcasts to the scores' shape (B, H, Tq, Tk) without widening it."""
    if mask.dtype != DType.bool and not mask.dtype.is_float:
        raise ShapeError(f"{what}: mask must be bool or float, got {mask}")
    if mask.rank > 4:
        raise ShapeError(f"{what}: mask {mask} has more dims than the scores {list(scores)}")
    out = broadcast(mask.shape, scores)
    if not all(symbolic.equal(a, b) for a, b in zip(out, scores)):
        raise ShapeError(f"{what}: mask {mask} does not broadcast to the scores {list(scores)}")


def _check_variants(a: Attrs, what: str) -> None:
    window, softcap = a.get("window", 0), a.get("softcap", 0.0)
    if not isinstance(window, int) or window < 0 or (window and not a.get("causal")):
        raise ShapeError(f"{what}: window must be an int >= 0, and a window needs causal=True, got {window!r}")
    if not isinstance(softcap, (int, float)) or softcap < 0:
        raise ShapeError(f"{what}: softcap must be a float >= 0 (0: none), got {softcap!r}")


def _attention_infer(t: Types, a: Attrs) -> list[TensorType]:
    _check_variants(a, "attention")
    q, k, v = t[:3]
    _check_pair(q, k, "attention")
    _check_value(k, v, "attention")
    _check_dtypes([q, k, v], "attention")
    if len(t) == 4:
        _check_mask(t[3], (q.shape[0], q.shape[1], q.shape[2], k.shape[2]), "attention")
    return [TensorType((q.shape[0], q.shape[1], q.shape[2], v.shape[3]), q.dtype)]


def _decoupled_infer(t: Types, a: Attrs) -> list[TensorType]:
    _check_variants(a, "decoupled_attention")
    q_sem, k_sem, q_geo, k_geo, v = t[:5]
    _check_pair(q_sem, k_sem, "decoupled_attention (semantic)")
    _check_pair(q_geo, k_geo, "decoupled_attention (geometric)")
    if not all(symbolic.equal(x, y) for x, y in zip(q_sem.shape[:3], q_geo.shape[:3])):
        raise ShapeError(f"decoupled_attention: q_sem {q_sem} and q_geo {q_geo} differ in (B, H, Tq)")
    _check_value(k_sem, k_geo, "decoupled_attention (k_geo against k_sem)")
    _check_value(k_sem, v, "decoupled_attention")
    _check_dtypes([q_sem, k_sem, q_geo, k_geo, v], "decoupled_attention")
    if len(t) == 6:
        _check_mask(t[5], (q_sem.shape[0], q_sem.shape[1], q_sem.shape[2], k_sem.shape[2]), "decoupled_attention")
    return [TensorType((q_sem.shape[0], q_sem.shape[1], q_sem.shape[2], v.shape[3]), q_sem.dtype)]


# ---------------------------------------------------------------------------------------------------------------
# Reference implementations
# ---------------------------------------------------------------------------------------------------------------
def _acc(x: torch.Tensor) -> torch.Tensor:
    """x in the accumulation dtype: fp32, or fp64 for fp64 inputs."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _grouped(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, Hkv, T, d) -> (B, H, T, d): query head h reads kv head h // (H / Hkv)."""
    return x.repeat_interleave(heads // x.shape[1], dim=1)


def _scores(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """(q·kᵀ)·scale in fp32: (B, H, Tq, Tk)."""
    return (_acc(q) @ _acc(_grouped(k, q.shape[1])).transpose(-2, -1)) * scale


def softcapped(scores: torch.Tensor, softcap: float) -> torch.Tensor:
    """cap * tanh(scores / cap), or the scores as they are for cap 0."""
    return scores if not softcap else torch.tanh(scores / softcap) * softcap


def _attend(scores: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool,
            out_dtype: torch.dtype, softcap: float = 0.0, window: int = 0) -> torch.Tensor:
    """softmax(mask(softcap(scores)))·v, rows that see no key give zeros; scores (B, H, Tq, Tk) fp32 ->
    (B, H, Tq, dv)."""
    scores = softcapped(scores, softcap)
    if window:
        tq, tk = scores.shape[-2:]
        old = torch.ones(tq, tk, dtype=torch.bool, device=scores.device).tril(tk - tq - window)
        scores = scores.masked_fill(old, -math.inf)
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else scores + mask.to(scores.dtype)
    if causal:
        tq, tk = scores.shape[-2:]
        future = torch.ones(tq, tk, dtype=torch.bool, device=scores.device).triu(tk - tq + 1)
        scores = scores.masked_fill(future, -math.inf)
    probs = torch.softmax(scores, dim=-1)
    blind = scores.amax(dim=-1, keepdim=True) == -math.inf  # (B, H, Tq, 1): no visible key
    probs = probs.masked_fill(blind, 0.0)
    return (probs @ _acc(_grouped(v, scores.shape[1]))).to(out_dtype)


ATTENTION_ATTRS = {"softcap": 0.0, "window": 0}


@register_op("attention", ["q", "k", "v", "mask?"], _attention_infer,
             attrs={"scale": REQUIRED, "causal": REQUIRED, **ATTENTION_ATTRS}, tags=["attention"])
def _attention(q, k, v, mask=None, *, scale, causal, softcap=0.0, window=0):
    """softmax(q·kᵀ·scale [+ mask] [causal]) · v with native GQA.

    q (B, H, Tq, d), k (B, Hkv, Tk, d), v (B, Hkv, Tk, dv), Hkv | H; query head h reads kv head h // (H/Hkv).
    scale: float multiplying q·kᵀ. causal: key j visible to query i iff j <= i + Tk - Tq (bottom-right aligned).
    mask (optional): bool (True = may attend) or float (added), broadcast to (B, H, Tq, Tk).
    softcap, window: see the module doc. fp32 scores/softmax/accumulation; result (B, H, Tq, dv) in q's dtype; a
    row with no visible key is zeros.
    """
    return _attend(_scores(q, k, scale), v, mask, causal, q.dtype, softcap, window)


@register_op("decoupled_attention", ["q_sem", "k_sem", "q_geo", "k_geo", "v", "mask?"], _decoupled_infer,
             attrs={"scale_sem": REQUIRED, "scale_geo": REQUIRED, "causal": REQUIRED, **ATTENTION_ATTRS},
             tags=["attention"])
def _decoupled_attention(q_sem, k_sem, q_geo, k_geo, v, mask=None, *, scale_sem, scale_geo, causal, softcap=0.0,
                         window=0):
    """Decoupled bottleneck attention (SPEC §1 steps 5-6): one softmax over two summed score terms.

    S = (q_sem·k_semᵀ)·scale_sem + (q_geo·k_geoᵀ)·scale_geo, then `attention`'s masking, softmax and ·v.
    q_sem (B, H, Tq, d_s), k_sem (B, Hkv, Tk, d_s), q_geo (B, H, Tq, d_g), k_geo (B, Hkv, Tk, d_g),
    v (B, Hkv, Tk, d_v); GQA native (query head h reads kv head h // (H/Hkv)); RoPE is already applied to the
    geometric pair. The per-head gate and learned temperature (SPEC §1 steps 3-4) are not part of the op: the
    queries arrive already multiplied by them, which is what the model computes and costs one elementwise pass
    over q, never over the keys, so the KV cache stores the plain k_sem, k_geo and v.
    """
    scores = _scores(q_sem, k_sem, scale_sem) + _scores(q_geo, k_geo, scale_geo)
    return _attend(scores, v, mask, causal, q_sem.dtype, softcap, window)
