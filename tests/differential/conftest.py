"""The differential suite runs target "cuda" through Triton's interpreter and "metal" through its emulator, as the
codegen tests do: the same environment (TRITON_INTERPRET before triton is imported; rendered kernels in a
temporary cache dir; the emulator's builds kept in ~/.cache/caramba-tests/metal across runs)."""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.codegen.conftest import kernel_cache_dir  # noqa: E402,F401  (the session fixture, autouse)
