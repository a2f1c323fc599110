"""Target "cuda" end to end on the CPU (TRITON_INTERPRET=1 runs the same Triton kernels): the executor's prefill
and decode steps give the interpreter's logits for every attention family and cache kind (a ring included), and
generation equals target "eager" token for token. The CUDA-graph replay runs on the GPU only
(benchmarks/gpu_check.py on the device)."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="target cuda's kernels need triton (pip install triton)")

import caramba  # noqa: E402
from caramba.models import Transformer, preset  # noqa: E402
from caramba.runtime import GenerateConfig, Generator  # noqa: E402
from caramba.runtime.executor import CacheConfig  # noqa: E402

MAX = 24


@pytest.fixture(scope="module", params=["standard", "gqa", "decoupled"])
def models(request):
    torch.manual_seed(0)
    extra = {"gate": "dynamic", "learned_temp": True} if request.param == "decoupled" else {}
    model = Transformer(preset("tiny", attention=request.param, n_layers=2, **extra)).eval()
    return caramba.compile(model, target="cuda"), caramba.compile(model, target="eager")


def _steps(ex, ids, chunks):
    cache, out, t = ex.new_cache(ids.shape[0]), [], 0
    for n in chunks:
        pos = torch.tensor(cache.lengths(0))[:, None] + torch.arange(n)
        out.append(ex.forward(ids[:, t:t + n], pos, cache))
        t += n
    return torch.cat(out, dim=1), cache


@pytest.mark.parametrize("kind, ring", [("fp32", 0), ("fp16", 0), ("q8_0", 0), ("q4_0", 3), ("nf4", 0)])
def test_prefill_and_decode_logits_equal_the_interpreters(models, kind, ring):
    cuda, eager = models
    config = CacheConfig.of(eager.cache_layout, kind, max_seq_len=MAX, residual_len=ring)
    ex, ref = cuda.executor(config), eager.executor(config)
    assert type(ex).__name__ == "CudaExecutor"
    # k's rope runs inside the cache append (each layer, prefill and decode), except with a ring (its exact
    # values are taken from the append's inputs, which must already be rotated)
    assert len(ex._ropes) == (0 if ring else 2 * 2)
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    got, cache = _steps(ex, ids, [6, 1, 1, 1])
    want, ref_cache = _steps(ref, ids, [6, 1, 1, 1])
    # fp32 model: the kernels accumulate in fp32 in another order; a code at a rounding tie may differ by one
    assert (got - want).abs().max() <= 2e-4 * want.abs().max()
    assert cache.lengths(0) == ref_cache.lengths(0) == (9, 9)
    for name, x in ref_cache.layers[1].stores.items():  # the kv_append kernel stored what the reference did
        held = cache.layers[1].stores[name]
        if x.codes.dtype.is_floating_point:
            torch.testing.assert_close(held.codes[:, :9].float(), x.codes[:, :9].float(), rtol=1e-3, atol=1e-3)
        else:
            assert (held.codes[:, :9].int() - x.codes[:, :9].int()).abs().max() <= 1


def test_generation_equals_eager_token_for_token(models):
    cuda, eager = models
    config = GenerateConfig(temperature=0, cache_kind="fp32", max_seq_len=MAX, max_new_tokens=8)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9]]
    assert torch.equal(Generator(cuda, config).generate(prompts), Generator(eager, config).generate(prompts))


def test_values_the_cache_cannot_hold_raise_and_leave_the_cache_as_it_was(models):
    """The kv_append kernel cannot raise: its error bits are read after the step, the step is undone and the
    reference's error is raised (NaN reaches k through a poisoned embedding row)."""
    cuda, eager = models
    config = CacheConfig.of(eager.cache_layout, "q8_0", max_seq_len=MAX)
    ex = cuda.executor(config)
    cache = ex.new_cache(1)
    ex.forward(torch.tensor([[1, 2, 3]]), torch.arange(3)[None], cache)
    name = next(n for n in ex._prefill.graph.params if "embed" in n)
    table = ex._prefill._params[[n for n in ex._prefill.graph.params].index(name)][1]
    saved = table[7].clone()
    table[7] = float("nan")
    try:
        with pytest.raises(Exception, match="(?i)nan|finite"):
            ex.forward(torch.tensor([[7]]), torch.tensor([[3]]), cache)
    finally:
        table[7] = saved
    assert cache.lengths(0) == (3,)
    ex.forward(torch.tensor([[4]]), torch.tensor([[3]]), cache)  # the cache goes on from where it was
    assert cache.lengths(0) == (4,)


def test_sampling_with_a_seed_gives_eagers_tokens(models):
    """Sampling draws from the CPU generator whatever device the logits are on: same seed, same tokens."""
    cuda, eager = models
    config = GenerateConfig(temperature=0.8, top_k=20, seed=3, cache_kind="fp32", max_seq_len=MAX, max_new_tokens=6)
    prompts = [[1, 2, 3], [4, 5]]
    assert torch.equal(Generator(cuda, config).generate(prompts), Generator(eager, config).generate(prompts))
