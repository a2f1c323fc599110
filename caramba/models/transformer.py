"""Reference eager decoder-only transformer: standard, GQA and decoupled (DBA) attention.

Written to be captured by `torch.export.export(..., strict=False)` with dynamic
batch and sequence: no branching on tensor values, no data-dependent shapes,
RoPE tables and the causal mask are built inside forward from the inputs.
Python-level branches only read the config, so they are resolved at trace time.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig

INIT_STD = 0.02
TEMP_CLAMP = 8.0


# ---- normalisation ---------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 statistics even for bf16/fp16 activations (SPEC §2), the Llama form.
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.to(x.dtype) * self.weight


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


def make_norm(config: ModelConfig) -> nn.Module:
    norm = RMSNorm if config.norm == "rms" else LayerNorm
    return norm(config.d_model, config.norm_eps)


# ---- rotary embedding ------------------------------------------------------------------


def rope_inv_freq(dim: int, base: float, device: torch.device | str | None = None) -> torch.Tensor:
    """inv_freq_i = base^(-2i/dim) for i < dim/2, as fp32 (SPEC §2)."""
    # Computed in fp64 and rounded once, so the table does not depend on pow's fp32 accuracy.
    exponent = torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim
    return (1.0 / (base ** exponent)).float()  # (dim/2,)


class RotaryEmbedding(nn.Module):
    """Turns position ids into fp32 cos/sin tables for rotate-half RoPE."""

    def __init__(self, dim: int, base: float) -> None:
        super().__init__()
        self.dim = dim
        self.base = base
        # Non-persistent: derived from the config, so checkpoints never carry it.
        self.register_buffer("inv_freq", rope_inv_freq(dim, base), persistent=False)

    def reset_inv_freq(self, device: torch.device | str | None = None) -> None:
        """Rebuild the fp32 table (after meta-device construction or a dtype cast)."""
        self.inv_freq = rope_inv_freq(self.dim, self.base, device)

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        # Module.to(dtype) / .half() would round the table to low precision; the angles
        # must stay fp32 (SPEC §2), so rebuild it on whatever device it moved to.
        super()._apply(fn, recurse)
        self.reset_inv_freq(self.inv_freq.device)
        return self

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = position_ids[..., None].float() * self.inv_freq  # (B, T, dim/2) fp32
        angles = torch.cat((angles, angles), dim=-1)  # (B, T, dim): rotate-half pairs i, i + dim/2
        return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, d); cos/sin: (B, T, d) fp32. y1 = x1·cos − x2·sin, y2 = x1·sin + x2·cos."""
    cos = cos.unsqueeze(1).to(x.dtype)  # (B, 1, T, d): Llama casts the tables to q's dtype
    sin = sin.unsqueeze(1).to(x.dtype)
    return x * cos + rotate_half(x) * sin


# ---- attention helpers -----------------------------------------------------------------


def split_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    return x.unflatten(-1, (n_heads, -1)).transpose(1, 2)  # (B, T, H*d) -> (B, H, T, d)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2).flatten(2)  # (B, H, T, d) -> (B, T, H*d)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, H_kv, T, d) -> (B, H_kv·n_rep, T, d); query head h reads kv head h // n_rep."""
    if n_rep == 1:
        return x
    batch, kv_heads, seq, dim = x.shape
    x = x[:, :, None, :, :].expand(batch, kv_heads, n_rep, seq, dim)
    return x.reshape(batch, kv_heads * n_rep, seq, dim)


def future_mask(seq_len: int, device: torch.device) -> torch.Tensor:
    """(T, T) bool, True where key position > query position (the masked entries)."""
    return torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).triu(1)


class Attention(nn.Module):
    """Standard (n_kv_heads == n_heads) and grouped-query attention, RoPE on q and k."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.n_kv_heads = config.kv_heads
        self.causal = config.causal
        d, bias = config.d_head, config.bias
        self.q = nn.Linear(config.d_model, self.n_heads * d, bias=bias)
        self.k = nn.Linear(config.d_model, self.n_kv_heads * d, bias=bias)
        self.v = nn.Linear(config.d_model, self.n_kv_heads * d, bias=bias)
        self.o = nn.Linear(self.n_heads * d, config.d_model, bias=bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        n_rep = self.n_heads // self.n_kv_heads
        q = apply_rope(split_heads(self.q(x), self.n_heads), cos, sin)  # (B, H, T, d)
        k = apply_rope(split_heads(self.k(x), self.n_kv_heads), cos, sin)  # (B, H_kv, T, d)
        v = split_heads(self.v(x), self.n_kv_heads)  # (B, H_kv, T, d)
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # (B, H, T, d)
        return self.o(merge_heads(out))


class DecoupledAttention(nn.Module):
    """Decoupled bottleneck attention, SPEC §1: a semantic (no position) and a geometric
    (RoPE) score summed before one softmax, with an optional per-head gate and temperature."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.n_kv_heads = config.kv_heads
        self.causal = config.causal
        self.sem_scale = 1.0 / math.sqrt(config.d_sem)
        self.geo_scale = 1.0 / math.sqrt(config.d_geo)
        d_model, bias, kv = config.d_model, config.bias, config.kv_heads
        self.q_sem = nn.Linear(d_model, config.sem_dim, bias=bias)
        self.k_sem = nn.Linear(d_model, kv * config.d_sem, bias=bias)
        self.q_geo = nn.Linear(d_model, config.geo_dim, bias=bias)
        self.k_geo = nn.Linear(d_model, kv * config.d_geo, bias=bias)
        self.v = nn.Linear(d_model, kv * config.d_v, bias=bias)
        self.o = nn.Linear(config.v_dim, d_model, bias=bias)
        self.gate = config.gate
        if config.gate != "off":
            self.gate_bias = nn.Parameter(torch.zeros(self.n_heads))  # b ∈ R^H
        if config.gate == "dynamic":
            self.gate_proj = nn.Linear(d_model, self.n_heads, bias=False)  # W_gate
        self.learned_temp = config.learned_temp
        if config.learned_temp:
            self.tau = nn.Parameter(torch.zeros(self.n_heads))  # log-temperature per head

    def reset_gate_and_temperature(self) -> None:
        """Zero the gate and temperature parameters, which makes both the identity."""
        if self.gate != "off":
            nn.init.zeros_(self.gate_bias)
        if self.gate == "dynamic":
            nn.init.zeros_(self.gate_proj.weight)
        if self.learned_temp:
            nn.init.zeros_(self.tau)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        q_s, k_s, q_g, k_g, v = self.project(x, cos, sin)
        scores = self.scores(q_s, k_s, q_g, k_g)  # (B, H, T, T)
        if self.causal:
            scores = scores.masked_fill(future_mask(x.shape[1], x.device), float("-inf"))
        probs = scores.float().softmax(dim=-1).to(v.dtype)  # fp32 softmax (SPEC §1.6)
        return self.o(merge_heads(probs @ v))  # (B, H, T, d_v) -> (B, T, d_model)

    def project(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries (scaled by temperature and gate) and keys/values repeated to H heads."""
        n_rep = self.n_heads // self.n_kv_heads
        q_s = split_heads(self.q_sem(x), self.n_heads)  # (B, H, T, d_s)
        k_s = split_heads(self.k_sem(x), self.n_kv_heads)  # (B, H_kv, T, d_s)
        q_g = apply_rope(split_heads(self.q_geo(x), self.n_heads), cos, sin)  # (B, H, T, d_g)
        k_g = apply_rope(split_heads(self.k_geo(x), self.n_kv_heads), cos, sin)  # (B, H_kv, T, d_g)
        v = split_heads(self.v(x), self.n_kv_heads)  # (B, H_kv, T, d_v)
        q_s, q_g = self.scale_queries(x, q_s, q_g)
        return q_s, repeat_kv(k_s, n_rep), q_g, repeat_kv(k_g, n_rep), repeat_kv(v, n_rep)

    def scores(
        self, q_s: torch.Tensor, k_s: torch.Tensor, q_g: torch.Tensor, k_g: torch.Tensor
    ) -> torch.Tensor:
        """S = (Q_s·K_sᵀ)/√d_s + (Q_g·K_gᵀ)/√d_g as two matmuls, the form fusion matches."""
        sem = (q_s @ k_s.transpose(-2, -1)) * self.sem_scale
        geo = (q_g @ k_g.transpose(-2, -1)) * self.geo_scale
        return sem + geo  # (B, H, T, T)

    def scale_queries(
        self, x: torch.Tensor, q_s: torch.Tensor, q_g: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.learned_temp:
            temp = torch.exp(self.tau.float().clamp(-TEMP_CLAMP, TEMP_CLAMP))  # (H,) fp32
            temp = temp.view(-1, 1, 1).to(q_s.dtype)  # (H, 1, 1)
            q_s, q_g = q_s * temp, q_g * temp
        if self.gate != "off":
            g = torch.sigmoid(self.gate_logit(x))  # fp32, broadcasts over (B, H, T, d)
            q_s = q_s * (2.0 * g).to(q_s.dtype)
            q_g = q_g * (2.0 * (1.0 - g)).to(q_g.dtype)
        return q_s, q_g

    def gate_logit(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 gate logit: (H, 1, 1) static, (B, H, T, 1) dynamic."""
        bias = self.gate_bias.float().view(-1, 1, 1)  # (H, 1, 1)
        if self.gate == "static":
            return bias
        dynamic = self.gate_proj(x).float().transpose(1, 2).unsqueeze(-1)  # (B, H, T, 1)
        return bias + dynamic


# ---- MLP and block ---------------------------------------------------------------------


class SwiGLU(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate = nn.Linear(config.d_model, config.d_ff, bias=config.bias)
        self.up = nn.Linear(config.d_model, config.d_ff, bias=config.bias)
        self.down = nn.Linear(config.d_ff, config.d_model, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class GeluMLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.d_model, config.d_ff, bias=config.bias)
        self.fc2 = nn.Linear(config.d_ff, config.d_model, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = make_norm(config)
        attention = DecoupledAttention if config.attention == "decoupled" else Attention
        self.attn = attention(config)
        self.mlp_norm = make_norm(config)
        self.mlp = SwiGLU(config) if config.mlp == "swiglu" else GeluMLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


# ---- model -----------------------------------------------------------------------------


class Transformer(nn.Module):
    """Decoder-only pre-norm transformer; `forward(input_ids) -> logits (B, T, vocab)`.

    With tied embeddings there is no `lm_head` module: the head reads `embed.weight`,
    so the weight exists (and is saved, and captured) exactly once.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.rotary = RotaryEmbedding(config.rope_dim, config.rope_base)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = make_norm(config)
        self.lm_head = None
        if not config.tie_embeddings:
            self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        init_weights(self)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        if position_ids is None:
            # (1, T): broadcasts over the batch in the RoPE tables.
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        cos, sin = self.rotary(position_ids)  # (B or 1, T, rope_dim) fp32
        x = self.embed(input_ids)  # (B, T, d_model)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.head(self.norm(x))

    def head(self, x: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:
            return F.linear(x, self.embed.weight)  # (B, T, vocab)
        return self.lm_head(x)


def init_weights(model: nn.Module) -> None:
    """normal(0, 0.02) matrices, zero biases, unit norms (their default), identity gates."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
    # After the generic pass, which drew the dynamic gate's weight from normal(0, 0.02).
    for module in model.modules():
        if isinstance(module, DecoupledAttention):
            module.reset_gate_and_temperature()


def count_parameters(model_or_config: nn.Module | ModelConfig) -> int:
    """Number of parameters, each shared tensor once; a config is built on the meta device."""
    if isinstance(model_or_config, ModelConfig):
        with torch.device("meta"):
            model_or_config = Transformer(model_or_config)
    return sum(p.numel() for p in model_or_config.parameters())  # parameters() dedupes shared ones
