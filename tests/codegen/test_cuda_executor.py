"""Target "cuda" end to end on the CPU (TRITON_INTERPRET=1 runs the same Triton kernels): the executor's prefill
and decode steps give the interpreter's logits for every attention family and cache kind (a ring included), and
generation equals target "eager" token for token. The CUDA-graph replay runs on the GPU only
(benchmarks/gpu_check.py on the device)."""
from __future__ import annotations

import contextlib
import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="target cuda's kernels need triton (pip install triton)")

import caramba  # noqa: E402
from caramba.models import Transformer, preset  # noqa: E402
from caramba.runtime import GenerateConfig, Generator  # noqa: E402
from caramba.runtime.executor import CacheConfig  # noqa: E402
from caramba.ir.quant import NonFiniteError  # noqa: E402

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
    assert type(ex).__name__ == "KernelExecutor" and type(ex.kernels).__name__ == "TritonKernels"
    # k's rope runs inside the cache append (each layer, prefill and decode), except with a ring (its exact
    # values are taken from the append's inputs, which must already be rotated)
    assert len(ex._ropes) == (0 if ring else 2 * 2)
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    got, cache = _steps(ex, ids, [6, 1, 1, 1])
    got = got.cpu()  # on a GPU (TRITON_INTERPRET=0) the executor's logits and cache live there
    want, ref_cache = _steps(ref, ids, [6, 1, 1, 1])
    # fp32 model: the kernels accumulate in fp32 in another order; a code at a rounding tie may differ by one
    assert (got - want).abs().max() <= 2e-4 * want.abs().max()
    assert cache.lengths(0) == ref_cache.lengths(0) == (9, 9)
    for name, x in ((n, ref_cache.view(1, n)) for n in ref_cache.spec.names):  # the kv_append kernel stored what the reference did
        held = cache.view(1, name).codes[:, :9].cpu()
        if x.codes.dtype.is_floating_point:
            torch.testing.assert_close(held.float(), x.codes[:, :9].float(), rtol=1e-3, atol=1e-3)
        else:
            assert (held.int() - x.codes[:, :9].int()).abs().max() <= 1


def test_generation_equals_eager_token_for_token(models):
    cuda, eager = models
    config = GenerateConfig(temperature=0, cache_kind="fp32", max_seq_len=MAX, max_new_tokens=8)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9]]
    assert torch.equal(Generator(cuda, config).generate(prompts), Generator(eager, config).generate(prompts))


@contextlib.contextmanager
def _poisoned(ex, rows):
    """The embedding rows `rows` (every row for None) hold NaN while inside: NaN then reaches k of any step that
    feeds those tokens, and the cache append refuses it."""
    name = next(n for n in ex._prefill.graph.params if "embed" in n)
    table = ex._prefill._params[[n for n in ex._prefill.graph.params].index(name)][1]
    saved = table.clone()
    table[slice(None) if rows is None else rows] = float("nan")
    try:
        yield
    finally:
        table.copy_(saved)


@contextlib.contextmanager
def _mode_restored(ex):
    try:
        yield
    finally:
        ex.check_values = "deferred"


def _prefilled(cuda, config):
    ex = cuda.executor(config)
    cache = ex.new_cache(1)
    ex.forward(torch.tensor([[1, 2, 3]]), torch.arange(3)[None], cache)
    return ex, cache


def test_values_the_cache_cannot_hold_raise_and_leave_the_cache_as_it_was(models):
    """The kv_append kernel cannot raise: its error bits reach the host after the step (check_values "deferred",
    the default: forward does not wait), check() raises the reference's error and the step is undone."""
    cuda, eager = models
    ex, cache = _prefilled(cuda, CacheConfig.of(eager.cache_layout, "q8_0", max_seq_len=MAX))
    assert ex.check_values == "deferred"
    with _poisoned(ex, [7]):
        ex.forward(torch.tensor([[7]]), torch.tensor([[3]]), cache)
        assert cache.lengths(0) == (4,)  # not read yet
        with pytest.raises(NonFiniteError, match="(?i)nan.*positions \\[3\\].*undone"):
            ex.check()
    assert cache.lengths(0) == (3,)
    ex.check()  # reported once
    ex.forward(torch.tensor([[4]]), torch.tensor([[3]]), cache)  # the cache goes on from where it was
    ex.check()
    assert cache.lengths(0) == (4,)


def test_a_deferred_error_is_raised_by_the_next_step_and_both_steps_are_undone(models):
    cuda, eager = models
    ex, cache = _prefilled(cuda, CacheConfig.of(eager.cache_layout, "q8_0", max_seq_len=MAX))
    with _poisoned(ex, [7]):
        ex.forward(torch.tensor([[7]]), torch.tensor([[3]]), cache)
    with pytest.raises(NonFiniteError, match="1 step\\(s\\) run after it were undone"):
        ex.forward(torch.tensor([[5]]), torch.tensor([[4]]), cache)
    assert cache.lengths(0) == (3,)
    logits = ex.forward(torch.tensor([[4]]), torch.tensor([[3]]), cache)
    ex.check()
    assert cache.lengths(0) == (4,) and torch.isfinite(logits).all()


def test_a_prefill_reports_earlier_steps_then_its_own_errors_at_once(models):
    cuda, eager = models
    ex, cache = _prefilled(cuda, CacheConfig.of(eager.cache_layout, "fp16", max_seq_len=MAX))
    with _poisoned(ex, [7]):
        ex.forward(torch.tensor([[7]]), torch.tensor([[3]]), cache)
        with pytest.raises(NonFiniteError):  # the decode step's, before the prefill runs
            ex.forward(torch.tensor([[1, 2]]), torch.tensor([[4, 5]]), cache)
        assert cache.lengths(0) == (3,)
        with pytest.raises(NonFiniteError):  # its own
            ex.forward(torch.tensor([[1, 7]]), torch.tensor([[3, 4]]), cache)
        assert cache.lengths(0) == (3,)


@pytest.mark.parametrize("mode", ["step", "off"])
def test_check_values_step_raises_from_the_step_itself_and_off_reads_nothing(models, mode):
    cuda, eager = models
    ex, cache = _prefilled(cuda, CacheConfig.of(eager.cache_layout, "q8_0", max_seq_len=MAX))
    ex.check_values = mode  # (the compiled model keeps its executors: the mode goes back when the test ends)
    with _poisoned(ex, [7]), _mode_restored(ex):
        if mode == "step":
            with pytest.raises(NonFiniteError):
                ex.forward(torch.tensor([[7]]), torch.tensor([[3]]), cache)
            assert cache.lengths(0) == (3,)
        else:
            ex.forward(torch.tensor([[7]]), torch.tensor([[3]]), cache)
            ex.check()
            assert cache.lengths(0) == (4,)


def test_generation_raises_a_bad_step_before_yielding_its_token(models):
    """The Generator calls check() after reading each token: a decode step whose values the cache refuses raises
    before its token is yielded, and the conversation and the cache stay consistent."""
    cuda, _ = models
    gen = Generator(cuda, GenerateConfig(temperature=0, cache_kind="q8_0", max_seq_len=MAX, max_new_tokens=6))
    stream = gen.generate_iter([[1, 2, 3]])
    first = next(stream)  # from the prefill
    with _poisoned(gen.executor, None), pytest.raises(NonFiniteError):
        next(stream)  # the step that feeds `first` is refused
    assert gen.tokens == [[1, 2, 3, int(first)]]
    assert gen.cache.lengths(0) == (3,)


def test_sampling_with_a_seed_gives_eagers_tokens(models):
    """Sampling draws from the CPU generator whatever device the logits are on: same seed, same tokens."""
    cuda, eager = models
    config = GenerateConfig(temperature=0.8, top_k=20, seed=3, cache_kind="fp32", max_seq_len=MAX, max_new_tokens=6)
    prompts = [[1, 2, 3], [4, 5]]
    assert torch.equal(Generator(cuda, config).generate(prompts), Generator(eager, config).generate(prompts))


def test_a_compiled_model_call_runs_the_triton_kernels_and_equals_eager(models):
    """cm(ids) on target cuda prefills the ids through the Triton kernels (an fp32 cache for an fp32 model), not
    the reference interpreter; the logits equal eager's. Bad ids get the interpreter's InputError."""
    cuda, eager = models
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(3))
    want = eager(ids)
    got = cuda(ids).cpu()
    ex = cuda.executor(cuda._stateless_config(7))  # the one the call used (kept per config)
    assert type(ex.kernels).__name__ == "TritonKernels" and ex.stats["eager_steps"] >= 1
    assert ex.config.kind_map == {n: "fp32" for n in cuda.cache_layout.names}
    assert (got - want).abs().max() <= 2e-4 * want.abs().max()
    with pytest.raises(caramba.InputError, match="must have dtype torch.int64"):
        cuda(ids.float())
