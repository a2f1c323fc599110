"""The README's Python snippets run as pasted: every ```python block, in order, as one script in a fresh
directory (later blocks use the `model` and `cm` of earlier ones; target cuda runs through Triton's interpreter)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_the_readme_python_snippets_run_as_pasted(tmp_path):
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 5
    script = "\n".join(b.replace("    ...\n", "    pass\n") for b in blocks)
    env = {**os.environ, "TRITON_INTERPRET": "1", "CARAMBA_CACHE_DIR": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "out" / "model.onnx").exists() and (tmp_path / "dump" / "summary.txt").exists()


def test_the_readme_points_only_at_what_users_have():
    """The README is for the package's users: no links into the developers' ../shared/ folder."""
    assert "../shared" not in README.read_text()
