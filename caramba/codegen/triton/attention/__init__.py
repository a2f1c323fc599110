"""Triton attention over the quantized KV cache: decode (flash-decoding split-K) and prefill (flash, causal).

The kernels read the cache buffers in place (runtime/kv_cache.py, layouts in ir/quant.py; CacheView from
ir/cache_format.py, handed out by KVCache.view) and dequantize each tile in registers; nothing is decoded to a full
tensor first. Semantics: ops_cache.cached_attention and cached_decoupled_attention (SPEC §1, §3, §7): scores =
Σ_i (q_i·k_i)·scale_i over one term (MHA/GQA) or two (DBA: k_sem and k_geo, each with its own head dim and scale),
key j visible to the query at position p iff j <= p, softmax in fp32, times v (its own head dim). Query head h
reads kv head h // (H / H_kv). Cache values are rounded to q's dtype before the products, as the reference reads
the cache in q's dtype.

Public API (launch.py; all tensors on one device; q's dtype, fp16 / bf16 / fp32, is the compute and output dtype):

    decode_attention(q, k, v, lengths, *, scales, kv_heads, window=None, residual_len=0, partitions=1,
                     out=None, workspace=None, block_n=None, knobs=None) -> (B, H, d_v)
    prefill_attention(q, k, v, starts, *, scales, kv_heads, exact=None, window=None, residual_len=0,
                      out=None, block_m=64, block_n=64, knobs=None) -> (B, H, S, d_v)
    decode_workspace(batch, heads, partitions, v_head_dim, device): split-K's fp32 partials
    decode_heads_per_program(head_dims, kinds, kv_heads, heads): kv heads a decode program covers (chunking.py)
    AttentionKnobs: the kernels' source, tile and launch choices (knobs=None: the defaults)
    AttentionLaunchError: arguments a kernel cannot take, raised before any launch

Modules, by kernel family:

    common.py   the specialisation (_Tensor, _Spec), the rendered header, per-tensor dequantizing loaders
    decode.py   decode, general path: grid (B, H_kv, P), a program = one kv head's query group, tl.dot per tile;
                blocked reads for heads of whole qblocks; GQA, rings, nf4 and any head dim
    wide.py     decode, wide path: H == H_kv, no ring, power-of-two heads of q8_0 / q4_0 / float kinds; a program
                = HP adjacent kv heads, L streams x R keys a tile, no tl.dot, codes decoded through their bits
    dp4a.py     the wide path's integer key products (dp4a against q in 16-bit integers)
    combine.py  split-K's combine: decode_combine (a second launch) or the fused merge (an atomic counter)
    prefill.py  prefill: grid (query tiles, B, H), causal, the ring's window per query
    launch.py   argument checks, the spec and kernel cache, the launch functions
    knobs.py    AttentionKnobs

Limits: one query per row at decode (speculative verification goes through prefill); head dims up to 256 per
tile (any size, masked to the next power of two >= 16); the last dim of every buffer contiguous; feature offsets
within a row must fit in int32 (row and batch offsets are int64). The first call of a specialisation compiles the
kernel and puts the NF4 table on the device: make it before capturing a CUDA graph (replays then only read
lengths / window from their tensors). triton itself is imported only at launch (source.py).

Measurements, history and the reasons behind each default: benchmarks/NOTES_attention.md (and RESULTS.md).
"""
from __future__ import annotations

from .common import AttentionLaunchError
from .knobs import AttentionKnobs
from .launch import decode_attention, decode_workspace, prefill_attention
from .wide import decode_heads_per_program

__all__ = ["AttentionKnobs", "AttentionLaunchError", "decode_attention", "decode_heads_per_program",
           "decode_workspace", "prefill_attention"]
