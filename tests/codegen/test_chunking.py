"""choose_chunking for target cuda: the cost model's decisions, measured decisions persisted per device (atomic,
other entries kept, a corrupt file set aside), and the pass writing them into the decode entry."""
from __future__ import annotations

import json
import math

import pytest

from caramba.codegen.triton.chunking import (ChunkKey, Chunking, ChunkingPlan, bucket, cost_model, even_split,
                                             heads_per_program, smooth_floor)

H100_SMS = 132


def key(batch=1, length=4096, dims=(32, 64, 64), kinds=("fp16",) * 3, kv_heads=32, heads=32) -> ChunkKey:
    return ChunkKey.of(batch, length, dims, kinds, kv_heads, heads)


def test_length_buckets_are_powers_of_two():
    assert [bucket(n) for n in (1, 2, 3, 4096, 4097, 131072)] == [1, 2, 4, 4096, 8192, 131072]
    assert key(length=3000) == key(length=4096)  # one decision for the whole bucket


def test_the_cost_model_fills_the_gpu_and_never_cuts_partitions_too_short():
    one = cost_model(key(batch=1, length=131072, kinds=("nf4",) * 3), H100_SMS)
    assert one.partitions * 32 >= 2 * H100_SMS  # B·H_kv·P programs: at least two waves
    assert cost_model(key(batch=32, length=131072, kinds=("nf4",) * 3), H100_SMS).partitions == 1  # 1024 programs
    # the wide path (H == H_kv, q8_0 / q4_0 / float kinds) covers HP kv heads a program: B·H_kv/HP·P programs
    hp = heads_per_program(key(kinds=("q4_0",) * 3))
    assert hp > 1 and heads_per_program(key(kinds=("nf4",) * 3)) == 1
    wide = cost_model(key(batch=32, length=131072, kinds=("q4_0",) * 3), H100_SMS)
    assert wide.partitions * 32 * 32 // hp >= 2 * H100_SMS
    nf4 = ("nf4",) * 3  # the general path
    short = cost_model(key(batch=1, length=512, kinds=nf4), H100_SMS)
    assert short.partitions == 2  # 512 keys: no partition under 256
    assert cost_model(key(length=1), H100_SMS).partitions == 1
    assert cost_model(key(dims=(128, 128, 128)), H100_SMS).block_n == 64
    assert cost_model(key(dims=(256, 256, 256)), H100_SMS).block_n == 32


@pytest.mark.parametrize("tiles", [1, 2, 7, 47, 64, 100, 512, 2048])
@pytest.mark.parametrize("partitions", [1, 2, 3, 9, 16, 66, 128])
def test_even_split_keeps_the_split_and_drops_only_empty_partitions(tiles, partitions):
    """The kernel's span is ceil(tiles / P) whole tiles; even_split gives the partitions that hold any: the same span
    (the work per partition does not change), none of them empty."""
    got = even_split(tiles, partitions)
    span = math.ceil(tiles / partitions)
    assert got <= partitions and math.ceil(tiles / got) == span
    assert (got - 1) * span < tiles <= got * span


def test_the_general_path_launches_no_always_empty_partition():
    """B=1, 32 kv heads, 4k keys of nf4 (the general path): 2 waves want 9 partitions of 64-key tiles, the ninth
    empty: 8. The wide path (q8_0, fp16: tiles of a few keys) keeps the model's count, rounded down to a power of
    two or 3 x one for q8_0 / q4_0 (12 waves of 4 head groups: B=8 wants 50 -> 48, B=32 13 -> 12, B=1 at 32k keys
    396 -> the cap, 192; measured best on the H100), to a power of two for float kinds."""
    assert cost_model(key(kinds=("nf4",) * 3), H100_SMS).partitions == 8
    assert cost_model(key(kinds=("q8_0",) * 3), H100_SMS).partitions == 128  # 4k keys: 32 a partition at least
    assert cost_model(key(batch=8, length=32768, kinds=("q4_0",) * 3), H100_SMS).partitions == 48
    assert cost_model(key(batch=32, length=32768, kinds=("q8_0",) * 3), H100_SMS).partitions == 12
    assert cost_model(key(batch=1, length=32768, kinds=("q4_0",) * 3), H100_SMS).partitions == 192
    assert cost_model(key(batch=8, length=32768), H100_SMS).partitions == 32  # fp16: 8 waves want 33


@pytest.mark.parametrize("n,want", [(1, 1), (2, 2), (3, 3), (5, 4), (7, 6), (11, 8), (13, 12), (47, 32), (50, 48),
                                    (96, 96), (191, 128), (192, 192), (400, 384)])
def test_smooth_floor_is_the_largest_power_of_two_or_three_times_one_not_above(n, want):
    assert smooth_floor(n) == want


def test_the_wide_path_splits_short_caches_finely_enough_to_fill_the_gpu():
    """Measured on an H100: at B=1 T=4k, 4 programs of 8 heads need 128 partitions of 32 keys (0.022 ms against
    0.052 at 16); its floor is 32 keys a partition, its ceiling 192 partitions."""
    hp = heads_per_program(key(kinds=("q8_0",) * 3))
    for batch, length in ((1, 4096), (8, 4096), (32, 4096), (1, 1024), (1, 131072)):
        p = cost_model(key(batch=batch, length=length, kinds=("q8_0",) * 3), H100_SMS).partitions
        assert length // p >= 32 and p <= 192
        assert smooth_floor(p) == p  # rounded down: at least two thirds of the 12 waves the model wants
        assert p == 192 or length // p == 32 or batch * 32 // hp * p * 3 >= 2 * 12 * H100_SMS
    assert cost_model(key(batch=1, length=1024, kinds=("q8_0",) * 3), H100_SMS).partitions == 32
    # float caches (longer rows): partitions of 16 keys and up to 256 (fp16 B=1 T=128k: 0.46 against 0.51 ms)
    assert cost_model(key(batch=1, length=4096), H100_SMS).partitions == 256
    assert cost_model(key(batch=1, length=131072), H100_SMS).partitions == 256
    assert cost_model(key(batch=8, length=32768), H100_SMS).partitions == 32


def test_measured_decisions_are_kept_per_device_and_reloaded(tmp_path):
    path = tmp_path / "chunking.json"
    h100 = ChunkingPlan("cuda H100 sm_90", H100_SMS, cost_model, path)
    times = {1: 3.0, 2: 1.0, 4: 2.0}
    best = h100.tune(key(), lambda c: times.get(c.partitions, 9.0),
                     [Chunking(p, 64) for p in (1, 2, 4)])
    assert (best.partitions, best.source, best.ms) == (2, "measured", 1.0)
    other = ChunkingPlan("cuda H200 sm_90", H100_SMS, cost_model, path)
    other.tune(key(batch=8), lambda c: 1.0, [Chunking(1, 32)])
    again = ChunkingPlan("cuda H100 sm_90", H100_SMS, cost_model, path)  # a new process: read from the file
    assert again.choose(key()) == best
    assert again.choose(key(batch=8)) == cost_model(key(batch=8), H100_SMS)  # measured on the H200 only
    data = json.loads(path.read_text())
    assert set(data["devices"]) == {"cuda H100 sm_90", "cuda H200 sm_90"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left behind


def test_a_corrupt_plan_is_set_aside_not_overwritten(tmp_path, caplog):
    path = tmp_path / "chunking.json"
    path.write_text("{not json")
    plan = ChunkingPlan("cpu", 4, cost_model, path)
    assert plan.choose(key()) == cost_model(key(), 4)  # unreadable: the cost model, with a warning
    plan.tune(key(), lambda c: 1.0, [Chunking(3, 32)])
    aside = [p for p in tmp_path.iterdir() if ".corrupt-" in p.name]
    assert len(aside) == 1 and aside[0].read_text() == "{not json"
    assert ChunkingPlan("cpu", 4, cost_model, path).choose(key()).partitions == 3


def test_choose_chunking_gives_the_cuda_decode_entry_the_plan_and_prefill_one_partition(monkeypatch, tmp_path):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("CARAMBA_CACHE_DIR", str(tmp_path))
    import torch

    import caramba
    from caramba.models import Transformer, preset
    from caramba.compiler import lower
    from caramba.runtime.executor import CacheConfig

    torch.manual_seed(0)
    cm = caramba.compile(Transformer(preset("tiny", attention="decoupled", n_layers=1)).eval(), target="cuda")
    program = lower(cm, CacheConfig.of(cm.cache_layout, "q8_0", max_seq_len=512))
    decode = [n for n in program.decode.nodes if n.op.startswith("cached_")]
    prefill = [n for n in program.prefill.nodes if n.op.startswith("cached_")]
    assert decode and prefill
    node = decode[0]
    dims = (node.inputs[0].type.shape[3], node.inputs[1].type.shape[3], node.attrs["v_head_dim"])
    want = cost_model(ChunkKey.of(1, 512, dims, node.attrs["kinds"], node.attrs["kv_heads"],
                                  node.inputs[0].type.shape[1]), 4).partitions
    assert want > 1 and all(n.attrs["partitions"] == want for n in decode)
    assert all(n.attrs.get("partitions", 1) == 1 for n in prefill)


def test_the_executor_takes_the_decision_for_its_batch_unless_partitions_were_forced(monkeypatch, tmp_path):
    import torch

    from caramba.codegen.triton import kernels
    monkeypatch.setenv("CARAMBA_CACHE_DIR", str(tmp_path))
    q = [torch.zeros(16, 4, 32)]
    attrs = {"v_head_dim": 32, "kinds": ["q8_0", "q8_0"], "kv_heads": 2}
    one = cost_model(ChunkKey.of(1, 4096, (32, 32), ("q8_0",) * 2, 2, 4), 4)
    sixteen = cost_model(ChunkKey.of(16, 4096, (32, 32), ("q8_0",) * 2, 2, 4), 4)
    assert one.partitions != sixteen.partitions  # the test can tell them apart
    assert kernels.decode_chunking(q, {**attrs, "partitions": one.partitions}, 4096) == sixteen
    forced = kernels.decode_chunking(q, {**attrs, "partitions": 7}, 4096)
    assert forced.partitions == 7
