"""Layer isomorphism and fusion coverage: a model whose layer 3 defeats a fusion is flagged at layer 3 (by
layer_mismatches and by `caramba compile --check-layers`); unmodified models and alternating sliding-window
layers are not."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import caramba
from caramba.analysis import check_layers, fusion_coverage, layer_mismatches, layer_of, layer_subgraphs
from caramba.cli import main
from caramba.models import Transformer, preset
from caramba.models.transformer import RMSNorm

N_LAYERS, PLANTED = 6, 3


class PowRMSNorm(RMSNorm):
    """RMSNorm with the root written as pow(., -0.5): the same numbers (one rounding apart), but fuse_rms_norm
    matches rsqrt or 1 / sqrt, so this norm stays primitive ops."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.pow(x32.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)).to(x.dtype) * self.weight


def tiny(planted: bool) -> nn.Module:
    torch.manual_seed(0)
    model = Transformer(preset("tiny", n_layers=N_LAYERS)).eval()
    if planted:
        model.layers[PLANTED].attn_norm = PowRMSNorm(64, model.config.norm_eps)
    return model


@pytest.fixture(scope="module")
def planted():
    model = tiny(planted=True)
    return model, caramba.compile(model, target="eager")


@pytest.fixture(scope="module")
def plain():
    return caramba.compile(tiny(planted=False), target="eager")


@pytest.mark.parametrize("loc, layer", [("layers.3.attn", 3), ("model.layers.12.self_attn.q_proj", 12),
                                        ("layers.3", 3), ("transformer.h.5.mlp", 5), ("lm_head", None),
                                        ("norm", None), ("mylayers.3.attn", None), ("", None)])
def test_layer_of_reads_the_module_path(loc, layer):
    assert layer_of(loc) == layer


def test_layers_of_an_unmodified_model_are_isomorphic(plain):
    layers = layer_subgraphs(plain.graph)
    assert sorted(layers) == list(range(N_LAYERS))
    # the boundary rule: layer 0 (no residual before its first norm) has the nodes of every other layer
    assert len({g.number_of_nodes() for g in layers.values()}) == 1
    assert layer_mismatches(plain.graph) == []
    check = check_layers(plain.graph)
    assert check.ok and check.notes == ()
    assert check.report() == f"layers agree: all {N_LAYERS} layers fused alike\n"


def test_the_planted_norm_is_the_same_function(planted):
    model, cm = planted
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = tiny(planted=False)(ids)
        assert torch.allclose(model(ids), reference, rtol=1e-5, atol=1e-5)
    assert torch.allclose(cm(ids), reference, rtol=1e-5, atol=1e-5)


def test_a_layer_that_defeats_a_fusion_is_flagged(planted):
    _, cm = planted
    [m] = layer_mismatches(cm.graph)
    assert m.layer == PLANTED and m.reference == (0, 1, 2, 4, 5)
    assert m.has == {"pow": 2, "mean": 1, "add": 1, "mul": 2} and m.lacks == {"rms_norm_fp32": 1}
    assert m.locs == ("layers.3.attn_norm",)
    assert str(m) == ("layer 3 has add, mean, mul x2, pow x2 where layers 0-2, 4-5 have rms_norm_fp32 "
                      "(at layers.3.attn_norm)")


def test_fusion_coverage_names_the_missing_fusion_and_why(planted):
    _, cm = planted
    coverage = fusion_coverage(cm.graph)
    assert sorted(coverage) == list(range(N_LAYERS))
    assert all(c.missing == {} and c.leftovers == () for i, c in coverage.items() if i != PLANTED)
    assert coverage[2].fused == {"add_rms_norm": 2, "decoupled_attention": 1, "rope": 2, "swiglu": 1}
    layer3 = coverage[PLANTED]
    assert layer3.missing == {"rms_norm_fp32": 1}
    [left] = layer3.leftovers
    assert left.fusion == "rms_norm" and left.loc == "layers.3.attn_norm"
    assert left.ops == ("pow", "mean", "add", "pow", "mul", "mul")
    assert "pow {scalar = -0.5}" in left.reason and "torch.rsqrt" in left.reason


def test_check_layers_cli_exits_1_naming_the_layer(planted, monkeypatch, capsys):
    model, _ = planted
    monkeypatch.setattr("caramba.models.sources.load_model", lambda *a, **k: model)
    assert main(["compile", "--model", "tiny", "--target", "eager", "--check-layers"]) == 1
    out = capsys.readouterr().out
    assert out.endswith("layer 3 has add, mean, mul x2, pow x2 where layers 0-2, 4-5 have rms_norm_fp32 "
                        "(at layers.3.attn_norm)\n")


def test_check_layers_cli_exits_0_when_the_layers_agree(capsys):
    assert main(["compile", "--model", "tiny", "--target", "eager", "--check-layers"]) == 0
    assert capsys.readouterr().out.endswith("layers agree: all 2 layers fused alike\n")


def test_alternating_sliding_window_layers_are_variants_not_mismatches():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.Gemma2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                       head_dim=16, sliding_window=6)
    cm = caramba.compile(transformers.Gemma2ForCausalLM(config).eval(), target="eager")
    windows = [n.attrs.get("window", 0) for n in cm.graph.nodes if n.op == "attention"]
    assert windows == [6, 0, 6, 0]  # sliding, full, sliding, full: one fused op, two attribute sets
    check = check_layers(cm.graph)
    assert check.ok
    assert check.notes == ("layers 0, 2 | 1, 3 fuse alike with other attributes: attention window = 6 | 0",)
