"""caramba: a compiler for transformer inference (torch.fx capture -> IR -> passes -> Triton | Metal | ONNX)."""
from caramba.compiler import CacheFallbackWarning, CompiledModel, cast_model, compile
from caramba.export import export_onnx
from caramba.runtime import CacheConfig, GenerateConfig, Generator, SpeculativeConfig
from caramba.runtime import SpeculativeGenerator
from caramba.errors import (CaptureError, CarambaError, InputError, ParseError, UnsupportedOpError,
                            VerificationError)
from caramba._version import __version__

__all__ = [
    "CacheFallbackWarning", "CaptureError", "CarambaError", "CompiledModel", "InputError", "ParseError", "UnsupportedOpError",
    "VerificationError", "cast_model", "compile", "export_onnx", "__version__", "CacheConfig", "GenerateConfig",
    "Generator", "SpeculativeConfig", "SpeculativeGenerator",
]
