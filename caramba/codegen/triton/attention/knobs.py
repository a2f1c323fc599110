"""AttentionKnobs: the source, tile and launch choices of the attention kernels, one frozen value per call.

decode_attention / prefill_attention take knobs=None (AttentionKnobs(), the defaults below: the variants measured
best) or an AttentionKnobs. The knobs are part of the kernel's specialisation (common._Spec), so different knobs
render and cache different kernels side by side and nothing module-level changes. benchmarks/attention_variants.py
times variants by passing them (--knobs); the measurements behind each default are in benchmarks/NOTES_attention.md.
Every choice computes the same function (tests/codegen/test_triton_attention.py runs the variants); they differ in
speed only.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AttentionKnobs:
    """Source, tile and launch choices of the attention kernels (see the module docstring); fields by path."""

    # -- the general decode path (decode.py), blocked heads ---------------------------------------------------
    interleave_v: bool = True
    """4-bit v: even and odd features put back in order in registers (tl.interleave), one dot of qblock features
    per block; off: two dots of qblock / 2 features each."""
    prefetch: bool = True
    """Each blocked tensor's scales carried one tile ahead in registers (outside the ring band; 2-byte loads take no
    async copy, so the pipeliner leaves them in the loop); off: loaded in the tile that uses them."""

    # -- both decode paths ----------------------------------------------------------------------------------------
    fused_combine: bool = False
    """P > 1: the last program of each (row, head group) merges the partitions in the partial kernel's launch
    (combine.py); off: a second launch, decode_combine. Off by default: no faster for fp16 and 3-14% slower on the
    wide path on an H100."""

    # -- the wide decode path (wide.py) ---------------------------------------------------------------------------
    wide: bool = True
    """Take the wide path where the shapes allow it (one query head per kv head, no ring, power-of-two heads of
    q8_0 / q4_0 / float kinds); off: always the general path."""
    wide_float: bool = True
    """Also when every tensor is a float kind (with chunking.py's partitions, faster or equal on an H100)."""
    wide_heads: int = 8
    """Most kv heads a program covers (HP: the largest power of two <= this that divides H_kv)."""
    wide_bytes: int = 32
    """Code bytes a thread loads per tile; R (keys a stream holds per tile) follows from it: small tiles keep
    registers low, so more programs fit an SM."""
    wide_magic: bool = True
    """Codes to fp32 through their bits (int8 c: 3 + c/128, nibble n: 2 + n/8) with the offset taken out per block;
    off: conversion instructions."""
    wide_prefetch: bool = True
    """The next tile's loads issued before this tile's math."""
    wide_words: bool = True
    """q4_0 segments of whole 32-bit words read as int32 (nibble j of a word is feature 8·word + j: one shift and
    one mask each); needs wide_magic, and the launch falls back to bytes for buffers not 4-byte aligned."""
    wide_lazy: float = 0.0
    """> 0: rescale the accumulators only when some stream's max grew by more than this (log2 units); 0: every
    tile (the lazy variant costs a cross-warp max per tile, measured offline as no gain)."""
    wide_idot: bool = True
    """q4_0 keys: scores as integer dot products (dp4a.py) against q rounded to 16-bit integers per segment (fp16 /
    bf16 queries; fp32 queries keep the exact float products)."""
    wide_idot8: bool = True
    """The same for q8_0 keys."""
    wide_maxnreg4: int = 128
    """Register cap (Triton's maxnreg) of wide launches reading q4_0, for launches of >= 32 (row, head group)
    pairs (wide._register_cap); 0: none."""
    wide_maxnreg8: int = 0
    """The same for launches reading q8_0 and no q4_0; 0: none."""

    # -- launch ---------------------------------------------------------------------------------------------------
    num_warps: int | None = None
    """Warps of the attention kernel; None: the tuned value (decode: per class of the heaviest cached tensor,
    launch._DECODE_TUNING; prefill: 4)."""
    num_stages: int | None = None
    """Pipeline stages of the attention kernel; None: the tuned value (3; 2 when nf4 is read)."""
