"""The `caramba` command: runs in a subprocess like a user's shell would, with clear errors on bad arguments."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from caramba.models import Transformer, preset, save
from caramba.passes import pipeline_for
from tests.helpers import hf_model, rel_err


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "caramba.cli", *args], capture_output=True, text=True, timeout=300)


def test_compile_preset_prints_summary_and_ir():
    r = run_cli("compile", "--model", "tiny", "--attention", "gqa", "--target", "eager", "--print-ir")
    assert r.returncode == 0, r.stderr
    assert "compiled tiny for eager (f32)" in r.stdout
    assert "attention 2" in r.stdout and "sdpa" not in r.stdout  # fused by the pipeline
    assert "graph @forward(%input_ids: i64[batch, seq]) {" in r.stdout


def test_compile_checkpoint_and_hf_directories(tmp_path):
    save(Transformer(preset("tiny")), tmp_path / "ckpt")
    r = run_cli("compile", "--model", str(tmp_path / "ckpt"), "--target", "eager")
    assert r.returncode == 0, r.stderr
    assert "decoupled_attention 2" in r.stdout  # the tiny preset is decoupled: one fused op per layer
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
        assert rel_err(caramba.compile(loaded, target="eager")(ids), model(ids)) <= 1e-5


def test_compile_dump_flags(tmp_path):
    import json

    out = tmp_path / "dump"
    r = run_cli("compile", "--model", "tiny", "--target", "eager", "--dump-dir", str(out), "--print-after", "cse",
                "--disable-passes", "fold_constants,dce", "--check-numerics")
    assert r.returncode == 0, r.stderr
    assert f"pass dump written to {out}" in r.stdout
    rows = json.loads((out / "summary.json").read_text())["passes"]
    names = [p.name for p in pipeline_for("eager")]
    assert [(row["name"], row["skipped"]) for row in rows] == [("import", None)] + [
        (n, "disabled" if n in ("fold_constants", "dce") else None) for n in names]
    assert all(row["max_err"] < 1e-6 for row in rows if not row["skipped"])
    assert r.stderr.count("*** IR after ") == 1 and "*** IR after cse ***" in r.stderr
    assert "IR after" not in r.stdout
    cse_dir = f"{names.index('cse') + 1:02d}-cse"
    diff = (out / cse_dir / "diff.patch").read_text()
    assert "\n-  %" in diff and "\n+  %" in diff
    assert not (out / "03-dce").exists() and (out / "00-import" / "ir.txt").exists()
    assert f"{cse_dir[:2]}  cse" in (out / "summary.txt").read_text()
    fused = json.loads((out / "summary.json").read_text())["passes"][names.index("fuse_decoupled_attention") + 1]
    assert fused["rewrites"] == {"decoupled_attention": 2} and fused["changed"]


def test_compile_dump_dir_from_environment_and_bad_pass_names(tmp_path):
    import os

    env = {**os.environ, "CARAMBA_DUMP_DIR": str(tmp_path / "env-dump"), "CARAMBA_PASS_LIMIT": "2"}
    r = subprocess.run([sys.executable, "-m", "caramba.cli", "compile", "--model", "tiny", "--target", "eager"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    assert "BISECT: running pass (2) fold_constants" in r.stderr and "BISECT: NOT running pass (3) dce" in r.stderr
    assert (tmp_path / "env-dump" / "02-fold_constants" / "ir.txt").exists()
    assert not (tmp_path / "env-dump" / "03-dce").exists()
    r = run_cli("compile", "--model", "tiny", "--disable-passes", "cse,fuse_everything")
    assert r.returncode == 2
    assert "unknown pass name(s) ['fuse_everything']" in r.stderr and "canonicalize" in r.stderr


def test_bisect_command_reports_no_drift():
    r = run_cli("bisect", "--model", "tiny", "--attention", "gqa", "--seq", "6")
    assert r.returncode == 0, r.stderr
    assert "caramba bisect: no pass drifts beyond tolerance 1.0e-04" in r.stdout
    names = [p.name for p in pipeline_for("eager")]
    assert f"{len(names):02d}-{names[-1]}" in r.stdout and "fuse_attention" in r.stdout
