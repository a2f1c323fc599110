"""Differential fuzzing (issue 18 item 1): random models x caches x batch shapes, every registered target against
the reference interpreter, step by step.

A draw (draws.py) is a model (caramba's own Transformer: standard / GQA with H_kv | H up to 8:1 / decoupled with
gate off / static / dynamic and learned temperature, rms / layer norm, swiglu / gelu, tied or not, bias or not,
RoPE bases, odd widths, head dims 2 .. 80; or a small transformers decoder with the attention variants: Gemma 2's
attention and final soft caps, alternating sliding / full layers and query scale, Mistral's window, Qwen 3's q/k
norms, StableLM's and Llama's partial rotary), its weights perturbed off their init; a cache (fp32 / fp16 / bf16 /
q8_0 / q4_0 / nf4, or a kind per tensor; qblock 2 .. 32; an fp16 residual ring, with or without slack; forced
split-K partitions); a ragged batch (prompt lengths 1 .. 65, some at or across the kernels' 16 / 32 / 64-position
tiles, a ring that wraps); steps after the prefill (greedy decode steps, continuation chunks, chunks whose rows roll
tokens back); and per-target options (the onnx runner's mode, cuda's GEMV).

Each draw runs on the interpreter (target "eager"'s executor) and then on every target the backend registry lists
(onnx, cuda under TRITON_INTERPRET=1, metal under CARAMBA_METAL_EMULATE=1, and the fake test backend of
tests/codegen/test_fake_backend.py, registered here), which must agree after every step: the same cache contents,
logits within 1e-4 relative (within the kind's bound once quantization rounding flipped a code), and the same greedy
tokens where the margin is clear; harness.py's doc gives the rules and why. "eager" itself, the interpreter, is
checked against the model's own uncached PyTorch forward. A target skips a draw only where its backend declares it
does not store that cache (needs.cache_kinds, needs.residual_ring) or refuses the combination when its executor is
built (UnsupportedOpError); the summary counts both, and every target must run on at least a third of the draws.

Running it:
    .venv/bin/python -m pytest -q tests/differential                       # the CI budget, fixed seeds
    CARAMBA_FUZZ_EXAMPLES=100 .venv/bin/python -m pytest -q -rP tests/differential -k every   # more (-rP: summary)
    CARAMBA_FUZZ_EXAMPLES=1000 CARAMBA_FUZZ_SHARDS=16 .venv/bin/python -m pytest -q -n 16 tests/differential -k every
CARAMBA_FUZZ_EXAMPLES (default CI_EXAMPLES) is the total, split evenly over CARAMBA_FUZZ_SHARDS parametrized shards
(default 2), each with its own hypothesis seed; CARAMBA_FUZZ_SEED (default 0) moves them all, for new draws. A
failing draw is shrunk (only the failing target reruns while hypothesis shrinks it) and printed with its model as
a constructor call, the cache and shapes, the seeds, and a one-line command that reruns exactly that draw through
test_repro: CARAMBA_FUZZ_REPRO='<the draw as JSON>' .venv/bin/python -m pytest -q tests/differential -k test_repro.
Without CARAMBA_FUZZ_REPRO, test_repro runs a fixed draw, so the path runs in CI. Draws that once failed are kept
in test_regressions.py.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, seed, settings

from caramba.codegen import backend as registry
from caramba.codegen.backend import Availability, Backend
from caramba.ir.quant import KIND_NAMES, quantize
from caramba.passes.base import TargetNeeds
from tests.codegen.test_fake_backend import TorchKernels
from tests.differential.draws import Draw, draws, tags
from tests.differential.harness import DifferentialFailure, check_draw, constructor

ROOT = Path(__file__).resolve().parents[2]
CI_EXAMPLES = 32  # about 3 minutes of the suite on 2 cores (see the module doc for more)
EXAMPLES = int(os.environ.get("CARAMBA_FUZZ_EXAMPLES", CI_EXAMPLES))
SHARDS = int(os.environ.get("CARAMBA_FUZZ_SHARDS", 2))
BASE_SEED = int(os.environ.get("CARAMBA_FUZZ_SEED", 0))
FAKE = "fuzzfake"
MIN_SHARE = 1 / 3  # of the draws, each target must run on at least this share


def shard_seed(shard: int) -> int:
    return BASE_SEED * 1_000_003 + shard


def python() -> str:
    """This interpreter as the command should name it: relative to the repository when it lives there."""
    try:
        return str(Path(sys.executable).relative_to(ROOT))
    except ValueError:
        return sys.executable


def reproducer(draw: Draw, failed: list[str], shard: int | None = None) -> str:
    """What a failure prints: the model as a constructor call, the cache and shapes, the seeds, and the command."""
    only = dataclasses.replace(draw, targets=failed)
    where = f"hypothesis seed {shard_seed(shard)} (shard {shard} of {SHARDS}), " if shard is not None else ""
    return (f"--- reproducer ---\nmodel: {constructor(draw)}\ncache: {json.dumps(draw.cache)}; rows (prompt "
            f"lengths) {draw.rows}; steps {draw.steps}; options {json.dumps(draw.options)}\nseeds: {where}"
            f"draw seed {draw.seed}\nrerun: CARAMBA_FUZZ_REPRO='{only.to_json()}' {python()} -m pytest -q "
            f"tests/differential -k test_repro")


@pytest.fixture(scope="module")
def targets():
    """Every registered target, the fake test backend included (registered for this module), each checked to run
    here: metal under its emulator, cuda under Triton's interpreter."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CARAMBA_METAL_EMULATE", "1")
        registry.register(Backend(
            name=FAKE, summary="tests/codegen/test_fake_backend.py's torch kernels (a test backend)",
            availability=lambda: Availability(True, "plain torch"),
            # its append quantizes with the reference and its attention dequantizes every kind; no ring
            needs=TargetNeeds(cache_kinds=frozenset(KIND_NAMES), residual_ring=False),
            kernels=lambda device, options: TorchKernels()))
        try:
            names = [b.name for b in registry.backends()]
            for name in names:
                registry.get(name).require()  # a target that cannot run here fails the suite, never skips
            yield names
        finally:
            registry.unregister(FAKE)


def summary(n: int, ran: Counter, declined: dict[str, Counter], seconds: dict[str, list[float]],
            covered: Counter | None = None) -> str:
    lines = [f"differential fuzzing: {n} draws"]
    if covered:
        lines.append("  covered: " + ", ".join(f"{t} {c}" for t, c in sorted(covered.items())))
    for name in sorted(set(ran) | set(declined)):
        s = seconds.get(name, [])
        per = f", {sum(s) / len(s):.2f} s per draw" if s else ""
        why = "; ".join(f"{r} x{c}" for r, c in declined[name].most_common(4))
        lines.append(f"  {name}: ran {ran[name]}/{n}{per}" + (f"; declined: {why}" if why else ""))
    return "\n".join(lines)


def shard_examples(shard: int) -> int:
    return EXAMPLES // SHARDS + (1 if shard < EXAMPLES % SHARDS else 0)


@pytest.mark.parametrize("shard", range(SHARDS))
def test_every_target_agrees_with_the_interpreter(shard, targets):
    n = shard_examples(shard)
    if n == 0:
        return
    focus: list[str] = []  # once a target failed, only it reruns while hypothesis shrinks the draw
    ran, declined, seconds, covered, draws_run = Counter(), defaultdict(Counter), defaultdict(list), Counter(), [0]

    @settings(max_examples=n, deadline=None, database=None, derandomize=False, report_multiple_bugs=False,
              suppress_health_check=list(HealthCheck), print_blob=False,
              phases=[Phase.explicit, Phase.generate, Phase.shrink])
    @seed(shard_seed(shard))
    @given(draw=draws())
    def fuzz(draw: Draw) -> None:
        try:
            outcome = check_draw(draw, focus or targets, lambda d, failed: reproducer(d, failed, shard))
        except DifferentialFailure as e:
            if not focus:
                focus.extend(re.findall(r"target '(\w+)'", str(e))[:1])
            raise
        draws_run[0] += 1
        covered.update(tags(draw))
        for name, s in outcome.ran.items():
            ran[name] += 1
            seconds[name].append(s)
        for name, why in outcome.declined.items():
            declined[name][re.sub(r"\d+", "N", why)[:90]] += 1

    t = time.perf_counter()
    fuzz()
    print(summary(draws_run[0], ran, declined, seconds, covered), f"\n  shard {shard}: {time.perf_counter() - t:.1f} s")
    if draws_run[0] >= 6:  # the share is meaningless on a handful of draws
        for name in targets:
            assert ran[name] >= MIN_SHARE * draws_run[0], (
                f"target {name!r} ran on only {ran[name]} of {draws_run[0]} draws:\n"
                + summary(draws_run[0], ran, declined, seconds))


# A fixed draw through the reproducer path: a decoupled model with a dynamic gate, a q4_0 / nf4 / q8_0 cache per
# tensor with an fp16 ring that wraps, qblock 8 (several blocks per token), a ragged batch whose longest row
# crosses 16 keys, decode steps and a continuation chunk, split-K over 2 partitions.
KNOWN = Draw(model={"family": "caramba", "config": dict(
    vocab_size=41, d_model=21, n_layers=2, n_heads=4, n_kv_heads=2, attention="decoupled", norm="rms",
    mlp="swiglu", d_ff=19, tie_embeddings=False, bias=True, max_seq_len=96, rope_base=10000.0, sem_dim=12,
    geo_dim=16, v_dim=20, gate="dynamic", learned_temp=True)},
    seed=7, cache={"kind": {"k_sem": "q4_0", "k_geo": "nf4", "v": "q8_0"}, "qblock": 8, "residual_len": 3,
                   "max_seq_len": 30, "partitions": 2},
    rows=[17, 1, 5], steps=[1, 3, 1], options={"onnx": {"mode": "scatter"}, "cuda": {"gemv": True}})


def rerun(targets: list[str]):
    """What test_repro runs: the draw in CARAMBA_FUZZ_REPRO (on the targets it names, else every target), or
    without it the fixed draw KNOWN."""
    text = os.environ.get("CARAMBA_FUZZ_REPRO")
    draw = Draw.from_json(text) if text else KNOWN
    names = draw.targets or targets
    unknown = sorted(set(names) - set(targets))
    assert not unknown, f"the draw names targets that are not registered here: {unknown}"
    outcome = check_draw(draw, names, lambda d, failed: reproducer(d, failed))
    assert set(outcome.ran) | set(outcome.declined) == set(names)
    print(outcome)
    return outcome


def test_repro(targets):
    """CARAMBA_FUZZ_REPRO='<draw JSON>' reruns exactly that draw; without it, the fixed draw KNOWN, which runs on
    every target but those whose backend declares no residual ring."""
    outcome = rerun(targets)
    if "CARAMBA_FUZZ_REPRO" not in os.environ:
        assert set(outcome.ran) == {n for n in targets if registry.get(n).needs.residual_ring}


# ---------------------------------------------------------------------------------------------------------------
# The harness catches bugs, and its reproducer reruns them
# ---------------------------------------------------------------------------------------------------------------
class NoWindowKernels(TorchKernels):
    """A planted bug: decode attention ignores the sliding window (prefill keeps it)."""

    def decode_attention(self, q, k, v, scales, ready, window, attrs, max_seq_len):
        return super().decode_attention(q, k, v, scales, ready, window, {**attrs, "window": 0}, max_seq_len)


class TruncatingKernels(TorchKernels):
    """A planted bug: the append rounds q8_0 codes toward zero instead of to nearest."""

    def kv_append(self, items, starts, error):
        super().kv_append(items, starts, error)
        for view, x, _ in items:
            if view.kind == "q8_0":
                q = quantize(x, view.kind, view.qblock)
                d = q.scales.float().repeat_interleave(view.qblock, dim=-1)[..., :x.shape[-1]]
                codes = torch.where(d > 0, x / d, torch.zeros_like(x)).trunc().to(torch.int8)
                pos = starts.long()[:, None] + torch.arange(x.shape[1])
                view.codes[torch.arange(x.shape[0])[:, None], pos, :x.shape[-1]] = codes


MISTRAL = {"family": "mistral", "config": dict(
    vocab_size=31, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
    num_key_value_heads=1, max_position_embeddings=96, tie_word_embeddings=False, head_dim=8, sliding_window=3,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0})}
WINDOWED = Draw(model=MISTRAL, seed=3, rows=[6, 2], steps=[1, 1],
                cache={"kind": "fp32", "qblock": 32, "residual_len": 0, "max_seq_len": 12, "partitions": None})
# bug -> (its kernels, a draw that shows it, what the failure says)
PLANTED = {
    "no-window": (NoWindowKernels, WINDOWED, r"at step 1 \(decode\): .*(logits rel err|greedy token)"),
    "truncating": (TruncatingKernels, dataclasses.replace(KNOWN, cache={**KNOWN.cache, "kind": "q8_0",
                                                                         "residual_len": 0}),
                   r"at step 0 \(prefill\): (cache contents differ|.* one code apart)"),
}


@pytest.mark.parametrize("bug", sorted(PLANTED))
def test_a_planted_bug_is_caught_and_its_draw_printed(bug, targets):
    kernels, draw, symptom = PLANTED[bug]
    name = f"fuzzbroken_{bug.replace('-', '_')}"
    registry.register(Backend(name=name, summary="a planted bug", availability=lambda: Availability(True, ""),
                              needs=TargetNeeds(cache_kinds=frozenset(KIND_NAMES), residual_ring=False),
                              kernels=lambda device, options: kernels()))
    try:
        assert not check_draw(draw, [FAKE], reproducer).declined  # the healthy kernels pass this very draw
        with pytest.raises(DifferentialFailure) as failure:
            check_draw(draw, [name], reproducer)
    finally:
        registry.unregister(name)
    text = str(failure.value)
    assert f"target '{name}'" in text and re.search(symptom, text), text
    command = text.splitlines()[-1]
    m = re.fullmatch(r"rerun: CARAMBA_FUZZ_REPRO='(\{.*\})' (\S+) -m pytest -q tests/differential -k test_repro",
                     command)
    assert m, command
    assert Draw.from_json(m.group(1)) == dataclasses.replace(draw, targets=[name])
    assert "model: torch.manual_seed" in text and f"draw seed {draw.seed}" in text


def test_the_printed_command_reruns_the_draw(targets, monkeypatch):
    """The reproducer's last line, split as a POSIX shell splits it, sets CARAMBA_FUZZ_REPRO to exactly the draw
    and runs this module's test_repro alone, with this interpreter; run that way, it reruns the draw (in this
    process: a fresh pytest would spend half a minute importing and warming torch.export for one tiny draw)."""
    draw = WINDOWED
    words = shlex.split(reproducer(draw, [FAKE]).splitlines()[-1].removeprefix("rerun: "))
    assignment, exe, *args = words
    name, _, text = assignment.partition("=")
    assert name == "CARAMBA_FUZZ_REPRO" and Draw.from_json(text) == dataclasses.replace(draw, targets=[FAKE])
    assert Path(exe) == Path(sys.executable) or (ROOT / exe).absolute() == Path(sys.executable).absolute()
    assert args == ["-m", "pytest", "-q", "tests/differential", "-k", "test_repro"]
    assert Path(__file__).parent == ROOT / "tests" / "differential"
    assert [n for n in globals() if n.startswith("test") and "test_repro" in n] == ["test_repro"]  # what -k picks
    monkeypatch.setenv(name, text)
    outcome = rerun(targets)
    assert set(outcome.ran) == {FAKE}
