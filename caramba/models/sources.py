"""Name a model the way the CLI does: a caramba preset, a caramba checkpoint directory, or a Hugging Face directory."""
from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import torch

from caramba.errors import CarambaError
from caramba.models.io import CONFIG_FILE, check_finite, load
from caramba.models.presets import PRESETS, preset
from caramba.models.transformer import Transformer


class ModelSourceError(CarambaError):
    """A --model argument that names no preset and no readable model directory."""


def load_model(spec: str, *, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """The model named by `spec`, in eval mode. Presets get random weights drawn with `seed`; overrides (e.g.
    attention="gqa") apply to presets only. Nothing is downloaded: Hugging Face directories load offline."""
    path = Path(spec)
    if spec in PRESETS:
        torch.manual_seed(seed)
        return Transformer(preset(spec, **overrides)).eval()
    if overrides:
        raise ModelSourceError(f"overrides {sorted(overrides)} only apply to presets, and {spec!r} is not one "
                               f"(presets: {', '.join(PRESETS)})")
    if not path.is_dir():
        raise ModelSourceError(f"{spec!r} is neither a preset ({', '.join(PRESETS)}) nor a model directory")
    config = _read_json(path / CONFIG_FILE)
    if "format_version" in config:
        return load(path)
    if "model_type" in config:
        return _load_hf(path)
    raise ModelSourceError(f"{path / CONFIG_FILE} is neither a caramba config (format_version) nor a Hugging Face "
                           f"config (model_type)")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ModelSourceError(f"{path} is missing: a model directory needs a config.json")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelSourceError(f"{path} is not valid JSON ({e}); restore or regenerate it") from None
    if not isinstance(data, dict):
        raise ModelSourceError(f"{path} holds {type(data).__name__}, not a JSON object")
    return data


def _load_hf(path: Path) -> torch.nn.Module:
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise ModelSourceError("loading a Hugging Face directory needs transformers: pip install 'caramba[hf]'") from None
    if not any(path.glob("*.safetensors")):
        raise ModelSourceError(f"{path} has no *.safetensors weights; caramba loads Hugging Face models offline from "
                               f"safetensors only (save with model.save_pretrained(dir, safe_serialization=True))")
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, use_safetensors=True).eval()
    check_finite(itertools.chain(model.named_parameters(), model.named_buffers()), path)
    return model
