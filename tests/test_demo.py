"""The README's first command: examples/demo.py runs end to end and prints what the README says it prints."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

DEMO = Path(__file__).resolve().parents[1] / "examples" / "demo.py"


def test_demo_generates_with_a_q8_0_cache():
    # From another working directory: the demo finds examples/tiny-dba next to itself.
    r = subprocess.run([sys.executable, str(DEMO), "--max-new-tokens", "16"], capture_output=True, text=True,
                       timeout=300, cwd=DEMO.parents[1] / "tests")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "model: tiny-dba, 1.97M parameters, decoupled attention" in out
    assert "compiled for target 'onnx'" in out and "decoupled_attention 4" in out  # auto, no GPU: onnx
    assert "cached_decoupled_attention 4" in out  # the decode graph reads the q8_0 cache
    text = out.split("(greedy):\n\n", 1)[1].split("\n\n16 tokens:", 1)[0]
    assert text.startswith('def read_config(path):\n    """') and len(text) > len('def read_config(path):\n    """')
    assert "\ufffd" not in text
    assert re.search(r"\n16 tokens: \d+\.\d tok/s overall, \d+\.\d tok/s decode", out)
    assert ("KV cache for 256 tokens x 4 layers (k_sem, k_geo, v): q8_0 522,240 bytes vs fp16 983,040 bytes "
            "(0.531x, 1.88x smaller)") in out  # 256: the positions tiny-dba was trained on (its config.json)
