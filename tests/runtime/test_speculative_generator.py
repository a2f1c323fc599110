"""SpeculativeGenerator (SPEC §5) over real compiled models: greedy output equals the target's greedy output, the
sampled output is distributed as the target's (chi-square on a vocabulary of 8), the two caches stay in sync with
the conversation, per-row EOS, adaptive k and disabling, and the errors raised before any work."""
from __future__ import annotations

import copy

import pytest
import torch

import caramba
from caramba.errors import InputError
from caramba.models import Transformer, preset
from caramba.runtime import CacheConfig, GenerateConfig, Generator, SpeculativeConfig
from caramba.runtime import speculative_generator as sg_module
from caramba.runtime.speculative import RoundResult
from caramba.runtime.speculative_generator import SpeculativeGenerator
from tests.helpers import ALPHA, chi_square_pvalue

PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10]]  # ragged: rows start at different positions
FIXED = dict(adaptive=False, disable_below=0.0)  # k stays spec_k for the whole test


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: one intra-op thread is faster, and much faster when other processes share the cores
    (oversubscribed threads made each tiny matmul ~30x slower on a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _greedy(**kw) -> GenerateConfig:
    return GenerateConfig(**{"temperature": 0, "cache_kind": "fp32", "max_seq_len": 48, "max_new_tokens": 10, **kw})


# ---------------------------------------------------------------------------------------------------------------
# Models. Vocabulary 256: the target, and a draft that is the target with slightly perturbed weights (about half of
# its greedy proposals are accepted, so rounds mix acceptances and rejections). A draft equal to the target is the
# compiled target itself.
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    target = Transformer(preset("tiny", attention="decoupled", n_layers=2)).eval()
    draft = copy.deepcopy(target)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(0.002 * torch.randn(p.shape, generator=g))
    return caramba.compile(target, target="eager"), caramba.compile(draft, target="eager")


@pytest.fixture(scope="module")
def reference(models):
    """The target's plain greedy output for the test prompts, batch 1 and ragged batch 3."""
    target, _ = models
    return {len(p): Generator(target, _greedy()).generate(p) for p in (PROMPTS[:1], PROMPTS)}


def _assert_in_sync(gen: SpeculativeGenerator, contents: bool = True) -> None:
    """Both caches hold exactly each row's conversation but its last token: the lengths in every layer, and (with
    contents) the stored values, against a fresh prefill of those tokens."""
    want = tuple(len(t) - 1 for t in gen.tokens)
    assert gen.target_cache.lengths(0) == gen.draft_cache.lengths(0) == want
    for cache in (gen.target_cache, gen.draft_cache):
        assert {cache.lengths(i) for i in range(cache.spec.n_layers)} == {want}
    if not contents:
        return
    for ex, cache in ((gen.target_executor, gen.target_cache), (gen.draft_executor, gen.draft_cache)):
        for b, tokens in enumerate(gen.tokens):
            fresh = ex.new_cache(1)
            ex.forward(torch.tensor([tokens[:-1]]), torch.arange(len(tokens) - 1)[None], fresh)
            for layer in range(cache.spec.n_layers):
                held, ref = cache.read(layer), fresh.read(layer)
                for name in ref:
                    torch.testing.assert_close(held[name][b, :want[b]], ref[name][0], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Temperature 0: exactly the target's greedy output
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("same", [False, True], ids=["perturbed-draft", "draft-is-target"])
@pytest.mark.parametrize("spec", [SpeculativeConfig(spec_k=1, **FIXED), SpeculativeConfig(spec_k=3, **FIXED),
                                  SpeculativeConfig(spec_k=2, k_min=1, k_max=6, adjust_every=2)],
                         ids=["k1", "k3", "adaptive"])
def test_greedy_output_equals_the_targets_greedy_output(models, reference, spec, same):
    target, draft = models
    for prompts in (PROMPTS[:1], PROMPTS):
        gen = SpeculativeGenerator(target, target if same else draft, _greedy(), spec)
        out = gen.generate(prompts)
        assert torch.equal(out, reference[len(prompts)])
        assert gen.stats.steps == gen.stats.new_tokens / len(prompts) == 10
        _assert_in_sync(gen)
        if same:
            assert gen.stats.acceptance_rate == 1.0 and gen.stats.accepted == gen.stats.committed_drafts
        else:  # the perturbed draft is neither always right nor always wrong
            assert 0 < gen.stats.accepted < gen.stats.proposed


@pytest.mark.parametrize("spec", [SpeculativeConfig(spec_k=3, **FIXED),
                                  SpeculativeConfig(spec_k=2, k_min=1, k_max=5, adjust_every=2)],
                         ids=["k3", "adaptive"])
def test_greedy_equality_holds_with_a_quantized_cache_and_an_fp16_ring(models, spec):
    """With cache_residual_len > 0 each query of the verify pass reads the ring window it would read decoding
    alone, and rollbacks keep later windows exact: the output is still the target's greedy output."""
    target, draft = models
    config = _greedy(cache_kind="q4_0", cache_residual_len=4, max_new_tokens=24)
    for prompts in (PROMPTS, [[7, 3, 9, 1, 200, 45, 6], [99]]):
        gen = SpeculativeGenerator(target, draft, config, spec)
        assert torch.equal(gen.generate(prompts), Generator(target, config).generate(prompts))
        assert 0 < gen.stats.accepted < gen.stats.proposed  # rounds with rejections, so rollbacks happened
        assert gen.target_cache.spec.ring_slack == (spec.k_max if spec.adaptive else spec.spec_k)
        _assert_in_sync(gen, contents=False)


def test_a_draft_equal_to_the_target_has_every_round_fully_accepted(models):
    target, _ = models
    gen = SpeculativeGenerator(target, target, _greedy(max_new_tokens=12), SpeculativeConfig(spec_k=3, **FIXED))
    yielded = list(gen.generate_iter(PROMPTS))
    assert len(yielded) == 12 and all(t.shape == (3,) for t in yielded)
    assert gen.stats.rounds == 3 and gen.stats.tokens_per_round == 4.0  # k + 1 per round: drafts and a bonus
    assert gen.stats.proposed == gen.stats.accepted == 3 * 3 * 3
    _assert_in_sync(gen)  # the draft never fed its last accepted draft; the end of the call caught it up


def test_executors_can_be_passed_directly(models, reference):
    target, draft = models
    config = CacheConfig.of(target.cache_layout, "fp32", max_seq_len=48)
    gen = SpeculativeGenerator(target.executor(config), draft.executor(config), _greedy(),
                               SpeculativeConfig(spec_k=2, **FIXED))
    assert torch.equal(gen.generate(PROMPTS), reference[3])
    _assert_in_sync(gen)


def test_generate_iter_yields_the_generated_positions_in_order(models, reference):
    target, draft = models
    gen = SpeculativeGenerator(target, draft, _greedy(), SpeculativeConfig(spec_k=3, **FIXED))
    tokens = torch.stack(list(gen.generate_iter(PROMPTS)), dim=1)
    assert torch.equal(tokens, reference[3][:, -10:])


# ---------------------------------------------------------------------------------------------------------------
# State: caches in sync, continuing the conversation, early close, rollback, reset
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("same", [True, False], ids=["all-accepted", "with-rejections"])
def test_caches_stay_in_sync_and_the_conversation_continues_greedily(models, same):
    target, draft = models
    config = _greedy(max_new_tokens=4)
    gen = SpeculativeGenerator(target, target if same else draft, config, SpeculativeConfig(spec_k=3, **FIXED))
    plain = Generator(target, config)
    assert torch.equal(gen.generate(PROMPTS), plain.generate(PROMPTS))
    if same:  # one round of k = 3, all accepted: the draft lacked x_2 until the end of the call
        assert gen.stats.rounds == 1 and gen.stats.accepted == 9
    else:
        assert gen.stats.accepted < gen.stats.proposed
    _assert_in_sync(gen)
    more = [[11, 12], [13], [14, 15, 16]]
    assert torch.equal(gen.generate(more), plain.generate(more))
    assert gen.tokens == plain.tokens
    _assert_in_sync(gen)


@pytest.mark.parametrize("same", [True, False], ids=["draft-is-target", "perturbed-draft"])
def test_closing_the_iterator_early_keeps_what_was_yielded(models, reference, same):
    target, draft = models
    gen = SpeculativeGenerator(target, target if same else draft, _greedy(), SpeculativeConfig(spec_k=3, **FIXED))
    it = gen.generate_iter(PROMPTS)
    first = torch.stack([next(it) for _ in range(5)], dim=1)  # with draft == target: 4 + 1 of the second round
    it.close()
    assert torch.equal(first, reference[3][:, -10:-5])
    assert gen.tokens == [p + row for p, row in zip(PROMPTS, first.tolist())]
    _assert_in_sync(gen)
    plain = Generator(target, _greedy())
    plain.generate(PROMPTS)
    plain.rollback(5)
    more = [[20], [21], [22]]
    assert torch.equal(gen.generate(more), plain.generate(more))


def test_rollback_and_reset(models):
    target, draft = models
    gen = SpeculativeGenerator(target, draft, _greedy(), SpeculativeConfig(spec_k=2, **FIXED))
    plain = Generator(target, _greedy())
    first = gen.generate(PROMPTS)
    plain.generate(PROMPTS)
    gen.rollback(4)
    plain.rollback(4)
    _assert_in_sync(gen)
    assert torch.equal(gen.generate([[30], [31], [32]]), plain.generate([[30], [31], [32]]))
    _assert_in_sync(gen)
    gen.reset()
    assert gen.tokens is None and torch.equal(gen.generate(PROMPTS), first)


# ---------------------------------------------------------------------------------------------------------------
# EOS per row, adaptive k, disabling
# ---------------------------------------------------------------------------------------------------------------
def test_rows_stop_at_their_own_eos(models, reference):
    target, draft = models
    new = reference[3][:, -10:]
    eos = int(new[1, 2])  # row 1 stops at its third new token (other rows may stop at it too, or never)
    config = _greedy(eos_token_id=eos)
    out = SpeculativeGenerator(target, draft, config, SpeculativeConfig(spec_k=3, **FIXED))
    got = out.generate(PROMPTS)
    want = Generator(target, config).generate(PROMPTS)
    assert torch.equal(got, want)
    assert got[1, -10:].tolist()[:3] == new[1, :3].tolist() and (got[1, -7:] == eos).all()  # pad_id is the EOS
    assert out.tokens[1] == PROMPTS[1] + new[1, :3].tolist()
    _assert_in_sync(out)


def test_every_row_at_eos_ends_the_call(models, reference):
    target, draft = models
    first = reference[1][0, -10:]
    config = _greedy(eos_token_id=int(first[1]))
    gen = SpeculativeGenerator(target, draft, config, SpeculativeConfig(spec_k=4, **FIXED))
    out = gen.generate(PROMPTS[:1])
    assert out[0, 3:].tolist() == first[:2].tolist()  # nothing is yielded after the last row's EOS
    _assert_in_sync(gen)


def test_adaptive_k_moves_and_a_poor_draft_gets_disabled(models, reference):
    target, draft = models
    # Acceptance of this draft is about 0.5: above a 0.3 target k grows, below a 0.9 target it shrinks, and a
    # threshold of 0.8 turns speculation off after the first proposals, leaving plain target steps.
    grow = SpeculativeGenerator(target, draft, _greedy(), SpeculativeConfig(spec_k=2, k_max=8, target_acceptance=0.3,
                                                                           adjust_every=1, disable_below=0.0))
    assert torch.equal(grow.generate(PROMPTS), reference[3]) and grow.adaptive.k > 2
    off = SpeculativeGenerator(target, draft, _greedy(), SpeculativeConfig(spec_k=2, target_acceptance=0.9,
                                                                          disable_below=0.8, min_proposals=4))
    assert torch.equal(off.generate(PROMPTS), reference[3])
    assert off.adaptive.disabled and off.stats.disabled
    assert off.stats.proposed == 6  # one round of 2 drafts for 3 rows, then plain steps
    assert off.stats.rounds == 10 - off.stats.committed_drafts // 3
    _assert_in_sync(off)  # the idle draft was caught up at the end of the call


# ---------------------------------------------------------------------------------------------------------------
# Temperature 1: the output is distributed as the target's. Vocabulary 8, a 1-layer target and an unrelated
# 1-layer draft (their joint distributions of two tokens are ~0.4 apart in total variation); lm_head scaled so
# that the distributions are far from uniform. Rows of one batch are independent samples.
# ---------------------------------------------------------------------------------------------------------------
SMALL_PROMPT = [1, 2, 3]
ROWS = 4000


def _small(seed: int) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(preset("tiny", attention="decoupled", vocab_size=8, n_layers=1)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)
    return model


@pytest.fixture(scope="module")
def small():
    target, draft = _small(2), _small(3)
    with torch.no_grad():  # the exact joint distributions of new tokens (0, 1) and (1, 2), from the eager model
        p0 = target(torch.tensor([SMALL_PROMPT]))[0, -1].softmax(-1)
        p1 = target(torch.tensor([SMALL_PROMPT + [a] for a in range(8)]))[:, -1].softmax(-1)
        p2 = target(torch.tensor([SMALL_PROMPT + [a, b] for a in range(8) for b in range(8)]))[:, -1].softmax(-1)
    j01 = p0[:, None] * p1
    j12 = (j01[:, :, None] * p2.view(8, 8, 8)).sum(0)
    compiled = [caramba.compile(m, target="eager", max_batch=ROWS) for m in (target, draft)]
    return compiled, (j01, j12)


def _sample(target, draft, spec: SpeculativeConfig, seed: int) -> torch.Tensor:
    config = GenerateConfig(temperature=1.0, cache_kind="fp32", max_seq_len=8, max_new_tokens=3, seed=seed)
    gen = SpeculativeGenerator(target, draft, config, spec) if draft is not None else Generator(target, config)
    return gen.generate([SMALL_PROMPT] * ROWS)[:, -3:], gen


def _pvalues(tokens: torch.Tensor, joints) -> list[float]:
    return [chi_square_pvalue(torch.bincount(tokens[:, t] * 8 + tokens[:, t + 1], minlength=64), joint)
            for t, joint in enumerate(joints)]


def test_sampled_output_is_distributed_as_the_target(small):
    (target, draft), joints = small
    tokens, gen = _sample(target, draft, SpeculativeConfig(spec_k=2, **FIXED), seed=0)
    assert 0 < gen.stats.accepted < gen.stats.proposed  # rows accept and reject within every round
    assert min(_pvalues(tokens, joints)) > ALPHA
    _assert_in_sync(gen, contents=False)  # 4000 rows: the lengths only
    plain, _ = _sample(target, None, SpeculativeConfig(), seed=1)  # the test itself, on plain sampling
    assert min(_pvalues(plain, joints)) > ALPHA


def test_sampled_output_with_bonus_tokens_is_distributed_as_the_target(small):
    """With the draft equal to the target nearly every round accepts both drafts, so most positions come from
    accepted drafts and bonus samples rather than from corrections."""
    (target, _), joints = small
    tokens, gen = _sample(target, target, SpeculativeConfig(spec_k=2, **FIXED), seed=2)
    assert gen.stats.acceptance_rate > 0.999  # p and q agree up to rounding (one S=1 pass, one S=3 pass)
    assert min(_pvalues(tokens, joints)) > ALPHA


def test_the_distribution_check_catches_a_generator_that_accepts_every_draft(small, monkeypatch):
    """The same check fails when every draft is accepted (the output is then the draft's where it proposed)."""
    (target, draft), joints = small

    def accept_all(draft_tokens, q, p, generator=None):
        b, k = draft_tokens.shape
        bonus = torch.multinomial(p[:, k].float(), 1, generator=generator)
        return RoundResult(torch.full((b,), k), torch.cat([draft_tokens, bonus], dim=1))

    monkeypatch.setattr(sg_module, "speculative_round", accept_all)
    tokens, _ = _sample(target, draft, SpeculativeConfig(spec_k=2, **FIXED), seed=0)
    assert min(_pvalues(tokens, joints)) < ALPHA


# ---------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------
def test_errors(models, small):
    target, draft = models
    (small_target, _), _ = small
    with pytest.raises(InputError, match="vocabulary"):
        SpeculativeGenerator(target, small_target, _greedy())
    with pytest.raises(TypeError, match="draft"):
        SpeculativeGenerator(target, "draft.pt", _greedy())
    with pytest.raises(TypeError, match="config"):
        SpeculativeGenerator(target, draft, {"temperature": 0})
    with pytest.raises(TypeError, match="spec"):
        SpeculativeGenerator(target, draft, _greedy(), {"spec_k": 2})

    gen = SpeculativeGenerator(target, draft, _greedy(max_seq_len=16))
    with pytest.raises(InputError, match="exceeds max_seq_len"):
        gen.generate_iter([list(range(8))])  # 8 + 10 > 16 + 1 (the last token is never fed): refused before any work, not at the first round
    assert gen.tokens is None and gen.target_cache is None and gen.draft_cache is None
    with pytest.raises(InputError, match="outside the vocabulary"):
        gen.generate([[1, 256]])
    with pytest.raises(InputError, match="input_ids"):
        gen.generate("hello")
    gen.generate([[1, 2, 3]])
    held = (gen.target_cache.lengths(0), gen.draft_cache.lengths(0), [list(t) for t in gen.tokens])
    with pytest.raises(InputError, match="exceeds max_seq_len"):
        gen.generate([[4]])  # 13 held + 1 + 10 > 16
    with pytest.raises(InputError, match="conversation of 1 row"):
        gen.generate([[4], [5]])
    with pytest.raises(InputError, match="roll back"):
        gen.rollback(100)
    assert (gen.target_cache.lengths(0), gen.draft_cache.lengths(0), gen.tokens) == held


def test_exported():
    assert caramba.SpeculativeGenerator is SpeculativeGenerator
    from caramba.runtime import SpeculativeGenerator as exported

    assert exported is SpeculativeGenerator
