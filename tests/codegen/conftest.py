"""Shared by the codegen tests: rendered kernels go to a temporary cache dir, not the user's; the Metal emulator's
built objects (content-addressed, written atomically) persist across runs in ~/.cache/caramba-tests/metal (unless
CARAMBA_METAL_BUILD_DIR says where), so a run rebuilds only the kernels whose text changed."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# Triton reads TRITON_INTERPRET when it is imported (its own jit helpers, tl.sum among them, are built then): set
# the default before any test imports it, so a kernel test run alone interprets exactly as in the whole suite.
os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session", autouse=True)
def kernel_cache_dir(tmp_path_factory):
    old = os.environ.get("CARAMBA_CACHE_DIR")
    os.environ["CARAMBA_CACHE_DIR"] = str(tmp_path_factory.mktemp("kernels"))
    os.environ.setdefault("CARAMBA_METAL_BUILD_DIR", str(Path.home() / ".cache" / "caramba-tests" / "metal"))
    yield
    if old is None:
        os.environ.pop("CARAMBA_CACHE_DIR")
    else:
        os.environ["CARAMBA_CACHE_DIR"] = old
