"""Shared by the codegen tests: rendered Triton kernels go to a temporary cache dir, not the user's."""
from __future__ import annotations

import os

import pytest

# Triton reads TRITON_INTERPRET when it is imported (its own jit helpers, tl.sum among them, are built then): set
# the default before any test imports it, so a kernel test run alone interprets exactly as in the whole suite.
os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session", autouse=True)
def kernel_cache_dir(tmp_path_factory):
    old = os.environ.get("CARAMBA_CACHE_DIR")
    os.environ["CARAMBA_CACHE_DIR"] = str(tmp_path_factory.mktemp("kernels"))
    yield
    if old is None:
        os.environ.pop("CARAMBA_CACHE_DIR")
    else:
        os.environ["CARAMBA_CACHE_DIR"] = old
