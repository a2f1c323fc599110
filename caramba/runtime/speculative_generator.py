"""Speculative decoding over two models (SPEC §5): a small draft proposes k tokens, the target checks them in one pass.

    gen = SpeculativeGenerator(target_cm, draft_cm, GenerateConfig(max_new_tokens=64), SpeculativeConfig(spec_k=4))
    out = gen.generate(input_ids)              # as Generator.generate: prompt + new tokens, (B, S + n)
    for tok in gen.generate_iter(more_ids):    # (B,) per position, in order, as rounds commit them
        ...
    gen.stats.acceptance_rate; gen.rollback(3); gen.reset()

Prompts, EOS, padding, the conversation (`tokens`), the length check before any work and what an early close
keeps are those of Generator (generator.py). What differs is how tokens are produced. A round, all rows at once:
1. the draft is fed the tokens its cache lacks (at least the pending last token), then samples x_0..x_{k-1}
   one step at a time from q_i = probs_after_filters(draft logits), the same filters the target's p_i get;
2. the target is fed the tokens its cache lacks (the pending last token, or the whole prompt in a call's first
   round) followed by x_0..x_{k-1}, in ONE forward pass, giving p_0..p_k;
3. speculative_round (greedy_round at temperature <= 0) decides per row, and the batch rule commits n + 1
   positions, n the fewest drafts accepted over the rows still generating;
4. the caches are truncated to the committed conversation minus its last token, which becomes the pending one.
k = min(adaptive k, remaining - 1), so a round never commits more than is left; k = 0 is a plain target step.

The draft may lag. It only runs in rounds with k >= 1, and when a row accepts all k drafts its cache lacks x_{k-1}
(the draft sampled it but never fed it). Instead of a draft forward pass at the end of such rounds just to catch
up, step 1 of the next round feeds the missing token together with the pending one. At the end of every call the
draft is brought level with the target, so between calls both caches hold exactly `tokens` minus each row's last
token; while speculation is disabled (AdaptiveK) that costs one draft pass per call, not one per token.

Rows that stopped at EOS keep receiving padding, as in Generator, so that every row's cache moves by the same
amount each round: the executors check `longest cached row + new tokens <= max_seq_len` over the whole batch, and
lengths that move together keep that within the same bound that is checked for one row before any work.

Exactness at temperature 0 assumes that scoring k + 1 tokens in one pass gives the logits k + 1 single steps
would. It does up to float rounding, for every cache kind: with an fp16 residual ring (cache_residual_len > 0)
each query of the pass reads the ring window it would have read alone (kv_cache.py), and both caches get
k_max (spec_k when not adaptive) extra ring slots, so the rollback after a rejection keeps the windows of later
queries exact as well.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from caramba.errors import InputError
from caramba.runtime.executor import Executor, check_model
from caramba.runtime.generate_config import GenerateConfig, SpeculativeConfig
from caramba.runtime.generator import (GenerationStats, Generator, Prompt, pad_id, plan_feed, prompt_rows,
                                      rolled_back, with_prompt)
from caramba.runtime.kv_cache import KVCache
from caramba.runtime.sampling import greedy, make_generator, probs_after_filters, sample_from
from caramba.runtime.speculative import AdaptiveK, RoundResult, greedy_round, speculative_round


@dataclass
class SpeculativeStats(GenerationStats):
    """What the last generate call did. `steps` counts committed positions (each yields one token per row);
    proposals and acceptances count draft tokens over the rows still generating, each row's own accept count
    (before the batch rule cuts it to the batch's minimum)."""

    rounds: int = 0
    proposed: int = 0
    accepted: int = 0
    committed_drafts: int = 0  # accepted drafts that the batch rule kept, summed over generating rows
    draft_seconds: float = 0.0  # inside the draft's forward passes and sampling (catch-up included)
    target_seconds: float = 0.0  # inside the target's forward passes and the accept/reject decision
    draft_cache_bytes: int = 0
    disabled: bool = False  # speculation was off at the end of the call (acceptance below the threshold)

    @property
    def acceptance_rate(self) -> float:
        """Accepted / proposed draft tokens in this call; NaN when nothing was proposed."""
        return self.accepted / self.proposed if self.proposed else float("nan")

    @property
    def tokens_per_round(self) -> float:
        """Committed positions per round: 1 for plain decoding, up to k + 1 when every draft is accepted."""
        return self.steps / self.rounds if self.rounds else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        """New tokens per second of the whole loop: the prompt is consumed by the first round's passes, so there is
        no separate prefill to leave out (prefill_seconds stays 0)."""
        return self.tokens_per_s


class SpeculativeGenerator:
    """Stateful speculative generation with a target and a draft model sharing a vocabulary; see the module doc.

    target, draft: caramba.CompiledModel (or an Executor). Both use the same
    GenerateConfig (cache kind included) and each gets its own KV cache. The output is distributed as the
    target's sampling (SPEC §4) and equals the target's greedy output at temperature <= 0. `adaptive` (AdaptiveK)
    keeps its k and its disabled flag across calls of one conversation, until reset().
    """

    def __init__(self, target, draft, config: GenerateConfig | None = None,
                 spec: SpeculativeConfig | None = None) -> None:
        self.config = config if config is not None else GenerateConfig()
        if not isinstance(self.config, GenerateConfig):
            raise TypeError(f"config must be a GenerateConfig, got {type(self.config).__name__}")
        self.spec = spec if spec is not None else SpeculativeConfig()
        if not isinstance(self.spec, SpeculativeConfig):
            raise TypeError(f"spec must be a SpeculativeConfig, got {type(self.spec).__name__}")
        check_model("target", target)
        check_model("draft", draft)
        # Each Generator owns one model's executor and cache (resolution of the cache kind, "auto" included, and
        # the max_seq_len checks); the conversation and the loop live here.
        self._target, self._draft = Generator(target, self.config), Generator(draft, self.config)
        # a round rolls back at most k tokens: ring slots for them keep fp16 residual windows exact
        self._target.ring_slack = self._draft.ring_slack = self.spec.k_max if self.spec.adaptive else self.spec.spec_k
        vt, vd = self._target.model.vocab_size, self._draft.model.vocab_size
        if vt != vd:
            raise InputError(f"the draft's vocabulary ({vd} tokens) differs from the target's ({vt}); speculative "
                             f"decoding compares their distributions token by token, so they must share a tokenizer")
        self.adaptive = AdaptiveK(self.spec)
        self.tokens: list[list[int]] | None = None  # per row, the conversation so far
        self.stats = SpeculativeStats()
        self._rng = make_generator(self.config.seed)

    # -- the caches -------------------------------------------------------------------------------------------
    @property
    def target_cache(self) -> KVCache | None:
        return self._target.cache

    @property
    def draft_cache(self) -> KVCache | None:
        return self._draft.cache

    @property
    def target_executor(self) -> Executor:
        return self._target.executor

    @property
    def draft_executor(self) -> Executor:
        return self._draft.executor

    def reset(self) -> None:
        """Forget the conversation (cache buffers are kept), re-seed sampling and restart adaptive k (which also
        re-enables speculation): a generate after reset is the same as the first one."""
        self.tokens = None
        self._target.reset()
        self._draft.reset()
        self.adaptive.reset()
        self._rng = make_generator(self.config.seed)

    def rollback(self, n: int) -> None:
        """Drop the last n tokens of every row's conversation (prompt or generated), from both caches."""
        self.tokens = rolled_back(self.tokens, n)
        if n:
            self._truncate_to_conversation()

    # -- generation -------------------------------------------------------------------------------------------
    def generate(self, input_ids: Prompt, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, S + n): the prompt as given (ragged lists left-padded) followed by the new tokens; rows that
        stopped at EOS are padded with pad_id(config)."""
        rows = prompt_rows(input_ids, attention_mask)
        return with_prompt(input_ids, rows, list(self.generate_iter(rows)), pad_id(self.config))

    def generate_iter(self, input_ids: Prompt, attention_mask: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
        """Yield each new position, (B,) int64, in order; a round commits several and yields them one by one.
        The length check happens before any work; closing the iterator early keeps exactly what was yielded."""
        rows = prompt_rows(input_ids, attention_mask)
        self._plan(rows)
        return self._loop(rows)

    def _plan(self, rows: list[list[int]]) -> None:
        """Generator's checks, before any work: rows, ids, and the length against max_seq_len (and against the
        max_seq_len of executors passed in directly, which the loop cannot exceed either)."""
        c = self.config
        # each Generator resolved its own max_seq_len (None in the config: its model's maximum)
        limit = min([g.config.max_seq_len for g in (self._target, self._draft)] +
                    [g.model.max_seq_len for g in (self._target, self._draft) if isinstance(g.model, Executor)])
        plan_feed("SpeculativeGenerator", self.tokens, rows, self._target.model.vocab_size, c.max_new_tokens, limit)
        self._target._ensure(len(rows))
        self._draft._ensure(len(rows))

    def _loop(self, rows: list[list[int]]) -> Iterator[torch.Tensor]:
        c = self.config
        before = [list(t) for t in self.tokens] if self.tokens is not None else None
        self.tokens = [list(t) + r for t, r in zip(before or [[] for _ in rows], rows)]
        batch, pad = len(rows), pad_id(c)
        eos = torch.tensor(sorted(c.eos_ids), dtype=torch.int64)
        fed = sum(len(h[-1:]) + len(r) for h, r in zip(before or [[] for _ in rows], rows))
        self.stats = SpeculativeStats(batch=batch, prompt_tokens=fed, cache_bytes=self.target_cache.nbytes,
                                      cache_kind=self.target_executor.config.label,
                                      draft_cache_bytes=self.draft_cache.nbytes)
        # Per row: the conversation, then padding after its EOS. The caches hold a prefix of this (see module doc).
        seqs = [list(t) for t in self.tokens]
        done = torch.zeros(batch, dtype=torch.bool)
        produced, failed = 0, False
        t0 = time.perf_counter()
        try:
            while produced < c.max_new_tokens:
                k = self.adaptive.k_for(c.max_new_tokens - produced)
                result = self._round(seqs, k, pad)
                live = ~done
                n = int(result.n_accepted[live].min())
                self._record(k, result, live, n)
                chunk = result.tokens[:, :n + 1]
                # The target fed [pending, x_0..x_{k-1}] and keeps [pending, x_0..x_{n-1}]: the committed tokens
                # but the last (c_j = x_j for j < n in every row still generating). The draft fed one token less.
                held_after = [len(s) + n for s in seqs]
                self.target_cache.truncate_rows(held_after)
                self.draft_cache.truncate_rows([min(h, a) for h, a in zip(self.draft_cache.lengths(0), held_after)])
                for j in range(n + 1):
                    tok = torch.where(done, torch.full_like(chunk[:, j], pad), chunk[:, j])
                    for b in range(batch):
                        seqs[b].append(int(tok[b]))
                        if not done[b]:
                            self.tokens[b].append(int(tok[b]))
                            self.stats.new_tokens += 1
                    self.stats.steps += 1
                    produced += 1
                    done = done | torch.isin(tok, eos)
                    yield tok
                    if bool(done.all()):
                        return
        except GeneratorExit:
            raise
        except BaseException:
            failed = True
            if produced == 0:
                self.tokens = before  # nothing was yielded: the conversation is as it was
            raise
        finally:
            self._finish(failed)
            self.stats.decode_seconds = time.perf_counter() - t0
            self.stats.disabled = self.adaptive.disabled

    def _round(self, seqs: list[list[int]], k: int, pad: int) -> RoundResult:
        """Draft k tokens, score them with the target in one pass, decide per row. The caches are left holding
        everything fed; the caller truncates them to what the batch rule commits."""
        c, batch = self.config, len(seqs)
        t0 = time.perf_counter()
        drafts, qs = [], []
        if k > 0:
            logits = _feed(self.draft_executor, self.draft_cache, seqs, None, pad)[:, 0]
            for i in range(k):
                if i:
                    pos = torch.tensor(self.draft_cache.lengths(0), dtype=torch.int64)[:, None]
                    logits = self.draft_executor.forward(drafts[-1][:, None], pos, self.draft_cache)[:, 0]
                if c.greedy:
                    x = greedy(logits)
                else:  # sampling draws from the CPU generator: the same seed gives the same tokens on every target
                    qs.append(probs_after_filters(logits.cpu(), c.temperature, c.top_k, c.top_p))
                    x = sample_from(qs[-1], self._rng)
                drafts.append(x.cpu())
                self.draft_executor.check()  # a draft step's errors (reported late by target cuda), free after .cpu()
        x = torch.stack(drafts, dim=1) if drafts else torch.zeros(batch, 0, dtype=torch.int64)
        t1 = time.perf_counter()
        logits = _feed(self.target_executor, self.target_cache, seqs, x, pad)  # [B, k+1, V]
        if c.greedy:
            result = greedy_round(x.to(logits.device), logits)
        else:
            p = probs_after_filters(logits.cpu(), c.temperature, c.top_k, c.top_p)
            q = torch.stack(qs, dim=1) if qs else p.new_zeros(batch, 0, p.shape[-1])
            result = speculative_round(x.to(p.device), q, p, self._rng)
        result = RoundResult(result.n_accepted.cpu(), result.tokens.cpu())
        self.target_executor.check()
        self.stats.draft_seconds += t1 - t0
        self.stats.target_seconds += time.perf_counter() - t1
        return result

    def _record(self, k: int, result: RoundResult, live: torch.Tensor, n: int) -> None:
        """Adaptive k learns from each row's own acceptances (how good the draft is), not from the batch minimum."""
        self.stats.rounds += 1
        if k == 0:
            return
        proposed, accepted = k * int(live.sum()), int(result.n_accepted[live].sum())
        self.stats.proposed += proposed
        self.stats.accepted += accepted
        self.stats.committed_drafts += n * int(live.sum())
        self.adaptive.update(proposed, accepted)

    def _finish(self, failed: bool) -> None:
        """Leave both caches holding exactly the conversation minus each row's last token: drop padding and
        uncommitted drafts, then feed the draft what it lacks. After a failure no model is called again; the
        draft may then lag, which the next round's catch-up absorbs."""
        self._truncate_to_conversation()
        if failed or self.tokens is None:
            return
        want = [len(t) - 1 for t in self.tokens]
        held = self.draft_cache.lengths(0)
        if any(h < w for h, w in zip(held, want)):
            t0 = time.perf_counter()
            _append(self.draft_executor, self.draft_cache, [t[h:w] for t, h, w in zip(self.tokens, held, want)],
                    pad_id(self.config))
            self.stats.draft_seconds += time.perf_counter() - t0

    def _truncate_to_conversation(self) -> None:
        """Truncate each cache row to min(what it validly holds, conversation - 1). A forward pass that failed
        halfway may have appended to some layers only, so "validly holds" is the shortest layer."""
        want = [max(len(t) - 1, 0) for t in self.tokens] if self.tokens is not None else None
        for cache in (self.target_cache, self.draft_cache):
            if cache is None:
                continue
            held = _shortest_layer(cache)
            cache.truncate_rows([min(h, w) for h, w in zip(held, want)] if want is not None else [0] * len(held))


def _shortest_layer(cache: KVCache) -> list[int]:
    return [min(col) for col in zip(*(cache.lengths(i) for i in range(cache.spec.n_layers)))]


def _append(ex: Executor, cache: KVCache, rows: Sequence[Sequence[int]], pad: int,
            logits_at: torch.Tensor | None = None) -> torch.Tensor:
    """Feed row b the tokens rows[b] at its own next positions (right-padded to one width; rows may be empty) and
    keep only the real ones in the cache. Returns the (B, width, V) logits, or (B, 1, V) at logits_at."""
    held = list(cache.lengths(0))
    width = max(len(r) for r in rows)
    if width == 0:
        return torch.empty(len(rows), 0, ex.vocab_size)
    ids = torch.tensor([list(r) + [pad] * (width - len(r)) for r in rows], dtype=torch.int64)
    pos = torch.tensor(held, dtype=torch.int64)[:, None] + torch.arange(width)
    try:
        logits = ex.forward(ids, pos, cache, logits_at=logits_at)
    finally:
        # The padding goes, and so does whatever a pass that failed halfway appended to some layers only.
        cache.truncate_rows([min(h + len(r), s) for h, r, s in zip(held, rows, _shortest_layer(cache))])
    return logits


def _feed(ex: Executor, cache: KVCache, seqs: Sequence[Sequence[int]], extra: torch.Tensor | None,
          pad: int) -> torch.Tensor:
    """Feed each row the tokens of seqs[b] its cache lacks (at least one: the pending last token), then its row
    of `extra` (B, e). Returns the (B, 1 + e, V) logits after the pending token and after each extra token."""
    held = cache.lengths(0)
    lead = [len(s) - h for s, h in zip(seqs, held)]
    assert min(lead) >= 1, f"every row must have a pending token to feed, got {lead}"
    e = 0 if extra is None else extra.shape[1]
    tails = extra.tolist() if e else [[] for _ in seqs]
    rows = [list(s[h:]) + t for s, h, t in zip(seqs, held, tails)]
    if not e:  # the draft's catch-up (a whole prompt, the first round): one position per row is read
        return _append(ex, cache, rows, pad, logits_at=torch.tensor(lead) - 1)
    logits = _append(ex, cache, rows, pad)
    at = (torch.tensor(lead)[:, None] - 1 + torch.arange(e + 1)).to(logits.device)
    return logits.gather(1, at[:, :, None].expand(-1, -1, logits.shape[-1]))
