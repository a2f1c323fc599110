"""Speculative decoding as pure math (SPEC §5): one round's accept/reject, the batch commit rule, adaptive k.

A round, per row: the draft proposed x_0..x_{k-1} with distributions q_0..q_{k-1}; the target scored them in one
pass, giving p_0..p_k (p_i conditions on x_<i). Token i is accepted with probability min(1, p_i(x_i) / q_i(x_i)),
in order; at the first rejection, position i gets a sample of normalize(max(p_i - q_i, 0)); if all k are
accepted, position k gets a bonus sample of p_k. Each row's output is then distributed exactly as the target's.
Nothing here touches a model or a cache: the generator loop feeds distributions in and commits what comes out.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from caramba.errors import CarambaError
from caramba.runtime.generate_config import SpeculativeConfig
from caramba.runtime.sampling import greedy, sample_from

PAD_TOKEN = -1  # fills RoundResult.tokens after a row's last produced token


class SpeculativeError(CarambaError, ValueError):
    """Round inputs whose shapes do not fit together, or a misuse of the adaptive-k controller."""


@dataclass(frozen=True, eq=False)
class RoundResult:
    """What each row's own procedure produced in one round."""

    n_accepted: torch.Tensor  # (B,) int64 in [0, k]: leading draft tokens accepted
    tokens: torch.Tensor  # (B, k+1) int64: the accepted drafts, then the correction or bonus token, then PAD_TOKEN


def accept_drafts(draft_tokens: torch.Tensor, q: torch.Tensor, p: torch.Tensor,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, k) bool: an independent accept decision per draft token, each with probability min(1, p_i/q_i).

    u * q < p with u ~ U[0, 1) has exactly that probability and never divides, so q(x) = 0 cannot give NaN.
    Only the leading run of accepts counts; drawing every u up front is the same as drawing them in order.
    """
    x = draft_tokens.unsqueeze(-1)  # [B, k, 1]
    px = p[:, :-1].float().gather(-1, x).squeeze(-1)  # [B, k]
    qx = q.float().gather(-1, x).squeeze(-1)
    u = torch.rand(px.shape, generator=generator, device=px.device)
    return u * qx < px


def count_leading(accepted: torch.Tensor) -> torch.Tensor:
    """(B, k) bool -> (B,) int64: how many decisions are True before the first False."""
    return accepted.long().cumprod(dim=-1).sum(dim=-1)


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """(..., V): normalize(max(p - q, 0)); where that is all zeros, p itself.

    Why the fallback is safe: max(p - q, 0) sums to zero only if p <= q everywhere, and two distributions that
    both sum to 1 then agree (p = q). With p = q every draft is accepted (u * q < q for u < 1), so the branch is
    unreachable in exact arithmetic. In floating point it is reached only when p and q agree up to rounding,
    where the rejection itself had a probability of rounding size and p is the right distribution to within it;
    unlike 0 / 0 it is a valid distribution to sample.
    """
    p, q = p.float(), q.float()
    r = (p - q).clamp_min(0)
    mass = r.sum(dim=-1, keepdim=True)
    return torch.where(mass > 0, r / mass, p)


def speculative_round(draft_tokens: torch.Tensor, q: torch.Tensor, p: torch.Tensor,
                      generator: torch.Generator | None = None) -> RoundResult:
    """draft_tokens (B, k), q (B, k, V), p (B, k+1, V) -> each row's accepted count and its k+1-wide output.

    k = 0 is a plain sampling step from p_0. Randomness: B*k uniforms, then one multinomial draw per row.
    """
    _check_round(draft_tokens, q, p)
    n = count_leading(accept_drafts(draft_tokens, q, p, generator))
    q_after = F.pad(q.float(), (0, 0, 0, 1))  # q = 0 after the last draft, so the residual there is p_k: the bonus
    at_n = n.view(-1, 1, 1).expand(-1, 1, p.shape[-1])  # [B, 1, V]
    p_n, q_n = p.float().gather(1, at_n).squeeze(1), q_after.gather(1, at_n).squeeze(1)
    extra = sample_from(residual_distribution(p_n, q_n), generator)  # [B]
    return RoundResult(n, _row_outputs(draft_tokens, n, extra))


def greedy_round(draft_tokens: torch.Tensor, target_logits: torch.Tensor) -> RoundResult:
    """Temperature 0: draft_tokens (B, k), target_logits (B, k+1, V) -> accept while the draft equals the target's
    argmax; the first mismatch (or the bonus) emits the target's argmax. Every produced token is the target's
    greedy choice given the tokens before it, so the output equals the target's greedy output exactly.

    Pass logits, not probabilities: argmax of a softmax can tie where the logits do not, and plain greedy
    decoding takes the argmax of the logits.
    """
    _check_round(draft_tokens, None, target_logits)
    choice = greedy(target_logits)  # [B, k+1]
    n = count_leading(draft_tokens == choice[:, :-1])
    return RoundResult(n, _row_outputs(draft_tokens, n, choice.gather(1, n.unsqueeze(1)).squeeze(1)))


def committed_count(result: RoundResult) -> int:
    """n of the batch rule: the fewest accepted drafts over rows. The round commits n + 1 tokens per row."""
    return int(result.n_accepted.min())


def commit(result: RoundResult) -> torch.Tensor:
    """(B, n+1) int64: the batch rule of SPEC §5. Row b gets the first n+1 tokens its own procedure produced:
    drafts it accepted, and at position n its correction or bonus if n_accepted[b] == n, else its accepted x_n.

    Cutting a row's output at a length set by the other rows keeps it distributed as the target's: each token a
    row produces has the target's distribution given the tokens before it, and whether position i is committed
    (n_accepted[b] >= i and every other row's too) depends only on earlier positions and on other rows'
    independent draws, never on the token at i. The discarded tail is regenerated next round.
    """
    return result.tokens[:, : committed_count(result) + 1]


def _row_outputs(draft_tokens: torch.Tensor, n: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
    """(B, k+1): draft tokens before n, `extra` at n, PAD_TOKEN after."""
    b, k = draft_tokens.shape
    pos = torch.arange(k + 1, device=draft_tokens.device)
    drafts = F.pad(draft_tokens.long(), (0, 1), value=PAD_TOKEN)
    out = torch.where(pos < n.unsqueeze(1), drafts, PAD_TOKEN)
    return out.scatter(1, n.unsqueeze(1), extra.long().unsqueeze(1))


def _check_round(draft_tokens: torch.Tensor, q: torch.Tensor | None, p: torch.Tensor) -> None:
    if draft_tokens.ndim != 2 or draft_tokens.dtype.is_floating_point or draft_tokens.dtype == torch.bool:
        raise SpeculativeError(f"draft_tokens must be (B, k) integer ids, got {draft_tokens.dtype} "
                               f"{tuple(draft_tokens.shape)}")
    b, k = draft_tokens.shape
    if p.ndim != 3 or p.shape[:2] != (b, k + 1):
        raise SpeculativeError(f"target distributions must be (B, k+1, V) = ({b}, {k + 1}, V) for {k} draft tokens, "
                               f"got {tuple(p.shape)}")
    if q is not None and q.shape != (b, k, p.shape[-1]):
        raise SpeculativeError(f"draft distributions must be (B, k, V) = ({b}, {k}, {p.shape[-1]}), "
                               f"got {tuple(q.shape)}")


class AdaptiveK:
    """How many tokens to draft next (SPEC §5), from the accept counts seen so far.

    Every adjust_every proposals (one proposal = one draft token offered to the target) k moves by step toward
    target_acceptance, using the acceptance rate of those proposals: above the target, longer rounds; below it,
    shorter ones; clamped to [k_min, k_max]. An update that brings several windows' worth of proposals adjusts
    once. When at least min_proposals proposals have been made and the overall acceptance rate is below
    disable_below, speculation is disabled until reset(); k_for then answers 0 (a plain decode step).
    """

    def __init__(self, config: SpeculativeConfig | None = None) -> None:
        self.config = config if config is not None else SpeculativeConfig()
        self.reset()

    def reset(self) -> None:
        self.k = self.config.spec_k
        self.disabled = False
        self.proposed = self.accepted = 0
        self._window_proposed = self._window_accepted = 0

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted / proposed over everything seen since reset; None before any proposal."""
        return self.accepted / self.proposed if self.proposed else None

    def k_for(self, remaining: int) -> int:
        """Draft tokens for a round that may produce at most `remaining` tokens: min(k, remaining - 1)."""
        if remaining < 1:
            raise SpeculativeError(f"a round needs at least one token left to produce, got remaining={remaining}")
        return 0 if self.disabled else min(self.k, remaining - 1)

    def update(self, proposed: int, accepted: int) -> None:
        """Record a round: `proposed` draft tokens offered (summed over rows), `accepted` of them accepted."""
        if not 0 <= accepted <= proposed:
            raise SpeculativeError(f"need 0 <= accepted <= proposed, got accepted={accepted}, proposed={proposed}")
        self.proposed += proposed
        self.accepted += accepted
        self._window_proposed += proposed
        self._window_accepted += accepted
        if self.config.adaptive and self._window_proposed >= self.config.adjust_every:
            self._adjust(self._window_accepted / self._window_proposed)
            self._window_proposed = self._window_accepted = 0
        if self.proposed >= self.config.min_proposals and self.acceptance_rate < self.config.disable_below:
            self.disabled = True

    def _adjust(self, rate: float) -> None:
        c = self.config
        if rate > c.target_acceptance:
            self.k = min(self.k + c.step, c.k_max)
        elif rate < c.target_acceptance:
            self.k = max(self.k - c.step, c.k_min)
