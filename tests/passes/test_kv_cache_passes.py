"""The KV-cache passes: every stage runs in the interpreter, prefill + decode equals one token at a time for
every kind, split-K is exact, dumps show the explicit quantize/dequantize stage, and what cannot be cached says so."""
from __future__ import annotations

import pytest
import torch

import caramba
from caramba.errors import CarambaError
from caramba.ir.interpreter import Interpreter
from caramba.ir.parser import parse_graph
from caramba.models import Transformer, preset
from caramba.passes.base import PassContext
from caramba.passes.insert_kv_cache import insert_kv_cache
from caramba.compiler import lower
from caramba.runtime.executor import CacheConfig, build_executor, vocab_size_of
from caramba.runtime.kernel_executor import InterpreterExecutor
from caramba.ir.quant import KIND_NAMES
from tests.helpers import hf_model

MAX = 40


@pytest.fixture(scope="module", params=["standard", "gqa", "decoupled"])
def compiled(request):
    torch.manual_seed(0)
    extra = {"gate": "dynamic", "learned_temp": True} if request.param == "decoupled" else {}
    model = Transformer(preset("tiny", attention=request.param, n_layers=2, **extra)).eval()
    return model, caramba.compile(model, target="eager")


def _positions(starts, width):
    return torch.tensor(starts)[:, None] + torch.arange(width)


def _run_chunks(ex, ids, chunks):
    """Feed ids (B, T) in the given chunk sizes; logits (B, T, V)."""
    cache, out, t = ex.new_cache(ids.shape[0]), [], 0
    for n in chunks:
        out.append(ex.forward(ids[:, t:t + n], _positions(cache.lengths(0), n), cache))
        t += n
    return torch.cat(out, dim=1), cache


# Tolerances: float kinds round k/v once when stored; a 1e-7 difference between a 10-token and a 1-token matmul
# can move a stored value by one ulp of the kind (fp16: 1e-3 relative, bf16: 8e-3), which moves logits by ~1e-5.
TOL = {"fp32": 1e-5, "fp16": 1e-3, "bf16": 1e-2, "q8_0": 1e-3, "q4_0": 1e-3, "nf4": 1e-3}


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_prefill_then_decode_equals_one_token_at_a_time(compiled, kind):
    """SPEC §3: attention reads keys through the cache's kind at prefill as at decode."""
    model, cm = compiled
    ex = cm.executor(CacheConfig.of(cm.cache_layout, kind, max_seq_len=MAX))
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(1))
    one, c1 = _run_chunks(ex, ids, [1] * 11)
    mixed, c2 = _run_chunks(ex, ids, [7, 1, 3])
    assert (mixed - one).abs().max() <= TOL[kind] * one.abs().max()
    assert c1.lengths(0) == c2.lengths(0) == (11, 11)
    if kind == "fp32":  # and with an fp32 cache it is the stateless model
        assert (one - model(ids)).abs().max() <= 1e-5 * one.abs().max()
    else:  # a quantized cache changes the logits, but not by much
        assert 0 < (one - model(ids)).abs().max() <= 0.2 * one.abs().max()


@pytest.mark.parametrize("kind", ["q8_0", "q4_0", "nf4"])
def test_with_a_residual_ring_prefill_equals_one_token_at_a_time(compiled, kind):
    """Each query of a multi-token step reads exactly the fp16 window it would read decoding alone, so chunking
    does not change the logits with a ring either, and the ring does change them (it is read)."""
    model, cm = compiled
    ex = cm.executor(CacheConfig.of(cm.cache_layout, kind, max_seq_len=MAX, residual_len=3))
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(1))
    one, _ = _run_chunks(ex, ids, [1] * 11)
    for chunks in ([7, 1, 3], [11], [2, 5, 4]):
        mixed, _ = _run_chunks(ex, ids, chunks)
        assert (mixed - one).abs().max() <= 1e-3 * one.abs().max(), chunks
    plain, _ = _run_chunks(cm.executor(CacheConfig.of(cm.cache_layout, kind, max_seq_len=MAX)), ids, [1] * 11)
    exact, _ = _run_chunks(cm.executor(CacheConfig.of(cm.cache_layout, "fp32", max_seq_len=MAX)), ids, [1] * 11)
    assert (one - exact).abs().max() < (plain - exact).abs().max()  # the ring's fp16 window is closer to exact


@pytest.mark.parametrize("slack", [0, 4])
def test_a_rolled_back_step_leaves_the_ring_as_decoding_would(compiled, slack):
    """Verify-style steps (several tokens, then a rollback) followed by decoding give the logits of plain
    one-token decoding: the ring is rebuilt from before the step, and slack slots cover rollbacks over steps."""
    _, cm = compiled
    ex = cm.executor(CacheConfig.of(cm.cache_layout, "q4_0", max_seq_len=MAX, residual_len=3))
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(5))
    want, _ = _run_chunks(ex, ids, [1] * 12)
    cache, got = ex.new_cache(1, ring_slack=slack), []
    junk = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(6))
    t = 0
    for n, extra in ((4, 3), (3, 5), (2, 0)):
        step = torch.cat([ids[:, t:t + n], junk[:, :extra]], dim=1)  # n real tokens, then drafts to reject
        got.append(ex.forward(step, _positions(cache.lengths(0), n + extra), cache)[:, :n])
        cache.rollback(extra)
        t += n
    if slack:  # single steps, then a rollback over three of them
        for extra in range(3):
            ex.forward(junk[:, extra:extra + 1], _positions(cache.lengths(0), 1), cache)
        cache.rollback(3)
    for i in range(t, 12):
        got.append(ex.forward(ids[:, i:i + 1], _positions(cache.lengths(0), 1), cache))
    got = torch.cat(got, dim=1)
    assert (got - want).abs().max() <= 1e-3 * want.abs().max()


def test_mixed_kinds_per_tensor(compiled):
    _, cm = compiled
    names = cm.cache_layout.names
    kinds = dict(zip(names, ["q8_0", "q4_0", "nf4"]))
    ex = cm.executor(CacheConfig.of(cm.cache_layout, kinds, max_seq_len=MAX))
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(2))
    one, cache = _run_chunks(ex, ids, [1] * 9)
    mixed, _ = _run_chunks(ex, ids, [5, 4])
    assert (mixed - one).abs().max() <= 1e-3 * one.abs().max()
    assert {n: str(k) for n, k in cache.kinds.items()} == kinds
    appends = [n for n in ex.program.decode.nodes if n.op == "kv_append"]
    assert appends and all(n.attrs["kinds"] == [kinds[x] for x in n.attrs["names"]] for n in appends)


@pytest.mark.parametrize("partitions", [2, 3, 7])
def test_split_k_is_exact(compiled, partitions):
    """SPEC §7: any partition count gives the same result up to rounding (odd counts, more parts than keys)."""
    _, cm = compiled
    config = CacheConfig.of(cm.cache_layout, "q8_0", max_seq_len=MAX)
    plain, split = cm.executor(config), cm.executor(config, partitions=partitions)
    assert all(n.attrs["partitions"] == partitions for n in split.program.decode.nodes if n.op.startswith("cached_"))
    ids = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(3))
    a, _ = _run_chunks(plain, ids, [3, 1, 1, 1])
    b, _ = _run_chunks(split, ids, [3, 1, 1, 1])
    assert (a - b).abs().max() <= 1e-5 * a.abs().max()


@pytest.mark.parametrize("disable", [(), ("fuse_cached_attention",), ("insert_kv_dequant",),
                                     ("insert_kv_dequant", "fuse_cached_attention")])
@pytest.mark.parametrize("kind", ["fp16", "q4_0"])
def test_every_stage_runs_in_the_interpreter(compiled, disable, kind):
    """Stage 1 (implicit kinds), stage 2 (explicit quantize/dequantize) and the folded stage agree exactly."""
    model, _ = compiled
    cm = caramba.compile(model, target="eager", disable_passes=list(disable))
    ex = cm.executor(CacheConfig.of(cm.cache_layout, kind, max_seq_len=MAX, residual_len=2 if kind == "q4_0" else 0))
    ops = ex.program.prefill.op_counts()
    folded = "fuse_cached_attention" not in disable
    assert ("cached_attention" in ops or "cached_decoupled_attention" in ops) == folded
    explicit = "insert_kv_dequant" not in disable and not folded
    assert ("kv_store" in ops) == explicit and ("kv_read" in ops) == ("insert_kv_dequant" in disable and not folded)
    if explicit and kind == "q4_0":
        assert {"kv_quantize", "kv_load_codes", "kv_dequantize", "kv_ring_merge"} <= set(ops)
    ref = caramba.compile(model, target="eager").executor(
        CacheConfig.of(cm.cache_layout, kind, max_seq_len=MAX, residual_len=2 if kind == "q4_0" else 0))
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(4))
    a, _ = _run_chunks(ex, ids, [4, 1, 2])
    b, _ = _run_chunks(ref, ids, [4, 1, 2])
    assert torch.equal(a, b)


def test_cached_graphs_print_parse_and_verify(compiled):
    _, cm = compiled
    ex = cm.executor(CacheConfig.of(cm.cache_layout, "q8_0", max_seq_len=MAX))
    for g in (ex.program.prefill, ex.program.decode):
        again = parse_graph(str(g))
        again.weights.update(g.weights)
        assert str(again) == str(g)
    assert "seq" not in ex.program.decode.symbols and "past" in ex.program.decode.symbols
    assert [v.name for v in ex.program.prefill.inputs] == ["input_ids", "position_ids"]


def test_stateful_op_without_a_cache_says_what_to_do(compiled):
    _, cm = compiled
    ex = cm.executor(CacheConfig.of(cm.cache_layout, "fp16", max_seq_len=MAX))
    ids = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(CarambaError, match="no cache was given"):
        Interpreter(ex.program.prefill).run(ids, _positions([0], 3), symbols={"past": 0})


def test_cache_of_other_kinds_is_refused(compiled):
    _, cm = compiled
    ex8 = cm.executor(CacheConfig.of(cm.cache_layout, "q8_0", max_seq_len=MAX))
    ex4 = cm.executor(CacheConfig.of(cm.cache_layout, "q4_0", max_seq_len=MAX))
    with pytest.raises(caramba.InputError, match="not made for this executor"):
        ex8.forward(torch.zeros(1, 2, dtype=torch.long), _positions([0], 2), ex4.new_cache(1))
    raw = InterpreterExecutor(ex8.program, vocab_size_of(cm.graph))
    with pytest.raises(CarambaError, match="compiled for cache kinds"):
        raw._forward(torch.zeros(1, 2, dtype=torch.long), _positions([0], 2), ex4.new_cache(1))


def test_positions_must_start_at_each_rows_length(compiled):
    _, cm = compiled
    ex = cm.executor(CacheConfig.of(cm.cache_layout, "fp16", max_seq_len=MAX))
    cache = ex.new_cache(2)
    with pytest.raises(caramba.InputError, match="start at its cached length"):
        ex.forward(torch.zeros(2, 2, dtype=torch.long), _positions([0, 1], 2), cache)
    with pytest.raises(caramba.InputError, match="do not fit"):
        ex.forward(torch.zeros(2, MAX + 1, dtype=torch.long), _positions([0, 0], MAX + 1), cache)
    assert cache.lengths(0) == (0, 0)


def test_rope_tables_are_gathered_at_positions(compiled):
    _, cm = compiled
    ctx = PassContext(options={"max_seq_len": MAX})
    g = insert_kv_cache(cm.graph.copy(), ctx)
    assert ctx.counts["tables"] == 2 and ctx.counts["attention"] == 2
    assert g.op_counts().get("embedding", 0) == 3  # token embedding + cos + sin


def test_table_shorter_than_the_cache_is_refused():
    torch.manual_seed(0)
    cm = caramba.compile(Transformer(preset("tiny", n_layers=1)).eval(), target="eager", max_seq_len=32)
    with pytest.raises(CarambaError, match="compile with max_seq_len >= 64"):
        lower(cm, CacheConfig.of(cm.cache_layout, "fp16", max_seq_len=64))


def test_a_sliding_window_moves_into_the_cached_mask():
    """Mistral's window (4 keys) is the fused op's attribute; lowering puts it in the position mask and the cached
    op, whose reference then sees only the last 4 keys: prefill + decode logits equal the uncached model's."""
    model = hf_model("mistral", sliding_window=4)
    cm = caramba.compile(model, target="eager")
    program = lower(cm, CacheConfig.of(cm.cache_layout, "fp32", max_seq_len=64))
    cached = [n for n in program.decode.nodes if n.op == "cached_attention"]
    assert cached and all(n.attrs["window"] == 4 for n in cached)
    ids = torch.randint(0, 90, (1, 10), generator=torch.Generator().manual_seed(2))
    ex = cm.executor(CacheConfig.of(cm.cache_layout, "fp32", max_seq_len=64))
    cache = ex.new_cache(1)
    got = torch.cat([ex.forward(ids[:, :7], torch.arange(7)[None], cache)] +
                    [ex.forward(ids[:, t:t + 1], torch.tensor([[t]]), cache) for t in range(7, 10)], dim=1)
    with torch.no_grad():
        want = model(ids).logits
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def test_dumps_show_each_cache_pass(tmp_path, compiled):
    model, _ = compiled
    cm = caramba.compile(model, target="eager", dump_dir=str(tmp_path))
    cm.executor(CacheConfig.of(cm.cache_layout, "q8_0", max_seq_len=MAX))
    kv = tmp_path / "kv-q8_0"
    texts = {p.name: p.read_text() for p in kv.rglob("ir.txt")} if kv.exists() else {}
    dumped = "\n".join(p.read_text() for p in kv.rglob("*.txt"))
    assert "kv_quantize" in dumped and "kv_dequantize" in dumped and "cached_" in dumped, sorted(texts)
    assert (kv / "decode").is_dir()
