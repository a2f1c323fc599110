"""Weight-only quantization on every target: greedy generation equals target eager's token for token (onnx
through ONNX Runtime, cuda through its Triton kernels under TRITON_INTERPRET=1, metal through its torch reference
under the emulator), the ONNX spellings (DequantizeLinear, MatMulNBits, quantized embeddings), and `caramba
export-onnx --weights` round trips that load in a plain ONNX Runtime session."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("CARAMBA_METAL_EMULATE", "1")
pytest.importorskip("onnxruntime")

import caramba  # noqa: E402
from caramba.codegen.onnx import qops  # noqa: E402
from caramba.codegen.onnx.model import build_model  # noqa: E402
from caramba.compiler import lower  # noqa: E402
from caramba.models import Transformer, preset  # noqa: E402
from caramba.runtime import GenerateConfig, Generator  # noqa: E402
from caramba.runtime.executor import CacheConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "onnx_generate.py"
IDS = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(5))
PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8], [9]]


def tiny(attention: str = "decoupled", **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return Transformer(preset("tiny", attention=attention, n_layers=2, **overrides)).eval()


@pytest.fixture(scope="module")
def model():
    return tiny()


@pytest.fixture(scope="module")
def eager(model):
    memo = {}

    def get(spec):
        if spec not in memo:
            memo[spec] = caramba.compile(model, target="eager", weights=spec)
        return memo[spec]
    return get


def generate(cm, prompts=PROMPTS, n=8):
    config = GenerateConfig(temperature=0, cache_kind="fp32", max_seq_len=24, max_new_tokens=n)
    return Generator(cm, config).generate(prompts)


@pytest.mark.parametrize("target, spec", [("onnx", "int8"), ("onnx", "int4"), ("cuda", "int4:g64:asym"),
                                          ("metal", "int4")])
def test_generation_equals_eager_token_for_token(model, eager, target, spec):
    pytest.importorskip("triton") if target == "cuda" else None
    cm = caramba.compile(model, target=target, weights=spec)
    assert "qlinear" in " ".join(cm.graph.op_counts())
    if target == "cuda":  # the fused quantized forms are what its kernels run
        assert {"swiglu_qlinear", "add_rms_norm_qlinear"} <= set(cm.graph.op_counts())
    assert torch.equal(generate(cm), generate(eager(spec)))
    want = eager(spec)(IDS)
    assert (cm(IDS).cpu() - want).abs().max() <= 2e-4 * want.abs().max()


@pytest.mark.parametrize("how", ["nbits", "dq"])
def test_onnx_int4_spellings(model, eager, monkeypatch, how):
    cm = caramba.compile(model, target="onnx", weights="int4:g128:asym")  # K = 64: one partial group per row
    config = CacheConfig.of(cm.cache_layout, "fp32", max_seq_len=24)
    program = lower(cm, config)
    om = build_model(program.prefill, program.layout, config.kind_map, max_seq_len=24, weight_matmul=how)
    ops = {n.op_type for n in om.proto.graph.node}
    assert ("MatMulNBits" in ops) == (how == "nbits") and ("DequantizeLinear" in ops) == (how == "dq")
    monkeypatch.setattr(qops, "DEFAULT_WEIGHT_MATMUL", how)  # what the runner builds
    want = eager("int4:g128:asym")(IDS)
    assert (cm(IDS) - want).abs().max() <= 1e-4 * want.abs().max()


@pytest.mark.parametrize("spec", ["int8", "int4:g32:asym"])
def test_onnx_quantized_embeddings_and_tied_head(spec):
    m = tiny("gqa", tie_embeddings=True)
    onnx_cm = caramba.compile(m, target="onnx", weights=spec, quantize_embeddings=True)
    eager_cm = caramba.compile(m, target="eager", weights=spec, quantize_embeddings=True)
    assert onnx_cm.graph.op_counts()["qembedding"] == 1
    want = eager_cm(IDS)
    assert (onnx_cm(IDS) - want).abs().max() <= 1e-4 * want.abs().max()


def run_example(directory: Path, prompt: list[int], n: int) -> list[int]:
    """examples/onnx_generate.py with torch and caramba unimportable: onnxruntime and numpy only."""
    guard = ("import sys, runpy; sys.modules['torch'] = None; sys.modules['caramba'] = None; "
             f"sys.argv = ['onnx_generate.py', {str(directory)!r}, '--ids', {','.join(map(str, prompt))!r}, "
             f"'--max-new-tokens', '{n}']; runpy.run_path({str(EXAMPLE)!r}, run_name='__main__')")
    g = subprocess.run([sys.executable, "-c", guard], capture_output=True, text=True, timeout=300)
    assert g.returncode == 0, g.stderr
    return [int(t) for t in g.stdout.strip().split(",")]


def test_cli_export_int4_then_standalone_generation_equals_caramba(tmp_path, capsys):
    from caramba.cli import main

    out = tmp_path / "int4"
    code = main(["export-onnx", "--model", "tiny", "--attention", "gqa", "-o", str(out), "--cache-kind", "fp32",
                 "--max-seq-len", "64", "--weights", "int4"])
    assert code == 0, capsys.readouterr().err
    import onnx

    proto = onnx.load(str(out / "model.onnx"))
    assert any(n.op_type == "MatMulNBits" for n in proto.graph.node)
    assert {p.key: p.value for p in proto.metadata_props}["caramba.weights"] == "int4:g32:sym"
    from caramba.models.sources import load_model

    cm = caramba.compile(load_model("tiny", seed=0, attention="gqa"), target="eager", max_seq_len=64, weights="int4")
    prompt = [5, 17, 3, 88, 41]
    config = GenerateConfig(max_new_tokens=12, cache_kind="fp32", temperature=0, max_seq_len=64)
    want = Generator(cm, config).generate([prompt])[0, len(prompt):].tolist()
    assert run_example(out, prompt, 12) == want


def test_export_int8_dequantize_linear_round_trip(model, eager, tmp_path):
    result = caramba.export_onnx(model, tmp_path / "int8", cache_kind="fp32", max_seq_len=24, weights="int8")
    import onnx

    proto = onnx.load(str(result.directory / "model.onnx"))
    dq = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == len([n for n in eager("int8").graph.nodes if n.op == "qlinear"])  # one per quantized product
    prompt = [7, 3, 250, 1]
    want = generate(eager("int8"), [prompt], n=10)[0, len(prompt):].tolist()
    assert run_example(result.directory, prompt, 10) == want


@pytest.mark.parametrize("command", ["export-onnx", "compile", "generate"])
def test_bad_weight_arguments_exit_with_one_line_before_loading(tmp_path, capsys, monkeypatch, command):
    from caramba.cli import main
    from caramba.models import sources

    monkeypatch.setattr(sources, "load_model", lambda *a, **k: pytest.fail("loaded a model for a bad --weights"))
    extra = {"export-onnx": ["-o", str(tmp_path / "x")], "generate": ["--prompt", "hi"], "compile": []}[command]
    for args, message in ((["--weights", "int4:g16"], "int4 group size must be one of 32, 64, 128, got 16"),
                          (["--weights", "int8:asym"], "int8 is per output channel"),
                          (["--weight-matmul", "fast"], "invalid choice: 'fast'")):
        if command != "export-onnx" and args[0] == "--weight-matmul":
            continue
        with pytest.raises(SystemExit) if args[0] == "--weight-matmul" else contextlib.nullcontext():  # argparse
            assert main([command, "--model", "tiny", *extra, *args]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1 and f"caramba {command}: error" in err, err
