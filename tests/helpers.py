"""Shared test helpers: small Hugging Face models built offline from configs, and numeric comparison."""
from __future__ import annotations

import torch

HF_FAMILIES = ("llama", "mistral", "qwen2")


def hf_model(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A 2-layer decoder from `transformers` with random weights (no download)."""
    import transformers as tf

    cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM), "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
           "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM)}[family]
    kw = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
              num_key_value_heads=2, max_position_embeddings=256)
    kw.update(overrides)
    torch.manual_seed(seed)
    return cls[1](cls[0](**kw)).eval()


def hf_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|, in float64."""
    out, ref = out.double(), ref.double()
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


# Fixed seeds make every run identical; the threshold bounds how often a correct sampler would fail were the
# seeds changed: per check, P(p-value < ALPHA) = ALPHA.
ALPHA = 1e-6


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's goodness-of-fit p-value of `counts` against `probs` (flattened). Categories with probability 0
    must have count 0 (asserted) and are left out of the statistic and the degrees of freedom."""
    counts, probs = counts.flatten().double(), probs.flatten().double()
    support = probs > 0
    assert counts[~support].sum() == 0, f"sampled outside the support: {counts[~support]}"
    expected = probs[support] / probs[support].sum() * counts.sum()
    assert expected.min() >= 5, "too few samples for the chi-square approximation"
    stat = ((counts[support] - expected) ** 2 / expected).sum()
    dof = torch.tensor((int(support.sum()) - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(dof, stat / 2))
