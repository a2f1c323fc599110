"""benchmarks/metal_check.py, the script for the first Mac, runs off a Mac in its emulator mode: every kernel class
compiled by the CPU emulator and checked against its reference, exit status 0, a summary of ok lines."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "metal_check.py"


def test_metal_check_passes_in_emulator_mode(tmp_path):
    # sources to a temporary cache; the emulator's objects where the codegen tests keep theirs (reused across runs)
    env = dict(os.environ, CARAMBA_METAL_EMULATE="1", CARAMBA_CACHE_DIR=str(tmp_path))
    env.setdefault("CARAMBA_METAL_BUILD_DIR", str(Path.home() / ".cache" / "caramba-tests" / "metal"))
    r = subprocess.run([sys.executable, str(SCRIPT), "--emulate", "--quick"], capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    assert "FAIL" not in out
    for section in ("compile", "numerics"):
        checks, ok, failed = map(int, re.search(rf"\| {section} \| (\d+) \| (\d+) \| (\d+) \|", out).groups())
        assert checks == ok > 0 and failed == 0
    for line in ("ok   kv_append q4_0 F=72 x half ring 3: emulator vs reference",
                 "ok   decode gqa q4_0/q8_0 q half P=3 sg=2 ring 8: emulator vs reference",
                 "ok   prefill dba nf4 q float P=1 sg=4: emulator vs reference"):
        assert line in out
    assert "speed, e2e and --refine-chunking need a Mac" in out
