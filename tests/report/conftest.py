"""Shared by the report tests: one compile of the tiny preset with a report (eager), reused by every test that
only reads the page; kernels rendered by the cuda dry run go to a temporary cache dir."""
from __future__ import annotations

import os

import pytest

# Triton reads TRITON_INTERPRET when it is imported: target cuda runs on the CPU here (its report is a dry run).
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


@pytest.fixture(scope="session")
def tiny_report(tmp_path_factory):
    """(compiled model, path of its report): the tiny DBA preset on target eager."""
    import caramba
    from tests.passes.captured import model

    path = tmp_path_factory.mktemp("report") / "tiny.html"
    cm = caramba.compile(model("tiny-decoupled"), target="eager", report=str(path))
    return cm, path
