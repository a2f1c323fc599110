"""The generation loop (SPEC §4): one implementation over every target's Executor.

    gen = Generator(cm, GenerateConfig(max_new_tokens=64, cache_kind="q8_0"))
    out = gen.generate(input_ids)              # prompt + new tokens, (B, S + n)
    for tok in gen.generate_iter(more_ids):    # (B,) per step, as soon as it is sampled; continues the chat
        ...
    gen.rollback(3); gen.reset()

Prompts: a (B, S) int64 tensor (optionally with a left-padded attention_mask, 1 = token, 0 = padding), a list of
ints (one row) or a list of lists (ragged rows, left-padded for the output). Inside, every row's tokens are packed
to the left of the step and sit at their own positions (row b starts at its own cached length), so padding never
enters the cache: after a ragged prefill each row is truncated to its real length.

State: per row the conversation so far (`tokens`); the cache holds every token of it but the last, which is fed
at the start of the next call (no model call happens after the last sampled token). A row that produced an EOS
stops: it is fed padding while the others go on, and that padding is dropped from its cache at the end.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from caramba.errors import InputError
from caramba.runtime.executor import CacheConfig, CompiledLike, Executor, check_model
from caramba.runtime.generate_config import GenerateConfig, GenerateConfigError
from caramba.runtime.kv_cache import KVCache
from caramba.runtime.sampling import make_generator, sample_next

Prompt = torch.Tensor | Sequence[int] | Sequence[Sequence[int]]


@dataclass
class GenerationStats:
    """What the last generate call did: token counts and wall time split into prefill and decode."""

    batch: int = 0
    prompt_tokens: int = 0  # real tokens fed by the prefill step (padding excluded)
    new_tokens: int = 0  # sampled tokens over all rows, EOS included, padding after it excluded
    steps: int = 0  # sampling steps (each yields one token per row)
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    cache_bytes: int = 0  # allocated bytes of the KV cache
    cache_kind: str = ""

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens per second of the decode steps (all rows), the prefill excluded."""
        decoded = max(self.steps - 1, 0) * self.batch
        return decoded / self.decode_seconds if self.decode_seconds > 0 else float("nan")

    @property
    def tokens_per_s(self) -> float:
        """New tokens per second over the whole call, prefill included."""
        total = self.prefill_seconds + self.decode_seconds
        return self.new_tokens / total if total > 0 else float("nan")


def pad_id(config: GenerateConfig) -> int:
    """The token that fills finished rows and left padding: the smallest EOS id, else 0."""
    return min(config.eos_ids) if config.eos_ids else 0


def prompt_rows(input_ids: Prompt, attention_mask: torch.Tensor | None = None) -> list[list[int]]:
    """Each row's real tokens, from a tensor (+ left-padding mask), a list of ints or a list of lists."""
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dtype not in (torch.int64, torch.int32) or input_ids.dim() not in (1, 2):
            raise InputError(f"input_ids must be an integer tensor (B, S) or (S,), got {input_ids.dtype} "
                             f"{list(input_ids.shape)}")
        ids = input_ids.reshape(-1, input_ids.shape[-1]).cpu()
        if attention_mask is None:
            return ids.tolist()
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
            got = list(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else \
                type(attention_mask).__name__
            raise InputError(f"attention_mask must be a tensor shaped like input_ids {list(input_ids.shape)} (1 = "
                             f"token, 0 = left padding), got {got}")
        mask = attention_mask.reshape(ids.shape).cpu().bool()
        rows = []
        for b in range(ids.shape[0]):
            n = int(mask[b].sum())
            if not bool(mask[b, ids.shape[1] - n:].all()):
                raise InputError(f"row {b} of attention_mask is not left padding (zeros, then ones): "
                                 f"{mask[b].int().tolist()}")
            rows.append(ids[b, ids.shape[1] - n:].tolist())
        return rows
    if attention_mask is not None:
        raise InputError("attention_mask goes with a tensor of input_ids; lists of rows need no mask")
    if isinstance(input_ids, Sequence) and all(isinstance(t, int) for t in input_ids):
        return [list(input_ids)]
    if isinstance(input_ids, Sequence) and all(isinstance(r, Sequence) and all(isinstance(t, int) for t in r)
                                               for r in input_ids) and len(input_ids) > 0:
        return [list(r) for r in input_ids]
    raise InputError(f"input_ids must be a tensor, a list of ints or a list of lists of ints, got "
                     f"{type(input_ids).__name__}")


def check_eos(config: GenerateConfig, vocab: int) -> None:
    """EOS ids must be tokens of the model: one past the vocabulary never ends a row, and the padding fed to
    finished rows (pad_id) would be out of range."""
    bad = sorted(t for t in config.eos_ids if t >= vocab)
    if bad:
        raise GenerateConfigError(f"eos_token_id: {bad} outside the model's vocabulary [0, {vocab}); pass the EOS id "
                                  f"of the tokenizer that goes with this model")


def left_pad(rows: Sequence[Sequence[int]], pad: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([[pad] * (width - len(r)) + list(r) for r in rows], dtype=torch.int64)


def plan_feed(owner: str, tokens: list[list[int]] | None, rows: list[list[int]], vocab: int, max_new_tokens: int,
              max_seq_len: int) -> list[list[int]]:
    """Every check a generate call makes before any work, shared by the generators: the row count against the
    conversation held (`tokens`), token ids, and the length against max_seq_len. Returns the tokens to feed per
    row: the conversation's last token (not yet in the cache), then the prompt."""
    if tokens is not None and len(rows) != len(tokens):
        raise InputError(f"this {owner} holds a conversation of {len(tokens)} row(s); got {len(rows)} prompt "
                         f"row(s): call reset() first")
    history = tokens or [[] for _ in rows]
    feed = [h[-1:] + r for h, r in zip(history, rows)]
    empty = [b for b, f in enumerate(feed) if not f]
    if empty:
        raise InputError(f"row(s) {empty} have no tokens to start from; give every row at least one token")
    bad = sorted({t for r in rows for t in r if not 0 <= t < vocab})
    if bad:
        raise InputError(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
    held = max((len(h) - 1 for h in history if h), default=0)
    need = held + max(len(f) for f in feed) + max_new_tokens - 1
    if need > max_seq_len:
        longest = max(len(r) for r in rows)
        raise InputError(f"prompt ({longest} tokens{f', after {held + 1} held' if tokens else ''}) + "
                         f"max_new_tokens ({max_new_tokens}) = {need + 1} exceeds max_seq_len ({max_seq_len}); "
                         f"shorten the prompt, lower max_new_tokens, roll back, or raise max_seq_len")
    return feed


def rolled_back(tokens: list[list[int]] | None, n: int) -> list[list[int]] | None:
    """The conversation without its last n tokens per row; checks n against the shortest row."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise InputError(f"rollback needs an int >= 0, got {n!r}")
    held = min(len(t) for t in tokens) if tokens else 0
    if n > held:
        raise InputError(f"cannot roll back {n} tokens: the shortest row holds {held}")
    return tokens if n == 0 else [t[:len(t) - n] for t in tokens]


def with_prompt(input_ids: Prompt, rows: list[list[int]], new: list[torch.Tensor], pad: int) -> torch.Tensor:
    """generate's result: the prompt as given (ragged lists left-padded) followed by the new tokens, (B, S + n)."""
    prompt = input_ids.reshape(len(rows), -1).cpu().long() if isinstance(input_ids, torch.Tensor) \
        else left_pad(rows, pad)
    return torch.cat([prompt, torch.stack(new, dim=1)], dim=1) if new else prompt


class Generator:
    """Stateful generation over a compiled model (or an Executor) with a KV cache; see the module doc."""

    def __init__(self, model: CompiledLike | Executor, config: GenerateConfig | None = None) -> None:
        config = config if config is not None else GenerateConfig()
        if not isinstance(config, GenerateConfig):
            raise TypeError(f"config must be a GenerateConfig, got {type(config).__name__}")
        check_model("model", model)
        # max_seq_len None: the model's maximum (an executor's own max_seq_len); an explicit one past it is refused
        self.config = config.resolved(model.max_seq_len if isinstance(model, Executor) else model.max_positions)
        check_eos(self.config, model.vocab_size)
        self.model = model
        self._executor: Executor | None = model if isinstance(model, Executor) else None
        self.cache: KVCache | None = None
        # extra fp16 ring slots (cache_residual_len > 0): rolling back up to this many tokens keeps every query's
        # residual window exact (kv_cache.py); SpeculativeGenerator sets it to its largest k
        self.ring_slack = 0
        self.tokens: list[list[int]] | None = None  # per row, the conversation so far
        self.stats = GenerationStats()
        self._rng = make_generator(self.config.seed)

    # -- the cache --------------------------------------------------------------------------------------------
    @property
    def executor(self) -> Executor:
        """The executor for the configured cache (for cache_kind "auto": resolved at the first call)."""
        if self._executor is None:
            raise InputError("the cache kind is chosen at the first generate call (cache_kind='auto' measures "
                             "candidates for the batch it is given)")
        return self._executor

    def _ensure(self, batch: int) -> None:
        if self._executor is None:
            self._executor = self._resolve_executor(batch)
        ex = self._executor
        if self.cache is None:
            self.cache = ex.new_cache(batch, ring_slack=self.ring_slack)
        elif self.cache.spec.batch != batch:
            if self.tokens:
                raise InputError(f"this Generator holds a conversation of {self.cache.spec.batch} row(s); got "
                                 f"{batch}: call reset() first, or use another Generator")
            self.cache = ex.new_cache(batch, ring_slack=self.ring_slack)

    def _resolve_executor(self, batch: int) -> Executor:
        cm, c = self.model, self.config
        if getattr(cm, "cache_blockers", ()):  # some attention layer takes no cache: recompute (warns once)
            return cm.recompute_executor(c.max_seq_len)
        if c.cache_kind == "auto":
            from caramba.runtime.cache_policy import choose_cache

            config = choose_cache(cm, c, batch).config
        else:
            config = CacheConfig.of(cm.cache_layout, c.cache_kind, max_seq_len=c.max_seq_len, qblock=c.cache_qblock,
                                    residual_len=c.cache_residual_len)
        return cm.executor(config)

    def reset(self) -> None:
        """Forget the conversation (the cache's buffers are kept) and re-seed sampling: a generate after reset
        is the same as the first one."""
        self.tokens = None
        if self.cache is not None:
            self.cache.reset()
        self._rng = make_generator(self.config.seed)

    def rollback(self, n: int) -> None:
        """Drop the last n tokens of every row's conversation (prompt or generated)."""
        self.tokens = rolled_back(self.tokens, n)
        if n:
            self.cache.truncate_rows([max(len(t) - 1, 0) for t in self.tokens])

    # -- generation -------------------------------------------------------------------------------------------
    def generate(self, input_ids: Prompt, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, S + n): the prompt as given (ragged lists left-padded) followed by the new tokens; rows that
        stopped at EOS are padded with pad_id(config)."""
        rows = prompt_rows(input_ids, attention_mask)
        return with_prompt(input_ids, rows, list(self.generate_iter(rows)), pad_id(self.config))

    def generate_iter(self, input_ids: Prompt, attention_mask: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
        """Yield each new token, (B,) int64, as soon as it is sampled. The length check happens before any work;
        closing the iterator early leaves a consistent conversation (what was yielded is kept)."""
        rows = prompt_rows(input_ids, attention_mask)
        feed = self._plan(rows)
        return self._loop(rows, feed)

    def _plan(self, rows: list[list[int]]) -> list[list[int]]:
        """Checks everything before any work: rows, ids, lengths against max_seq_len. The tokens to feed."""
        c = self.config
        feed = plan_feed("Generator", self.tokens, rows, self.model.vocab_size, c.max_new_tokens, c.max_seq_len)
        self._ensure(len(rows))
        return feed

    def _loop(self, rows: list[list[int]], feed: list[list[int]]) -> Iterator[torch.Tensor]:
        c, ex, cache = self.config, self.executor, self.cache
        before = [list(t) for t in self.tokens] if self.tokens is not None else None
        self.tokens = [list(t) + r for t, r in zip(before or [[] for _ in rows], rows)]
        batch, pad, eos = len(rows), pad_id(c), c.eos_ids
        self.stats = GenerationStats(batch=batch, prompt_tokens=sum(len(f) for f in feed),
                                     cache_bytes=cache.nbytes, cache_kind=ex.config.label)
        starts = list(cache.lengths(0))
        n = [len(f) for f in feed]
        width = max(n)
        ids = torch.tensor([f + [pad] * (width - len(f)) for f in feed], dtype=torch.int64)
        pos = torch.tensor(starts, dtype=torch.int64)[:, None] + torch.arange(width)
        t0 = time.perf_counter()
        try:  # only each row's last position is sampled: the head runs on those B rows (Executor.forward)
            logits = ex.forward(ids, pos, cache, logits_at=torch.tensor(n) - 1)
        except BaseException:
            self.tokens = before  # nothing happened: the conversation and the cache are as they were
            cache.truncate_rows(starts)
            raise
        cache.truncate_rows([s + k for s, k in zip(starts, n)])
        last = logits[:, 0].float()
        self.stats.prefill_seconds = time.perf_counter() - t0
        done = torch.zeros(batch, dtype=torch.bool)
        eos_t = torch.tensor(sorted(eos), dtype=torch.int64)
        t1 = time.perf_counter()
        try:
            for step in range(c.max_new_tokens):
                # sampling draws from the CPU generator (the same seed gives the same tokens on every target);
                # greedy picks on the logits' own device
                tok = sample_next(last if c.greedy else last.cpu(), c, self._rng).cpu()
                ex.check()  # the step's errors (reported late by target cuda) before its token is used: free here
                tok = torch.where(done, torch.full_like(tok, pad), tok)
                for b in range(batch):
                    if not done[b]:
                        self.tokens[b].append(int(tok[b]))
                        self.stats.new_tokens += 1
                self.stats.steps += 1
                done = done | torch.isin(tok, eos_t)
                yield tok
                if bool(done.all()) or step == c.max_new_tokens - 1:
                    break
                lengths = torch.tensor(cache.lengths(0), dtype=torch.int64)
                last = ex.forward(tok[:, None], lengths[:, None], cache)[:, 0].float()
        finally:
            self.stats.decode_seconds = time.perf_counter() - t1
            # The cache holds each row's conversation but its last token: drop padding fed after an EOS (and
            # a step that failed halfway through the layers).
            cache.truncate_rows([len(t) - 1 for t in self.tokens])
