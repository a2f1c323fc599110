"""The stateful KV-cache ops, one node each, run by the interpreter against a real KVCache (the `state` they read
and write), compared with plain torch written here. tests/ir/test_ops.py covers the stateless ones."""
from __future__ import annotations

import math

import pytest
import torch

from caramba.ir import DType, Graph, Interpreter, TensorType, get_op, symbolic, verify
from caramba.runtime.kv_cache import CacheSpec, KVCache
from caramba.ir.quant import quantize

STATEFUL_OPS_COVERED = {"kv_append", "kv_read", "kv_store", "kv_load", "kv_load_codes", "kv_ring_merge", "kv_window_mask",
                        "cached_attention", "cached_decoupled_attention"}
B, SEQ = symbolic.symbol("batch"), symbolic.symbol("seq")
_gen = torch.Generator().manual_seed(7)


def randn(*shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=_gen)


def one_node(op: str, inputs: list[TensorType], attrs: dict) -> Interpreter:
    g = Graph(op)
    g.add_symbol("batch", 1, 8)
    g.add_symbol("seq", 1, 16)
    g.add_symbol("past", 0, 16)
    values = [g.add_input(f"x{i}", t) for i, t in enumerate(inputs)]
    opdef = get_op(op)
    g.outputs = list(g.add_node(op, values, opdef.infer(inputs, opdef.full_attrs(attrs)), attrs).outputs)
    verify(g)
    return Interpreter(g, check_types=True)


def cache(kinds: dict[str, str], features: dict[str, int], residual_len: int = 0, batch: int = 2) -> KVCache:
    return KVCache(CacheSpec.build(1, batch, 16, {n: (features[n], kinds[n]) for n in kinds},
                                   residual_len=residual_len))


POS = TensorType((B, SEQ), DType.i64)
READY = TensorType((B,), DType.i64)
CTX = symbolic.canonical(symbolic.symbol("past") + SEQ)


def positions(starts: list[int], n: int) -> torch.Tensor:
    return torch.tensor(starts)[:, None] + torch.arange(n)


def test_kv_append_writes_each_row_at_its_positions():
    c = cache({"k": "fp32", "v": "fp32"}, {"k": 6, "v": 4})
    c.append(0, {"k": randn(2, 1, 6), "v": randn(2, 1, 4)}, start=[0, 0])
    c.truncate_rows([1, 0])  # ragged: row 0 holds one token, row 1 none
    k, v = randn(2, 3, 6), randn(2, 3, 4)
    run = one_node("kv_append", [POS, TensorType((B, SEQ, 6), DType.f32), TensorType((B, SEQ, 4), DType.f32)],
                   {"layer": 0, "names": ["k", "v"]})
    lengths, = run.run(positions([1, 0], 3), k, v, state=c)
    assert lengths.tolist() == [4, 3]
    got = c.read(0)
    assert torch.equal(got["k"][0, 1:4], k[0]) and torch.equal(got["k"][1, :3], k[1])
    assert torch.equal(got["v"][1, 3], torch.zeros(4))  # past row 1's length: zero
    with pytest.raises(Exception, match="contiguous"):
        run.run(torch.tensor([[4, 6, 7], [3, 4, 5]]), k, v, state=c)


@pytest.mark.parametrize("kind", ["fp16", "q8_0"])
def test_kv_read_decodes_through_the_kind(kind):
    c = cache({"k": kind, "v": kind}, {"k": 40, "v": 40})
    k = randn(2, 5, 40)
    c.append(0, {"k": k, "v": k}, start=0)
    c.truncate_rows([5, 3])
    run = one_node("kv_read", [READY], {"layer": 0, "tensor": "k", "features": 40, "dtype": DType.f32, "ctx": CTX})
    x, = run.run(torch.tensor([5, 3]), state=c, symbols={"past": 4, "seq": 1})
    step = 2 ** -10 if kind == "fp16" else k.abs().max() / 127
    assert (x[0] - k[0]).abs().max() <= step and (x[1, :3] - k[1, :3]).abs().max() <= step
    assert torch.equal(x[1, 3:], torch.zeros(2, 40))


def test_kv_store_and_kv_load_codes_hold_exactly_the_given_codes():
    c = cache({"k": "q8_0", "v": "fp16"}, {"k": 40, "v": 8})
    k, v = randn(2, 3, 40), randn(2, 3, 8)
    q = quantize(k, "q8_0", 32)
    store = one_node("kv_store", [POS, TensorType((B, SEQ, 64), DType.i8), TensorType((B, SEQ, 2), DType.f16),
                                  TensorType((B, SEQ, 8), DType.f16)],
                     {"layer": 0, "names": ["k", "v"], "kinds": ["q8_0", "fp16"], "qblock": 32, "residual_len": 0})
    lengths, = store.run(positions([0, 0], 3), q.codes, q.scales, v.half(), state=c)
    assert lengths.tolist() == [3, 3]
    load = one_node("kv_load_codes", [READY], {"layer": 0, "tensor": "k", "kind": "q8_0", "features": 40,
                                               "qblock": 32, "ctx": CTX})
    codes, scales = load.run(lengths, state=c, symbols={"past": 2, "seq": 1})
    assert torch.equal(codes, q.codes) and torch.equal(scales, q.scales)
    raw = one_node("kv_load", [READY], {"layer": 0, "tensor": "v", "kind": "fp16", "features": 8, "ctx": CTX})
    stored, = raw.run(lengths, state=c, symbols={"past": 2, "seq": 1})
    assert stored.dtype == torch.float16 and torch.equal(stored, v.half())
    with pytest.raises(Exception, match="compiled for cache kinds"):
        wrong = one_node("kv_load", [READY], {"layer": 0, "tensor": "v", "kind": "bf16", "features": 8, "ctx": CTX})
        wrong.run(lengths, state=c, symbols={"past": 2, "seq": 1})


def test_kv_ring_merge_gives_the_window_of_the_step_exact():
    c = cache({"k": "q4_0", "v": "q4_0"}, {"k": 32, "v": 32}, residual_len=2, batch=1)
    k = randn(1, 6, 32)
    run = one_node("kv_ring_merge", [TensorType((B, CTX, 32), DType.f32), READY], {"layer": 0, "tensor": "k"})
    c.append(0, {"k": k[:, :5], "v": k[:, :5]}, start=0)
    placeholder = torch.full((1, 5, 32), 7.0)
    merged, = run.run(placeholder, torch.tensor([5]), state=c, symbols={"past": 0, "seq": 5})
    assert torch.equal(merged[0], k[0, :5].half().float())  # a step's own tokens are all exact for it
    c.append(0, {"k": k[:, 5:], "v": k[:, 5:]})
    placeholder = torch.full((1, 6, 32), 7.0)
    merged, = run.run(placeholder, torch.tensor([6]), state=c, symbols={"past": 5, "seq": 1})
    assert torch.equal(merged[0, :3], placeholder[0, :3])  # older positions: what the caller decoded
    # the ring before the step (positions 3, 4) and the step's token (5): exact fp16
    assert torch.equal(merged[0, 3:], k[0, 3:].half().float())


def test_kv_read_views_and_the_window_mask():
    """view "stored" ignores the ring, "exact" takes the step's window from it; the mask shows each key once."""
    c = cache({"k": "q4_0", "v": "fp16"}, {"k": 32, "v": 8}, residual_len=3, batch=2)
    k, v = randn(2, 6, 32), randn(2, 6, 8)
    c.append(0, {"k": k[:, :4], "v": v[:, :4]}, start=0)
    c.truncate_rows([4, 2])
    c.append(0, {"k": k[:, 4:], "v": v[:, 4:]})  # row 0 at positions 4, 5; row 1 at 2, 3
    ready, symbols = torch.tensor([6, 4]), {"past": 4, "seq": 2}
    read = {"layer": 0, "tensor": "k", "features": 32, "dtype": DType.f32, "ctx": CTX}
    stored, = one_node("kv_read", [READY], read).run(ready, state=c, symbols=symbols)
    exact, = one_node("kv_read", [READY], {**read, "view": "exact"}).run(ready, state=c, symbols=symbols)
    q4 = quantize(k, "q4_0")
    from caramba.ir.quant import dequantize
    decoded = dequantize(q4, torch.float32)
    assert torch.equal(stored[0], decoded[0]) and torch.equal(stored[1, :2], decoded[1, :2])
    assert torch.equal(exact[0, 1:], k[0, 1:].half().float())  # ring before the step: 1, 2, 3; the step: 4, 5
    assert torch.equal(exact[0, :1], decoded[0, :1])
    # row 1: truncating right after the 4-token append rebuilt its ring as if only 0, 1 had come
    assert torch.equal(exact[1, :2], k[1, :2].half().float()) and torch.equal(exact[1, 2:4], k[1, 4:].half().float())
    pos = torch.tensor([[4, 5], [2, 3]])
    mask, = one_node("kv_window_mask", [POS, READY], {"layer": 0, "ctx": CTX}).run(pos, ready, state=c,
                                                                                    symbols=symbols)
    assert mask.shape == (2, 1, 2, 12)
    keys = torch.arange(6)
    for b in range(2):
        for i, p in enumerate(pos[b].tolist()):
            window = (keys <= p) & (keys > p - 3) & (keys >= 1 - b)  # row 0's ring started at 1, row 1's at 0
            assert torch.equal(mask[b, 0, i, 6:], window)
            assert torch.equal(mask[b, 0, i, :6], (keys <= p) & ~window)


def reference_attention(terms: list[tuple[torch.Tensor, torch.Tensor, float]], v: torch.Tensor,
                        pos: torch.Tensor) -> torch.Tensor:
    """float64: the sum of q·kᵀ·scale over the score terms, key j visible to the query at position p iff j <= p,
    GQA by repeating kv heads. Each term: q (B, H, S, ·), k (B, Hkv, T, ·); v (B, Hkv, T, dv)."""
    h = terms[0][0].shape[1]
    scores = sum((q.double() @ k.double().repeat_interleave(h // k.shape[1], 1).transpose(-1, -2)) * s
                 for q, k, s in terms)
    visible = torch.arange(scores.shape[-1])[None, None, None, :] <= pos[:, None, :, None]
    probs = scores.masked_fill(~visible, -math.inf).softmax(-1)
    return probs @ v.double().repeat_interleave(h // v.shape[1], 1)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, t, f = x.shape
    return x.reshape(b, t, heads, f // heads).transpose(1, 2)


@pytest.mark.parametrize("partitions", [1, 3])
def test_cached_attention_against_float64(partitions):
    c = cache({"k": "fp32", "v": "fp32"}, {"k": 2 * 8, "v": 2 * 6})
    k, v = randn(2, 7, 16), randn(2, 7, 12)
    c.append(0, {"k": k, "v": v}, start=0)
    c.truncate_rows([7, 5])
    q, pos = randn(2, 4, 2, 8), torch.tensor([[5, 6], [3, 4]])
    run = one_node("cached_attention", [TensorType((B, 4, SEQ, 8), DType.f32), POS, READY],
                   {"scale": 0.3, "layer": 0, "names": ["k", "v"], "kinds": ["fp32", "fp32"], "qblock": 32,
                    "residual_len": 0, "kv_heads": 2, "v_head_dim": 6, "partitions": partitions})
    out, = run.run(q, pos, torch.tensor([7, 5]), state=c, symbols={"past": 5})
    want = reference_attention([(q, _heads(k, 2), 0.3)], _heads(v, 2), pos)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)


def test_cached_decoupled_attention_against_float64():
    c = cache({"k_sem": "fp32", "k_geo": "fp32", "v": "fp32"}, {"k_sem": 4, "k_geo": 8, "v": 6}, batch=1)
    ks, kg, v = randn(1, 6, 4), randn(1, 6, 8), randn(1, 6, 6)
    c.append(0, {"k_sem": ks, "k_geo": kg, "v": v}, start=0)
    qs, qg, pos = randn(1, 3, 1, 4), randn(1, 3, 1, 8), torch.tensor([[5]])
    run = one_node("cached_decoupled_attention",
                   [TensorType((B, 3, SEQ, 4), DType.f32), TensorType((B, 3, SEQ, 8), DType.f32), POS, READY],
                   {"scale_sem": 0.5, "scale_geo": 0.35, "layer": 0, "names": ["k_sem", "k_geo", "v"],
                    "kinds": ["fp32"] * 3, "qblock": 32, "residual_len": 0, "kv_heads": 1, "v_head_dim": 6})
    out, = run.run(qs, qg, pos, torch.tensor([6]), state=c, symbols={"past": 5})
    want = reference_attention([(qs, _heads(ks, 1), 0.5), (qg, _heads(kg, 1), 0.35)], _heads(v, 1), pos)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)


def window_reference(kind: str, k: torch.Tensor, v: torch.Tensor, q: torch.Tensor, residual: int,
                     scale: float) -> torch.Tensor:
    """float64 attention of q at positions 0..S-1 over k, v (B, S, F), one head: the query at p reads key j
    exact (fp16) iff p - R < j <= p, through the kind otherwise (a cache filled from empty, no rollback)."""
    from caramba.ir.quant import dequantize

    s = k.shape[1]
    kq, vq = (dequantize(quantize(x, kind), torch.float64) for x in (k, v))
    kx, vx = k.half().double(), v.half().double()
    out = []
    for p in range(s):
        exact = (torch.arange(p + 1) > p - residual)[None, :, None]
        kk, vv = torch.where(exact, kx[:, :p + 1], kq[:, :p + 1]), torch.where(exact, vx[:, :p + 1], vq[:, :p + 1])
        w = ((q[:, 0, p:p + 1].double() @ kk.transpose(1, 2)) * scale).softmax(-1)
        out.append(w @ vv)
    return torch.cat(out, 1)[:, None]


@pytest.mark.parametrize("partitions", [1, 2])
def test_cached_attention_with_a_ring_prefill_equals_one_token_at_a_time(partitions):
    """SPEC §3 invariance with an fp16 residual ring: a step of 7 tokens gives what 7 steps of one do, both
    equal to the per-query window reference."""
    kind, residual, s = "q4_0", 3, 7
    k, v, q = randn(1, s, 32), randn(1, s, 32), randn(1, 1, s, 32)
    attrs = {"scale": 0.2, "layer": 0, "names": ["k", "v"], "kinds": [kind, kind], "qblock": 32,
             "residual_len": residual, "kv_heads": 1, "v_head_dim": 32, "partitions": partitions}
    run = one_node("cached_attention", [TensorType((B, 1, SEQ, 32), DType.f32), POS, READY], attrs)
    whole = cache({"k": kind, "v": kind}, {"k": 32, "v": 32}, residual_len=residual, batch=1)
    whole.append(0, {"k": k, "v": v}, start=0)
    at_once, = run.run(q, torch.arange(s)[None], torch.tensor([s]), state=whole, symbols={"past": 0})
    single = cache({"k": kind, "v": kind}, {"k": 32, "v": 32}, residual_len=residual, batch=1)
    steps = []
    for p in range(s):
        single.append(0, {"k": k[:, p:p + 1], "v": v[:, p:p + 1]})
        o, = run.run(q[:, :, p:p + 1], torch.tensor([[p]]), torch.tensor([p + 1]), state=single,
                     symbols={"past": p})
        steps.append(o)
    want = window_reference(kind, k, v, q, residual, 0.2)
    torch.testing.assert_close(at_once.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat(steps, 2).double(), want, rtol=1e-5, atol=1e-5)
