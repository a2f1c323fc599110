"""Speculative decoding math (SPEC §5): the output is distributed as the target's (chi-square), greedy equals the
target's greedy output, all-accepted rounds, the batch rule, and adaptive k."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from caramba.runtime.generate_config import SpeculativeConfig
from caramba.runtime.sampling import make_generator, probs_after_filters
from caramba.runtime.speculative import (
    PAD_TOKEN,
    AdaptiveK,
    RoundResult,
    SpeculativeError,
    commit,
    committed_count,
    greedy_round,
    residual_distribution,
    speculative_round,
)
from tests.helpers import ALPHA, chi_square_pvalue

V = 6  # vocabulary of the statistical tests
START = V  # "no previous token" row of a Markov table


# ---------------------------------------------------------------------------------------------------------------
# A target and a draft that are Markov chains with position-dependent tables: P[t, prev] is the target's
# distribution of the token at position t after token `prev`. The draft disagrees with the target a lot, never
# proposes token 0 (only corrections and bonuses can emit it), and proposes V-1 where the target gives it zero
# probability at even positions (such drafts must always be rejected).
# ---------------------------------------------------------------------------------------------------------------
def _markov_tables(n_positions: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(n_positions, V + 1, V, generator=g).softmax(-1)
    q = (1.5 * torch.randn(n_positions, V + 1, V, generator=g)).softmax(-1)
    q[..., 0] = 0
    p[0::2, :, V - 1] = 0
    return p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)


def _draft(p: torch.Tensor, q: torch.Tensor, t: torch.Tensor, prev: torch.Tensor, k: int, g: torch.Generator):
    """Rows at positions t after token prev: k draft tokens (R, k), their q (R, k, V) and the target's p (R, k+1, V)."""
    tokens, qs, ps = [], [], []
    for i in range(k):
        qs.append(q[t + i, prev])
        ps.append(p[t + i, prev])
        prev = torch.multinomial(qs[-1], 1, generator=g).squeeze(1)
        tokens.append(prev)
    ps.append(p[t + k, prev])
    return torch.stack(tokens, 1), torch.stack(qs, 1), torch.stack(ps, 1)


def _simulate(p, q, k: int, rows: int, group: int, length: int, seed: int) -> torch.Tensor:
    """(rows, length) committed tokens: rows in batches of `group` that share a position and commit by the batch
    rule, round after round, until every row has `length` tokens."""
    g = torch.Generator().manual_seed(seed)
    out = torch.full((rows, length + k + 1), PAD_TOKEN)
    pos = torch.zeros(rows, dtype=torch.long)
    cols = torch.arange(k + 1)
    while (live := torch.nonzero(pos < length).flatten()).numel():  # whole batches are live together
        t = pos[live]
        prev = torch.where(t == 0, START, out[live, (t - 1).clamp_min(0)])
        result = speculative_round(*_draft(p, q, t, prev, k, g), g)
        n = result.n_accepted.view(-1, group).amin(1).repeat_interleave(group)
        first = RoundResult(result.n_accepted[:group], result.tokens[:group])
        assert torch.equal(commit(first), result.tokens[:group, : n[0] + 1])
        keep = cols < (n + 1).unsqueeze(1)
        out[live.unsqueeze(1).expand_as(keep)[keep], (t.unsqueeze(1) + cols)[keep]] = result.tokens[keep]
        pos[live] = t + n + 1
    return out[:, :length]


def _pair_distributions(p: torch.Tensor, length: int) -> list[torch.Tensor]:
    """(V, V) joint distribution of the tokens at positions t, t+1 under the target, for t < length - 1."""
    marginal, pairs = p[0, START], []
    for t in range(length - 1):
        pairs.append(marginal.unsqueeze(1) * p[t + 1, :V])
        marginal = pairs[-1].sum(0)
    return pairs


@pytest.mark.parametrize("k, group, seed", [(1, 1, 0), (2, 1, 1), (3, 1, 2), (2, 3, 3)])
def test_output_is_distributed_as_the_target(k, group, seed):
    """Every consecutive pair of committed tokens has the target's joint distribution, which checks each token's
    distribution given the one before it, at every position, across round boundaries (and, with group > 1,
    under the batch rule)."""
    length, rows = 5, 30_000
    p, q = _markov_tables(length + k, seed=100 + seed)
    tokens = _simulate(p, q, k, rows, group, length, seed)
    assert (tokens >= 0).all()
    for t, joint in enumerate(_pair_distributions(p, length)):
        counts = torch.bincount(tokens[:, t] * V + tokens[:, t + 1], minlength=V * V)
        assert chi_square_pvalue(counts, joint) > ALPHA, f"positions {t}, {t + 1}"


def test_the_distribution_check_catches_a_wrong_residual(monkeypatch):
    """The same check fails when a rejection resamples from p instead of normalize(max(p - q, 0))."""
    import caramba.runtime.speculative as speculative
    monkeypatch.setattr(speculative, "residual_distribution", lambda p, q: p)
    p, q = _markov_tables(6, seed=101)
    tokens = _simulate(p, q, 2, 30_000, 1, 4, seed=1)
    pairs = _pair_distributions(p, 4)
    assert min(chi_square_pvalue(torch.bincount(tokens[:, t] * V + tokens[:, t + 1], minlength=V * V), joint)
               for t, joint in enumerate(pairs)) < ALPHA


# ---------------------------------------------------------------------------------------------------------------
# Greedy: the output equals the target's own greedy decoding
# ---------------------------------------------------------------------------------------------------------------
def _greedy_reference(logits: torch.Tensor, starts: torch.Tensor, length: int) -> torch.Tensor:
    prev, out = starts, []
    for t in range(length):
        prev = logits[t, prev].argmax(-1)
        out.append(prev)
    return torch.stack(out, 1)


def _greedy_speculative(target: torch.Tensor, draft: torch.Tensor, starts: torch.Tensor, length: int,
                        controller: AdaptiveK, sampled: bool) -> torch.Tensor:
    """Decode `length` tokens for rows that share a position; `sampled` runs the sampling round on the
    temperature-0 (one-hot) distributions instead of greedy_round."""
    g = make_generator(0)
    out = starts.unsqueeze(1)
    while out.shape[1] - 1 < length:
        t, k = out.shape[1] - 1, controller.k_for(length - (out.shape[1] - 1))
        prev, tokens, target_logits = out[:, -1], [], []
        for i in range(k):
            target_logits.append(target[t + i, prev])
            prev = draft[t + i, prev].argmax(-1)
            tokens.append(prev)
        target_logits.append(target[t + k, prev])
        drafts = torch.stack(tokens, 1) if tokens else out[:, :0]  # [B, k]
        logits = torch.stack(target_logits, 1)  # [B, k+1, vocab]
        if sampled:
            q = F.one_hot(drafts, target.shape[-1]).float()
            result = speculative_round(drafts, q, probs_after_filters(logits, 0.0), g)
        else:
            result = greedy_round(drafts, logits)
        committed = commit(result)
        controller.update(drafts.numel(), int(result.n_accepted.sum()))
        out = torch.cat([out, committed], 1)
    return out[:, 1:]


@pytest.mark.parametrize("sampled", [False, True])
@pytest.mark.parametrize("spec_k", [1, 3, 6])
def test_greedy_equals_the_targets_greedy_output(spec_k, sampled):
    vocab, length = 16, 40
    g = torch.Generator().manual_seed(spec_k)
    target = torch.randn(length + 16, vocab + 1, vocab, generator=g)
    draft = target + 1.2 * torch.randn(target.shape, generator=g)  # agrees with the target about half the time
    starts = torch.tensor([vocab, 3, 7, 11])
    controller = AdaptiveK(SpeculativeConfig(spec_k=spec_k, adjust_every=8, disable_below=0.0))
    out = _greedy_speculative(target, draft, starts, length, controller, sampled)
    assert torch.equal(out, _greedy_reference(target, starts, length))
    assert 0 < controller.accepted < controller.proposed  # both accepts and rejections happened


# ---------------------------------------------------------------------------------------------------------------
# Single rounds
# ---------------------------------------------------------------------------------------------------------------
def _one_hot(ids, vocab: int = V) -> torch.Tensor:
    return F.one_hot(torch.as_tensor(ids), vocab).float()


@pytest.mark.parametrize("k", [1, 2, 4])
def test_all_accepted_gives_k_plus_one_tokens_with_a_bonus_from_p_k(k):
    g = torch.Generator().manual_seed(k)
    q = torch.randn(3, k, V, generator=g).softmax(-1)
    drafts = torch.multinomial(q.view(-1, V), 1, generator=g).view(3, k)
    p = torch.cat([q, _one_hot([[4], [0], [5]])], 1)  # p_i = q_i: every draft is accepted
    result = speculative_round(drafts, q, p, make_generator(k))
    assert result.n_accepted.tolist() == [k] * 3 and committed_count(result) == k
    assert torch.equal(commit(result), torch.cat([drafts, torch.tensor([[4], [0], [5]])], 1))


def test_first_rejection_samples_the_residual_and_pads_after_it():
    drafts = torch.tensor([[1, 2, 3]])
    q = _one_hot([[1, 2, 3]])
    p = torch.stack([_one_hot(1), 0.5 * _one_hot(2) + 0.5 * _one_hot(5), _one_hot(0), _one_hot(0)]).unsqueeze(0)
    for seed in range(20):  # x_1 = 2 is accepted half the time; the residual at position 1 is the point mass on 5
        result = speculative_round(drafts, q, p, make_generator(seed))
        n = int(result.n_accepted)
        assert n in (1, 2)
        expected = [1, 5, PAD_TOKEN, PAD_TOKEN] if n == 1 else [1, 2, 0, PAD_TOKEN]
        assert result.tokens.tolist() == [expected]


def test_zero_draft_tokens_is_a_plain_sample_from_p0():
    p = _one_hot([[3]])
    result = speculative_round(torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, 0, V), p, make_generator(0))
    assert result.n_accepted.tolist() == [0] and commit(result).tolist() == [[3]]


def test_same_seed_same_round():
    g = torch.Generator().manual_seed(9)
    q = torch.randn(8, 3, V, generator=g).softmax(-1)
    p = torch.randn(8, 4, V, generator=g).softmax(-1)
    drafts = torch.multinomial(q.view(-1, V), 1, generator=g).view(8, 3)
    a, b = (speculative_round(drafts, q, p, make_generator(5)) for _ in range(2))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.n_accepted, b.n_accepted)


def test_residual_distribution_and_its_fallback():
    p = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.25, 0.25, 0.25, 0.25]])
    q = torch.tensor([[0.2, 0.4, 0.1, 0.3], [0.25, 0.25, 0.25, 0.25]])
    r = residual_distribution(p, q)
    assert torch.allclose(r[0], torch.tensor([0.75, 0.0, 0.25, 0.0]))
    assert torch.equal(r[1], p[1])  # p == q: max(p - q, 0) is all zeros, so p itself
    assert not r.isnan().any()


def test_round_shapes_are_checked():
    drafts, q, p = torch.zeros(2, 3, dtype=torch.long), torch.rand(2, 3, V), torch.rand(2, 4, V)
    with pytest.raises(SpeculativeError, match=r"target distributions must be \(B, k\+1, V\) = \(2, 4, V\)"):
        speculative_round(drafts, q, p[:, :3])
    with pytest.raises(SpeculativeError, match=r"draft distributions must be \(B, k, V\) = \(2, 3, 6\)"):
        speculative_round(drafts, q[:1], p)
    with pytest.raises(SpeculativeError, match="draft_tokens must be"):
        greedy_round(drafts.float(), p)


# ---------------------------------------------------------------------------------------------------------------
# The batch rule
# ---------------------------------------------------------------------------------------------------------------
def test_commit_takes_the_fewest_accepted_and_each_rows_own_tokens():
    result = RoundResult(torch.tensor([2, 1, 3]),
                         torch.tensor([[10, 11, 40, PAD_TOKEN], [10, 41, PAD_TOKEN, PAD_TOKEN], [10, 11, 12, 42]]))
    assert committed_count(result) == 1
    assert commit(result).tolist() == [[10, 11], [10, 41], [10, 11]]


def test_batch_rule_on_a_real_round():
    """Row 0 rejects x_2, row 1 rejects x_1, row 2 accepts all: one draft is committed, then each row's own token
    at position 1 — row 1's correction, rows 0 and 2's accepted x_1."""
    drafts = torch.tensor([[1, 2, 3], [1, 2, 3], [1, 2, 3]])
    q = _one_hot(drafts)
    p = torch.stack([
        torch.stack([_one_hot(1), _one_hot(2), _one_hot(4), _one_hot(0)]),
        torch.stack([_one_hot(1), _one_hot(5), _one_hot(3), _one_hot(0)]),
        torch.stack([_one_hot(1), _one_hot(2), _one_hot(3), _one_hot(0)]),
    ])
    result = speculative_round(drafts, q, p, make_generator(0))
    assert result.n_accepted.tolist() == [2, 1, 3]
    assert result.tokens.tolist() == [[1, 2, 4, PAD_TOKEN], [1, 5, PAD_TOKEN, PAD_TOKEN], [1, 2, 3, 0]]
    assert commit(result).tolist() == [[1, 2], [1, 5], [1, 2]]
    greedy = greedy_round(drafts, p)
    assert torch.equal(greedy.tokens, result.tokens) and torch.equal(greedy.n_accepted, result.n_accepted)


# ---------------------------------------------------------------------------------------------------------------
# Adaptive k
# ---------------------------------------------------------------------------------------------------------------
def test_k_for_caps_at_remaining_minus_one():
    control = AdaptiveK(SpeculativeConfig(spec_k=4))
    assert [control.k_for(r) for r in (1, 2, 4, 5, 6, 100)] == [0, 1, 3, 4, 4, 4]
    with pytest.raises(SpeculativeError, match="at least one token left"):
        control.k_for(0)


def test_k_moves_toward_the_target_acceptance_every_window():
    control = AdaptiveK(SpeculativeConfig(spec_k=4, k_max=6, adjust_every=32, step=1, disable_below=0.0))
    control.update(16, 16)
    assert control.k == 4  # half a window: no adjustment yet
    control.update(16, 16)
    assert control.k == 5  # window rate 1.0 > 0.7
    for _ in range(4):
        control.update(32, 30)
    assert control.k == 6  # clamped to k_max
    control.update(32, 16)
    assert control.k == 5  # window rate 0.5 < 0.7, judged on this window, not the whole history
    control.update(40, 28)
    assert control.k == 5  # exactly on target: unchanged


def test_k_shrinks_by_step_and_clamps_at_k_min():
    control = AdaptiveK(SpeculativeConfig(spec_k=8, k_min=3, step=2, adjust_every=10, disable_below=0.0))
    for expected in (6, 4, 3, 3):
        control.update(10, 5)
        assert control.k == expected


def test_not_adaptive_keeps_k():
    control = AdaptiveK(SpeculativeConfig(spec_k=4, adaptive=False, disable_below=0.0))
    for _ in range(10):
        control.update(32, 0)
    assert control.k == 4 and not control.disabled


def test_low_acceptance_disables_only_after_min_proposals():
    control = AdaptiveK(SpeculativeConfig(disable_below=0.3, min_proposals=16))
    control.update(12, 0)
    assert not control.disabled and control.k_for(10) == 4  # too few proposals to judge
    control.update(4, 4)
    assert control.acceptance_rate == 0.25 and control.disabled
    assert control.k_for(10) == 0  # plain decoding from now on
    control.update(100, 100)
    assert control.disabled  # disabled stays disabled until reset
    control.reset()
    assert not control.disabled and control.k == 4 and control.acceptance_rate is None


def test_acceptance_at_the_threshold_keeps_speculating():
    control = AdaptiveK(SpeculativeConfig(disable_below=0.25, min_proposals=16, adaptive=False))
    control.update(16, 4)
    assert not control.disabled


def test_update_rejects_impossible_counts():
    with pytest.raises(SpeculativeError, match="0 <= accepted <= proposed"):
        AdaptiveK().update(3, 4)
