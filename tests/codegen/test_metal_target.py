"""Target "metal" end to end on the CPU (CARAMBA_METAL_EMULATE=1 runs the same MSL through the emulator): the shared
kernel executor's prefill and decode steps give the interpreter's logits for every attention family and cache
kind (a ring included), greedy generation equals target "eager" token for token, a value the cache cannot hold is
refused and rolled back, and off a Mac without the emulator the target says what it needs."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import caramba
from caramba.codegen import backend as targets
from caramba.ir.quant import NonFiniteError
from caramba.models import Transformer, preset
from caramba.runtime import GenerateConfig, Generator
from caramba.runtime.executor import CacheConfig

MAX = 24


@pytest.fixture(scope="module")
def emulated():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CARAMBA_METAL_EMULATE", "1")
        yield mp


@pytest.fixture(scope="module", params=["standard", "gqa", "decoupled"])
def models(request, emulated):
    torch.manual_seed(0)
    extra = {"gate": "dynamic", "learned_temp": True} if request.param == "decoupled" else {}
    if request.param == "gqa":  # two kv heads of two query heads each: a wrong head map shows (one kv head hides it)
        extra = {"n_kv_heads": 2}
    model = Transformer(preset("tiny", attention=request.param, n_layers=2, **extra)).eval()
    return caramba.compile(model, target="metal"), caramba.compile(model, target="eager")


def _steps(ex, ids, chunks):
    cache, out, t = ex.new_cache(ids.shape[0]), [], 0
    for n in chunks:
        pos = torch.tensor(cache.lengths(0))[:, None] + torch.arange(n)
        out.append(ex.forward(ids[:, t:t + n], pos, cache))
        t += n
    return torch.cat(out, dim=1), cache


@pytest.mark.parametrize("kind, ring", [("fp32", 0), ("fp16", 0), ("q8_0", 0), ("q4_0", 3), ("nf4", 0)])
def test_prefill_and_decode_logits_equal_the_interpreters(models, kind, ring):
    metal, eager = models
    config = CacheConfig.of(eager.cache_layout, kind, max_seq_len=MAX, residual_len=ring)
    ex, ref = metal.executor(config), eager.executor(config)
    assert type(ex).__name__ == "KernelExecutor" and type(ex.kernels).__name__ == "MetalKernels"
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    got, cache = _steps(ex, ids, [6, 1, 1, 1])
    want, ref_cache = _steps(ref, ids, [6, 1, 1, 1])
    assert (got - want).abs().max() <= 2e-4 * want.abs().max()
    assert cache.lengths(0) == ref_cache.lengths(0) == (9, 9)
    for name in ref_cache.spec.names:  # the metal kv_append stored what the reference did
        held, x = cache.view(1, name).codes[:, :9], ref_cache.view(1, name).codes[:, :9]
        if x.dtype.is_floating_point:
            torch.testing.assert_close(held.float(), x.float(), rtol=1e-3, atol=1e-3)
        else:
            assert (held.int() - x.int()).abs().max() <= 1


@pytest.mark.parametrize("kind", ["fp32", "fp16", "q8_0", "q4_0"])
def test_greedy_generation_equals_eager_token_for_token(models, kind):
    metal, eager = models
    config = GenerateConfig(temperature=0, cache_kind=kind, max_seq_len=MAX, max_new_tokens=8)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9]]  # ragged: per-row starts and lengths
    assert torch.equal(Generator(metal, config).generate(prompts), Generator(eager, config).generate(prompts))


def test_a_compiled_model_call_runs_the_metal_kernels_and_equals_eager(models):
    metal, eager = models
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(3))
    want = eager(ids)
    got = metal(ids)
    ex = metal.executor(metal._stateless_config(7))
    assert type(ex.kernels).__name__ == "MetalKernels"
    assert (got - want).abs().max() <= 2e-4 * want.abs().max()


def test_a_value_the_cache_cannot_hold_is_refused_and_rolled_back(models):
    """The metal append's error flag (atomics in the MSL) goes through the shared executor's protocol: NaN reaching
    k is reported (deferred: by check()), the step is undone, and the cache goes on from where it was."""
    metal, eager = models
    ex = metal.executor(CacheConfig.of(eager.cache_layout, "q8_0", max_seq_len=MAX))
    cache = ex.new_cache(1)
    ex.forward(torch.tensor([[1, 2, 3]]), torch.arange(3)[None], cache)
    ex.check()
    name = next(n for n in ex._prefill.graph.params if "embed" in n)
    table = ex._prefill._params[list(ex._prefill.graph.params).index(name)][1]
    saved = table.clone()
    table[7] = float("nan")
    try:
        ex.forward(torch.tensor([[7]]), torch.tensor([[3]]), cache)
        with pytest.raises(NonFiniteError, match="(?i)nan.*positions \\[3\\].*undone"):
            ex.check()
    finally:
        table.copy_(saved)
    assert cache.lengths(0) == (3,)
    ex.forward(torch.tensor([[4]]), torch.tensor([[3]]), cache)
    ex.check()
    assert cache.lengths(0) == (4,)


def test_the_metal_target_refuses_bf16_caches(models):
    metal, eager = models
    with pytest.raises(caramba.UnsupportedOpError, match="target 'metal' does not store bf16"):
        metal.executor(CacheConfig.of(eager.cache_layout, "bf16", max_seq_len=MAX))


def test_off_a_mac_without_the_emulator_metal_says_what_it_needs(monkeypatch):
    monkeypatch.delenv("CARAMBA_METAL_EMULATE", raising=False)
    from caramba.codegen.metal import backend

    monkeypatch.setattr(backend, "mps", lambda: False)
    model = Transformer(preset("tiny", n_layers=1)).eval()
    with pytest.raises(targets.TargetError, match="no Apple GPU.*CARAMBA_METAL_EMULATE=1"):
        caramba.compile(model, target="metal")
    reason = targets.get("metal").availability().reason
    assert "torch.backends.mps.is_available() is False" in reason
    monkeypatch.setenv("CARAMBA_METAL_EMULATE", "1")
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    assert "not installed" in targets.get("metal").availability().reason


def test_auto_picks_metal_on_a_mac_and_never_the_emulator(monkeypatch):
    from caramba.codegen.metal import backend

    monkeypatch.setattr(backend, "mps", lambda: True)
    for b in targets.backends():  # what auto would try first (cuda) is not on a Mac
        if b.auto_rank is not None and b.auto_rank < backend.BACKEND.auto_rank:
            monkeypatch.setitem(targets._REGISTRY, b.name, dataclasses.replace(
                b, availability=lambda: targets.Availability(False, "not on a Mac")))
    assert targets.resolve("auto").name == "metal"
    monkeypatch.setattr(backend, "mps", lambda: False)
    monkeypatch.setenv("CARAMBA_METAL_EMULATE", "1")
    assert targets.get("metal").availability().ok and targets.resolve("auto").name != "metal"


def test_caramba_targets_lists_metal_with_its_reason(capsys, monkeypatch):
    from caramba.cli import main
    from caramba.codegen.metal import backend

    monkeypatch.delenv("CARAMBA_METAL_EMULATE", raising=False)
    monkeypatch.setattr(backend, "mps", lambda: False)
    main(["targets"])
    out = capsys.readouterr().out
    block = out[out.index("metal: not available"):].split("\n")[:4]
    why = next(x for x in block if x.strip().startswith("why:"))
    assert "no Apple GPU" in why and "CARAMBA_METAL_EMULATE=1" in why
