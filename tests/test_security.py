"""Issue 18 item 6: no pickle on a load path, and the cache directory's files get the user's umask and are never
written (or loaded) through a symlink that leads out of the cache directory."""
from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import pytest

import caramba
from caramba.codegen import chunking
from caramba.codegen.metal import emulator
from caramba.codegen.source import SourceCache
from caramba.fsutil import UnsafeCachePathError, atomic_write_text, safe_cache_path

PACKAGE = Path(caramba.__file__).parent
PICKLERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve"}
UNPICKLE = {"load", "loads", "Unpickler", "open"}


def _keyword_true(call: ast.Call, name: str) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is True for k in call.keywords)


def unsafe_loads(source: str, filename: str = "<source>") -> list[str]:
    """Every unpickling call in `source`: torch.load without weights_only=True, pickle-family load/loads,
    np.load(allow_pickle=True), and unpickling names imported from a pickle-family module."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLERS:
            found += [f"{where}: from {node.module} import {a.name}" for a in node.names if a.name in UNPICKLE]
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        owner = node.func.value
        module = owner.id if isinstance(owner, ast.Name) else owner.attr if isinstance(owner, ast.Attribute) else ""
        attr = node.func.attr
        if module == "torch" and attr == "load" and not _keyword_true(node, "weights_only"):
            found.append(f"{where}: torch.load without weights_only=True")
        elif module in PICKLERS and attr in UNPICKLE:
            found.append(f"{where}: {module}.{attr}")
        elif module in ("np", "numpy") and attr == "load" and _keyword_true(node, "allow_pickle"):
            found.append(f"{where}: np.load(allow_pickle=True)")
    return found


def test_the_scanner_finds_each_kind_of_unpickling():
    bad = ("import torch, pickle, numpy as np\nfrom pickle import loads\n"
           "torch.load(p)\ntorch.load(p, weights_only=False)\npickle.load(f)\npickle.loads(b)\n"
           "np.load(p, allow_pickle=True)\n")
    assert len(unsafe_loads(bad)) == 6
    good = "import torch, numpy as np\ntorch.load(p, weights_only=True)\nnp.load(p)\njson.loads(s)\n"
    assert unsafe_loads(good) == []


def test_no_pickle_on_any_load_path_in_the_package():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20  # the scan really looks at the package
    found = [hit for f in files for hit in unsafe_loads(f.read_text(encoding="utf-8"), str(f.relative_to(PACKAGE)))]
    assert found == [], "unpickling on a load path (use safetensors / json, or torch.load(..., weights_only=True)):\n" \
        + "\n".join(found)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("CARAMBA_CACHE_DIR", str(root))
    monkeypatch.delenv("CARAMBA_METAL_BUILD_DIR", raising=False)
    outside = tmp_path / "outside"
    outside.mkdir()
    return root, outside


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    try:
        yield 0o027
    finally:
        os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_a_cache_file_gets_the_users_umask(cache, mask):
    old = os.umask(mask)
    try:
        path = SourceCache("triton", "salt").write("x = 1\n", "kernel")
        plan_path = cache[0] / "plan" / "chunking.json"
        chunking.ChunkingPlan("cpu", 1, lambda key, sm: chunking.Chunking(1, 32), path=plan_path).tune(
            chunking.ChunkKey.of(1, 4096, (64,), ("fp16",), 4, 4), lambda c: 1.0, [chunking.Chunking(1, 32)])
    finally:
        os.umask(old)
    assert path.read_text() == "x = 1\n"
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask
    assert plan_path.stat().st_mode & 0o777 == 0o666 & ~mask


def test_atomic_write_text_honours_the_umask_when_replacing_a_file(tmp_path, umask_027):
    target = tmp_path / "f.txt"
    target.write_text("old")
    target.chmod(0o600)
    atomic_write_text(target, "new")
    assert target.read_text() == "new" and target.stat().st_mode & 0o777 == 0o640


def test_a_symlinked_directory_leading_outside_is_refused(cache):
    root, outside = cache
    root.mkdir()
    (root / "triton").symlink_to(outside, target_is_directory=True)
    with pytest.raises(UnsafeCachePathError, match=r"triton is a symlink to .*outside.*Remove the link"):
        SourceCache("triton", "salt").write("x = 1\n", "kernel")
    assert list(outside.iterdir()) == []


def test_a_symlinked_file_leading_outside_is_refused(cache):
    root, outside = cache
    secret = outside / "secret.txt"
    secret.write_text("mine")
    cache_ = SourceCache("triton", "salt")
    cache_.directory.mkdir(parents=True)
    link = cache_.directory / (cache_.key("x = 1\n", "kernel") + ".py")
    link.symlink_to(secret)
    with pytest.raises(UnsafeCachePathError, match=str(link)):
        cache_.write("x = 1\n", "kernel")
    assert secret.read_text() == "mine" and list(outside.iterdir()) == [secret]


def test_a_dangling_link_outside_is_refused_and_creates_nothing(cache):
    root, outside = cache
    root.mkdir()
    (root / "triton").symlink_to(outside / "not-yet", target_is_directory=True)
    with pytest.raises(UnsafeCachePathError):
        SourceCache("triton", "salt").write("x = 1\n", "kernel")
    assert list(outside.iterdir()) == []


def test_links_that_stay_inside_the_cache_and_a_linked_root_are_fine(cache, tmp_path, monkeypatch):
    root, _ = cache
    (root / "real").mkdir(parents=True)
    (root / "triton").symlink_to(root / "real", target_is_directory=True)
    path = SourceCache("triton", "salt").write("x = 1\n", "kernel")
    assert (root / "real" / path.name).read_text() == "x = 1\n"
    linked_root = tmp_path / "linked-cache"
    linked_root.symlink_to(root, target_is_directory=True)  # the whole cache moved to another disk
    monkeypatch.setenv("CARAMBA_CACHE_DIR", str(linked_root))
    assert SourceCache("other", "salt").write("y = 2\n", "kernel").read_text() == "y = 2\n"


def test_the_chunking_plan_refuses_a_link_leading_outside(cache):
    root, outside = cache
    root.mkdir()
    theirs = outside / "chunking.json"
    theirs.write_text(json.dumps({"format_version": chunking.FORMAT_VERSION, "devices": {}}))
    (root / "chunking.json").symlink_to(theirs)
    plan = chunking.ChunkingPlan("cpu", 1, lambda key, sm: chunking.Chunking(1, 32))
    assert plan.path == root / "chunking.json"
    with pytest.raises(UnsafeCachePathError, match="chunking.json is a symlink"):
        plan.tune(chunking.ChunkKey.of(1, 4096, (64,), ("fp16",), 4, 4), lambda c: 1.0, [chunking.Chunking(1, 32)])
    assert json.loads(theirs.read_text())["devices"] == {}


def test_the_metal_emulator_never_builds_or_loads_through_a_link_leading_outside(cache, monkeypatch):
    root, outside = cache
    root.mkdir()
    (root / "metal").symlink_to(outside, target_is_directory=True)
    monkeypatch.setattr(emulator, "_compiler_version", lambda cxx: "test compiler")
    monkeypatch.setattr(emulator, "_build", lambda *a: pytest.fail("built through the link"))
    with pytest.raises(UnsafeCachePathError, match="metal is a symlink"):
        emulator.shared_object("int x;\n", "kernel")
    assert list(outside.iterdir()) == []


def test_safe_cache_path_rejects_paths_not_under_the_root(tmp_path):
    with pytest.raises(ValueError, match="not under the cache directory"):
        safe_cache_path(tmp_path / "cache", tmp_path / "elsewhere" / "f")
    with pytest.raises(UnsafeCachePathError, match="'..'"):
        safe_cache_path(tmp_path / "cache", tmp_path / "cache" / ".." / "f")
    assert safe_cache_path(tmp_path / "cache", tmp_path / "cache" / "a" / "f") == tmp_path / "cache" / "a" / "f"
