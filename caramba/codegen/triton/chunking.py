"""How target "cuda" splits decode attention (SPEC §7): split-K partitions and the key block, per
(batch, length bucket, dims, kinds), from a cost model or from measurement, persisted per device.

Cost model. Decode attention is memory-bound: each (row, kv head) reads its T keys and values once. One program
per (row, HP kv heads, partition) streams T / P keys (HP: several adjacent heads on attention.py's wide path, else
1); the GPU is busy when there are at least `waves` programs per SM, so P = ceil(waves · SMs / (B · H_kv / HP)),
but no partition shorter than `min_keys` (a partition's fixed cost, the combine step's reads and the
online-softmax epilogue, must stay small next to its stream), and at most `max_partitions` (the combine reads P
partial rows). On the general path (HP = 1) P then drops the partitions that whole key blocks leave empty at the
bucket's length (even_split: B=1, 32 kv heads, 4k keys: 9 -> 8, as 64 tiles in spans of 8 leave the ninth
empty); the wide path's tiles are a few keys, so it keeps the count, rounded down to a power of two (float
caches) or to a power of two or 3 x one (smooth_floor; q8_0 / q4_0). The wide path's constants for q8_0 / q4_0
(12 waves, partitions of at least 32 keys and at most 192) come from sweeps on an H100 (DBA 32/64/64 and
16/32/64, 32 heads, benchmarks/attention_variants.py --knobs P=0.5,P=1.5,P=2, 2026-12-06) after the keys' integer
dot products (attention.py, _idot) changed the kernels' registers: B=8 T=32k 48 partitions against 32 / 64,
q8_0 0.500 against 0.584 / 0.515 ms, q4_0 0.348 against 0.363 / 0.373; B=32 12 against 8 / 16, q8_0 1.98 against
2.32 / 2.03, q4_0 1.31 against 1.40 / 1.41; B=1 192 against 128 / 256, q4_0 0.058 against 0.065 / 0.063 ms (the
earlier sweep, 2026-11-22: B=1 T=4k ran 0.052 ms at 16 partitions and 0.022 ms at 128). Float caches: 8 waves,
16 to 256 keys, powers of two: fp16 on the wide path at B=1, 256 partitions against 128: T=128k 0.46 against
0.51 ms, T=32k 0.13 against 0.14, T=4k 0.029 against 0.032. The key block is 64
keys for cache rows up to 256 bytes per head and 32 above (registers). Length buckets are powers of two (4k covers 2049..4096), so a
decision holds for every length in its bucket; the decode CUDA graph is captured with the decision for
max_seq_len's bucket and each partition takes its share of the row's current length in the kernel, so no recapture
is needed as T grows.

Measured: the shared ChunkingPlan (codegen/chunking.py) keeps decisions timed on a device in its file and asks
this cost model for the rest.
"""
from __future__ import annotations

import functools
import math

from caramba.codegen.chunking import (ChunkKey, Chunking, ChunkingPlan, bucket, default_path, even_split,
                                      smooth_floor)

__all__ = ["ChunkKey", "Chunking", "ChunkingPlan", "FLOAT_KINDS", "bucket", "cost_model", "device_plan",
           "even_split", "heads_per_program", "smooth_floor"]


def cost_model(key: ChunkKey, sm_count: int, *, waves: int = 2, min_keys: int = 256,
               max_partitions: int = 64, wide_waves: int = 12, wide_min_keys: int = 32,
               wide_max_partitions: int = 192) -> Chunking:
    bytes_per_key = max(key.head_dims) * 2
    block_n = 64 if bytes_per_key <= 256 else 32
    hp = heads_per_program(key)
    programs = key.batch * max(1, key.kv_heads // hp)
    floats = all(k in FLOAT_KINDS for k in key.kinds)
    if hp > 1:  # the wide path's programs are small (3-6 an SM): several waves of them balance better
        waves, min_keys, max_partitions = wide_waves, wide_min_keys, wide_max_partitions
        if floats:  # float rows are longer: 8 waves of shorter partitions, up to 256
            waves, min_keys, max_partitions = 8, min_keys // 2, 256
    want = math.ceil(waves * sm_count / programs)
    longest = max(1, key.length_bucket // min_keys)
    partitions = max(1, min(want, longest, max_partitions))
    if hp == 1:  # the general path's partitions are whole tiles of block_n keys: drop those left empty
        partitions = even_split(math.ceil(key.length_bucket / block_n), partitions)
    elif floats:  # powers of two
        partitions = 1 << (partitions.bit_length() - 1)
    else:  # powers of two or 3 x a power of two (48 and 12 beat 32, 64 and 8, 16 on the H100)
        partitions = smooth_floor(partitions)
    return Chunking(partitions, block_n)


FLOAT_KINDS = ("fp16", "bf16", "fp32")


def heads_per_program(key: ChunkKey) -> int:
    """kv heads one decode program covers: the wide path (one query head per kv head, q8_0 / q4_0 / float kinds)
    takes several adjacent heads per program (attention.decode_heads_per_program), the general path one."""
    try:
        from caramba.codegen.triton.attention import decode_heads_per_program
    except ImportError:  # torch missing: the general path's count
        return 1
    return decode_heads_per_program(key.head_dims, key.kinds, key.kv_heads, key.heads)


def device_plan(device) -> ChunkingPlan:
    """The plan of a torch device: its name and SM count (CPU under TRITON_INTERPRET: 'cpu', 4 'SMs'); one per
    device and plan file in a process, so decisions are read from the file once."""
    import torch

    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _device_plan(str(device), str(default_path()))


@functools.lru_cache(maxsize=None)
def _device_plan(device: str, path: str) -> ChunkingPlan:
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return ChunkingPlan(f"cuda {props.name} sm_{props.major}{props.minor}", props.multi_processor_count,
                            cost_model, path)
    return ChunkingPlan("cpu (triton interpreter)", 4, cost_model, path)
