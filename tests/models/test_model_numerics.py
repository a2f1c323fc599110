"""Eager numerics against float64 references written from SPEC §1–2, and model invariants."""

import math
import re

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from caramba.models import ModelConfig, Transformer, preset
from caramba.models.transformer import DecoupledAttention, apply_rope, rope_inv_freq

MODES = ("standard", "gqa", "decoupled")


# ---- float64 references, written from the SPEC formulas rather than from the model code ----


def rope_reference(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """SPEC §2 rotate-half RoPE in fp64. x: (..., T, r), positions: (T,)."""
    x = x.double()
    r = x.shape[-1]
    i = torch.arange(r // 2, dtype=torch.float64)
    angle = positions.double()[:, None] * base ** (-2 * i / r)  # (T, r/2)
    x1, x2 = x[..., : r // 2], x[..., r // 2 :]
    return torch.cat((x1 * angle.cos() - x2 * angle.sin(), x1 * angle.sin() + x2 * angle.cos()), dim=-1)


def dba_reference(attn: DecoupledAttention, cfg: ModelConfig, x: torch.Tensor, positions: torch.Tensor):
    """SPEC §1 in fp64, as one attention over q_cat = [Q_s/√d_s ‖ Q_g/√d_g], k_cat = [K_s ‖ K_g]."""
    w = {name: p.detach().double() for name, p in attn.named_parameters()}
    x = x.double()
    batch, seq, _ = x.shape
    H, H_kv = cfg.n_heads, cfg.kv_heads

    def project(name: str, heads: int) -> torch.Tensor:
        y = x @ w[f"{name}.weight"].T + (w[f"{name}.bias"] if cfg.bias else 0)
        return y.reshape(batch, seq, heads, -1).permute(0, 2, 1, 3)  # (B, heads, T, d)

    q_s, k_s = project("q_sem", H), project("k_sem", H_kv)
    q_g = rope_reference(project("q_geo", H), positions, cfg.rope_base)
    k_g = rope_reference(project("k_geo", H_kv), positions, cfg.rope_base)
    v = project("v", H_kv)
    if cfg.learned_temp:
        temp = torch.exp(w["tau"].clamp(-8, 8))[None, :, None, None]
        q_s, q_g = q_s * temp, q_g * temp
    if cfg.gate != "off":
        logit = w["gate_bias"][None, :, None].expand(batch, H, seq)
        if cfg.gate == "dynamic":
            logit = logit + (x @ w["gate_proj.weight"].T).permute(0, 2, 1)
        g = torch.sigmoid(logit)[..., None]  # (B, H, T, 1)
        q_s, q_g = 2 * g * q_s, 2 * (1 - g) * q_g
    kv_of = [h * H_kv // H for h in range(H)]  # query head h reads key head h·H_kv/H
    k_s, k_g, v = k_s[:, kv_of], k_g[:, kv_of], v[:, kv_of]
    q_cat = torch.cat((q_s / math.sqrt(cfg.d_sem), q_g / math.sqrt(cfg.d_geo)), dim=-1)
    k_cat = torch.cat((k_s, k_g), dim=-1)
    scores = q_cat @ k_cat.transpose(-2, -1)  # scale 1
    masked = scores
    if cfg.causal:
        future = positions[None, :] > positions[:, None]
        masked = scores.masked_fill(future, float("-inf"))
    out = torch.softmax(masked, dim=-1) @ v  # (B, H, T, d_v)
    out = out.permute(0, 2, 1, 3).reshape(batch, seq, -1)
    y = out @ w["o.weight"].T + (w["o.bias"] if cfg.bias else 0)
    return scores, y


def sharpen(module: nn.Module, std: float = 0.3) -> None:
    """Larger random weights (gate and temperature included), so attention is far from uniform."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, std)


# ---- RoPE ----


@pytest.mark.parametrize("base", [10000.0, 500000.0])
def test_rope_matches_spec(base):
    torch.manual_seed(0)
    positions = torch.cat((torch.arange(64), torch.randint(64, 4096, (64,))))
    x = torch.randn(2, 3, positions.numel(), 16)
    rotary = Transformer(preset("tiny", n_layers=1, rope_base=base)).rotary
    cos, sin = rotary(positions[None])
    got = apply_rope(x, cos, sin)
    ref = rope_reference(x, positions, base)
    # fp32 angles p·inv_freq carry an error ~ p·2^-23, so far positions get a looser bound.
    torch.testing.assert_close(got[..., :64, :].double(), ref[..., :64, :], atol=1e-5, rtol=0)
    torch.testing.assert_close(got.double(), ref, atol=2e-3, rtol=0)


def test_inv_freq_stays_fp32_under_dtype_casts():
    model = Transformer(preset("tiny")).to(torch.bfloat16)
    assert model.rotary.inv_freq.dtype == torch.float32
    assert torch.equal(model.rotary.inv_freq, rope_inv_freq(16, 10000.0))
    assert model.embed.weight.dtype == torch.bfloat16
    assert model(torch.randint(0, 256, (1, 3))).dtype == torch.bfloat16
    assert "rotary.inv_freq" not in model.state_dict()


# ---- decoupled attention against the SPEC formula ----


@pytest.mark.parametrize(
    "options",
    [
        dict(n_kv_heads=2),
        dict(n_kv_heads=1, gate="static", learned_temp=True),
        dict(n_kv_heads=2, gate="dynamic", learned_temp=True, bias=True),
        dict(gate="dynamic", causal=False),
    ],
)
def test_dba_matches_spec_reference(options):
    torch.manual_seed(0)
    cfg = preset("tiny", **options)
    attn = Transformer(cfg).layers[0].attn
    sharpen(attn)
    scores = _check_dba(attn, cfg, torch.randn(2, 7, cfg.d_model), torch.arange(5, 12))
    assert scores.std() > 1.0  # far from uniform attention, so the comparison can fail


@settings(max_examples=25, deadline=None)
@given(
    heads=st.sampled_from([(1, 1), (2, 1), (4, 2), (4, 4), (6, 3)]),
    dims=st.tuples(st.integers(1, 4), st.integers(1, 3), st.integers(1, 4)),
    seq=st.integers(1, 6),
    gate=st.sampled_from(["off", "static", "dynamic"]),
    learned_temp=st.booleans(),
    causal=st.booleans(),
)
def test_dba_matches_spec_reference_any_shape(heads, dims, seq, gate, learned_temp, causal):
    n_heads, n_kv = heads
    d_s, half_d_g, d_v = dims
    cfg = ModelConfig(
        vocab_size=8, d_model=12, n_layers=1, n_heads=n_heads, n_kv_heads=n_kv, attention="decoupled",
        sem_dim=d_s * n_heads, geo_dim=2 * half_d_g * n_heads, v_dim=d_v * n_heads, d_ff=8,
        gate=gate, learned_temp=learned_temp, causal=causal,
    )
    torch.manual_seed(seq)
    attn = DecoupledAttention(cfg)
    sharpen(attn)
    _check_dba(attn, cfg, torch.randn(2, seq, cfg.d_model), torch.arange(seq) + 3)


def _check_dba(attn, cfg, x, positions):
    cos, sin = Transformer(cfg).rotary(positions[None])
    q_s, k_s, q_g, k_g, _ = attn.project(x, cos, sin)
    ref_scores, ref_out = dba_reference(attn, cfg, x, positions)
    scores = attn.scores(q_s, k_s, q_g, k_g).double()
    torch.testing.assert_close(scores, ref_scores, atol=1e-5 * ref_scores.abs().max().item(), rtol=1e-4)
    torch.testing.assert_close(attn(x, cos, sin).double(), ref_out, atol=1e-5 * ref_out.abs().max().item(), rtol=1e-4)
    return ref_scores


def test_temperature_is_clamped():
    torch.manual_seed(0)
    cfg = preset("tiny", learned_temp=True)
    attn = Transformer(cfg).layers[0].attn
    x = torch.randn(1, 5, cfg.d_model)
    cos, sin = Transformer(cfg).rotary(torch.arange(5)[None])
    outputs = []
    for tau in (8.0, 9.0, -8.0, -9.0):
        with torch.no_grad():
            attn.tau.fill_(tau)
            outputs.append(attn(x, cos, sin))
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[2], outputs[3])
    assert not torch.equal(outputs[0], outputs[2])


# ---- initialisation and invariants ----


@pytest.mark.parametrize("options", [dict(gate="static"), dict(gate="dynamic"), dict(learned_temp=True),
                                     dict(gate="dynamic", learned_temp=True, n_kv_heads=2)])
def test_gate_and_temperature_are_identity_at_init(options):
    torch.manual_seed(0)
    plain = Transformer(preset("tiny", n_kv_heads=options.get("n_kv_heads"))).eval()
    gated = Transformer(preset("tiny", **options)).eval()
    missing, unexpected = gated.load_state_dict(plain.state_dict(), strict=False)
    # Only the gate/temperature parameters are new; they keep their (zero) init.
    assert unexpected == [] and missing
    assert all(k.endswith(("attn.gate_bias", "attn.gate_proj.weight", "attn.tau")) for k in missing)
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        assert torch.equal(gated(ids), plain(ids))


def test_init_values():
    torch.manual_seed(0)
    model = Transformer(preset("small", gate="dynamic", learned_temp=True, bias=True, norm="layer"))
    for name, p in model.named_parameters():
        if name.endswith(("gate_bias", "tau", "gate_proj.weight")) or name.endswith(".bias"):
            assert torch.count_nonzero(p) == 0, name
        elif "norm" in name:
            assert torch.equal(p, torch.ones_like(p)), name
        else:
            assert abs(p.std().item() - 0.02) < 0.002, name


@pytest.mark.parametrize("attention", MODES)
def test_causal(attention):
    torch.manual_seed(0)
    model = Transformer(preset("tiny", attention=attention, gate="dynamic" if attention == "decoupled" else "off")).eval()
    ids = torch.randint(0, 256, (2, 10))
    changed = ids.clone()
    changed[:, 6] = (ids[:, 6] + 1) % 256
    with torch.no_grad():
        before, after = model(ids), model(changed)
    torch.testing.assert_close(after[:, :6], before[:, :6], atol=1e-6, rtol=0)
    assert not torch.allclose(after[:, 6:], before[:, 6:])


@pytest.mark.parametrize("attention", MODES)
def test_non_causal_sees_the_future(attention):
    torch.manual_seed(0)
    model = Transformer(preset("tiny", attention=attention, causal=False)).eval()
    ids = torch.randint(0, 256, (1, 10))
    changed = ids.clone()
    changed[:, 6] = (ids[:, 6] + 1) % 256
    with torch.no_grad():
        assert not torch.allclose(model(changed)[:, :6], model(ids)[:, :6])


@pytest.mark.parametrize("attention", MODES)
def test_positions(attention):
    torch.manual_seed(0)
    model = Transformer(preset("tiny", attention=attention)).eval()
    ids = torch.randint(0, 256, (2, 8))
    with torch.no_grad():
        default = model(ids)
        explicit = model(ids, torch.arange(8).expand(2, 8))
        shifted = model(ids, torch.arange(8).expand(2, 8) + 100)
    assert torch.equal(default, explicit)
    # RoPE scores depend only on relative position, so a common offset changes nothing but rounding.
    torch.testing.assert_close(shifted, default, atol=1e-4, rtol=1e-4)


# ---- standard / gqa are exactly Llama ----


@pytest.mark.parametrize("attention, tied, bias", [("gqa", False, False), ("standard", True, True)])
def test_matches_transformers_llama(attention, tied, bias):
    transformers = pytest.importorskip("transformers")
    cfg = preset("tiny", attention=attention, tie_embeddings=tied, bias=bias, rope_base=500000.0)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.d_head, rms_norm_eps=cfg.norm_eps, tie_word_embeddings=tied,
        attention_bias=bias, mlp_bias=bias, max_position_embeddings=cfg.max_seq_len,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_base},
    )
    torch.manual_seed(0)
    ours = Transformer(cfg).eval()
    sharpen(ours, std=0.1)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    hf.load_state_dict(_to_llama_names(ours.state_dict(), tied), strict=True)
    ids = torch.randint(0, 256, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-5, rtol=1e-5)


_LLAMA_NAMES = [  # ours -> transformers
    (r"^embed\.", "model.embed_tokens."),
    (r"^norm\.", "model.norm."),
    (r"^layers\.(\d+)\.attn_norm\.", r"model.layers.\1.input_layernorm."),
    (r"^layers\.(\d+)\.mlp_norm\.", r"model.layers.\1.post_attention_layernorm."),
    (r"^layers\.(\d+)\.attn\.([qkvo])\.", r"model.layers.\1.self_attn.\2_proj."),
    (r"^layers\.(\d+)\.mlp\.(gate|up|down)\.", r"model.layers.\1.mlp.\2_proj."),
]


def _to_llama_names(state: dict, tied: bool) -> dict:
    out = {}
    for name, tensor in state.items():
        for pattern, repl in _LLAMA_NAMES:
            name = re.sub(pattern, repl, name)
        out[name] = tensor
    if tied:
        out["lm_head.weight"] = state["embed.weight"]
    return out
