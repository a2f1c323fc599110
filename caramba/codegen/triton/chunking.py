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

Measured. `ChunkingPlan.tune(key, measure)` times candidate (partitions, block) pairs with a caller's function,
keeps the fastest, and saves it. The file (JSON, default $CARAMBA_CACHE_DIR/chunking.json, else
~/.cache/caramba/chunking.json) maps device -> key -> decision; saves are atomic (temp file + rename) and keep
every other entry. A corrupt file is moved aside to <name>.corrupt-<timestamp>, never overwritten.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

from caramba.fsutil import atomic_write_text

log = logging.getLogger("caramba")
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ChunkKey:
    """What a chunking decision depends on."""

    batch: int
    length_bucket: int  # a power of two >= the longest row
    head_dims: tuple[int, ...]  # per cached tensor: (d) for k and v, (d_sem, d_geo, d_v) for DBA
    kinds: tuple[str, ...]
    kv_heads: int
    heads: int

    @classmethod
    def of(cls, batch: int, length: int, head_dims: Iterable[int], kinds: Iterable[str], kv_heads: int,
           heads: int) -> ChunkKey:
        return cls(batch, bucket(length), tuple(head_dims), tuple(kinds), kv_heads, heads)

    def text(self) -> str:
        return (f"B{self.batch}/T{self.length_bucket}/d{'-'.join(map(str, self.head_dims))}/"
                f"{'-'.join(self.kinds)}/h{self.heads}x{self.kv_heads}")


@dataclass(frozen=True)
class Chunking:
    partitions: int
    block_n: int
    source: str = "model"  # "model" | "measured"
    ms: float | None = None


def bucket(length: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, length))))


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


def smooth_floor(n: int) -> int:
    """The largest 2^k or 3·2^k that is <= n (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, ...)."""
    p = 1 << (max(1, n).bit_length() - 1)
    return p * 3 // 2 if p >= 2 and p * 3 // 2 <= n else p


FLOAT_KINDS = ("fp16", "bf16", "fp32")


def even_split(tiles: int, partitions: int) -> int:
    """The partitions that hold keys when `tiles` tiles split into `partitions` spans of whole tiles (the kernel's
    ceil(tiles / P) a span): 64 tiles in 9 partitions fill 8 spans of 8 and leave the ninth empty, so 8. An empty
    partition still launches its programs (queries, an empty stream, a partial row, the combine's counter) and is
    one more row for the combine to read."""
    return math.ceil(tiles / math.ceil(tiles / partitions))


def heads_per_program(key: ChunkKey) -> int:
    """kv heads one decode program covers: the wide path (one query head per kv head, q8_0 / q4_0 / float kinds)
    takes several adjacent heads per program (attention.decode_heads_per_program), the general path one."""
    try:
        from caramba.codegen.triton.attention import decode_heads_per_program
    except ImportError:  # torch missing: the general path's count
        return 1
    return decode_heads_per_program(key.head_dims, key.kinds, key.kv_heads, key.heads)


class ChunkingPlan:
    """Decisions per device, from the file when measured there, else from the cost model."""

    def __init__(self, device: str, sm_count: int, path: str | os.PathLike[str] | None = None) -> None:
        self.device, self.sm_count = device, sm_count
        self.path = Path(path) if path is not None else default_path()
        self._memo: dict[ChunkKey, Chunking] = {}

    def choose(self, key: ChunkKey) -> Chunking:
        found = self._memo.get(key)
        if found is None:
            found = self._load().get(key.text()) or cost_model(key, self.sm_count)
            self._memo[key] = found
        return found

    def tune(self, key: ChunkKey, measure: Callable[[Chunking], float],
             candidates: Iterable[Chunking] | None = None) -> Chunking:
        """Time each candidate with `measure` (milliseconds), keep and save the fastest."""
        if candidates is None:
            base = cost_model(key, self.sm_count)
            parts = sorted({max(1, base.partitions // 2), base.partitions, base.partitions * 2, 1})
            candidates = [Chunking(p, b) for p in parts for b in (32, 64)]
        timed = [(measure(c), c) for c in candidates]
        ms, best = min(timed, key=lambda t: t[0])
        best = Chunking(best.partitions, best.block_n, "measured", ms)
        self._memo[key] = best
        self._save(key, best)
        return best

    # -- the file ---------------------------------------------------------------------------------------------
    def _load(self) -> dict[str, Chunking]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            entries = data["devices"].get(self.device, {}) if data.get("format_version") == FORMAT_VERSION else {}
            return {k: Chunking(int(v["partitions"]), int(v["block_n"]), str(v["source"]), v.get("ms"))
                    for k, v in entries.items()}
        except FileNotFoundError:
            return {}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            log.warning("chunking plan %s is unreadable (%s); using the cost model", self.path, e)
            return {}

    def _save(self, key: ChunkKey, choice: Chunking) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = {"format_version": FORMAT_VERSION, "devices": {}}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if data.get("format_version") != FORMAT_VERSION or not isinstance(data.get("devices"), dict):
                raise ValueError("unknown layout")
        except FileNotFoundError:
            data = {"format_version": FORMAT_VERSION, "devices": {}}
        except (ValueError, UnicodeDecodeError) as e:
            aside = self.path.with_name(f"{self.path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
            os.replace(self.path, aside)
            log.warning("chunking plan %s was corrupt (%s); moved it aside to %s", self.path, e, aside)
            data = {"format_version": FORMAT_VERSION, "devices": {}}
        data["devices"].setdefault(self.device, {})[key.text()] = asdict(choice)
        atomic_write_text(self.path, json.dumps(data, indent=1) + "\n")


def default_path() -> Path:
    root = os.environ.get("CARAMBA_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "caramba") / "chunking.json"


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
        return ChunkingPlan(f"cuda {props.name} sm_{props.major}{props.minor}", props.multi_processor_count, path)
    return ChunkingPlan("cpu (triton interpreter)", 4, path)
