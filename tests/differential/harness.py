"""Runs one Draw on the reference interpreter and on every target, and compares them step by step.

The reference is target "eager"'s executor (the interpreter) with the draw's cache. Each target compiles the same
model and runs the same feed: a ragged prefill (rows padded to the widest, then truncated to their lengths, as
the Generator does), then the draw's steps: a 1-token step feeds every row the reference's greedy token, a longer
step feeds random tokens (a continuation chunk), after which rows may roll tokens back (truncate_rows, as
speculative decoding drops rejected drafts). After every step the target must agree with the reference:

cache contents (every layer and tensor, each row's written positions, the fp16 ring's live slots; taken before a
rollback, so also what the step's own queries read), in value space (codes and scales read back through the
reference dequantization): identical, except for fp32 noise and flips.
  - noise: within TOL_FP32 of the tensor's largest value. fp32 arithmetic in another order moves a value by ~1e-7
    of the tensor's scale, which is many fp16 ulps of a value near zero; in an fp32 cache it is all that may differ.
  - a flip: one code apart (q8_0 / q4_0: the block's scale; nf4: the widest gap between neighbouring levels times
    the scale; fp16 / bf16 storage and the ring: one ulp), plus that noise. Two correct implementations flip
    exactly where a value lies within their rounding difference of a rounding boundary (quant.py: "the codes can
    then differ by one where x / d lies within an ulp of a rounding tie"; the fp16 scale absmax / 127 rounds the
    other way near a tie too, which moves its whole block), and a flip moves the inputs of every later layer and
    step by up to one code, which makes the next flips likelier. Anything further apart is a bug, and flips stay
    rare in a correct target: at most MAX_FLIP_SHARE of a step's blocks (fp16 values) flip, MIN_FLIPS in a tiny
    cache (a wrong rounding mode or scale formula moves a large share of them).
  - propagation: layer L's new values come from what layers < L read, so after a flip there (or in an earlier
    step) they may move by more than a code: by up to the reference's own drift from quantizing (its largest
    distance, in that tensor, to the values of the same feed with an fp32 cache). Layer 0's values depend on the
    tokens alone and are always held to one code; the flip share counts only tensors no flip could reach (found
    by the 1,000-example run: a one-ulp flip in layer 0's fp16 k moved layer 1's k by 6 ulps on cuda and metal
    alike, through a soft-max over large scores).
logits (B, S, V) of every position (the padding's too: they are computed like any other):
  - TOL_FP32 = 1e-4 of the largest |logit| (the issue's bound): what separates two fp32 evaluations of the same
    tiny model in different reduction orders (Triton's interpreter and the Metal emulator sum in other orders than
    torch; ONNX Runtime has its own GEMMs and its own exp / tanh) is ~1e-6 relative; 1e-4 leaves room for the
    softmax and the soft cap amplifying it and still catches a wrong mask, scale or position, which move logits
    by percents. While the caches are identical this holds for every kind: the values read back are the same
    bits, so only arithmetic differs.
  - with a residual ring, TOL_FP32 + what rounding the whole cache to fp16 does (rel_err(reference with an fp16
    cache, with an fp32 one)): a prefill or chunk step reads its own tokens exact, as fp16 roundings made in the
    step that the snapshot cannot see once the ring moved on, and one of those may flip an ulp.
  - once a flip happened, the kind's bound: TOL_FP32 + the reference's own quantization sensitivity at that step,
    rel_err(reference with this cache, reference with an fp32 cache). A flip changes a handful of values by one
    code; quantizing the whole cache changes every value by up to half a code (sqrt(n) times more in total), so
    a correct target stays well inside the latter; a target whose reads are wrong moves logits by more.
greedy tokens: where the reference's top-2 margin exceeds twice the step's tolerance (the logits of both may move
by the tolerance each), the target's argmax is the reference's.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

import caramba
from caramba.codegen import backend as registry
from caramba.errors import UnsupportedOpError
from caramba.ir.quant import NF4_LEVELS, QTensor, dequantize, parse_kind
from caramba.runtime.executor import CacheConfig
from tests.differential.draws import Draw, step_drops, step_tokens
from tests.helpers import rel_err

TOL_FP32 = 1e-4
MAX_FLIP_SHARE, MIN_FLIPS = 0.02, 3  # flips allowed in one step's cache: this share of its units, at least MIN_FLIPS
PERTURB = 0.2  # weights += PERTURB * randn: gates, temperatures and norms leave their identity init


class DifferentialFailure(AssertionError):
    """A target disagreed with the reference; the message ends with the reproducer."""


# ---------------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------------
HF_CLASSES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM"),
              "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"), "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
              "stablelm": ("StableLmConfig", "StableLmForCausalLM")}


def build_model(draw: Draw) -> torch.nn.Module:
    """The draw's model: seeded init, then every parameter perturbed (constructor() says the same in words)."""
    torch.manual_seed(draw.seed)
    cfg = dict(draw.model["config"])
    if draw.family == "caramba":
        from caramba.models import ModelConfig, Transformer

        model = Transformer(ModelConfig(**cfg))
    else:
        import transformers

        config_cls, model_cls = (getattr(transformers, n) for n in HF_CLASSES[draw.family])
        partial = cfg.pop("partial_rotary_factor", None)  # Llama reads it as an attribute only
        config = config_cls(**cfg)
        if partial is not None:
            config.partial_rotary_factor = partial
        model = model_cls(config)
    model.eval()
    g = torch.Generator().manual_seed(draw.seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * PERTURB)
    return model


def constructor(draw: Draw) -> str:
    """The model as a constructor call (what build_model runs, before the perturbation)."""
    cfg = dict(draw.model["config"])
    if draw.family == "caramba":
        call = f"caramba.models.Transformer(caramba.models.ModelConfig(**{cfg!r}))"
    else:
        partial = cfg.pop("partial_rotary_factor", None)
        config_cls, model_cls = HF_CLASSES[draw.family]
        call = f"transformers.{model_cls}(transformers.{config_cls}(**{cfg!r}))"
        if partial is not None:
            call += f"  # with config.partial_rotary_factor = {partial}"
    return (f"torch.manual_seed({draw.seed}); model = {call}; then each parameter p += {PERTURB} * "
            f"torch.randn(p.shape, generator=torch.Generator().manual_seed({draw.seed})), in order")


# ---------------------------------------------------------------------------------------------------------------
# Running a feed
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Step:
    ids: torch.Tensor  # (B, S)
    positions: torch.Tensor  # (B, S)
    keep: list[int] | None  # lengths to truncate rows to after the step (the prefill's padding, a rollback)
    last: list[int]  # per row, the index of its last real token in this step
    label: str


@dataclass
class Trace:
    logits: list[torch.Tensor] = field(default_factory=list)
    caches: list[list[tuple[str, dict[str, torch.Tensor]]]] = field(default_factory=list)


def snapshot(cache) -> list[tuple[str, dict[str, torch.Tensor]]]:
    """Every layer's tensors as stored, each row's live positions only (the rest zeroed): codes, scales and the
    ring's live slots (positions [ring_start, length) of each row, gathered by position)."""
    out = []
    for layer in range(len(cache.layers)):
        lengths = cache.lengths(layer)
        n = max(lengths)
        live = torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]  # (B, n)
        ring_start = torch.tensor(cache.layers[layer].ring_start)
        for name in cache.spec.names:
            view = cache.view(layer, name)
            parts = {"codes": view.codes[:, :n].clone(), "scales": None if view.scales is None
                     else view.scales[:, :n].clone()}
            if view.ring is not None and view.capacity:
                pos = torch.arange(n)
                in_ring = live & (pos[None, :] >= ring_start[:, None])
                parts["ring"] = view.ring[:, pos % view.capacity].clone()
                parts["ring"][~in_ring] = 0
            for key in ("codes", "scales"):
                if parts[key] is not None:
                    parts[key][~live] = 0
            parts.update(kind=view.kind, features=view.features, qblock=view.qblock, layer=layer)
            out.append((f"layer {layer} {name}", {k: v for k, v in parts.items() if v is not None}))
    return out


def make_feed(draw: Draw, vocab: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The prompt tokens (B, widest row; 0 past each row's length) and the tokens of each continuation chunk."""
    g = torch.Generator().manual_seed(draw.seed + 1)
    width = max(draw.rows)
    prompt = torch.randint(0, vocab, (len(draw.rows), width), generator=g)
    prompt[torch.arange(width)[None, :] >= torch.tensor(draw.rows)[:, None]] = 0
    chunks = [torch.randint(0, vocab, (len(draw.rows), step_tokens(s)), generator=g) for s in draw.steps]
    return prompt, chunks


def run(ex, draw: Draw, prompt: torch.Tensor, chunks: list[torch.Tensor], steps: list[Step] | None = None,
        check_step: Callable[[int, torch.Tensor, Any], None] | None = None) -> tuple[list[Step], Trace]:
    """Run the feed on one executor. Without `steps` (the reference) the 1-token steps feed the greedy token of
    the previous step; with them (a target) exactly the reference's steps. check_step(i, logits, cache) runs after
    each step, before the next."""
    batch = len(draw.rows)
    cache = ex.new_cache(batch, ring_slack=draw.cache.get("ring_slack", 0) if ex.config.residual_len else 0)
    trace, made = Trace(), []
    for i in range(1 + len(draw.steps)):
        if steps is not None:
            step = steps[i]
        elif i == 0:
            width = prompt.shape[1]
            step = Step(prompt, torch.arange(width).expand(batch, width).contiguous(), list(draw.rows),
                        [r - 1 for r in draw.rows], "prefill")
        else:
            lengths = torch.tensor(cache.lengths(0))[:, None]
            n, drops = step_tokens(draw.steps[i - 1]), step_drops(draw.steps[i - 1], batch)
            if n == 1:
                prev, last = trace.logits[-1], made[-1].last
                ids = torch.stack([prev[b, last[b]].argmax() for b in range(batch)])[:, None]
            else:
                ids = chunks[i - 1]
            keep = [int(k) + n - d for k, d in zip(lengths[:, 0], drops)] if any(drops) else None
            label = "decode" if n == 1 else f"chunk of {n}" + (f", rolling back {drops}" if keep else "")
            step = Step(ids, lengths + torch.arange(n), keep, [n - 1 - d for d in drops], label)
        made.append(step)
        logits = ex.forward(step.ids, step.positions, cache)
        ex.check()
        trace.logits.append(logits.detach().float().clone())
        trace.caches.append(snapshot(cache))  # before a truncation: what the step's queries read, padding included
        if step.keep is not None:
            cache.truncate_rows(step.keep)
        if check_step is not None:
            check_step(i, trace.logits[-1], trace.caches[-1])
    return made, trace


# ---------------------------------------------------------------------------------------------------------------
# Comparing
# ---------------------------------------------------------------------------------------------------------------
NF4_GAP = max(b - a for a, b in zip(NF4_LEVELS, NF4_LEVELS[1:]))  # the widest step between neighbouring levels


def decoded(parts: dict[str, Any], part: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, step) of one stored part, both (B, n, F) fp32: the values as read (the reference dequantization)
    and, per element, one code of its block (q8_0 / q4_0: the scale; nf4: the widest level gap times the scale)
    or one ulp of its fp16 / bf16 value (fp32: 0)."""
    if part == "ring":
        x = parts["ring"]
        return x.float(), ulp(x)
    kind = parse_kind(parts["kind"])
    codes, features, qblock = parts["codes"], parts["features"], parts["qblock"]
    if not kind.block_scaled:
        return codes.float(), ulp(codes) if codes.dtype != torch.float32 else torch.zeros(codes.shape)
    x = dequantize(QTensor(kind, codes, parts["scales"], features, qblock), torch.float32)
    d = parts["scales"].float().abs().repeat_interleave(qblock, dim=-1)[..., :features]
    return x, d * (NF4_GAP if kind.name == "nf4" else 1.0)


def ulp(x: torch.Tensor) -> torch.Tensor:
    """One unit in the last place of each fp16 / bf16 value (subnormals included), as fp32."""
    bits, lowest = {torch.float16: (11, -24), torch.bfloat16: (8, -133)}[x.dtype]
    _, e = torch.frexp(x.float().abs())
    return torch.pow(2.0, (e - bits).clamp_min(lowest).float())


def compare_caches(got: list, want: list, fp32: list, flipped_before: bool) -> tuple[list[str], int, int]:
    """(problems, flips, units no earlier flip could reach and their flips) between two snapshots, in value space
    (the module doc): a value further from the reference's than one code of the larger of the two blocks plus fp32
    noise (plus, where a flip below or before could reach it, the reference's drift from quantizing: its largest
    distance to `fp32`, the fp32-cache run's snapshot) is a problem; a flip is a unit whose values differ by more
    than the noise, counted per block for block-scaled kinds (one fp16 scale that rounded the other way moves its
    whole block) and per value for fp16 / bf16 storage and the ring. Returns (problems, strict flips, strict units)."""
    problems, flips, total = [], 0, 0
    flipped_in: dict[int, int] = {}  # layer -> flips seen in it
    for (where, g), (_, w), (_, x) in zip(got, want, fp32):
        layer = w["layer"]
        reached = layer > 0 and (flipped_before or any(n for lay, n in flipped_in.items() if lay < layer))
        ref, ref32 = decoded(w, "codes")[0], decoded(x, "codes")[0]
        drift = (ref - ref32).abs().max().item() if reached and ref.numel() else 0.0
        for part in ("codes", "ring"):
            if part not in w:
                continue
            a, step_a = decoded(g, part)
            b, step_b = decoded(w, part)
            if not b.numel():
                continue
            noise = TOL_FP32 * b.abs().max().item()
            diff = (a - b).abs()
            far = diff > torch.maximum(step_a, step_b) + noise + drift
            moved = diff > noise
            if part == "codes" and "scales" in w:  # per block: (B, n, F) -> (B, n, blocks)
                q = w["qblock"]
                pad = -moved.shape[-1] % q
                moved = torch.nn.functional.pad(moved, (0, pad)).unflatten(-1, (-1, q)).any(-1)
            n = int(moved.sum())
            flipped_in[layer] = flipped_in.get(layer, 0) + n
            if not reached:
                total += moved.numel()
                flips += n
            if bool(far.any()):
                at = tuple(int(i) for i in torch.nonzero(far)[0])
                what = w["kind"] if part == "codes" else "fp16 ring"
                problems.append(f"{where} {part} ({what}): {int(far.sum())} value(s) more than one code apart"
                                f"{f' (+ the reference drift {drift:.3g})' if drift else ''}, first at (row, "
                                f"position, feature) {at}: {a[at].item():.6g} vs the reference's {b[at].item():.6g}")
    return problems, flips, total


def margin(logits: torch.Tensor) -> float:
    """The gap between the largest and the second largest logit (vocabularies have >= 5 tokens)."""
    top = logits.topk(2).values
    return (top[0] - top[1]).item()


# ---------------------------------------------------------------------------------------------------------------
# One draw, every target
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    ran: dict[str, float] = field(default_factory=dict)  # target -> seconds (compile + run + compare)
    built: dict[str, float] = field(default_factory=dict)  # target -> seconds of that spent compiling and lowering
    declined: dict[str, str] = field(default_factory=dict)  # target -> why
    flips: dict[str, int] = field(default_factory=dict)
    reference_seconds: float = 0.0


def declines(backend, config: CacheConfig) -> str | None:
    """Why this target's backend does not take this cache, from what it declares (None: it takes it)."""
    kinds = sorted({k for _, k in config.kinds} - set(backend.needs.cache_kinds))
    if kinds:
        return f"stores no {', '.join(kinds)}"
    if config.residual_len and not backend.needs.residual_ring:
        return "has no residual ring"
    return None


def check_draw(draw: Draw, targets: list[str], repro: Callable[[Draw, list[str]], str]) -> Outcome:
    """Run `draw` on the reference and on each of `targets`; raise DifferentialFailure (with repro(draw, failed
    targets) in its message) at the first disagreement."""
    with one_capture():
        try:
            return _check_draw(draw, targets, repro)
        except DifferentialFailure:
            raise
        except Exception as e:  # a crash (compile, executor, cache) is a failure too, with its reproducer
            raise DifferentialFailure(f"the draw raised {type(e).__name__}: {e}\n{repro(draw, targets)}") from e


def _check_draw(draw: Draw, targets: list[str], repro: Callable[[Draw, list[str]], str]) -> Outcome:
    outcome = Outcome()
    t0 = time.perf_counter()
    model = build_model(draw)
    eager = compile_for(model, "eager")
    outcome.built["eager"] = time.perf_counter() - t0
    c = draw.cache
    config = CacheConfig.of(eager.cache_layout, c["kind"], max_seq_len=c["max_seq_len"], qblock=c["qblock"],
                            residual_len=c["residual_len"])
    prompt, chunks = make_feed(draw, eager.vocab_size)
    steps, want = run(eager.executor(config), draw, prompt, chunks)
    sensitivity, rounding, unquantized = [0.0] * len(steps), [0.0] * len(steps), want
    if any(k != "fp32" for _, k in config.kinds):
        plain = CacheConfig.of(eager.cache_layout, "fp32", max_seq_len=c["max_seq_len"])
        _, unquantized = run(eager.executor(plain), draw, prompt, chunks, steps)
        sensitivity = [rel_err(a, b) for a, b in zip(want.logits, unquantized.logits)]
    if config.residual_len:  # what rounding every value to fp16 does (the bound of the ring's exact reads)
        half = CacheConfig.of(eager.cache_layout, "fp16", max_seq_len=c["max_seq_len"])
        _, halved = run(eager.executor(half), draw, prompt, chunks, steps)
        rounding = [rel_err(a, b) for a, b in zip(halved.logits, unquantized.logits)]
    outcome.reference_seconds = time.perf_counter() - t0

    for name in targets:
        backend = registry.get(name)
        if backend.reference:  # the interpreter itself: checked against the model's own uncached forward
            t = time.perf_counter()
            problem = against_model(model, draw, steps, unquantized)
            if problem:
                raise DifferentialFailure(f"target {name!r} (the interpreter, fp32 cache) disagrees with the "
                                          f"model's own uncached forward: {problem}\n{repro(draw, [name])}")
            outcome.ran[name] = time.perf_counter() - t + outcome.reference_seconds
            continue
        why = declines(backend, config)
        if why is not None:
            outcome.declined[name] = why
            continue
        t = time.perf_counter()
        cm = model_for(name, model, eager)
        options = dict(draw.options.get(name, {}))
        if c.get("partitions") is not None and not backend.reference:
            options["partitions"] = c["partitions"]
        try:
            ex = cm.executor(config, **options)
        except UnsupportedOpError as e:  # the backend refuses this combination itself (e.g. an opt-in mode's limits)
            outcome.declined[name] = f"refused: {e}"
            continue
        outcome.built[name] = time.perf_counter() - t
        state = {"flips": 0}

        def fail(i: int, what: str) -> None:
            raise DifferentialFailure(f"target {name!r} disagrees with the reference at step {i} "
                                      f"({steps[i].label}): {what}\n{repro(draw, [name])}")

        def check_step(i: int, logits: torch.Tensor, cache_now: list) -> None:
            problems, flips, total = compare_caches(cache_now, want.caches[i], unquantized.caches[i],
                                                    state["flips"] > 0)
            if problems:
                fail(i, "cache contents differ: " + "; ".join(problems[:4]))
            if flips > max(MIN_FLIPS, MAX_FLIP_SHARE * total):
                fail(i, f"{flips} of {total} stored blocks / values one code apart (more than {MAX_FLIP_SHARE:.0%}: "
                        f"not rounding noise)")
            state["flips"] = max(state["flips"], flips)
            ref = want.logits[i]
            tol = TOL_FP32 + (sensitivity[i] if state["flips"] else rounding[i])
            if logits.shape != ref.shape:
                fail(i, f"logits shape {list(logits.shape)} != {list(ref.shape)}")
            bound = tol * ref.abs().max().item()
            for b, at in enumerate(steps[i].last):
                if margin(ref[b, at]) > 2 * bound and logits[b, at].argmax() != ref[b, at].argmax():
                    fail(i, f"row {b}: greedy token {int(logits[b, at].argmax())} != the reference's "
                            f"{int(ref[b, at].argmax())} (margin {margin(ref[b, at]):.3g} > 2 x {bound:.3g})")
            err = rel_err(logits, ref)
            if not err <= tol:
                detail = f" (the caches differ by {state['flips']} flip(s) so far)" if state["flips"] else ""
                fail(i, f"logits rel err {err:.3g} > tolerance {tol:.3g}{detail}")

        try:
            run(ex, draw, prompt, chunks, steps, check_step)
        except DifferentialFailure:
            raise
        except Exception as e:  # a target that crashes where the reference runs is a failure too
            raise DifferentialFailure(f"target {name!r} raised {type(e).__name__}: {e}\n{repro(draw, [name])}") from e
        outcome.ran[name] = time.perf_counter() - t
        outcome.flips[name] = state["flips"]
    return outcome


def against_model(model: torch.nn.Module, draw: Draw, steps: list[Step], fp32: Trace) -> str | None:
    """The reference's run with an fp32 cache against the model's own forward over each row's whole sequence
    (batch 1, no cache, no padding): every real position's logits within TOL_FP32. None when they agree."""
    for b in range(len(draw.rows)):
        kept = [s.last[b] + 1 for s in steps]  # each step's tokens of row b that stay in the sequence
        seq = torch.cat([s.ids[b, :k] for s, k in zip(steps, kept)])[None]
        with torch.no_grad():
            out = model(seq)
        full = (out if isinstance(out, torch.Tensor) else out.logits)[0].float()
        start = 0
        for i, (step, width) in enumerate(zip(steps, kept)):
            got = fp32.logits[i][b, :width]
            err = rel_err(got, full[start:start + width])
            if not err <= TOL_FP32:
                return f"row {b}, step {i} ({step.label}): logits rel err {err:.3g} > {TOL_FP32}"
            start += width
    return None


def compile_for(model: torch.nn.Module, target: str) -> caramba.CompiledModel:
    """caramba.compile without the verifier after every pass (under pytest it is on by default): it would triple a
    tiny model's build time, and tests/passes verify every pass already. The verifier still checks the compiled
    graph and each entry graph of the cache (compile's and lower's own final checks)."""
    return caramba.compile(model, target=target, verify_each=False)


def model_for(name: str, model: torch.nn.Module, eager: caramba.CompiledModel) -> caramba.CompiledModel:
    return eager if name == eager.target else compile_for(model, name)


@contextlib.contextmanager
def one_capture():
    """Within the block, caramba.compile captures each model once: the torch.export capture (1-3 s of a tiny
    model's 2-4 s compile) does not depend on the target, so every target's pipeline starts from a copy of the
    same imported graph (Graph.copy: passes replace nodes, never mutate them)."""
    from caramba import compiler

    real = compiler.import_model
    memo: dict = {}

    def import_once(model, **kw):
        key = (id(model), tuple(sorted(kw.items())))
        if key not in memo:
            memo[key] = (model, real(model, **kw))  # the model is kept alive, so its id stays its own
        graph, cap = memo[key][1]
        return graph.copy(), cap

    compiler.import_model = import_once
    try:
        yield
    finally:
        compiler.import_model = real

