"""Property test: random model configs (all attention modes, odd dims, H_kv | H, both norms and MLPs) compile to
the eager target and give the model's own logits."""
from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import caramba
from caramba.models import ModelConfig, Transformer
from tests.helpers import rel_err


@st.composite
def configs(draw) -> ModelConfig:
    mode = draw(st.sampled_from(["standard", "gqa", "decoupled"]))
    n_heads = draw(st.sampled_from([1, 2, 3, 4, 6]))
    divisors = [d for d in range(1, n_heads + 1) if n_heads % d == 0]
    if mode == "standard":
        kv = n_heads
    elif mode == "gqa":
        if n_heads == 1:
            mode, kv = "standard", 1
        else:
            kv = draw(st.sampled_from([d for d in divisors if d < n_heads]))
    else:
        kv = draw(st.sampled_from(divisors))
    common = dict(
        vocab_size=draw(st.integers(5, 67)), d_model=draw(st.integers(5, 37)), n_layers=draw(st.integers(1, 2)),
        n_heads=n_heads, n_kv_heads=kv, attention=mode, norm=draw(st.sampled_from(["rms", "layer"])),
        mlp=draw(st.sampled_from(["swiglu", "gelu"])), d_ff=draw(st.integers(3, 41)),
        tie_embeddings=draw(st.booleans()), bias=draw(st.booleans()), max_seq_len=64,
        rope_base=draw(st.sampled_from([10000.0, 500000.0, 37.5])),
    )
    if mode == "decoupled":
        extra = dict(sem_dim=n_heads * draw(st.integers(1, 7)), geo_dim=n_heads * 2 * draw(st.integers(1, 4)),
                     v_dim=n_heads * draw(st.integers(1, 7)), gate=draw(st.sampled_from(["off", "static", "dynamic"])),
                     learned_temp=draw(st.booleans()))
    else:
        extra = dict(head_dim=2 * draw(st.integers(1, 5)))
    return ModelConfig(**common, **extra)


@settings(max_examples=50, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=configs(), batch=st.integers(1, 3), seq=st.integers(1, 19), seed=st.integers(0, 2**16))
def test_random_configs_compile_to_eager(cfg, batch, seq, seed):
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # move gates and temperatures off their identity init
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    cm = caramba.compile(model, target="eager")
    for b, t in [(batch, seq), (batch + 1, seq + 4)]:  # two shapes from one capture
        ids = torch.randint(0, cfg.vocab_size, (b, t))
        with torch.no_grad():
            assert rel_err(cm(ids), model(ids)) <= 1e-5
