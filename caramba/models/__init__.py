"""Reference eager models (standard, GQA, decoupled DBA), presets and safetensors I/O."""

from .config import ConfigError, ModelConfig
from .io import CheckpointError, load, save
from .presets import PRESETS, preset
from .transformer import Transformer, count_parameters

__all__ = [
    "PRESETS",
    "CheckpointError",
    "ConfigError",
    "ModelConfig",
    "Transformer",
    "count_parameters",
    "load",
    "preset",
    "save",
]
