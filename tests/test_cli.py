"""The `caramba` command: runs in a subprocess like a user's shell would, with clear errors on bad arguments."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

from caramba.codegen import backend as targets
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
    (["compile", "--model", "tiny", "--target", "vulkan"], "invalid choice: 'vulkan'"),
    (["compile", "--model", "tiny", "--target", "tpu"], "invalid choice: 'tpu'"),
    (["compile", "--model", "tiny", "--max-seq-len", "1"], "--max-seq-len must be at least 5"),
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
    names = [p.name for p in pipeline_for(targets.get("eager").needs)]
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
    names = [p.name for p in pipeline_for(targets.get("eager").needs)]
    assert f"{len(names):02d}-{names[-1]}" in r.stdout and "fuse_attention" in r.stdout


# -- caramba generate ---------------------------------------------------------------------------------------------
STATS = re.compile(r"\[caramba\] (\d+) tokens, \d+\.\d tok/s \(decode \d+\.\d tok/s\), KV cache (\S+): ([\d,]+) bytes"
                   r"(?: \(fp16 would be ([\d,]+)\))?")


def api_generate(spec: str, prompt: str, *, seed: int = 0, max_seq_len: int | None = None, **settings):
    """What the Python API makes of the same request: (new text, stats, compiled model, config)."""
    import caramba
    from caramba.models.sources import load_model
    from caramba.runtime.generate_config import GenerateConfig
    from caramba.runtime.generator import Generator
    from caramba.tokenizer import ByteTokenizer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the CLI runs below (--threads 1): the same reductions, the same argmax
    try:
        cm = caramba.compile(load_model(spec, seed=seed), target="eager", max_seq_len=max_seq_len)
        config = GenerateConfig(seed=seed, max_seq_len=max_seq_len or cm.max_positions, **settings)
        gen = Generator(cm, config)
        tok = ByteTokenizer()
        ids = tok.encode(prompt)
        out = gen.generate(ids)
    finally:
        torch.set_num_threads(threads)
    return tok.decode(out[0, len(ids):].tolist()), gen.stats, cm, config


def cache_nbytes(cm, kind, max_seq_len: int) -> int:
    from caramba.runtime.executor import CacheConfig
    from caramba.runtime.kv_cache import CacheSpec

    return CacheSpec.for_config(cm.cache_layout, CacheConfig.of(cm.cache_layout, kind, max_seq_len=max_seq_len),
                                1).nbytes


def test_generate_trained_model_streams_what_the_api_generates():
    prompt = "def read_config(path):\n"
    r = run_cli("generate", "--model", "examples/tiny-dba", "--prompt", prompt, "--max-new-tokens", "24",
                "--temperature", "0", "--cache-kind", "q8_0", "--target", "eager", "--threads", "1")
    assert r.returncode == 0, r.stderr
    text, stats, cm, config = api_generate("examples/tiny-dba", prompt, max_new_tokens=24, temperature=0,
                                           cache_kind="q8_0")
    assert r.stdout == text + "\n"  # stdout is the generated text alone; the stats go to stderr
    assert text.strip() and "\ufffd" not in text  # the trained model writes text, not byte soup
    last = r.stderr.rstrip("\n").splitlines()[-1]
    m = STATS.fullmatch(last)
    assert m, last
    n, kind, nbytes, fp16 = m.groups()
    assert (int(n), kind) == (24, "q8_0")
    assert int(nbytes.replace(",", "")) == stats.cache_bytes == cache_nbytes(cm, "q8_0", config.max_seq_len)
    assert int(fp16.replace(",", "")) == cache_nbytes(cm, "fp16", config.max_seq_len) > stats.cache_bytes


def test_generate_preset_sampling_with_per_tensor_kinds_is_reproducible():
    kind = "k_sem=q8_0,k_geo=q8_0,v=q4_0"
    r = run_cli("generate", "--model", "tiny", "--seed", "7", "--prompt", "Hello, wörld", "--max-new-tokens", "12",
                "--temperature", "0.9", "--top-k", "40", "--cache-kind", kind, "--max-seq-len", "64",
                "--target", "eager", "--threads", "1")
    assert r.returncode == 0, r.stderr
    text, stats, cm, _ = api_generate("tiny", "Hello, wörld", seed=7, max_seq_len=64, max_new_tokens=12,
                                      temperature=0.9, top_k=40,
                                      cache_kind={"k_sem": "q8_0", "k_geo": "q8_0", "v": "q4_0"})
    assert r.stdout == text + "\n"  # random weights drawn from --seed, sampling seeded by it too
    m = STATS.fullmatch(r.stderr.rstrip("\n").splitlines()[-1])
    assert m and m.group(1) == "12" and m.group(2) == kind
    assert int(m.group(3).replace(",", "")) == stats.cache_bytes
    assert int(m.group(4).replace(",", "")) == cache_nbytes(cm, "fp16", 64)


def test_generate_typo_in_kind_exits_before_loading_anything():
    r = run_cli("generate", "--model", "small", "--prompt", "Hello", "--cache-kind", "q8")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == ("caramba generate: error: cache_kind: unknown KV-cache kind 'q8'; valid kinds: fp32, fp16, "
                        "bf16, q8_0, q4_0, nf4\n")


@pytest.mark.parametrize("args,needle", [
    (["--model", "nope"], "'nope' is neither a preset"),
    (["--model", "/nonexistent/model-dir"], "'/nonexistent/model-dir' is neither a preset"),
    (["--cache-kind", "fp8"], "unknown KV-cache kind 'fp8'"),
    (["--cache-kind", "k_sem=q8_0,v"], "--cache-kind 'k_sem=q8_0,v': expected one kind"),
    (["--cache-kind", "k_sem=q8_0,k_sem=q4_0"], "'k_sem' is given twice"),
    (["--cache-kind", "k_sem=q8_0,v=q4_0"], "must name exactly"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["--prompt", "x" * 20, "--max-seq-len", "16", "--max-new-tokens", "4"], "20 tokens, longer than --max-seq-len 16"),
    (["--prompt", "x" * 10, "--max-seq-len", "16", "--max-new-tokens", "8"], "at most 7 new tokens fit"),
    (["--prompt", ""], "--prompt is empty"),
    (["--temperature", "nan"], "temperature: expected a finite number"),
    (["--top-p", "1.5"], "top_p: expected a number in (0, 1]"),
    (["--plan-file", "plan.json"], "--plan-file only applies to --cache-kind auto"),
    (["--tokenizer", "/nonexistent/tokenizer.json"], "does not exist"),
    (["--cache-budget-mb", "0.01", "--target", "eager", "--max-seq-len", "64", "--max-new-tokens", "4"],
     "the KV cache for 64 tokens takes 21,760 bytes, over --cache-budget-mb 0.01 (10,485 bytes)"),
])
def test_generate_bad_arguments(args, needle, capsys):
    from caramba.cli import main

    argv = ["generate", "--model", "tiny", "--prompt", "hi", "--cache-kind", "q8_0", *args]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse-level checks exit through parser.error, like the existing commands
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and needle in err, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith(("caramba generate: error:",
                                                                               "caramba: error:"))


def test_generate_stats_line_and_cache_kind_parsing():
    from caramba.cli import parse_cache_kind, stats_line
    from caramba.runtime.generator import GenerationStats

    assert parse_cache_kind("q8_0") == "q8_0"
    assert parse_cache_kind(" k_sem = q8_0, k_geo=q8_0 ,v=q4_0") == {"k_sem": "q8_0", "k_geo": "q8_0", "v": "q4_0"}
    s = GenerationStats(batch=1, new_tokens=64, steps=64, prefill_seconds=0.1, decode_seconds=0.42,
                        cache_bytes=1114112, cache_kind="q8_0")
    assert stats_line(s, 2097152) == ("[caramba] 64 tokens, 123.1 tok/s (decode 150.0 tok/s), KV cache q8_0: "
                                      "1,114,112 bytes (fp16 would be 2,097,152)")
    one = GenerationStats(batch=1, new_tokens=1, steps=1, prefill_seconds=0.5, cache_bytes=10, cache_kind="fp16")
    assert stats_line(one, 10) == "[caramba] 1 token, 2.0 tok/s (decode n/a), KV cache fp16: 10 bytes"
    assert STATS.fullmatch(stats_line(s, 2097152))


def test_generate_hf_directory_uses_its_own_tokenizer_json(tmp_path, capsys):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from caramba.cli import main

    hf_model("llama", vocab_size=97).save_pretrained(tmp_path / "small-vocab", safe_serialization=True)
    assert main(["generate", "--model", str(tmp_path / "small-vocab"), "--prompt", "hi"]) == 2
    assert "the byte tokenizer needs a vocabulary of at least 256 ids" in capsys.readouterr().err

    hf_model("llama", vocab_size=320).save_pretrained(tmp_path / "hf", safe_serialization=True)
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(["über naïve"] * 10, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tmp_path / "hf" / "tokenizer.json"))
    code = main(["generate", "--model", str(tmp_path / "hf"), "--prompt", "über naïve", "--max-new-tokens", "6",
                 "--temperature", "0", "--target", "eager", "--max-seq-len", "32"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert STATS.fullmatch(err.rstrip("\n").splitlines()[-1])
    n = len(tok.encode("über naïve").ids)
    assert n < len("über naïve".encode()) and f"prompt {n} tokens" in err  # the BPE, not bytes
    assert out.endswith("\n")
