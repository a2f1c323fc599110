"""The architecture, checked: one-way layering (import-linter contracts in pyproject.toml), target names only in
their own backend package, and files a newcomer can read."""
from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "caramba"
# a target's name may be written only inside its own backend package (and in tests and docs)
OWNERS = {"cuda": "codegen/triton", "onnx": "codegen/onnx", "metal": "codegen/metal"}
# files allowed past 500 lines, each with the reason the README's architecture section gives
LONG_FILES: dict[str, str] = {}


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("lint-imports")
    return subprocess.run([str(exe), "--no-cache"], cwd=root, capture_output=True, text=True,
                          env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})


def test_the_import_contracts_hold():
    r = lint_imports(ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "3 kept, 0 broken" in r.stdout


def test_a_back_edge_breaks_the_layering(tmp_path):
    """The contracts can fail: the IR importing the runtime (a back-edge) is reported."""
    shutil.copytree(PACKAGE, tmp_path / "caramba", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    quant = tmp_path / "caramba" / "ir" / "quant.py"
    quant.write_text(quant.read_text() + "\nimport caramba.runtime.kv_cache  # noqa\n")
    r = lint_imports(tmp_path)
    assert r.returncode != 0
    assert "caramba.ir.quant -> caramba.runtime.kv_cache" in r.stdout


def _docstrings(tree: ast.AST) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def target_name_uses(path: Path) -> list[str]:
    """Non-docstring string constants of `path` that are a target name, or hold one in quotes, outside its
    owner package."""
    rel = path.relative_to(PACKAGE).as_posix()
    tree = ast.parse(path.read_text())
    docs = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Constant) or not isinstance(node.value, str) or id(node) in docs:
            continue
        for name, owner in OWNERS.items():
            if rel.startswith(owner + "/"):
                continue
            if node.value == name or re.search(rf"['\"]{name}['\"]", node.value):
                found.append(f"caramba/{rel}:{node.lineno}: {node.value[:60]!r}")
    return found


def test_target_names_appear_only_in_their_backend_package():
    found = [hit for path in sorted(PACKAGE.rglob("*.py")) for hit in target_name_uses(path)]
    assert not found, "target names outside their backend package (ask the registry instead):\n" + "\n".join(found)


def test_the_name_check_can_fail(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('"""a doc naming "cuda" is fine"""\nTARGET = "cuda"\nMSG = f"use target \'onnx\'"\n')
    copy = PACKAGE / "runtime" / "_name_check_probe.py"
    try:
        shutil.copy(bad, copy)
        hits = target_name_uses(copy)
    finally:
        copy.unlink()
    assert [h.split(": ", 1)[0] for h in hits] == ["caramba/runtime/_name_check_probe.py:2",
                                                   "caramba/runtime/_name_check_probe.py:3"]


@pytest.mark.parametrize("path", sorted(p.relative_to(ROOT).as_posix() for p in PACKAGE.rglob("*.py")))
def test_no_file_over_500_lines(path):
    lines = len((ROOT / path).read_text().splitlines())
    assert lines <= 500 or path in LONG_FILES, f"{path} has {lines} lines: split it (or give the reason in the " \
                                               f"README's architecture section and list it in LONG_FILES)"
