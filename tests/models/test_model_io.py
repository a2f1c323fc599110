"""save/load: round trips, atomic replacement, and clear errors for damaged checkpoints."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import caramba.models.io as model_io
from caramba.models import CheckpointError, Transformer, load, preset, save


def _model(**overrides) -> Transformer:
    torch.manual_seed(0)
    return Transformer(preset("tiny", **overrides)).eval()


def _logits(model: Transformer) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.arange(12).reshape(2, 6))


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(tie_embeddings=True),
        dict(attention="gqa", norm="layer", mlp="gelu", bias=True),
        dict(gate="dynamic", learned_temp=True, n_kv_heads=2),
    ],
)
def test_round_trip_gives_identical_logits(tmp_path, overrides):
    model = _model(**overrides)
    with torch.no_grad():
        for p in model.parameters():  # non-init values everywhere, gates and biases included
            p.add_(torch.randn_like(p) * 0.1)
    save(model, tmp_path / "ckpt")
    loaded = load(tmp_path / "ckpt")
    assert not loaded.training
    assert loaded.config == model.config
    assert torch.equal(_logits(loaded), _logits(model))


def test_tied_weights_stored_once(tmp_path):
    save(_model(tie_embeddings=True), tmp_path / "ckpt")
    with safe_open(tmp_path / "ckpt" / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert "embed.weight" in names and not any(n.startswith("lm_head") for n in names)


def test_config_json_is_readable(tmp_path):
    save(_model(), tmp_path / "ckpt")
    data = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert data["format_version"] == 1 and data["attention"] == "decoupled" and data["d_model"] == 64


def test_load_casts_dtype_and_keeps_rope_fp32(tmp_path):
    save(_model(), tmp_path / "ckpt")
    loaded = load(tmp_path / "ckpt", dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert loaded.rotary.inv_freq.dtype == torch.float32
    assert _logits(loaded).dtype == torch.bfloat16


def test_load_never_unpickles(tmp_path, monkeypatch):
    save(_model(), tmp_path / "ckpt")

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load must not be used")

    monkeypatch.setattr(torch, "load", refuse)
    load(tmp_path / "ckpt")


def test_save_replaces_previous_checkpoint(tmp_path):
    save(_model(), tmp_path / "ckpt")
    newer = _model(tie_embeddings=True, gate="static")
    save(newer, tmp_path / "ckpt")
    assert load(tmp_path / "ckpt").config == newer.config
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no staging or backup left over


def test_interrupted_save_keeps_old_checkpoint(tmp_path, monkeypatch):
    old = _model()
    save(old, tmp_path / "ckpt")

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(model_io, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save(_model(attention="gqa"), tmp_path / "ckpt")
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    assert torch.equal(_logits(load(tmp_path / "ckpt")), _logits(old))


def test_interrupted_first_save_leaves_nothing(tmp_path, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(model_io, "save_file", disk_full)
    with pytest.raises(OSError, match="disk full"):
        save(_model(), tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


def test_save_refuses_to_replace_other_files(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"refusing to replace .*notes.txt"):
        save(_model(), tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "notes.txt").read_text() == "keep me"


# ---- damaged checkpoints ----


@pytest.fixture
def ckpt(tmp_path):
    save(_model(), tmp_path / "ckpt")
    return tmp_path / "ckpt"


def _edit_config(ckpt, **changes):
    data = json.loads((ckpt / "config.json").read_text())
    data.update(changes)
    (ckpt / "config.json").write_text(json.dumps(data))


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="is not a directory"):
        load(tmp_path / "nowhere")


@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
def test_missing_file(ckpt, name):
    (ckpt / name).unlink()
    with pytest.raises(CheckpointError, match=rf"{name} is missing"):
        load(ckpt)


def test_config_not_json(ckpt):
    (ckpt / "config.json").write_text("{ d_model: 64")
    with pytest.raises(CheckpointError, match=r"config.json is not valid JSON .*re-save"):
        load(ckpt)


def test_config_not_an_object(ckpt):
    (ckpt / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="config.json must hold a JSON object"):
        load(ckpt)


def test_config_unknown_key(ckpt):
    _edit_config(ckpt, hidden_size=64)
    with pytest.raises(CheckpointError, match=r"config.json: ModelConfig: unknown key\(s\) \['hidden_size'\]"):
        load(ckpt)


def test_config_invalid_value(ckpt):
    _edit_config(ckpt, n_kv_heads=3)
    with pytest.raises(CheckpointError, match="config.json: ModelConfig: n_kv_heads=3 must divide n_heads=4"):
        load(ckpt)


def test_config_wrong_format_version(ckpt):
    _edit_config(ckpt, format_version=99)
    with pytest.raises(CheckpointError, match="format_version 99 is not supported"):
        load(ckpt)


def test_weights_garbage(ckpt):
    (ckpt / "model.safetensors").write_bytes(b"\x00not a safetensors file at all")
    with pytest.raises(CheckpointError, match=r"model.safetensors is not a readable safetensors file .*re-save"):
        load(ckpt)


def test_weights_truncated(ckpt):
    path = ckpt / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="model.safetensors is not a readable safetensors file"):
        load(ckpt)


def _rewrite_weights(ckpt, edit):
    path = ckpt / "model.safetensors"
    with safe_open(path, "pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    edit(tensors)
    save_file(tensors, str(path))


def test_weights_missing_tensor(ckpt):
    _rewrite_weights(ckpt, lambda t: t.pop("layers.1.attn.k_geo.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors \['layers.1.attn.k_geo.weight'\]"):
        load(ckpt)


def test_weights_unexpected_tensor(ckpt):
    _rewrite_weights(ckpt, lambda t: t.update({"layers.0.attn.extra": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensors \['layers.0.attn.extra'\]"):
        load(ckpt)


def test_weights_wrong_shape(ckpt):
    _edit_config(ckpt, d_ff=96)
    with pytest.raises(CheckpointError, match=r"layers.0.mlp.gate.weight: file \(128, 64\), config \(96, 64\)"):
        load(ckpt)
