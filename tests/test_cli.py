"""The `caramba` command: runs in a subprocess like a user's shell would, with clear errors on bad arguments."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from caramba.models import Transformer, preset, save
from tests.helpers import hf_model


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "caramba.cli", *args], capture_output=True, text=True, timeout=300)


def test_compile_preset_prints_summary_and_ir():
    r = run_cli("compile", "--model", "tiny", "--attention", "gqa", "--target", "eager", "--print-ir")
    assert r.returncode == 0, r.stderr
    assert "compiled tiny for eager (f32)" in r.stdout
    assert "sdpa 2" in r.stdout
    assert "graph @forward(%input_ids: i64[batch, seq]) {" in r.stdout


def test_compile_checkpoint_and_hf_directories(tmp_path):
    save(Transformer(preset("tiny")), tmp_path / "ckpt")
    r = run_cli("compile", "--model", str(tmp_path / "ckpt"), "--target", "eager")
    assert r.returncode == 0, r.stderr
    assert "softmax 2" in r.stdout  # the tiny preset is decoupled: one softmax per layer
    hf_model("qwen2").save_pretrained(tmp_path / "hf", safe_serialization=True)
    r = run_cli("compile", "--model", str(tmp_path / "hf"), "--target", "eager", "--dtype", "bf16")
    assert r.returncode == 0, r.stderr
    assert "(bf16)" in r.stdout


@pytest.mark.parametrize("args,needle", [
    (["compile", "--model", "nope"], "'nope' is neither a preset"),
    (["compile", "--model", "tiny", "--dtype", "fp13"], "unknown dtype 'fp13'"),
    (["compile", "--model", "tiny", "--target", "onnx"], "target 'onnx' is not implemented"),
    (["compile", "--model", "tiny", "--target", "tpu"], "invalid choice: 'tpu'"),
    (["compile", "--model", "tiny", "--max-seq-len", "1"], "--max-seq-len must be at least 2"),
])
def test_bad_arguments_exit_nonzero_with_message(args, needle):
    r = run_cli(*args)
    assert r.returncode != 0
    assert needle in r.stderr


def test_corrupt_model_directory(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    r = run_cli("compile", "--model", str(tmp_path))
    assert r.returncode == 2
    assert "is not valid JSON" in r.stderr
    assert "Traceback" not in r.stderr


def test_compiled_checkpoint_matches_model(tmp_path):
    import caramba
    from caramba.models.sources import load_model

    torch.manual_seed(3)
    model = Transformer(preset("tiny", attention="gqa")).eval()
    save(model, tmp_path / "m")
    loaded = load_model(str(tmp_path / "m"))
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        assert torch.equal(caramba.compile(loaded, target="eager")(ids), model(ids))
