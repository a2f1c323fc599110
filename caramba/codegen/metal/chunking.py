"""How target "metal" splits decode attention: split-K partitions and the threadgroup size, from the shapes and
the GPU family (a cost model), or from what benchmarks/metal_check.py measured on this Mac (the shared
ChunkingPlan's file, codegen/chunking.py).

Cost model. Decode attention is memory-bound: each (row, kv head) reads its n keys and values once, one threadgroup
per (row, kv head, partition). An Apple GPU core keeps several threadgroups resident; the GPU is busy when there
are about `waves` threadgroups per core, so P = ceil(waves · cores / (B · H_kv)), but no partition shorter than
`min_keys` keys (each partition pays its queries' loads, the reduction over simdgroups and a row of the combine)
and at most `max_partitions`. Within a partition the NSG simdgroups take keys in turn: NSG = keys per partition /
`keys_per_simdgroup`, a power of two from 1 to 8 (a short partition with 8 simdgroups leaves most idle at the
reduction). The decision's block_n is NSG (keys a threadgroup reads per step). Length buckets are powers of two,
so one decision holds for every length in a bucket, and each partition takes its share of the row's current length
in the kernel.

GPU family: the GPU's core count (torch.backends.mps.get_core_count()), else the chip's family from `sysctl
machdep.cpu.brand_string` ("Apple M2 Max" -> 38 cores, the largest configuration of each chip); an unknown chip
counts 10 cores; the emulator 4.
"""
from __future__ import annotations

import functools
import math
import platform
import subprocess

from caramba.codegen.chunking import ChunkKey, Chunking, ChunkingPlan, default_path

# GPU cores of each Apple silicon chip's largest configuration
GPU_CORES = {
    "M1": 8, "M1 Pro": 16, "M1 Max": 32, "M1 Ultra": 64,
    "M2": 10, "M2 Pro": 19, "M2 Max": 38, "M2 Ultra": 76,
    "M3": 10, "M3 Pro": 18, "M3 Max": 40, "M3 Ultra": 80,
    "M4": 10, "M4 Pro": 20, "M4 Max": 40,
}
DEFAULT_CORES = 10
EMULATOR_CORES = 4


def cost_model(key: ChunkKey, cores: int, *, waves: int = 4, min_keys: int = 256, max_partitions: int = 32,
               keys_per_simdgroup: int = 64) -> Chunking:
    programs = key.batch * key.kv_heads
    want = math.ceil(waves * cores / programs)
    partitions = max(1, min(want, key.length_bucket // min_keys, max_partitions))
    per_partition = math.ceil(key.length_bucket / partitions)
    simdgroups = 1
    while simdgroups < 8 and per_partition >= 2 * simdgroups * keys_per_simdgroup:
        simdgroups *= 2
    return Chunking(partitions, simdgroups)


def chip_name() -> str:
    """"Apple M2 Max" and the like on a Mac, "" elsewhere or when sysctl cannot say."""
    if platform.system() != "Darwin":
        return ""
    try:
        return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                              timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def core_count() -> int | None:
    """The GPU's own core count where torch can read it (binned chips have fewer than their family's largest)."""
    import torch

    try:
        return int(torch.backends.mps.get_core_count())
    except (AttributeError, RuntimeError):
        return None


def gpu_cores(chip: str) -> int:
    """The GPU cores of `chip` ("Apple M3 Pro" -> 18): the longest family name it holds, else DEFAULT_CORES."""
    name = chip.removeprefix("Apple ").strip()
    found = [family for family in GPU_CORES if name == family or name.startswith(family + " ")]
    return GPU_CORES[max(found, key=len)] if found else DEFAULT_CORES


def device_plan(device) -> ChunkingPlan:
    """The chunking plan of a torch device: "mps <chip>" on a Mac, "cpu (metal emulator)" elsewhere; one per
    device and plan file in a process."""
    import torch

    return _device_plan(torch.device(device).type, str(default_path()))


@functools.lru_cache(maxsize=None)
def _device_plan(device_type: str, path: str) -> ChunkingPlan:
    if device_type == "mps":
        chip = chip_name() or "Apple GPU"
        return ChunkingPlan(f"mps {chip}", core_count() or gpu_cores(chip), cost_model, path)
    return ChunkingPlan("cpu (metal emulator)", EMULATOR_CORES, cost_model, path)
