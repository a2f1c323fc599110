"""cache_kind "auto" (SPEC §6): choose the KV-cache storage kind for a compiled model, a batch and a budget.

    decision = choose_cache(cm, GenerateConfig(cache_kind="auto", cache_budget_mb=64,
                                               cache_plan_path="caramba_plan.json"), batch=8)
    ex = cm.executor(decision.config)       # what Generator does with cache_kind "auto"
    print(decision.table)                   # every candidate's bytes, quality, speed and verdict

The steps, in this order:
1. Candidates (cache_candidates.candidates), best expected quality first. Those whose exact cache bytes for
   (batch, max_seq_len, qblock, residual ring) exceed cache_budget_mb are dropped; when none fits,
   NoCacheKindError shows every candidate's bytes.
2. Quality gates, on evaluation text (the default text shipped with caramba, or the caller's), against an fp16
   cache. Every candidate, the fp16 reference included, runs the same procedure on the same token windows (one
   batch of `ProbeSettings.windows` rows of `window` tokens, evenly spread over the text):
   - teacher forcing THROUGH THE CACHE: the first `prefill` tokens go in one forward, the rest in chunks of
     `chunk` tokens, each chunk appended to the cache and attending to what the cache stored (quantized) for the
     earlier ones. NLL is the mean over all window-1 next-token predictions (nats/token); ΔNLL = NLL - NLL(fp16)
     and the perplexity ratio exp(ΔNLL) are gated by max_delta_nll and max_ppl_ratio.
   - decode: after the window, `decode_steps` single-token steps feed the tokens the fp16 run chose greedily
     (so every candidate sees the same context); the mean over steps and rows of KL(fp16 ‖ candidate) of the
     next-token distributions is gated by max_mean_kl.
   fp16 passes by construction (its row is the reference itself: 0, 1, 0). Gates are one-sided: a candidate
   whose noise happens to lower the NLL passes the ΔNLL gate.
3. Among the survivors, the fastest by a warmed-up, synchronised benchmark of decode steps at the caller's batch
   and max_seq_len (median seconds per step over `bench_steps` after `bench_warmup`, a context of
   `bench_context` tokens already cached), or the smallest cache when benchmark=False. Ties go to the earlier
   (better quality) candidate, so with benchmarking off nf4 is preferred over q4_0 (same bytes).
4. With cache_plan_path set, the decision and its table are saved in that JSON plan file (plan_file.PlanFile:
   atomic, locked, a corrupt file is set aside and never overwritten), keyed by a PlanSignature of the compiled
   graph, its weights, device, compute dtype, batch, max_seq_len, versions and every option that shaped the
   choice (budget, gates, qblock, ring, the eval text's digest, ProbeSettings, benchmark on/off). A plan for an
   equal signature that is younger than ProbeSettings.reprobe_s is used without measuring anything; an older
   one is measured again and replaced.

If no candidate fits the budget and passes the gates, NoCacheKindError carries the measured table. The choice
and the table are logged (logger "caramba", INFO) whether measured or read from the plan file; the decision's
`reason` says in one line why it was chosen (what `caramba generate --cache-kind auto` prints with the table).

Cost: by default 4 windows x 256 tokens and 16 decode steps per candidate (6 candidates for DBA, 5 for standard
attention), each executor lowered once (CompiledModel.executor keeps it). Pass ProbeSettings to trade precision
for time; the evaluation's windows and decode steps need window + decode_steps <= the model's positions (the
window is shortened to fit, with a log line, otherwise).
"""
from __future__ import annotations

import hashlib
import itertools
import logging
import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from caramba.runtime.cache_candidates import (Candidate, CandidateRow, NoCacheKindError, budget_bytes, candidates,
                                              format_table, no_fit_error, within_budget)
from caramba.runtime.eval_text import EvalTextError, eval_windows, load_eval_text
from caramba.runtime.executor import CacheConfig, CompiledLike, Executor
from caramba.runtime.generate_config import GenerateConfig
from caramba.runtime.plan_file import DEFAULT_REPROBE_S, Plan, PlanFile, PlanFileError, PlanSignature


log = logging.getLogger("caramba")

REFERENCE_KIND = "fp16"
EvalText = str | Path | Sequence[int] | torch.Tensor | None


@dataclass(frozen=True)
class ProbeSettings:
    """How much the quality gates and the speed benchmark measure (see the module docstring for the procedure).

    The defaults score 4 x 255 teacher-forced tokens and 4 x 16 decode steps per candidate: enough to separate
    8-bit from 4-bit caches by an order of magnitude on a small model, a few seconds per candidate on one CPU
    core for a 2M-parameter model. ΔNLL is a paired difference over the same tokens, so its noise is far below
    the NLL's own sampling error; raise `windows` for gates tighter than about 0.005 nats.
    """

    windows: int = 4  # evaluation rows (one batch), evenly spread over the text
    window: int = 256  # tokens per row under teacher forcing
    prefill: int = 128  # of which the first `prefill` go in one forward ...
    chunk: int = 16  # ... and the rest `chunk` tokens per forward
    decode_steps: int = 16  # single-token steps after the window, scored by KL(fp16 || candidate)
    bench_context: int = 128  # tokens cached before the benchmark's decode steps
    bench_warmup: int = 4
    bench_steps: int = 16  # timed decode steps; the median step time counts
    reprobe_s: float | None = DEFAULT_REPROBE_S  # a plan older than this is measured again (None: never)

    def __post_init__(self) -> None:
        for name, lo in (("windows", 1), ("window", 2), ("prefill", 1), ("chunk", 1), ("decode_steps", 1),
                         ("bench_context", 1), ("bench_warmup", 0), ("bench_steps", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ValueError(f"ProbeSettings.{name} must be an integer >= {lo}, got {value!r}")
        if self.prefill >= self.window:
            raise ValueError(f"ProbeSettings.prefill ({self.prefill}) must be below window ({self.window}): the "
                             f"rest of the window is what goes through the cache in chunks")
        r = self.reprobe_s
        if r is not None and (isinstance(r, bool) or not isinstance(r, (int, float)) or not r >= 0):
            raise ValueError(f"ProbeSettings.reprobe_s must be a number of seconds >= 0 or None, got {r!r}")

    def measurement(self) -> dict[str, int]:
        """The fields that change what is measured (reprobe_s only says how long a measurement is trusted)."""
        d = asdict(self)
        d.pop("reprobe_s")
        return d


DEFAULT_PROBE = ProbeSettings()


@dataclass(frozen=True)
class CacheDecision:
    """What cache_kind "auto" chose: the CacheConfig to build the executor with, the chosen candidate, the table
    of every candidate (in candidate order) and its text form, and whether it came from the plan file."""

    config: CacheConfig
    candidate: Candidate
    rows: list[CandidateRow]
    table: str
    from_plan_file: bool
    plan_path: Path | None = None
    signature: PlanSignature | None = None  # None when no plan file was asked for
    reason: str = ""  # why it was chosen, one line: "the fastest of 4 passing ..." or "from plan file ..."


@dataclass
class ProbeRun:
    """One run of the evaluation procedure on one executor: sums, so that several batches of windows add up.

    decode_tokens / decode_log_probs are kept only for a reference run (the tokens later runs feed, the
    distributions they are compared with); a compared run has kl_sum instead.
    """

    nll_sum: float
    n_tokens: int
    decode_tokens: torch.Tensor  # (B, decode_steps) int64: greedy choices of the reference run
    decode_log_probs: torch.Tensor | None = None  # (B, decode_steps, V) float32, reference runs only
    kl_sum: float = 0.0
    n_steps: int = 0
    row_nll: torch.Tensor | None = None  # (B,) float64: mean NLL of each window, for paired error bars

    @property
    def nll(self) -> float:
        """Mean NLL per predicted token (nats)."""
        return self.nll_sum / self.n_tokens

    @property
    def mean_kl(self) -> float:
        """Mean KL(reference || this) per decode step and row (nats); 0 for a reference run."""
        return self.kl_sum / self.n_steps if self.n_steps else 0.0


@dataclass(frozen=True)
class Quality:
    """A candidate's figures against the fp16 reference."""

    nll: float
    delta_nll: float
    ppl_ratio: float
    mean_kl: float


# ---------------------------------------------------------------------------------------------------------------
# The policy
# ---------------------------------------------------------------------------------------------------------------
def choose_cache(cm: CompiledLike, config: GenerateConfig, batch: int, *, eval_text: EvalText = None,
                 benchmark: bool = True, probe: ProbeSettings | None = None,
                 progress: Callable[[str], None] | None = None) -> CacheDecision:
    """Run SPEC §6 for `cm` generating `batch` rows under `config` (its budget, gates, qblock, ring, max_seq_len
    and plan path); see the module docstring. eval_text: None (the default text), text, a path, or token ids
    (a sequence of ints or a 1-D tensor: for models whose tokens are not bytes). probe: how much to measure
    (default DEFAULT_PROBE). progress, when given, is called with a short line as each measurement starts (a
    status line for the seconds this takes). Raises NoCacheKindError, with the table, when nothing fits and
    passes."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be an integer >= 1, got {batch!r}")
    if not isinstance(config, GenerateConfig):
        raise TypeError(f"config must be a GenerateConfig, got {type(config).__name__}")
    config = config.resolved(cm.max_positions)  # max_seq_len None: the model's maximum
    probe = DEFAULT_PROBE if probe is None else probe
    layout = cm.cache_layout
    cands = candidates(layout.names)
    shape = {"n_layers": layout.n_layers, "batch": batch, "max_seq_len": config.max_seq_len,
             "features": layout.features, "qblock": config.cache_qblock, "residual_len": config.cache_residual_len}
    fits, over = within_budget(cands, config.cache_budget_mb, **shape)
    if not fits:
        err = no_fit_error(_in_order(cands, over), config.cache_budget_mb)
        log.error("cache_kind 'auto': %s", err)
        raise err

    tokens = eval_tokens(eval_text, probe, cm.vocab_size)
    plan_file = signature = None
    if config.cache_plan_path is not None:
        plan_file = PlanFile(config.cache_plan_path)
        signature = _signature(cm, config, batch, tokens, benchmark, probe, cands)
        plan = _load_plan(plan_file, signature, probe.reprobe_s)
        if plan is not None and plan.choice in cands:
            why = (f"from plan file {plan_file.path} (measured "
                   f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(plan.created))}; re-probed after "
                   f"{_age(probe.reprobe_s)})")
            decision = _decision(cm, config, plan.choice, list(plan.table), True, plan_file.path, signature, why)
            log.info("cache_kind 'auto': %s, %s:\n%s", plan.choice, why, decision.table)
            return decision

    say = progress or (lambda line: None)
    quality = measure_quality(cm, [row.candidate for row in fits], tokens, probe, qblock=config.cache_qblock,
                              residual_len=config.cache_residual_len, progress=say)
    gated = [_gate(row, quality[row.candidate], config) for row in fits]
    survivors = [row for row in gated if row.passed]
    if survivors and benchmark:
        speeds = {}
        for i, row in enumerate(survivors, 1):
            say(f"timing decode with the {row.candidate} cache ({i}/{len(survivors)})")
            speeds[row.candidate] = benchmark_decode(cm, _cache_config(layout, row.candidate, config), batch, probe,
                                                     tokens)
        gated = [_with(row, tokens_per_s=speeds[row.candidate]) if row.passed else row for row in gated]
        survivors = [row for row in gated if row.passed]
    rows = _in_order(cands, gated + over)
    if not survivors:
        err = _no_pass_error(rows, config)
        log.error("cache_kind 'auto': %s", err)
        raise err
    if benchmark:
        best = max(survivors, key=lambda row: (row.tokens_per_s, -cands.index(row.candidate)))
    else:
        best = min(survivors, key=lambda row: (row.nbytes, cands.index(row.candidate)))
    saved = plan_file is not None and _save_plan(plan_file, Plan(signature, best.candidate, tuple(rows),
                                                                  plan_file.clock()))
    why = (f"the {'fastest' if benchmark else 'smallest (benchmark off)'} of the {len(survivors)} of "
           f"{len(cands)} candidates that fit the budget and pass the quality gates against fp16"
           f"{f'; saved to plan file {plan_file.path}' if saved else ''}")
    decision = _decision(cm, config, best.candidate, rows, False, plan_file.path if plan_file else None, signature,
                         why)
    log.info("cache_kind 'auto': %s, %s:\n%s", best.candidate, why, decision.table)
    return decision


def _decision(cm: CompiledLike, config: GenerateConfig, chosen: Candidate, rows: list[CandidateRow],
              from_plan: bool, path: Path | None, signature: PlanSignature | None, why: str) -> CacheDecision:
    return CacheDecision(_cache_config(cm.cache_layout, chosen, config), chosen, rows, format_table(rows, chosen),
                         from_plan, path, signature, why)


def _cache_config(layout, candidate: Candidate, config: GenerateConfig) -> CacheConfig:
    return CacheConfig.of(layout, candidate.mapping, max_seq_len=config.max_seq_len, qblock=config.cache_qblock,
                          residual_len=config.cache_residual_len)


def _in_order(cands: list[Candidate], rows: list[CandidateRow]) -> list[CandidateRow]:
    return sorted(rows, key=lambda row: cands.index(row.candidate))


def _with(row: CandidateRow, **changes) -> CandidateRow:
    return CandidateRow(**{**{f: getattr(row, f) for f in CandidateRow.__dataclass_fields__}, **changes})


def _gate(row: CandidateRow, q: Quality, config: GenerateConfig) -> CandidateRow:
    """The row with its measured figures and its verdict: passed, or every gate it failed."""
    failed = []
    if not all(math.isfinite(x) for x in (q.delta_nll, q.ppl_ratio, q.mean_kl)):
        failed.append("non-finite quality figures")
    else:
        for name, value, limit, spec in (("dNLL", q.delta_nll, config.max_delta_nll, "+.4f"),
                                         ("ppl ratio", q.ppl_ratio, config.max_ppl_ratio, ".4f"),
                                         ("mean KL", q.mean_kl, config.max_mean_kl, ".2e")):
            if value > limit:
                failed.append(f"{name} {value:{spec}} > {limit:g}")
    return _with(row, delta_nll=q.delta_nll, ppl_ratio=q.ppl_ratio, mean_kl=q.mean_kl, passed=not failed,
                 reason="; ".join(failed) or None)


def _no_pass_error(rows: list[CandidateRow], config: GenerateConfig) -> NoCacheKindError:
    budget = "no budget" if config.cache_budget_mb is None else \
        f"the budget of {config.cache_budget_mb!r} MB ({budget_bytes(config.cache_budget_mb):,} bytes)"
    return NoCacheKindError(
        f"no cache kind fits {budget} and passes the quality gates (max_delta_nll={config.max_delta_nll:g}, "
        f"max_ppl_ratio={config.max_ppl_ratio:g}, max_mean_kl={config.max_mean_kl:g}; measured against an fp16 "
        f"cache on the evaluation text):\n{format_table(rows)}\n"
        f"loosen the gates (math.inf turns one off), raise cache_budget_mb, lower batch, max_seq_len or "
        f"cache_residual_len, or set cache_kind yourself")


# ---------------------------------------------------------------------------------------------------------------
# The plan file
# ---------------------------------------------------------------------------------------------------------------
def _signature(cm: CompiledLike, config: GenerateConfig, batch: int, tokens: torch.Tensor, benchmark: bool,
               probe: ProbeSettings, cands: list[Candidate]) -> PlanSignature:
    """The compiled graph's text stands for the model config: it holds every shape and op (and no weight value,
    which the weights digest covers), and it changes with the target's pass pipeline too."""
    model = {"graph": hashlib.sha256(str(cm.graph).encode()).hexdigest(), "target": cm.target}
    options = {"budget_mb": config.cache_budget_mb, "max_delta_nll": config.max_delta_nll,
               "max_ppl_ratio": config.max_ppl_ratio, "max_mean_kl": config.max_mean_kl,
               "qblock": config.cache_qblock, "residual_len": config.cache_residual_len,
               "eval_tokens": hashlib.sha256(tokens.cpu().numpy().tobytes()).hexdigest(),
               "eval_shape": list(tokens.shape), "probe": probe.measurement(), "benchmark": benchmark,
               "candidates": [c.mapping for c in cands]}
    device = _device(cm)
    if device.type == "cpu" and benchmark:
        options["cpu_threads"] = torch.get_num_threads()  # CPU speed depends on it as much as on the chip
    length = config.max_seq_len or cm.max_positions  # None: the model's maximum, as choose_cache resolves it
    return PlanSignature.of(model, cm.graph.weights, device, cm.dtype.torch, batch, length, options)


def _load_plan(plan_file: PlanFile, signature: PlanSignature, max_age_s: float | None) -> Plan | None:
    try:
        return plan_file.load(signature, max_age_s)
    except PlanFileError as e:
        log.warning("cache_kind 'auto': %s Measuring again; the new plan is saved once measured.", e)
    except OSError as e:
        log.warning("cache_kind 'auto': could not read the plan file %s (%s); measuring", plan_file.path, e)
    return None


def _save_plan(plan_file: PlanFile, plan: Plan) -> bool:
    """Save; a file that cannot be written costs a re-measurement next time, not this decision."""
    try:
        plan_file.save(plan)
        return True
    except OSError as e:
        log.warning("cache_kind 'auto': could not save the plan to %s (%s); the choice stands, but the next run "
                    "measures again", plan_file.path, e)
        return False


def _age(seconds: float | None) -> str:
    return "never" if seconds is None else f"{seconds / 86400:g} days"


def _device(cm: CompiledLike) -> torch.device:
    first = next(iter(cm.graph.weights.values()), None)
    return first.device if first is not None else torch.device("cpu")


# ---------------------------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------------------------
def eval_tokens(eval_text: EvalText, probe: ProbeSettings, vocab_size: int) -> torch.Tensor:
    """The evaluation batch, (windows, window) int64: non-overlapping windows of the text's byte tokens (or of the
    given token ids), `probe.windows` of them evenly spread from the first to the last; all of them when the text
    holds fewer. Byte tokens need a vocabulary of at least 256 (or a text whose bytes are all below it)."""
    if isinstance(eval_text, torch.Tensor) or (isinstance(eval_text, Sequence) and not isinstance(eval_text, str)):
        ids = torch.as_tensor(eval_text)
        if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise EvalTextError(f"eval token ids must be a 1-D sequence of ints, got {ids.dtype} {list(ids.shape)}")
        ids = ids.long().tolist()
        if len(ids) < probe.window:
            raise EvalTextError(f"the eval tokens number {len(ids)}, fewer than one window of {probe.window}; "
                                f"pass more or lower ProbeSettings.window")
        rows = [ids[s:s + probe.window] for s in range(0, len(ids) - probe.window + 1, probe.window)]
        what = "token ids"
    else:
        rows = eval_windows(load_eval_text(eval_text), probe.window, probe.window)
        what = "byte tokens"
    picked = sorted({round(i * (len(rows) - 1) / max(probe.windows - 1, 1)) for i in range(probe.windows)}) \
        if len(rows) > probe.windows else range(len(rows))
    tokens = torch.tensor([rows[i] for i in picked], dtype=torch.int64)
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= vocab_size:
        raise EvalTextError(f"the evaluation {what} run from {lo} to {hi}, outside this model's vocabulary of "
                            f"{vocab_size}; pass token ids from the model's tokenizer as eval_text")
    return tokens


def measure_quality(cm: CompiledLike, cands: Sequence[Candidate], tokens: torch.Tensor, probe: ProbeSettings, *,
                    qblock: int = 32, residual_len: int = 0,
                    progress: Callable[[str], None] | None = None) -> dict[Candidate, Quality]:
    """Each candidate's Quality against an fp16 cache on `tokens` (eval_tokens), by the procedure of the module
    docstring. The fp16 reference runs once; an fp16 candidate gets exactly (0, 1, 0) from it."""
    tokens, probe = _fit_to_model(cm, tokens, probe)
    length = probe.window + probe.decode_steps
    ring = min(residual_len, length)  # a ring longer than the evaluation holds everything: the same thing

    def executor(kind) -> Executor:
        return cm.executor(CacheConfig.of(cm.cache_layout, kind, max_seq_len=length, qblock=qblock,
                                          residual_len=ring))

    say = progress or (lambda line: None)
    say(f"measuring the {REFERENCE_KIND} reference on {tokens.shape[0]} x {tokens.shape[1]} tokens")
    reference = probe_run(executor(REFERENCE_KIND), tokens, probe)
    out = {}
    for i, c in enumerate(cands, 1):
        say(f"measuring the quality of the {c} cache ({i}/{len(cands)})")
        run = reference if c == Candidate.of(REFERENCE_KIND, c.names) else \
            probe_run(executor(c.mapping), tokens, probe, reference)
        delta = run.nll - reference.nll
        out[c] = Quality(run.nll, delta, math.exp(delta) if math.isfinite(delta) else math.nan, run.mean_kl)
        log.debug("cache_kind 'auto': %s NLL %.5f dNLL %+.5f mean KL %.3e", c, run.nll, delta, run.mean_kl)
    return out


def _fit_to_model(cm: CompiledLike, tokens: torch.Tensor, probe: ProbeSettings) -> tuple[torch.Tensor,
                                                                                           ProbeSettings]:
    """Shorten the windows when window + decode_steps exceeds the positions the model was compiled for."""
    room = cm.max_positions - probe.decode_steps
    if probe.window <= room:
        return tokens, probe
    if room < 2:
        raise ValueError(f"the model takes {cm.max_positions} positions, too few for {probe.decode_steps} decode "
                         f"steps after a window; lower ProbeSettings.decode_steps")
    log.info("cache_kind 'auto': evaluation windows shortened from %d to %d tokens to leave room for %d decode "
             "steps within the model's %d positions", probe.window, room, probe.decode_steps, cm.max_positions)
    short = ProbeSettings(**{**asdict(probe), "window": room, "prefill": min(probe.prefill, room // 2)})
    return tokens[:, :room], short


@torch.no_grad()
def probe_run(ex: Executor, tokens: torch.Tensor, probe: ProbeSettings, reference: ProbeRun | None = None) \
        -> ProbeRun:
    """Teacher-force `tokens` (B, window) through a fresh cache of `ex` (prefill, then chunks), then take
    probe.decode_steps single-token steps: greedy when reference is None (its choices and distributions are kept),
    else feeding the reference's choices and summing KL(reference || this) per step and row."""
    tokens = tokens.to(ex.device)
    b, w = tokens.shape
    cache = ex.new_cache(b)
    bounds = [0, *range(probe.prefill, w, probe.chunk), w]
    row_sums, last = torch.zeros(b, dtype=torch.float64, device=ex.device), None
    for lo, hi in itertools.pairwise(bounds):
        logits = ex.forward(tokens[:, lo:hi], _positions(b, lo, hi, ex.device), cache)
        scored = min(hi, w - 1) - lo  # the window's last token has no target inside the window
        if scored > 0:
            logp = torch.log_softmax(logits[:, :scored].double(), dim=-1)
            row_sums -= logp.gather(-1, tokens[:, lo + 1:lo + 1 + scored, None])[..., 0].sum(-1)
        last = logits[:, -1]
    steps = probe.decode_steps
    chosen = torch.empty(b, steps, dtype=torch.int64, device=ex.device)
    kept = [] if reference is None else None
    kl_sum = 0.0
    for d in range(steps):
        tok = last.argmax(-1) if reference is None else reference.decode_tokens[:, d].to(ex.device)
        chosen[:, d] = tok
        last = ex.forward(tok[:, None], _positions(b, w + d, w + d + 1, ex.device), cache)[:, 0]
        ex.check()
        logp = torch.log_softmax(last.double(), dim=-1)
        if reference is None:
            kept.append(logp.float())
        else:
            ref = reference.decode_log_probs[:, d].to(ex.device).double()
            kl_sum += float((ref.exp() * (ref - logp)).sum(-1).clamp_min(0).sum())  # rounding never makes KL < 0
    return ProbeRun(float(row_sums.sum()), b * (w - 1), chosen, torch.stack(kept, 1) if kept is not None else None,
                    kl_sum, 0 if reference is None else b * steps, (row_sums / (w - 1)).cpu())


def benchmark_decode(cm: CompiledLike, config: CacheConfig, batch: int, probe: ProbeSettings,
                     tokens: torch.Tensor) -> float:
    """Decode tokens per second (all rows) of `config` at `batch`: `bench_context` tokens cached, `bench_warmup`
    steps untimed, then the median of `bench_steps` synchronised single-step timings. Everything is shortened to
    fit config.max_seq_len. The executor is lowered before any timing."""
    ex = cm.executor(config)
    room = config.max_seq_len
    context = max(1, min(probe.bench_context, room - probe.bench_warmup - probe.bench_steps))
    total = min(probe.bench_warmup + probe.bench_steps, room - context)
    warmup = min(probe.bench_warmup, total // 2)
    feed = tokens.flatten().to(ex.device)
    ids = feed[torch.arange(batch * (context + total), device=ex.device) % feed.numel()].view(batch, -1)
    cache = ex.new_cache(batch)
    sync = ex.synchronize
    times = []
    with torch.no_grad():
        ex.forward(ids[:, :context], _positions(batch, 0, context, ex.device), cache)
        for i in range(total):
            p = context + i
            sync()
            t = time.perf_counter()
            ex.forward(ids[:, p:p + 1], _positions(batch, p, p + 1, ex.device), cache)
            sync()
            ex.check()
            if i >= warmup:
                times.append(time.perf_counter() - t)
    del cache
    return batch / statistics.median(times)


def _positions(batch: int, lo: int, hi: int, device: torch.device) -> torch.Tensor:
    return torch.arange(lo, hi, dtype=torch.int64, device=device).expand(batch, hi - lo)
