"""Triton kernel source: templates rendered per specialisation, cached on disk by content hash, imported lazily.

A kernel is Python source text with a `@triton.jit` function, rendered from a template (string.Template `$NAME`
placeholders) with the graph's dims, dtypes, cache kinds and chunking baked in. `load(source)` writes it once to
`<cache dir>/<name>_<sha256[:16]>.py` (atomically: temp file, fsync, rename) and imports it; the same source is
never written or imported twice in a process. Triton needs the source on disk (it reads the function's text),
which is why kernels are files and not `exec` strings; the files are also what a user opens to see what ran.

The cache dir is $CARAMBA_CACHE_DIR/triton, else ~/.cache/caramba/triton. The hash covers the source and the
Triton version, so a Triton upgrade never reuses a file written for another version.

Triton is imported only here and only when a kernel is loaded: `import caramba` works without it, and
`require_triton()` says what to install when it is missing. `TRITON_INTERPRET=1` runs the same kernels on the
CPU (CI checks every kernel that way).
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import string
import sys
import tempfile
from pathlib import Path
from types import ModuleType

from caramba.errors import CarambaError
from caramba.fsutil import fsync_dir

_LOADED: dict[str, ModuleType] = {}


class TritonUnavailableError(CarambaError, ImportError):
    """target="cuda" needs triton (and a CUDA GPU, or TRITON_INTERPRET=1 on the CPU)."""


def require_triton() -> ModuleType:
    """The triton module, or a clear error saying what to install."""
    try:
        import triton
    except ImportError as e:
        raise TritonUnavailableError(f"target='cuda' needs triton ({e}); pip install triton, or use target='onnx' "
                                     f"or 'eager' on a machine without a CUDA GPU") from None
    return triton


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def cache_dir() -> Path:
    root = os.environ.get("CARAMBA_CACHE_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "caramba"
    return base / "triton"


def render(template: str, **subs: object) -> str:
    """Substitute `$NAME` placeholders; a placeholder left unfilled is an error (a template bug)."""
    try:
        return string.Template(template).substitute({k: str(v) for k, v in subs.items()})
    except (KeyError, ValueError) as e:
        raise CarambaError(f"kernel template: placeholder {e} has no value") from None


def source_hash(source: str) -> str:
    triton = require_triton()
    return hashlib.sha256(f"triton {triton.__version__}\n{source}".encode()).hexdigest()[:16]


def load(source: str, name: str) -> ModuleType:
    """Import rendered kernel source as a module, through the disk cache. `name`: a short identifier."""
    digest = source_hash(source)
    key = f"{name}_{digest}"
    mod = _LOADED.get(key)
    if mod is not None:
        return mod
    directory = cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{key}.py"
    if not path.exists() or path.read_text() != source:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{key}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(source)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        fsync_dir(directory)
    spec = importlib.util.spec_from_file_location(f"caramba_kernels.{key}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    _LOADED[key] = mod
    return mod
