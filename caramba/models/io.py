"""Checkpoint directories: config.json + model.safetensors, written atomically, never unpickled.

A quantized checkpoint (save(model, dir, weights="int4")) stores each quantized weight W as `W.qcodes`,
`W.qscales` and, with a zero point, `W.qzeros` (ir/weight_quant.py's layout) in place of `W`, and config.json
names the format and the tensors under "quantization". load() checks every stored tensor against the format and
the model's shapes, gives the module the decoded weights (it computes what the quantized model computes) and
attaches the tensors as `model.caramba_weights`, which caramba.compile uses as stored: never re-quantized.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from caramba.errors import CarambaError
from caramba.fsutil import fsync_dir
from caramba.ir.weight_quant import (SUFFIXES, QWeight, StoredWeights, WeightQuantError, WeightSpecError, check_stored,
                                     parse_weights, quantize_weight)

from .config import ConfigError, ModelConfig
from .transformer import Transformer

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
_CHECKPOINT_FILES = frozenset({CONFIG_FILE, WEIGHTS_FILE})


class CheckpointError(CarambaError, ValueError):
    """A checkpoint directory that cannot be read back into a Transformer."""


def save(model: Transformer, directory: str | os.PathLike[str], *, weights: Any = None,
         quantize_embeddings: bool = False) -> Path:
    """Write `model` to `directory` (config.json + model.safetensors) and return the path.

    weights ("int8", "int4", "int4:g64:asym", ...; see caramba.compile) stores the linear weights quantized (the
    LM head and the embedding table too with quantize_embeddings=True): the tensors caramba.compile(model,
    weights=...) would make, so compiling the loaded checkpoint gives the same weights bit for bit. A model loaded
    from a quantized checkpoint is saved with its stored tensors (weights None or its own format).

    The files are written into a hidden sibling and renamed into place, so
    `directory` never holds a half-written checkpoint: an interrupted save leaves
    the old one (or, after a crash in the instant between the two renames, the
    old one under a hidden `.NAME.old-*` sibling). An existing directory is
    replaced only if it holds nothing but checkpoint files.
    """
    target = Path(directory)
    _check_replaceable(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _sibling(target, "tmp")
    staging.mkdir()  # mkdir, not mkdtemp: the checkpoint should get umask permissions, not 0700
    quantized = _quantized(model, weights, quantize_embeddings)
    try:
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        _write_config(model.config, staging / CONFIG_FILE, quantized, dtype)
        _write_weights(model, staging / WEIGHTS_FILE, quantized)
        fsync_dir(staging)
        _swap_into_place(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def load(directory: str | os.PathLike[str], dtype: torch.dtype | None = None) -> Transformer:
    """Read a checkpoint written by `save`; the model comes back in eval mode.

    `dtype` casts the weights (the RoPE table stays fp32); None keeps the stored dtype.
    """
    path = Path(directory)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory; pass a directory written by caramba.models.save.")
    config, quantization = _read_config(path / CONFIG_FILE)
    tensors = _read_weights(path / WEIGHTS_FILE)
    with torch.device("meta"):
        model = Transformer(config)  # no memory, no init: every weight comes from the file
    stored = _read_quantized(model, tensors, quantization, path) if quantization is not None else None
    _check_tensors(model, tensors, path / WEIGHTS_FILE)
    check_finite(tensors.items(), path / WEIGHTS_FILE)
    model.load_state_dict(tensors, assign=True)
    if stored is not None:
        model.caramba_weights = stored
    model.rotary.reset_inv_freq("cpu")  # non-persistent, so still on meta after assign
    if dtype is not None:
        model.to(dtype=dtype)
    return model.eval()


# ---- save ------------------------------------------------------------------------------


def _check_replaceable(target: Path) -> None:
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory; choose another path.")
    if target.is_dir():
        foreign = sorted(p.name for p in target.iterdir() if p.name not in _CHECKPOINT_FILES)
        if foreign:
            raise FileExistsError(
                f"refusing to replace {target}: it holds files that are not a caramba checkpoint "
                f"({foreign[:5]}); save to a new or empty directory."
            )


def _write_config(config: ModelConfig, path: Path, quantized: StoredWeights | None = None,
                  dtype: torch.dtype = torch.float32) -> None:
    data = {"format_version": FORMAT_VERSION, **config.to_dict()}
    if quantized is not None:
        data["quantization"] = {"weights": str(quantized.spec), "embeddings": quantized.embeddings,
                                "dtype": str(dtype).removeprefix("torch."), "tensors": sorted(quantized.weights)}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _write_weights(model: nn.Module, path: Path, quantized: StoredWeights | None = None) -> None:
    # Tied embeddings have no lm_head entry (see Transformer), so each tensor is stored once.
    tensors = {name: t.detach().contiguous().cpu() for name, t in model.state_dict().items()}
    metadata = {"format": "pt", "format_version": str(FORMAT_VERSION)}
    if quantized is not None:
        for name, q in quantized.weights.items():
            del tensors[name]
            tensors.update({name + SUFFIXES[role]: t.detach().contiguous().cpu() for role, t in q.tensors.items()})
        metadata["caramba.weights"] = str(quantized.spec)
    save_file(tensors, str(path), metadata=metadata)
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def quantizable(model: nn.Module, embeddings: bool) -> list[str]:
    """The state-dict names compile(weights=...) quantizes in a Transformer: every nn.Linear's weight but the LM
    head; with `embeddings`, the head and the embedding table too (a tied head is the table)."""
    head = getattr(model, "lm_head", None)
    names = [f"{name}.weight" for name, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head]
    if embeddings:
        names += [f"{name}.weight" for name, m in model.named_modules()
                  if isinstance(m, nn.Embedding) or (head is not None and m is head)]
    return names


def _quantized(model: nn.Module, weights: Any, embeddings: bool) -> StoredWeights | None:
    """What save writes quantized: the model's stored tensors (a loaded quantized checkpoint) or fresh ones."""
    spec = parse_weights(weights)
    stored = getattr(model, "caramba_weights", None)
    if isinstance(stored, StoredWeights):
        if spec is not None and spec != stored.spec:
            raise WeightQuantError(f"this model holds {stored.spec} weights (a quantized checkpoint); save it with "
                                   f"weights=None or {str(stored.spec)!r}, or quantize the float checkpoint instead")
        return stored
    if spec is None:
        if embeddings:
            raise WeightSpecError("quantize_embeddings=True needs weights='int8' or 'int4' (...) too")
        return None
    state = model.state_dict()
    return StoredWeights(spec, {n: quantize_weight(state[n], spec) for n in quantizable(model, embeddings)},
                         embeddings)


def _sibling(target: Path, kind: str) -> Path:
    """A fresh hidden name next to target: same filesystem, so renames are atomic."""
    return target.parent / f".{target.name}.{kind}-{uuid.uuid4().hex}"


def _swap_into_place(staging: Path, target: Path) -> None:
    # rename(2) cannot replace a non-empty directory, so move the old one aside first;
    # if the second rename fails the old checkpoint is put back.
    if not target.exists():
        os.replace(staging, target)
    else:
        old = _sibling(target, "old")
        os.replace(target, old)
        try:
            os.replace(staging, target)
        except BaseException:
            os.replace(old, target)
            raise
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(target.parent)


# ---- load ------------------------------------------------------------------------------


def _read_config(path: Path) -> tuple[ModelConfig, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; a checkpoint directory needs the config.json written by save.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); re-save the model with caramba.models.save.") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(data).__name__}; re-save the model.")
    quantization = data.pop("quantization", None)
    return _config_from_json(data, path), quantization


def _config_from_json(data: dict[str, Any], path: Path) -> ModelConfig:
    version = data.pop("format_version", None)
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format_version {version!r} is not supported (expected {FORMAT_VERSION}); "
            "re-save the model with this version of caramba."
        )
    try:
        return ModelConfig.from_dict(data)
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from e


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; a checkpoint directory needs the weights written by save.")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error type for every kind of damage
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({e}); it is damaged or truncated, re-save the model."
        ) from e


def _read_quantized(model: nn.Module, tensors: dict[str, torch.Tensor], quantization: Any,
                    path: Path) -> StoredWeights:
    """Replace each quantized weight's stored tensors in `tensors` by its decoded weight (in the dtype of the
    checkpoint's float tensors) after checking them against the format and the model; the stored ones, by name."""
    where = path / CONFIG_FILE
    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if not isinstance(quantization, dict) or set(quantization) != {"weights", "embeddings", "dtype", "tensors"} or \
            not isinstance(quantization["tensors"], list) or quantization["dtype"] not in dtypes:
        raise CheckpointError(f"{where}: 'quantization' must be an object with weights, embeddings, dtype (float32, "
                              f"float16 or bfloat16) and tensors (a list of names); re-save the model with "
                              f"caramba.models.save(..., weights=...)")
    try:
        spec = parse_weights(quantization["weights"])
    except WeightSpecError as e:
        raise CheckpointError(f"{where}: {e}") from None
    expected, dtype = model.state_dict(), dtypes[quantization["dtype"]]
    out: dict[str, QWeight] = {}
    for name in quantization["tensors"]:
        if not isinstance(name, str) or name not in expected or expected[name].dim() != 2:
            raise CheckpointError(f"{where}: quantized tensor {name!r} is not a 2-D weight of this model; the files "
                                  f"come from different models, re-save them together")
        parts = {role: tensors.pop(name + suffix) for role, suffix in SUFFIXES.items() if name + suffix in tensors}
        try:
            q = check_stored(name, parts, spec, *expected[name].shape)
        except WeightQuantError as e:
            raise CheckpointError(f"{path / WEIGHTS_FILE}: {e}; the file is damaged or does not match config.json, "
                                  f"re-save the model") from None
        out[name] = q
        tensors[name] = q.dequantize(dtype)
    return StoredWeights(spec, out, bool(quantization["embeddings"]))


def check_finite(named: Iterable[tuple[str, torch.Tensor]], source: str | os.PathLike[str]) -> None:
    """Refuse weights holding NaN or inf: every target would compute garbage from them (NaN logits, NUL bytes
    sampled), and the eager interpreter alone would notice, at the first cache write. Names the first bad tensor."""
    for name, t in named:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
            raise CheckpointError(
                f"{source}: tensor {name!r} holds non-finite values ({nan:,} NaN, {inf:,} inf of {t.numel():,}); "
                "the checkpoint is damaged or was saved after training diverged: re-save it from good weights."
            )


def _check_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match config.json: missing tensors {missing[:8]}, unexpected tensors "
            f"{unexpected[:8]}; the two files come from different models, re-save them together."
        )
    wrong = [
        f"{name}: file {tuple(tensors[name].shape)}, config {tuple(t.shape)}"
        for name, t in expected.items()
        if tensors[name].shape != t.shape
    ]
    if wrong:
        raise CheckpointError(
            f"{path} has tensors whose shapes do not match config.json ({wrong[:8]}); "
            "the two files come from different models, re-save them together."
        )
