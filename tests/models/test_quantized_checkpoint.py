"""Quantized checkpoints (caramba.models.save(model, dir, weights=...)): safetensors only, read back bit for bit,
compiled without re-quantizing (the same weights as compiling the float model), re-saved unchanged, and every kind
of damage or mismatch refused with a CheckpointError that names the tensor and what to do."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import caramba
from caramba.ir.weight_quant import WeightQuantError, parse_weights, quantize_weight
from caramba.models import CheckpointError, Transformer, load, preset, save

IDS = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(2))


def tiny(**overrides) -> Transformer:
    torch.manual_seed(0)
    return Transformer(preset("tiny", attention="gqa", n_layers=1, **overrides)).eval()


def q_tensors(cm) -> dict[str, torch.Tensor]:
    return {k: v for k, v in cm.graph.weights.items() if k.endswith((".qcodes", ".qscales", ".qzeros"))}


@pytest.mark.parametrize("spec", ["int8", "int4:g64:asym"])
def test_round_trip_is_bit_exact_and_compiles_to_the_same_weights(tmp_path, spec):
    model = tiny(bias=True)
    save(model, tmp_path / "q", weights=spec)
    stored = load_file(str(tmp_path / "q" / "model.safetensors"))
    assert "layers.0.attn.q.weight" not in stored and "layers.0.attn.q.weight.qcodes" in stored
    assert "lm_head.weight" in stored and "embed.weight" in stored  # the head and the table stay float
    loaded = load(tmp_path / "q")
    assert loaded.caramba_weights.spec == parse_weights(spec)
    for name, q in loaded.caramba_weights.weights.items():
        fresh = quantize_weight(model.state_dict()[name], spec)
        assert all(torch.equal(q.tensors[r], fresh.tensors[r]) for r in fresh.tensors)
        assert torch.equal(loaded.state_dict()[name], q.dequantize(torch.float32))  # the module decodes them
    from_float = caramba.compile(model, target="eager", weights=spec)
    from_file = caramba.compile(loaded, target="eager")  # weights=None: the checkpoint's own format
    assert str(from_file.weights) == str(from_float.weights)
    a, b = q_tensors(from_float), q_tensors(from_file)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(from_file(IDS), from_float(IDS))
    assert (loaded(IDS) - from_file(IDS)).abs().max() <= 1e-5 * from_file(IDS).abs().max()  # the module agrees
    save(loaded, tmp_path / "again")  # re-saved as stored: the same bytes for every tensor
    again = load_file(str(tmp_path / "again" / "model.safetensors"))
    assert again.keys() == stored.keys() and all(torch.equal(again[k], stored[k]) for k in stored)


def test_tied_embeddings_quantized_and_a_conflicting_format_refused(tmp_path):
    model = tiny(tie_embeddings=True)
    save(model, tmp_path / "q", weights="int4", quantize_embeddings=True)
    config = json.loads((tmp_path / "q" / "config.json").read_text())["quantization"]
    assert config["weights"] == "int4:g32:sym" and config["embeddings"] and "embed.weight" in config["tensors"]
    loaded = load(tmp_path / "q")
    cm = caramba.compile(loaded, target="eager")
    assert cm.quantize_embeddings and cm.graph.op_counts()["qembedding"] == 1
    assert torch.equal(cm.graph.weights["embed.weight.qcodes"], loaded.caramba_weights.weights["embed.weight"].codes)
    with pytest.raises(WeightQuantError, match="holds int4:g32:sym weights .* weights=None or 'int4:g32:sym'"):
        caramba.compile(loaded, target="eager", weights="int8")
    with pytest.raises(WeightQuantError, match="holds int4:g32:sym weights"):
        save(loaded, tmp_path / "other", weights="int8")


def _damage(directory, *, drop=(), replace=None, config=None):
    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    for name in drop:
        del tensors[name]
    tensors.update(replace or {})
    save_file(tensors, str(path))
    if config is not None:
        data = json.loads((directory / "config.json").read_text())
        config(data["quantization"])
        (directory / "config.json").write_text(json.dumps(data))


@pytest.mark.parametrize("damage, message", [
    (lambda d: _damage(d, drop=["layers.0.mlp.up.weight.qscales"]),
     r"layers.0.mlp.up.weight: a int4:g64:asym weight stores codes, scales, zeros; missing \['scales'\]"),
    (lambda d: _damage(d, replace={"layers.0.mlp.up.weight.qcodes": torch.zeros(128, 16, dtype=torch.uint8)}),
     r"layers.0.mlp.up.weight.codes: expected torch.uint8 \(128, 32\)"),
    (lambda d: _damage(d, replace={"layers.0.mlp.up.weight.qzeros": torch.full((128, 1), 99, dtype=torch.uint8)}),
     "past the 4-bit range"),
    (lambda d: _damage(d, replace={"layers.0.mlp.up.weight.qscales": torch.full((128, 1), float("inf")).half()}),
     "scales holds NaN or inf"),
    (lambda d: _damage(d, replace={"stray.qcodes": torch.zeros(2, dtype=torch.uint8)}),
     r"unexpected tensors \['stray.qcodes'\]"),
    (lambda d: _damage(d, config=lambda q: q.update(weights="int5")), "unknown weight format 'int5'"),
    (lambda d: _damage(d, config=lambda q: q["tensors"].append("nope.weight")),
     "quantized tensor 'nope.weight' is not a 2-D weight of this model"),
    (lambda d: _damage(d, config=lambda q: q.pop("dtype")), "'quantization' must be an object with weights"),
])
def test_damaged_or_mismatched_files_are_refused(tmp_path, damage, message):
    save(tiny(), tmp_path / "q", weights="int4:g64:asym")
    damage(tmp_path / "q")
    with pytest.raises(CheckpointError, match=message):
        load(tmp_path / "q")


def test_the_cli_compiles_a_quantized_checkpoint_as_stored(tmp_path, capsys):
    from caramba.cli import main

    save(tiny(), tmp_path / "q", weights="int8")
    assert main(["compile", "--model", str(tmp_path / "q"), "--target", "eager"]) == 0
    out = capsys.readouterr().out
    assert "weights: int8 (embeddings and head float)" in out and "qlinear 7" in out  # q, k, v, o, gate, up, down
    assert main(["compile", "--model", str(tmp_path / "q"), "--target", "eager", "--weights", "int4"]) == 2
    assert "holds int8 weights" in capsys.readouterr().err
