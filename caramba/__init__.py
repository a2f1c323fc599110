"""caramba: a compiler for transformer inference (torch.fx capture -> IR -> passes -> Triton | Metal | ONNX)."""
from caramba.compiler import CompiledModel, cast_model, compile
from caramba.runtime import CacheConfig, GenerateConfig, Generator, SpeculativeConfig
from caramba.runtime import SpeculativeGenerator
from caramba.errors import (CaptureError, CarambaError, InputError, ParseError, UnsupportedOpError,
                            VerificationError)

__version__ = "0.1.0"


def export_onnx(model, out_dir, **options):
    """Compile `model` for target "onnx" and write out_dir/{model.onnx, genai_config.json, caramba.json}
    (caramba.codegen.onnx.export.export_onnx: cache_kind, opset, max_seq_len, dtype, cache_mode, cache_layout
    ("optimum" by default: head-major float caches and attention_mask), ort_contrib, ...)."""
    from caramba.codegen.onnx.export import export_onnx as export

    return export(model, out_dir, **options)


__all__ = [
    "CaptureError", "CarambaError", "CompiledModel", "InputError", "ParseError", "UnsupportedOpError",
    "VerificationError", "cast_model", "compile", "export_onnx", "__version__", "CacheConfig", "GenerateConfig",
    "Generator", "SpeculativeConfig", "SpeculativeGenerator",
]
