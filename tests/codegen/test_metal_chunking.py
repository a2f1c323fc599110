"""Target "metal"'s chunking policy (codegen/metal/chunking.py): split-K partitions and simdgroups per threadgroup
from the shapes and the GPU family, and the per-device plan the backend and its kernels ask."""
from __future__ import annotations

import torch

from caramba.codegen.chunking import ChunkKey, Chunking
from caramba.codegen.metal import chunking as C


def key(batch=1, length=4096, kv_heads=8, heads=32, dims=(128, 128), kinds=("q8_0", "q8_0")):
    return ChunkKey.of(batch, length, dims, kinds, kv_heads, heads)


def test_more_cores_or_fewer_rows_split_the_keys_further():
    small, big = C.gpu_cores("Apple M2"), C.gpu_cores("Apple M2 Max")
    assert (small, big) == (10, 38)
    assert C.cost_model(key(), big).partitions > C.cost_model(key(), small).partitions
    assert C.cost_model(key(batch=1), big).partitions > C.cost_model(key(batch=16), big).partitions
    assert C.cost_model(key(batch=64), big).partitions == 1  # enough threadgroups without a split


def test_partitions_keep_a_minimum_span_and_a_cap():
    for length in (1, 100, 255, 256, 700, 4096, 131072):
        for cores in (4, 10, 80):
            choice = C.cost_model(key(length=length), cores)
            bucket = key(length=length).length_bucket
            assert 1 <= choice.partitions <= 32
            assert choice.partitions == 1 or bucket // choice.partitions >= 256
            assert choice.block_n in (1, 2, 4, 8)  # simdgroups a threadgroup


def test_long_partitions_get_more_simdgroups():
    short = C.cost_model(key(length=256, batch=64), 10)
    long = C.cost_model(key(length=65536, batch=64), 10)
    assert short.block_n < long.block_n == 8


def test_chip_names_map_to_their_family():
    assert C.gpu_cores("Apple M3 Pro") == 18
    assert C.gpu_cores("Apple M1") == 8
    assert C.gpu_cores("Apple M4 Max") == 40
    assert C.gpu_cores("Intel(R) Core(TM) i9") == C.DEFAULT_CORES
    assert C.gpu_cores("") == C.DEFAULT_CORES


def test_the_emulator_has_its_own_plan_and_measured_decisions_win(tmp_path, monkeypatch):
    monkeypatch.setenv("CARAMBA_CACHE_DIR", str(tmp_path))
    C._device_plan.cache_clear()
    try:
        plan = C.device_plan(torch.device("cpu"))
        assert plan.device == "cpu (metal emulator)" and plan.sm_count == C.EMULATOR_CORES
        k = key()
        assert plan.choose(k) == C.cost_model(k, C.EMULATOR_CORES)
        best = plan.tune(k, lambda c: {1: 3.0, 2: 1.0}.get(c.partitions, 2.0),
                         [Chunking(1, 4), Chunking(2, 4), Chunking(4, 2)])
        assert (best.partitions, best.block_n, best.source) == (2, 4, "measured")
        C._device_plan.cache_clear()
        assert C.device_plan(torch.device("cpu")).choose(k).partitions == 2  # read back from the file
    finally:
        C._device_plan.cache_clear()
