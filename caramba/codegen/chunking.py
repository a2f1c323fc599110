"""How decode attention is split over the keys (SPEC §7), for any backend: the key a decision depends on, the
decision, and the per-device plan that keeps measured decisions on disk and asks the backend's cost model for the
rest.

`ChunkingPlan.tune(key, measure)` times candidate (partitions, block) pairs with a caller's function, keeps the
fastest, and saves it. The file (JSON, flags.cache_dir() / chunking.json) maps device -> key -> decision; saves are
atomic (temp file + rename, the user's umask) and keep every other entry; a symlink under the cache directory
that leads out of it is refused. A corrupt file is moved aside to <name>.corrupt-<timestamp>,
never overwritten. Length buckets are powers of two (4k covers 2049..4096), so a decision holds for every length
in its bucket.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

from caramba import flags
from caramba.fsutil import atomic_write_text, safe_cache_path

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


CostModel = Callable[[ChunkKey, int], Chunking]  # (key, SM count) -> decision


def bucket(length: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, length))))


def smooth_floor(n: int) -> int:
    """The largest 2^k or 3·2^k that is <= n (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, ...)."""
    p = 1 << (max(1, n).bit_length() - 1)
    return p * 3 // 2 if p >= 2 and p * 3 // 2 <= n else p


def even_split(tiles: int, partitions: int) -> int:
    """The partitions that hold keys when `tiles` tiles split into `partitions` spans of whole tiles (the kernel's
    ceil(tiles / P) a span): 64 tiles in 9 partitions fill 8 spans of 8 and leave the ninth empty, so 8. An empty
    partition still launches its programs (queries, an empty stream, a partial row, the combine's counter) and is
    one more row for the combine to read."""
    return math.ceil(tiles / math.ceil(tiles / partitions))


class ChunkingPlan:
    """Decisions per device, from the file when measured there, else from the backend's cost model."""

    def __init__(self, device: str, sm_count: int, model: CostModel,
                 path: str | os.PathLike[str] | None = None) -> None:
        self.device, self.sm_count, self.model = device, sm_count, model
        self.path = Path(path) if path is not None else default_path()
        self._memo: dict[ChunkKey, Chunking] = {}

    def choose(self, key: ChunkKey) -> Chunking:
        found = self._memo.get(key)
        if found is None:
            found = self._load().get(key.text()) or self.model(key, self.sm_count)
            self._memo[key] = found
        return found

    def entry_partitions(self, node, max_seq_len: int) -> int:
        """The split-K partitions of one cached attention node of a decode entry graph: this plan's choice for
        batch 1 at max_seq_len's bucket (backends' TargetNeeds.chunking; the executor refines it per batch)."""
        q = node.inputs[0].type.shape
        dims = [v.type.shape[3] for v in node.inputs[:2 if node.op == "cached_decoupled_attention" else 1]]
        dims.append(node.attrs["v_head_dim"])
        return self.choose(ChunkKey.of(1, max_seq_len, dims, node.attrs["kinds"], node.attrs["kv_heads"],
                                       q[1])).partitions

    def step_choice(self, q, attrs, max_seq_len: int) -> Chunking:
        """The decision for one decode step's batch (q: the query terms, (B, H, d_i) tensors; attrs: the cached
        op's) at max_seq_len's bucket; a partitions attribute other than the batch-1 choice was forced
        (ctx.options["partitions"]) and is kept with this batch's block."""
        dims = [x.shape[-1] for x in q] + [attrs["v_head_dim"]]
        shape = dict(length=max_seq_len, head_dims=dims, kinds=attrs["kinds"], kv_heads=attrs["kv_heads"],
                     heads=q[0].shape[1])
        choice = self.choose(ChunkKey.of(q[0].shape[0], **shape))
        if attrs["partitions"] != self.choose(ChunkKey.of(1, **shape)).partitions:
            return Chunking(attrs["partitions"], choice.block_n)
        return choice

    def tune(self, key: ChunkKey, measure: Callable[[Chunking], float],
             candidates: Iterable[Chunking] | None = None) -> Chunking:
        """Time each candidate with `measure` (milliseconds), keep and save the fastest."""
        if candidates is None:
            base = self.model(key, self.sm_count)
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
        _check_cache_path(self.path)
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


def _check_cache_path(path: Path) -> None:
    """A plan file under the cache directory is never written through a symlink leading out of it
    (fsutil.UnsafeCachePathError); a path the caller chose elsewhere is the caller's to trust."""
    root = Path(os.path.abspath(flags.cache_dir()))
    target = Path(os.path.abspath(path))
    if target.is_relative_to(root):
        safe_cache_path(root, target)


def default_path() -> Path:
    return flags.cache_dir() / "chunking.json"
