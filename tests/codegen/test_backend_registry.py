"""The backend registry: names, refusals, what target="auto" picks, and `caramba targets`."""
from __future__ import annotations

import pytest

from caramba.codegen import backend as targets
from caramba.codegen.backend import Availability, Backend, Kernels, TargetError


def fake(name: str, ok: bool = True, rank: int | None = None, auto: bool = True) -> Backend:
    return Backend(name=name, summary="a test backend", availability=lambda: Availability(ok, f"{name} reason", auto),
                   auto_rank=rank, kernels=lambda device, options: Kernels())


@pytest.fixture
def registered():
    added = []

    def add(backend: Backend) -> Backend:
        added.append(backend.name)
        return targets.register(backend)
    yield add
    for name in added:
        targets.unregister(name)


def test_the_built_in_backends_register_from_their_packages():
    assert targets.names()[0] == "auto"
    assert {"eager", "onnx", "cuda"} <= set(targets.names())
    assert targets.get("eager").reference and not targets.get("onnx").reference
    assert targets.get("onnx").runner is not None and targets.get("cuda").kernels is not None


def test_auto_takes_the_lowest_rank_that_runs_here_and_may_pick(registered):
    registered(fake("gone", ok=False, rank=-3))  # cannot run here
    registered(fake("emulated", ok=True, rank=-2, auto=False))  # runs, but only when named
    assert targets.resolve("auto").name not in ("gone", "emulated")
    registered(fake("first", ok=True, rank=-1))
    assert targets.resolve("auto").name == "first"
    assert targets.names()[1:4] == ["gone", "emulated", "first"]  # in the order auto tries them


def test_refusals_say_what_is_wrong(registered):
    registered(fake("gone", ok=False))
    with pytest.raises(TargetError, match="target 'gone' cannot run on this machine: gone reason"):
        targets.resolve("gone")
    with pytest.raises(TargetError, match="unknown target 'nope'; choose one of auto, "):
        targets.get("nope")
    with pytest.raises(TargetError, match="registered already"):
        targets.register(fake("gone"))
    with pytest.raises(TargetError, match="identifier other than 'auto'"):
        targets.register(fake("auto"))
    with pytest.raises(TargetError, match="exactly one of kernels"):
        Backend(name="both", summary="", availability=lambda: Availability(True), kernels=lambda d, o: Kernels(),
                runner=lambda *a: None)
    with pytest.raises(TargetError, match="takes no option 'x'; its options: a"):
        Backend(name="opt", summary="", availability=lambda: Availability(True), options={"a": int},
                kernels=lambda d, o: Kernels()).check_options({"x": 1})
    with pytest.raises(TargetError, match="'a' must be int"):
        Backend(name="opt", summary="", availability=lambda: Availability(True), options={"a": int},
                kernels=lambda d, o: Kernels()).check_options({"a": True})


def test_the_targets_command_lists_every_backend_and_why(capsys):
    from caramba.cli import main

    assert main(["targets"]) == 0
    out = capsys.readouterr().out
    for name in ("cuda", "onnx", "eager"):
        assert f"\n{name}: " in f"\n{out}"
    cuda = out[out.index("cuda: "):].split("\n")
    ok = targets.get("cuda").availability().ok
    assert cuda[0].startswith("cuda: available" if ok else "cuda: not available")
    assert cuda[2].startswith("  here: " if ok else "  why: ")
    assert "target_options: cuda_graphs (bool)" in out and "target_options: ort_contrib (bool)" in out
