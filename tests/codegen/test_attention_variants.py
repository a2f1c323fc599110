"""Attention variants on every target with the KV cache: logit soft-capping (attention and final logits) and
alternating sliding / full layers (Gemma 2), a sliding window on every layer (Mistral), a query scale other than
1/sqrt(head_dim), q/k norms (Qwen 3), partial rotary with q/k LayerNorms (StableLM) and partial rotary on Llama.
transformers decoders with random weights: every attention layer fuses, with the variant as attributes, and greedy
generation through the cache on eager, onnx, cuda (TRITON_INTERPRET=1) and metal (the emulator) equals the
model's own uncached greedy loop. The Triton kernels' soft cap and window are also checked against the Metal ones
at kernel level (split-K over a window)."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
transformers = pytest.importorskip("transformers")

import caramba  # noqa: E402

PROMPT, NEW = 9, 8
SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)


def gemma2(**over):
    cfg = dict(SMALL, head_dim=16, sliding_window=6, attn_logit_softcapping=20.0, final_logit_softcapping=30.0,
               query_pre_attn_scalar=24)
    return transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**{**cfg, **over}))


def mistral(**over):
    return transformers.MistralForCausalLM(transformers.MistralConfig(**{**SMALL, "sliding_window": 5, **over}))


def qwen3():
    return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**SMALL, head_dim=16))


def stablelm():
    return transformers.StableLmForCausalLM(transformers.StableLmConfig(**SMALL, partial_rotary_factor=0.25,
                                                                        qk_layernorm=True))


def llama_partial_rotary():
    cfg = transformers.LlamaConfig(**SMALL)
    cfg.partial_rotary_factor = 0.5
    return transformers.LlamaForCausalLM(cfg)


MODELS = {"gemma2": gemma2, "mistral": mistral, "qwen3": qwen3, "stablelm": stablelm,
          "llama_partial_rotary": llama_partial_rotary}
# the kernel targets run the two models whose variants live in their attention kernels
TARGETS = {"gemma2": ("eager", "onnx", "cuda", "metal"), "mistral": ("eager", "onnx", "cuda", "metal"),
           "qwen3": ("eager", "onnx"), "stablelm": ("eager", "onnx"), "llama_partial_rotary": ("eager", "onnx")}


def build(name, **over):
    torch.manual_seed(0)
    return (MODELS[name](**over) if over else MODELS[name]()).eval()


def greedy(model, ids):
    """The model's own greedy continuation without a cache (each step reruns the whole sequence)."""
    with torch.no_grad():
        for _ in range(NEW):
            ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
    return ids


def prompt():
    return torch.randint(0, 256, (1, PROMPT), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def metal_emulated(monkeypatch):
    monkeypatch.setenv("CARAMBA_METAL_EMULATE", "1")


@pytest.mark.parametrize("name, target", [(n, t) for n, ts in TARGETS.items() for t in ts])
def test_greedy_generation_through_the_cache_equals_the_models_own(name, target, metal_emulated):
    model = build(name)
    cm = caramba.compile(model, target=target)
    attention = [n for n in cm.graph.nodes if n.op == "attention"]
    assert len(attention) == model.config.num_hidden_layers  # every layer fused: nothing falls back
    gen = caramba.Generator(cm, caramba.GenerateConfig(temperature=0, max_new_tokens=NEW, max_seq_len=32,
                                                       cache_kind="fp32"))
    ids = prompt()
    assert torch.equal(gen.generate(ids.tolist()), greedy(model, ids))


def test_gemma2_fuses_its_soft_cap_window_and_query_scale():
    cm = caramba.compile(build("gemma2"), target="eager")
    attrs = [dict(n.attrs) for n in cm.graph.nodes if n.op == "attention"]
    assert [a.get("window", 0) for a in attrs] == [6, 0]  # alternating: sliding, then full
    assert all(a["softcap"] == 20.0 and a["scale"] == pytest.approx(24 ** -0.5) for a in attrs)
    assert cm.graph.op_counts().get("tanh") == 1  # only the final logits' cap is left as ops


@pytest.mark.parametrize("name, over", [("gemma2", dict(sliding_window=64)), ("mistral", dict(sliding_window=64))])
def test_the_window_and_the_cap_change_the_tokens(name, over):
    """The prompt and the new tokens outrun the window (and the cap bites): the same weights without them give
    another continuation, so the generation test above would see a target that ignored them."""
    ids = prompt()
    with_variants = greedy(build(name), ids)
    extra = {"attn_logit_softcapping": None} if name == "gemma2" else {}
    assert not torch.equal(with_variants, greedy(build(name, **over, **extra), ids))


def test_triton_soft_cap_and_window_equal_the_metal_kernels(metal_emulated):
    """Split-K over a window (partitions start at the window's first key's tile), a ring, prefill with queries
    whose windows start in different tiles: the Triton kernels (interpreted) against the Metal ones (emulated),
    which tests/codegen/test_metal_attention.py checks against float64."""
    pytest.importorskip("triton")
    from caramba.codegen.metal import attention as M
    from caramba.codegen.triton import attention as T
    from caramba.ir.cache_format import CacheView
    from caramba.ir.quant import quantize

    g = torch.Generator().manual_seed(3)
    b, heads, kv_heads, d, length = 2, 4, 2, 32, 150
    views = []
    for kind in ("q8_0", "q4_0"):
        qt = quantize(torch.randn(b, length, kv_heads * d, generator=g), kind, 32)
        views.append(CacheView(qt.codes, qt.scales, None, kind, kv_heads * d, 32, 0))
    q = torch.randn(b, heads, d, generator=g) * 3
    ready = torch.tensor([150, 70], dtype=torch.int32)
    kw = dict(scales=[d ** -0.5], kv_heads=kv_heads, softcap=8.0, sliding=37)
    want = M.decode_attention([q], [views[0]], views[1], ready, partitions=1, **kw)
    for partitions in (1, 3):
        got = T.decode_attention([q], [views[0]], views[1], ready, partitions=partitions, block_n=16, **kw)
        assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    qs = torch.randn(b, heads, 40, d, generator=g) * 3
    starts = torch.tensor([110, 3], dtype=torch.int32)
    want = M.prefill_attention([qs], [views[0]], views[1], starts, **kw)
    got = T.prefill_attention([qs], [views[0]], views[1], starts, block_m=16, block_n=16, **kw)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
