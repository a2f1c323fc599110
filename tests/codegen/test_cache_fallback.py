"""Models whose attention the KV cache cannot take still generate, on every target (issue 18 item 0).

Three models the cache passes refuse, each for another reason: a transformers Falcon with ALiBi (its attention
fuses, but with a position bias as its own mask), a transformers GPT-J (its sin/cos table is read at per-row positions fine, but
the graph then expands it to a literal batch of 1) and a two-layer module whose second layer's scores go through a learned
distance bias (its softmax is not recognised as attention at all; the first layer fuses). For each: the compiled
model names the layers that fell back and why, cm(ids) equals the model on every target, and greedy generation
(ragged rows, a continued conversation, a rollback) equals the model's own uncached loop token for token, through
the recomputing executor. Sampling is the same as eager's on every target, speculative decoding works with such a
model as the target, the CLI's compile report lists the layers, and export-onnx says why it cannot export it.
"""
from __future__ import annotations

import math
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import caramba
from caramba.models import Transformer, preset
from caramba.runtime.recompute import RecomputeExecutor, TokenCache

transformers = pytest.importorskip("transformers")

TARGETS = ("eager", "onnx", "cuda", "metal")
NEW = 6


class DistanceBias(nn.Module):
    """Layer 0: causal SDPA (fused). Layer 1: q·kᵀ/√d plus a learned per-head bias by key - query distance, a
    causal masked_fill, softmax, ·v (not an attention pattern the fusion knows)."""

    def __init__(self, vocab: int = 61, d: int = 24, heads: int = 2, max_pos: int = 48) -> None:
        super().__init__()
        self.heads, self.dh, self.max_pos = heads, d // heads, max_pos
        self.embed = nn.Embedding(vocab, d)
        self.qkv = nn.ModuleList(nn.Linear(d, 3 * d) for _ in range(2))
        self.o = nn.ModuleList(nn.Linear(d, d) for _ in range(2))
        self.bias = nn.Parameter(torch.randn(heads, 2 * max_pos) * 0.5)
        self.head = nn.Linear(d, vocab)
        self.config = transformers.PretrainedConfig(max_position_embeddings=max_pos, vocab_size=vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for layer in range(2):
            q, k, v = self.qkv[layer](x).unflatten(-1, (3, self.heads, self.dh)).permute(2, 0, 3, 1, 4)
            if layer == 0:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                pos = torch.arange(ids.shape[1], device=ids.device)
                rel = pos[None, :] - pos[:, None] + self.max_pos
                scores = q @ k.transpose(-1, -2) / math.sqrt(self.dh) + self.bias[:, rel]
                y = scores.masked_fill(pos[None, :] > pos[:, None], float("-inf")).softmax(-1) @ v
            x = x + self.o[layer](y.transpose(1, 2).flatten(2))
        return self.head(x)


def falcon_alibi():
    return transformers.FalconForCausalLM(transformers.FalconConfig(
        vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, alibi=True))


def gptj():
    return transformers.GPTJForCausalLM(transformers.GPTJConfig(
        vocab_size=256, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=64, bos_token_id=0,
        eos_token_id=0))


MODELS = {"falcon_alibi": falcon_alibi, "gptj": gptj, "distance_bias": DistanceBias}
# what each model's fallback names: (where, a phrase of why)
BLOCKERS = {
    "falcon_alibi": [("transformer.h.0.self_attention", "ALiBi"), ("transformer.h.1.self_attention", "ALiBi")],
    "gptj": [("model", "a literal batch of 1")],
    "distance_bias": [("%softmax", "matmul -> div -> add -> masked_fill -> softmax")],
}


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[name]().eval()


def logits_of(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


def greedy(model, rows: list[list[int]], n: int) -> list[list[int]]:
    """The model's own continuation of each row without a cache (each step reruns the row)."""
    out = []
    for row in rows:
        ids = torch.tensor([row])
        for _ in range(n):
            ids = torch.cat([ids, logits_of(model, ids)[:, -1:].argmax(-1)], dim=1)
        out.append(ids[0].tolist())
    return out


@pytest.fixture(autouse=True)
def metal_emulated(monkeypatch):
    monkeypatch.setenv("CARAMBA_METAL_EMULATE", "1")


def compiled(name: str, target: str):
    model = build(name)
    return model, caramba.compile(model, target=target, max_seq_len=48)


@pytest.mark.parametrize("name", MODELS)
def test_the_blockers_name_each_layer_that_fell_back_and_why(name):
    _, cm = compiled(name, "eager")
    got = [(b.where, b.why) for b in cm.cache_blockers]
    assert [w for w, _ in got] == [w for w, _ in BLOCKERS[name]]
    for (_, why), (_, phrase) in zip(got, BLOCKERS[name]):
        assert phrase in why
    with pytest.raises(caramba.UnsupportedOpError, match="takes no KV cache"):
        cm.cache_layout  # noqa: B018


def test_a_cacheable_model_has_no_blockers_and_keeps_its_cache():
    cm = caramba.compile(Transformer(preset("tiny")).eval(), target="eager")
    assert cm.cache_blockers == ()
    gen = caramba.Generator(cm, caramba.GenerateConfig(temperature=0, max_new_tokens=2, cache_kind="q8_0"))
    gen.generate([[1, 2, 3]])
    assert not isinstance(gen.executor, RecomputeExecutor) and gen.stats.cache_kind == "q8_0"


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", MODELS)
def test_generation_recomputes_and_equals_the_models_own_greedy_loop(name, target):
    model, cm = compiled(name, target)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 61, (2, 7), generator=g)
    assert (cm(ids) - logits_of(model, ids)).abs().max() <= 1e-4 * logits_of(model, ids).abs().max()
    rows = [torch.randint(0, 61, (n,), generator=g).tolist() for n in (5, 1, 9)]  # ragged, one of length 1
    with pytest.warns(caramba.CacheFallbackWarning, match="recomputes"):
        gen = caramba.Generator(cm, caramba.GenerateConfig(temperature=0, max_new_tokens=NEW, max_seq_len=40,
                                                           cache_kind="q4_0"))
        out = gen.generate(rows)
    want = greedy(model, rows, NEW)
    for b, row in enumerate(rows):
        assert out[b, out.shape[1] - len(row) - NEW:].tolist() == want[b]
    assert isinstance(gen.executor, RecomputeExecutor) and gen.stats.cache_kind == "none"
    # the conversation goes on from where it stopped, and a rollback undoes tokens exactly
    more = gen.generate([[3], [4], [5]])
    gen.rollback(NEW + 1)
    again = gen.generate([[3], [4], [5]])
    assert torch.equal(more, again)
    assert [t[-(NEW + 1):] for t in gen.tokens] == [greedy(model, [w + [x]], NEW)[0][-(NEW + 1):]
                                                    for w, x in zip(want, (3, 4, 5))]


@pytest.mark.parametrize("target", ("onnx", "cuda"))
def test_sampling_draws_the_same_tokens_as_eager(target):
    cfg = caramba.GenerateConfig(temperature=0.9, top_k=20, max_new_tokens=NEW, seed=7, max_seq_len=32)
    outs = []
    for t in ("eager", target):
        _, cm = compiled("falcon_alibi", t)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", caramba.CacheFallbackWarning)
            outs.append(caramba.Generator(cm, cfg).generate([[5, 6, 7], [8]]))
    assert torch.equal(*outs)


def test_speculative_decoding_with_a_recomputing_target():
    model, cm = compiled("distance_bias", "eager")
    draft = caramba.compile(DistanceBias().eval(), target="eager", max_seq_len=48)  # other weights: rejections
    spec = caramba.SpeculativeGenerator(cm, draft, caramba.GenerateConfig(temperature=0, max_new_tokens=8,
                                                                          max_seq_len=32),
                                        caramba.SpeculativeConfig(spec_k=3, adaptive=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", caramba.CacheFallbackWarning)
        out = spec.generate([[1, 2, 3, 4]])
    assert out[0].tolist() == greedy(model, [[1, 2, 3, 4]], 8)[0]


def test_the_token_cache_checks_what_it_is_given():
    cache = TokenCache(2, 8)
    cache.append(torch.tensor([[1, 2], [3, 4]]), [0, 0])
    with pytest.raises(caramba.CarambaError, match="do not continue"):
        cache.append(torch.tensor([[5], [6]]), [1, 2])
    with pytest.raises(caramba.CarambaError, match="between 0 and"):
        cache.truncate_rows([3, 1])
    cache.truncate_rows([1, 2])
    assert cache.lengths(0) == (1, 2) and cache.max_length == 2


def test_compile_report_lists_the_fallback_and_export_refuses_clearly(tmp_path, capsys):
    from caramba.cli import main

    model = build("falcon_alibi")
    model.save_pretrained(tmp_path / "falcon", safe_serialization=True)
    assert main(["compile", "--model", str(tmp_path / "falcon"), "--target", "eager"]) == 0
    out = capsys.readouterr().out
    assert "KV cache: none, generation recomputes every step; 2 fell back:" in out
    assert "  transformer.h.1.self_attention: attention is not plain causal attention" in out
    assert main(["generate", "--model", str(tmp_path / "falcon"), "--target", "onnx", "--prompt", "hi",
                 "--max-new-tokens", "3", "--temperature", "0"]) == 0
    err = capsys.readouterr().err
    assert "no KV cache for this model" in err and "no KV cache (each step recomputed" in err
    with pytest.raises(caramba.UnsupportedOpError, match="export-onnx writes a model with a KV cache, and this one "
                                                         "takes none"):
        caramba.export_onnx(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert os.listdir(tmp_path) == ["falcon"]


def gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4,
                                                                n_positions=64, bos_token_id=0, eos_token_id=0))


def bloom():
    return transformers.BloomForCausalLM(transformers.BloomConfig(vocab_size=256, hidden_size=64, n_layer=2,
                                                                  n_head=4))


@pytest.mark.parametrize("target", ("eager", "onnx"))
@pytest.mark.parametrize("make, where", [(gpt2, []),
                                         (bloom, ["transformer.h.0.self_attention", "transformer.h.1.self_attention"])])
def test_gpt2_and_bloom_import_and_generate(make, where, target):
    """GPT-2's Conv1D (addmm) and Bloom's ALiBi scores (baddbmm) import. GPT-2's learned positions (its wpe read at
    arange(seq)) are read at position_ids, so it takes the KV cache; Bloom (a softmax after an ALiBi bias) falls
    back. Both generate their own greedy tokens."""
    torch.manual_seed(0)
    model = make().eval()
    cm = caramba.compile(model, target=target, max_seq_len=48)
    assert [b.where for b in cm.cache_blockers] == where
    with warnings.catch_warnings():
        warnings.simplefilter("error" if not where else "ignore", caramba.CacheFallbackWarning)
        gen = caramba.Generator(cm, caramba.GenerateConfig(temperature=0, max_new_tokens=NEW, cache_kind="fp32"))
        out = gen.generate([[7, 8, 9], [4]])
    assert gen.stats.cache_kind == ("none" if where else "fp32")
    assert out[0].tolist() == greedy(model, [[7, 8, 9]], NEW)[0]
    assert out[1, 2:].tolist() == greedy(model, [[4]], NEW)[0]
