"""Triton kernel source: rendered per specialisation (codegen/source.py: templates and the on-disk cache, shared
with every text-emitting backend), imported lazily.

`load(source, name)` writes the source once to `<cache dir>/triton/<name>_<sha256[:16]>.py` and imports it; the same
source is never written or imported twice in a process. Triton needs the source on disk (it reads the function's
text), which is why kernels are files and not `exec` strings. The hash covers the source and the Triton version,
so a Triton upgrade never reuses a file written for another version.

Triton is imported only here and only when a kernel is loaded: `import caramba` works without it, and
`require_triton()` says what to install when it is missing. `TRITON_INTERPRET=1` runs the same kernels on the
CPU (CI checks every kernel that way).
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

from caramba import flags
from caramba.codegen.source import SourceCache, render
from caramba.errors import CarambaError

__all__ = ["TritonUnavailableError", "cache_dir", "interpreting", "load", "render", "require_triton"]

_LOADED: dict[str, ModuleType] = {}


class TritonUnavailableError(CarambaError, ImportError):
    """target="cuda" needs triton (and a CUDA GPU, or TRITON_INTERPRET=1 on the CPU)."""


def require_triton() -> ModuleType:
    """The triton module, or a clear error saying what to install."""
    try:
        import triton
    except ImportError as e:
        raise TritonUnavailableError(f"target='cuda' needs triton ({e}); pip install triton, or pick another target "
                                     f"(`caramba targets` lists them)") from None
    return triton


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def cache_dir() -> Path:
    return flags.cache_dir() / "triton"


def _sources() -> SourceCache:
    return SourceCache("triton", f"triton {require_triton().__version__}")


def load(source: str, name: str) -> ModuleType:
    """Import rendered kernel source as a module, through the disk cache. `name`: a short identifier."""
    cache = _sources()
    key = cache.key(source, name)
    mod = _LOADED.get(key)
    if mod is not None:
        return mod
    path = cache.write(source, name)
    spec = importlib.util.spec_from_file_location(f"caramba_kernels.{key}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    _LOADED[key] = mod
    return mod
