"""caramba.export_onnx and `caramba export-onnx`: the directory's files, all-or-nothing writes, the CLI's errors,
and examples/onnx_generate.py generating from an export with onnxruntime and numpy alone."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnxruntime")

import caramba
from caramba.codegen.onnx import export as export_mod
from caramba.models import Transformer, preset

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "onnx_generate.py"


def tiny(attention: str = "decoupled") -> torch.nn.Module:
    torch.manual_seed(0)
    return Transformer(preset("tiny", attention=attention)).eval()


def test_export_writes_model_and_metadata_and_no_genai_config_for_dba(tmp_path):
    """DBA's three caches (and q8_0's codes + scales) are nothing onnxruntime-genai can bind: no genai_config.json,
    one progress line saying why; caramba.json describes the cache."""
    out, lines = tmp_path / "tiny", []
    result = caramba.export_onnx(tiny(), out, cache_kind="q8_0", max_seq_len=64, progress=lines.append)
    assert sorted(p.name for p in out.iterdir()) == ["caramba.json", "model.onnx"]
    assert result.opset == 23 and result.cache == "q8_0" and result.bytes > 0
    assert [ln for ln in lines if "genai" in ln] == [
        "no genai_config.json: DBA caches three tensors a layer (key_sem, key_geo, value) and onnxruntime-genai "
        "binds one key and one value; examples/onnx_generate.py (onnxruntime + numpy) runs it"]
    import onnx

    model = onnx.load(str(out / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == 10 and model.opset_import[0].version == 23
    meta = json.loads(dict((p.key, p.value) for p in model.metadata_props)["caramba.cache"])
    assert [(t["name"], t["features"], t["kind"]) for t in meta["tensors"]] == [
        ("k_sem", 32, "q8_0"), ("k_geo", 64, "q8_0"), ("v", 64, "q8_0")]
    info = json.loads((out / "caramba.json").read_text())
    assert info["cache_names"]["k_geo"] == "past_key_values.%d.key_geo"
    assert info["cache"]["mode"] == "concat" and "past_key_values.1.value_scales" in info["inputs"]
    assert info["cache"]["layout"] == "optimum" and "attention_mask" in info["inputs"]


def test_default_export_has_optimums_float_cache_shapes_and_attention_mask(tmp_path):
    """The default export (concat, layout "optimum"): fp16 caches (batch, kv_heads, past, head_dim) in and
    (batch, kv_heads, past + seq, head_dim) out, attention_mask (batch, past + seq), as generic tools expect."""
    out = tmp_path / "gqa"
    result = caramba.export_onnx(tiny("gqa"), out, cache_kind="fp16", max_seq_len=64)
    assert (result.mode, result.layout) == ("concat", "optimum")
    import onnx

    graph = onnx.load(str(out / "model.onnx")).graph
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in list(graph.input) + list(graph.output)}
    assert [i.name for i in graph.input][:3] == ["input_ids", "attention_mask", "position_ids"]
    assert dims["attention_mask"] == ["batch_size", "total_sequence_length"]
    assert dims["past_key_values.0.key"] == ["batch_size", 1, "past_sequence_length", 16]
    assert dims["present.1.value"] == ["batch_size", 1, "present_sequence_length", 16]
    meta = json.loads((out / "caramba.json").read_text())["cache"]
    assert meta["tensors"][0]["shape"] == "batch, kv_heads, position, head_dim"


@pytest.mark.parametrize("attention", ["decoupled", "standard", "gqa"])
def test_exported_rotary_embeddings_are_the_standard_op(tmp_path, attention):
    """The written model.onnx of every attention family applies RoPE with RotaryEmbedding (opset 23, domain ""),
    one per rotated tensor per layer (decoupled: q_geo and k_geo; otherwise q and k), and passes the full check."""
    import onnx

    out = tmp_path / attention
    caramba.export_onnx(tiny(attention), out, cache_kind="fp16", max_seq_len=48)
    model = onnx.load(str(out / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    rotary = [n for n in model.graph.node if n.op_type == "RotaryEmbedding"]
    assert len(rotary) == 4 and all(n.domain == "" for n in rotary)
    assert model.opset_import[0].domain == "" and model.opset_import[0].version == 23
    assert not any(n.op_type == "Neg" for n in model.graph.node)


def test_ort_contrib_export_runs_in_the_example(tmp_path):
    """export_onnx(ort_contrib=True): GroupQueryAttention over in-place buffers; the example drives it and gives the
    tokens the caramba layout's concat export gives."""
    model = tiny("decoupled")
    caramba.export_onnx(model, tmp_path / "contrib", cache_kind="q8_0", max_seq_len=48, ort_contrib=True)
    caramba.export_onnx(model, tmp_path / "plain", cache_kind="q8_0", max_seq_len=48, cache_layout="caramba")
    import onnx

    proto = onnx.load(str(tmp_path / "contrib" / "model.onnx"))
    assert "GroupQueryAttention" in {n.op_type for n in proto.graph.node}
    assert json.loads((tmp_path / "contrib" / "caramba.json").read_text())["cache"]["mode"] == "contrib"
    runs = [run_example(tmp_path / d, "3,1,4,1,5,9", 12) for d in ("contrib", "plain")]
    assert runs[0] == runs[1] and len(runs[0]) == 12


def test_external_data_and_the_scatter_cache(tmp_path):
    out = tmp_path / "ext"
    caramba.export_onnx(tiny("gqa"), out, cache_kind="fp16", max_seq_len=32, cache_mode="scatter",
                        external_data=True)
    assert (out / "model.onnx.data").stat().st_size > (out / "model.onnx").stat().st_size
    import onnx

    onnx.checker.check_model(str(out / "model.onnx"), full_check=True)
    assert onnx.load(str(out / "model.onnx"), load_external_data=False).opset_import[0].version == 24


def test_a_failed_export_leaves_nothing_behind(tmp_path, monkeypatch):
    def broken(model):
        raise RuntimeError("checker says no")

    monkeypatch.setattr(export_mod, "check", broken)
    with pytest.raises(RuntimeError, match="checker says no"):
        caramba.export_onnx(tiny(), tmp_path / "new", max_seq_len=32)
    assert list(tmp_path.iterdir()) == []
    old = tmp_path / "old"
    old.mkdir()
    (old / "keep.txt").write_text("mine")
    with pytest.raises(RuntimeError, match="checker says no"):
        caramba.export_onnx(tiny(), old, max_seq_len=32, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"] and (old / "keep.txt").read_text() == "mine"


def test_overwrite_is_explicit(tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "x").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        caramba.export_onnx(tiny(), out, max_seq_len=32)
    caramba.export_onnx(tiny(), out, max_seq_len=32, overwrite=True)
    assert not (out / "x").exists() and (out / "model.onnx").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # the old directory went away


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "caramba.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)


def run_example(directory: Path, ids: str, n: int) -> list[int]:
    """examples/onnx_generate.py with torch and caramba unimportable: onnxruntime and numpy only."""
    guard = ("import sys, runpy; sys.modules['torch'] = None; sys.modules['caramba'] = None; "
             f"sys.argv = ['onnx_generate.py', {str(directory)!r}, '--ids', {ids!r}, '--max-new-tokens', '{n}']; "
             f"runpy.run_path({str(EXAMPLE)!r}, run_name='__main__')")
    g = subprocess.run([sys.executable, "-c", guard], capture_output=True, text=True, timeout=300)
    assert g.returncode == 0, g.stderr
    return [int(t) for t in g.stdout.strip().split(",")]


@pytest.mark.parametrize("kind", ["q4_0", "fp16"])
def test_cli_export_then_standalone_generation_equals_caramba(tmp_path, kind):
    out = tmp_path / "gqa"
    r = run_cli("export-onnx", "--model", "tiny", "--attention", "gqa", "-o", str(out), "--cache-kind", kind,
                "--max-seq-len", "64")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(out)
    assert "[caramba] export: capturing" in r.stderr and "checking the model" in r.stderr
    prompt = [5, 17, 3, 88, 41]
    got = run_example(out, "5,17,3,88,41", 16)
    from caramba.models.sources import load_model

    cm = caramba.compile(load_model("tiny", seed=0, attention="gqa"), target="eager", max_seq_len=64)
    config = caramba.GenerateConfig(max_new_tokens=16, cache_kind=kind, temperature=0, max_seq_len=64)
    want = caramba.Generator(cm, config).generate([prompt])[0, len(prompt):].tolist()
    assert got == want


@pytest.mark.parametrize("args, message", [
    (["--cache-kind", "q8"], "unknown KV-cache kind 'q8'"),
    (["--cache-mode", "scatter", "--opset", "23"], "opset 24"),
    (["--cache-mode", "scatter", "--cache-layout", "optimum"], "needs cache_layout 'caramba'"),
    (["--cache-mode", "scatter", "--ort-contrib"], "cannot be combined with cache_mode='scatter'"),
    (["--max-seq-len", "1"], "--max-seq-len must be at least 5"),
    (["--opset", "22"], "invalid choice: 22"),
    (["--model", "nope"], "nope"),
])
def test_cli_bad_arguments_exit_non_zero_with_one_clear_line(tmp_path, args, message):
    model = [] if "--model" in args else ["--model", "tiny"]
    r = run_cli("export-onnx", *model, "-o", str(tmp_path / "x"), *args)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert not (tmp_path / "x").exists()


def test_cli_refuses_a_non_empty_directory(tmp_path):
    (tmp_path / "file").write_text("x")
    r = run_cli("export-onnx", "--model", "tiny", "-o", str(tmp_path))
    assert r.returncode == 2 and "not an empty directory" in r.stderr and "--force" in r.stderr
