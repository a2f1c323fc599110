"""Bad input, as a new user would give it: each gets one clear error that says what is wrong and what to do (the CLI:
exit status 2 and one line on stderr, never a traceback; Ctrl-C: `interrupted`, 130), and an interrupted generation
leaves the Generator usable."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import caramba
from caramba.cli import main
from caramba.errors import CaptureError, InputError
from caramba.models import CheckpointError, Transformer, load, preset, save
from caramba.models.sources import load_model
from caramba.runtime import kv_cache
from caramba.runtime.generate_config import GenerateConfig, GenerateConfigError
from caramba.runtime.generator import Generator
from tests.helpers import hf_model


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse's own errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def cli_error(capsys, *argv: str) -> str:
    """The one stderr line of a refused command (exit status 2, nothing on stdout, no traceback)."""
    code, out, err = cli(capsys, *argv)
    lines = err.strip().splitlines()
    assert code == 2 and out == "" and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return Transformer(preset("tiny", attention="decoupled", n_layers=2)).eval()


@pytest.fixture(scope="module")
def nan_checkpoint(tmp_path_factory, tiny):
    bad = Transformer(tiny.config).eval()
    bad.load_state_dict(tiny.state_dict())
    with torch.no_grad():
        bad.layers[1].mlp.up.weight[3, 5] = float("nan")
        bad.layers[1].mlp.up.weight[0, 0] = float("inf")
    return save(bad, tmp_path_factory.mktemp("nan") / "ckpt")


# -- weights ------------------------------------------------------------------------------------------------------
def test_non_finite_weights_are_refused_at_load_naming_the_tensor(nan_checkpoint):
    with pytest.raises(CheckpointError, match=r"tensor 'layers\.1\.mlp\.up\.weight' holds non-finite values "
                                              r"\(1 NaN, 1 inf of [\d,]+\).*re-save it from good weights"):
        load(nan_checkpoint)


@pytest.mark.parametrize("target", [None, "eager"])  # None: the default target (auto), which printed NUL bytes
def test_generate_refuses_a_nan_checkpoint_on_every_target(capsys, nan_checkpoint, target):
    argv = ["generate", "--model", str(nan_checkpoint), "--prompt", "hi", "--max-new-tokens", "4"]
    line = cli_error(capsys, *argv, *(["--target", target] if target else []))
    assert line.startswith("caramba generate: error: ") and "'layers.1.mlp.up.weight' holds non-finite" in line


def test_a_transformers_directory_with_nan_weights_is_refused(tmp_path):
    model = hf_model("qwen2")
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.self_attn\.k_proj\.weight' holds non-finite"):
        load_model(str(tmp_path / "hf"))


def test_truncated_and_mismatched_checkpoints_are_one_line_errors(capsys, tmp_path, tiny):
    save(tiny, tmp_path / "cut")
    weights = tmp_path / "cut" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    line = cli_error(capsys, "compile", "--model", str(tmp_path / "cut"))
    assert "is not a readable safetensors file" in line and "re-save the model" in line
    save(tiny, tmp_path / "a")
    save(Transformer(preset("tiny", attention="gqa", n_layers=2)), tmp_path / "b")
    (tmp_path / "a" / "model.safetensors").write_bytes((tmp_path / "b" / "model.safetensors").read_bytes())
    line = cli_error(capsys, "generate", "--model", str(tmp_path / "a"), "--prompt", "hi")
    assert "does not match config.json" in line and "re-save them together" in line


# -- lengths ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,message", [
    ({"max_seq_len": 0}, "max_seq_len must be an integer >= 5 (the capture traces a 2 x 5 example), got 0; pass "
                         "None for the model's maximum"),
    ({"max_seq_len": 1}, "max_seq_len must be an integer >= 5"),
    ({"max_seq_len": -3}, "got -3"),
    ({"max_seq_len": 4}, "got 4"),
    ({"max_seq_len": 64.0}, "got 64.0"),
    ({"max_batch": 1}, "max_batch must be an integer >= 2"),
    ({"max_seq_len": 4096}, "max_seq_len 4096 exceeds the 512 positions Transformer declares (config.max_seq_len); "
                            "pass max_seq_len <= 512 (or None), or allow_extrapolation=True"),
])
def test_compile_refuses_lengths_it_cannot_honour(tiny, kw, message):
    with pytest.raises(ValueError) as e:
        caramba.compile(tiny, target="eager", **kw)
    assert message in str(e.value)


def test_compiling_past_the_model_positions_needs_the_explicit_opt_in(tiny, capsys):
    cm = caramba.compile(tiny, target="eager", max_seq_len=600, allow_extrapolation=True)
    assert cm.max_positions == 600
    line = cli_error(capsys, "generate", "--model", "examples/tiny-dba", "--prompt", "hi", "--max-seq-len", "1000000")
    assert line == ("caramba generate: error: --max-seq-len 1000000 exceeds the 256 positions examples/tiny-dba "
                    "declares (config.max_seq_len); use --max-seq-len 256 or less, or pass --allow-extrapolation to "
                    "compile past them anyway (text degrades past the length a model was trained on, and the cache "
                    "grows with --max-seq-len)")
    code, _, err = cli(capsys, "export-onnx", "--model", "tiny", "-o", "never-written", "--max-seq-len", "4096")
    assert code == 2 and err.splitlines()[-1].endswith("use --max-seq-len 512 or less, or pass "
                                                       "--allow-extrapolation to compile past them anyway (text "
                                                       "degrades past the length a model was trained on, and the "
                                                       "cache grows with --max-seq-len)")
    with pytest.raises(ValueError, match="or allow_extrapolation=True"):
        caramba.export_onnx(tiny, "never-written", max_seq_len=4096)
    assert not Path("never-written").exists()
    code, out, err = cli(capsys, "compile", "--model", "tiny", "--target", "eager", "--max-seq-len", "600",
                         "--allow-extrapolation")
    assert code == 0 and "compiled tiny for eager" in out, err


def test_generate_config_defaults_to_the_model_positions(tiny):
    cm = caramba.compile(tiny, target="eager", max_seq_len=48)
    gen = Generator(cm, GenerateConfig(max_new_tokens=4, temperature=0, cache_kind="fp32"))
    assert gen.config.max_seq_len == cm.max_positions == 48
    assert gen.generate([[1, 2, 3]]).shape == (1, 7) and gen.cache.spec.max_seq_len == 48
    ex = cm.executor(caramba.CacheConfig.of(cm.cache_layout, "fp32", max_seq_len=32))
    assert Generator(ex, GenerateConfig(max_new_tokens=4)).config.max_seq_len == 32  # an executor's own length
    with pytest.raises(GenerateConfigError, match="max_seq_len: 49 exceeds the 48 positions this model was compiled "
                                                  "for; pass GenerateConfig"):
        Generator(cm, GenerateConfig(max_new_tokens=4, max_seq_len=49))
    with pytest.raises(GenerateConfigError, match="max_new_tokens: 64 leaves no room for a prompt in the model's 48 "
                                                  "positions"):
        Generator(cm, GenerateConfig())


def test_prompt_too_long_and_empty_prompt_for_the_model_positions(capsys):
    line = cli_error(capsys, "generate", "--model", "examples/tiny-dba", "--prompt", "x" * 300)
    assert line == ("caramba generate: error: --prompt is 300 tokens, longer than the 256 positions of "
                    "examples/tiny-dba; shorten it")
    line = cli_error(capsys, "generate", "--model", "examples/tiny-dba", "--prompt", "x" * 250)
    assert "with the 256 positions of examples/tiny-dba at most 7 new tokens fit, not --max-new-tokens 64" in line
    assert cli_error(capsys, "generate", "--model", "tiny", "--prompt", "").endswith("--prompt is empty: the model "
                                                                                     "needs at least one token to "
                                                                                     "continue from")


# -- ids, masks, prompts --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("target", ["eager", "onnx"])
def test_out_of_vocabulary_ids_name_the_id_and_the_vocabulary(tiny, target):
    cm = caramba.compile(tiny, target=target, dtype="fp32")
    for bad in (256, 999, -1):
        with pytest.raises(InputError, match=rf"token id {bad} is outside the model's vocabulary \[0, 256\); pass "
                                             rf"ids from the model's tokenizer"):
            cm(torch.tensor([[1, bad, 2]]))


@pytest.mark.parametrize("mask", [torch.ones(1, 2), torch.ones(2, 3), torch.ones(1, 3, 1), torch.ones(3),
                                  [[1, 1, 1]]])
def test_an_attention_mask_of_another_shape_is_refused(tiny, mask):
    gen = Generator(caramba.compile(tiny, target="eager", max_seq_len=32), GenerateConfig(max_new_tokens=2))
    with pytest.raises(InputError, match=r"attention_mask must be a tensor shaped like input_ids \[1, 3\] \(1 = "
                                         r"token, 0 = left padding\), got "):
        gen.generate(torch.tensor([[1, 2, 3]]), attention_mask=mask)


def test_a_prompt_that_is_not_utf8_is_refused(capsys):
    prompt = os.fsdecode(b"ab\xff")  # what Python makes of a shell argument holding a byte that is not UTF-8
    assert cli_error(capsys, "generate", "--model", "tiny", "--prompt", prompt) == (
        "caramba generate: error: --prompt is not valid UTF-8 (byte ff at character 2); pass UTF-8 text (check the "
        "terminal's or the script's encoding)")


def test_eos_ids_outside_the_vocabulary_are_refused(capsys, tiny):
    assert cli_error(capsys, "generate", "--model", "tiny", "--prompt", "hi", "--eos-id", "999") == (
        "caramba generate: error: --eos-id 999 is outside the vocabulary of tiny [0, 256); pass a token id of the "
        "model's tokenizer")
    cm = caramba.compile(tiny, target="eager", max_seq_len=32)
    with pytest.raises(GenerateConfigError, match=r"eos_token_id: \[256, 300\] outside the model's vocabulary "
                                                  r"\[0, 256\)"):
        Generator(cm, GenerateConfig(max_new_tokens=2, eos_token_id=[2, 256, 300]))


# -- other arguments ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["-1", "nan", "inf"])
def test_bisect_refuses_a_tolerance_that_is_no_relative_error(capsys, value):
    line = cli_error(capsys, "bisect", "--model", "tiny", "--tolerance", value)
    assert line.startswith(f"caramba bisect: error: --tolerance {value}: expected a relative error >= 0, e.g. 1e-4")


def test_output_paths_are_checked_before_any_work(capsys, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("")
    assert cli_error(capsys, "export-onnx", "--model", "tiny", "-o", str(afile / "sub")) == (
        f"caramba export-onnx: error: -o {afile / 'sub'} lies under {afile}, which is a file; choose a path whose "
        f"parents are directories")
    assert cli_error(capsys, "compile", "--model", "tiny", "--dump-dir", str(afile)) == (
        f"caramba compile: error: --dump-dir {afile} is a file; name a directory")
    line = cli_error(capsys, "generate", "--model", "tiny", "--prompt", "hi", "--cache-kind", "auto", "--plan-file",
                     str(tmp_path))
    assert line == f"caramba generate: error: --plan-file {tmp_path} is a directory; name a file, e.g. " \
                   f"{tmp_path / 'caramba_plan.json'}"
    internal = tmp_path / ".out.1234.0123abcd.tmp"  # the staging name an export writes through, then renames
    assert cli_error(capsys, "export-onnx", "--model", "tiny", "-o", str(internal)).endswith(
        ".tmp: a name of caramba's own temporary files (.NAME.PID.HEX.tmp / .old, written through, then renamed or "
        "deleted); choose another name")
    assert not internal.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]
    with pytest.raises(ValueError, match=f"lies under {afile}, which is a file; choose a path whose parents are "
                                         f"directories"):
        caramba.export_onnx(Transformer(preset("tiny")).eval(), afile / "sub" / "deeper")


def test_a_huge_max_seq_len_says_the_tables_stay_ops():
    """Past what fold_tables folds, RoPE tables stay ops and the model falls back; the reason says so."""
    cm = caramba.compile(Transformer(preset("tiny")).eval(), target="eager", max_seq_len=4_000_000,
                         allow_extrapolation=True)
    assert "at 4,000,000 positions RoPE tables exceed fold_tables.max_elements" in str(cm.cache_blockers[0])


def test_an_os_error_is_one_line_that_names_the_path(capsys, monkeypatch):
    def refuse(*args, **kwargs):
        raise NotADirectoryError(20, "Not a directory", "somewhere/00-import")

    monkeypatch.setattr(caramba, "compile", refuse)
    assert cli_error(capsys, "compile", "--model", "tiny") == (
        "caramba compile: error: [Errno 20] Not a directory: 'somewhere/00-import'; check the path and its "
        "permissions")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_target_cuda_without_a_gpu_is_one_line(capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the kernel tests run cuda through Triton's interpreter
    line = cli_error(capsys, "generate", "--model", "tiny", "--prompt", "hi", "--target", "cuda")
    assert line.startswith("caramba generate: error: target 'cuda' cannot run on this machine: no CUDA GPU")


@pytest.mark.parametrize("argv,needle", [
    (["compile", "--model", "tiny", "--target", "tpu"], "argument --target: invalid choice: 'tpu'"),
    (["generate", "--model", "tiny", "--prompt", "hi", "--cache-kind", "q8"], "unknown KV-cache kind 'q8'"),
    (["compile", "--model", "tiny", "--max-seq-len", "3"], "--max-seq-len must be at least 5"),
    (["generate", "--model", "tiny", "--prompt", "hi", "--bogus"], "unrecognized arguments: --bogus"),
])
def test_usage_errors_are_one_line_too(capsys, argv, needle):
    line = cli_error(capsys, *argv)
    assert line.startswith(("caramba: error:", f"caramba {argv[0]}: error:")) and needle in line


# -- torch's logs -------------------------------------------------------------------------------------------------
class _Branchy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(16, 8)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        if x.sum() > 0:  # data-dependent control flow
            return x * 2
        return x


def test_a_capture_failure_keeps_torch_logs_out_unless_asked(capfd, monkeypatch):
    for var in ("CARAMBA_TORCH_LOGS", "TORCH_LOGS", "TORCH_TRACE"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(CaptureError, match="data-dependent control flow"):
        caramba.compile(_Branchy(), target="eager")
    assert capfd.readouterr().err == ""
    monkeypatch.setenv("CARAMBA_TORCH_LOGS", "1")
    with pytest.raises(CaptureError):
        caramba.compile(_Branchy(), target="eager")
    assert "def forward" in capfd.readouterr().err  # torch's partial graph, when asked for


# -- Ctrl-C -------------------------------------------------------------------------------------------------------
def test_ctrl_c_during_compile_is_one_line_and_status_130(capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(caramba, "compile", interrupted)
    code, out, err = cli(capsys, "compile", "--model", "tiny")
    assert (code, out, err) == (130, "", "caramba compile: interrupted\n")


def test_sigint_during_a_capture_from_the_shell(tmp_path):
    script = ("import sys, time\nimport caramba.compiler as c\nfrom caramba.cli import main\n"
              "def slow(*a, **k):\n    print('capturing', file=sys.stderr, flush=True)\n    time.sleep(120)\n"
              "c.import_model = slow\nsys.exit(main(sys.argv[1:]))\n")
    # as from a shell: SIGINT handled by default (a pytest-xdist worker ignores it, and children inherit that)
    p = subprocess.Popen([sys.executable, "-c", script, "compile", "--model", "tiny", "--target", "eager"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        while p.stderr.readline() not in ("capturing\n", ""):  # anything else torch may warn about first
            pass
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert (p.returncode, out, err) == (130, "", "caramba compile: interrupted\n")


def _interrupt_forward(ex, n: int, after: bool) -> None:
    """Raise KeyboardInterrupt at the executor's n-th forward: before it runs, or after it ran (result lost)."""
    real, calls = ex.forward, [0]

    def forward(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n and not after:
            raise KeyboardInterrupt
        out = real(*args, **kwargs)
        if calls[0] == n:
            raise KeyboardInterrupt
        return out

    ex.forward = forward


def _interrupted_then_continued(gen: Generator, prompt: list[int], steps) -> list[int]:
    """Generate until the interrupt, then go on in the same Generator: prompt + every token, as one sequence."""
    got = []
    with pytest.raises(KeyboardInterrupt):
        for t in steps:
            got.append(int(t[0]))
    vars(gen.executor).pop("forward", None)  # the next call runs as if nothing had happened
    if gen.tokens is None:  # interrupted in the prefill: nothing is kept
        return prompt + gen.generate([prompt])[0, len(prompt):].tolist()
    assert gen.tokens == [prompt + got]
    return prompt + got + [int(t[0]) for t in gen.generate_iter([[]])]


@pytest.mark.parametrize("target,kind", [("eager", "q8_0"), ("onnx", "q8_0")])
@pytest.mark.parametrize("n,after", [(1, False), (1, True), (3, False), (3, True), (6, True)])
def test_ctrl_c_in_a_step_leaves_the_generator_usable(tiny, target, kind, n, after):
    cm = caramba.compile(tiny, target=target, dtype="fp32", max_seq_len=48)
    config = GenerateConfig(max_new_tokens=8, temperature=0, cache_kind=kind)
    prompt = [5, 6, 7]
    reference = Generator(cm, config).generate([prompt])[0].tolist()
    gen = Generator(cm, config)
    steps = gen.generate_iter([prompt])  # builds the executor; nothing runs before the first token is asked for
    _interrupt_forward(gen.executor, n, after)
    assert _interrupted_then_continued(gen, prompt, steps)[:len(reference)] == reference


@pytest.mark.parametrize("ring", [0, 4])
@pytest.mark.parametrize("n", [1, 3, 5])
def test_ctrl_c_halfway_through_the_layers_of_a_step(tiny, monkeypatch, ring, n):
    """The interrupt lands after layer 0 appended to the cache and before layer 1 did (fp16 ring or not)."""
    cm = caramba.compile(tiny, target="eager", dtype="fp32", max_seq_len=48)
    config = GenerateConfig(max_new_tokens=8, temperature=0, cache_kind="q4_0", cache_residual_len=ring)
    prompt = [9, 8, 7, 6]
    reference = Generator(cm, config).generate([prompt])[0].tolist()
    real, calls = kv_cache.LayerCache.append, [0]

    def append(self, *args, **kwargs):
        if self.index == 1:
            calls[0] += 1
            if calls[0] == n:
                raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(kv_cache.LayerCache, "append", append)
    gen = Generator(cm, config)
    got = []
    with pytest.raises(KeyboardInterrupt):
        for t in gen.generate_iter([prompt]):
            got.append(int(t[0]))
    assert calls[0] == n  # the interrupt did land in a layer append
    monkeypatch.setattr(kv_cache.LayerCache, "append", real)
    rest = gen.generate([prompt])[0, len(prompt):].tolist() if gen.tokens is None else \
        [int(t[0]) for t in gen.generate_iter([[]])]
    assert (prompt + got + rest)[:len(reference)] == reference


def test_a_cache_config_whose_ring_is_longer_than_the_cache_is_refused_when_made(tiny):
    """Found by the differential fuzzing: a residual ring longer than max_seq_len was refused only when the first
    cache was allocated; the config itself now refuses it, saying what to change."""
    from caramba.ir.cache_format import CacheError
    from caramba.runtime.executor import CacheConfig

    layout = caramba.compile(tiny, target="eager").cache_layout
    with pytest.raises(CacheError, match=r"residual_len \(9\) exceeds max_seq_len \(8\).*lower residual_len"):
        CacheConfig.of(layout, "q8_0", max_seq_len=8, residual_len=9)
    assert CacheConfig.of(layout, "q8_0", max_seq_len=8, residual_len=8).residual_len == 8
