"""What one differential example is (a Draw: model x cache x shapes, all plain JSON) and the hypothesis strategy
that draws it. Every choice lists its simplest value first, so hypothesis shrinks a failure towards a small model,
an fp32 cache, one row and one decode step."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from hypothesis import strategies as st

# transformers families with the attention variants of issue 18 item 0 (soft caps, sliding windows, query scale,
# q/k norms, partial rotary), built from random small configs with random weights (never downloaded)
HF_ARCHS = ("llama", "mistral", "gemma2", "qwen3", "stablelm")
KINDS = ("fp32", "fp16", "q8_0", "q4_0", "nf4", "bf16")
QUANTIZED = ("q8_0", "q4_0", "nf4")
MAX_POSITIONS = 96  # every drawn model's max positions (RoPE tables); caches are shorter
VOCAB = (5, 67)


@dataclass
class Draw:
    """One example: the model (family + constructor kwargs), the seed of its weights, perturbation and tokens, the
    cache, the batch (prompt length per row: ragged), the steps after the prefill, per-target executor options, and
    optionally the targets to run (None: every target; a reproducer names the ones that failed).

    A step is n (tokens per row: 1 is a greedy decode step, more a continuation chunk) or [n, drop_0, drop_1, ...]:
    a chunk after which row b rolls its last drop_b < n tokens back (speculative decoding's rejected drafts)."""

    model: dict[str, Any]
    seed: int
    cache: dict[str, Any]
    rows: list[int]
    steps: list[int | list[int]]
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    targets: list[str] | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Draw:
        return cls(**json.loads(text))

    @property
    def family(self) -> str:
        return self.model["family"]

    @property
    def names(self) -> tuple[str, ...]:
        """The cached tensors of every layer."""
        decoupled = self.family == "caramba" and self.model["config"]["attention"] == "decoupled"
        return ("k_sem", "k_geo", "v") if decoupled else ("k", "v")

    @property
    def tokens(self) -> int:
        """The longest row's tokens after every step."""
        return max(self.rows) + sum(step_tokens(s) for s in self.steps)


def step_tokens(step: int | list[int]) -> int:
    return step if isinstance(step, int) else step[0]


def step_drops(step: int | list[int], batch: int) -> list[int]:
    return [0] * batch if isinstance(step, int) else list(step[1:])


# even (RoPE rotates pairs): mostly small and odd halves (tiles padded past the head), some at real sizes
HEAD_DIMS = st.one_of(st.integers(1, 6).map(lambda h: 2 * h), st.sampled_from([16, 32, 64, 80]))


def _heads(draw, most: int = 8) -> tuple[int, int]:
    """(H, H_kv) with H_kv | H, ratios up to 8."""
    n_heads = draw(st.sampled_from([1, 2, 3, 4, 6, 8][: [1, 2, 3, 4, 6, 8].index(most) + 1]))
    kv = draw(st.sampled_from([d for d in range(n_heads, 0, -1) if n_heads % d == 0]))
    return n_heads, kv


@st.composite
def caramba_models(draw) -> dict[str, Any]:
    """caramba.models.Transformer configs: standard / gqa / decoupled (gates, learned temperature), both norms
    and MLPs, tied or not, bias or not, RoPE bases; odd widths and sem / v dims."""
    mode = draw(st.sampled_from(["standard", "gqa", "decoupled"]))
    if mode == "gqa":  # H_kv a proper divisor of H
        n_heads = draw(st.sampled_from([2, 3, 4, 6, 8]))
        kv = draw(st.sampled_from([d for d in range(1, n_heads) if n_heads % d == 0]))
    else:
        n_heads, kv = _heads(draw)
        kv = n_heads if mode == "standard" else kv
    cfg = dict(vocab_size=draw(st.integers(*VOCAB)), d_model=draw(st.integers(5, 48)),
               n_layers=draw(st.integers(1, 2)), n_heads=n_heads, n_kv_heads=kv, attention=mode,
               norm=draw(st.sampled_from(["rms", "layer"])), mlp=draw(st.sampled_from(["swiglu", "gelu"])),
               d_ff=draw(st.integers(3, 41)), tie_embeddings=draw(st.booleans()), bias=draw(st.booleans()),
               max_seq_len=MAX_POSITIONS, rope_base=draw(st.sampled_from([10000.0, 500000.0, 37.5])))
    if mode == "decoupled":
        cfg.update(sem_dim=n_heads * draw(st.integers(1, 7)), geo_dim=n_heads * 2 * draw(st.integers(1, 4)),
                   v_dim=n_heads * draw(st.integers(1, 7)), gate=draw(st.sampled_from(["off", "static", "dynamic"])),
                   learned_temp=draw(st.booleans()))
    else:
        cfg.update(head_dim=draw(HEAD_DIMS))
    return {"family": "caramba", "config": cfg}


@st.composite
def hf_models(draw) -> dict[str, Any]:
    """A small transformers decoder of one of HF_ARCHS with its variant drawn: Gemma 2 (attention and final
    soft caps, alternating sliding / full layers, query_pre_attn_scalar), Mistral (sliding window on every layer),
    Qwen 3 (q/k RMSNorms), StableLM (partial rotary, q/k LayerNorms), Llama (partial rotary)."""
    arch = draw(st.sampled_from(HF_ARCHS))
    n_heads, kv = _heads(draw, most=6)
    head_dim = draw(HEAD_DIMS)
    cfg: dict[str, Any] = dict(
        vocab_size=draw(st.integers(*VOCAB)), hidden_size=n_heads * draw(st.integers(-(-8 // n_heads), 48 // n_heads)),
        intermediate_size=draw(st.integers(3, 41)), num_hidden_layers=draw(st.integers(1, 2)),
        num_attention_heads=n_heads, num_key_value_heads=kv, max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=draw(st.booleans()),
        rope_parameters={"rope_type": "default", "rope_theta": draw(st.sampled_from([10000.0, 500000.0, 37.5]))})
    window = st.integers(1, 10)  # shorter than most sequences drawn, so it bites
    if arch == "stablelm":  # head_dim is hidden_size // heads; the rotary part must be even
        head_dim = min(head_dim, 2 * (24 // n_heads))  # hidden_size <= 48
        cfg["hidden_size"] = n_heads * head_dim
        rotary = draw(st.integers(1, head_dim // 2))
        cfg["rope_parameters"]["partial_rotary_factor"] = 2 * rotary / head_dim
        cfg.update(qk_layernorm=draw(st.booleans()), use_qkv_bias=draw(st.booleans()))
    else:
        cfg["head_dim"] = head_dim
    if arch == "llama":
        cfg.update(attention_bias=draw(st.booleans()), mlp_bias=draw(st.booleans()))
        cfg["partial_rotary_factor"] = 2 * draw(st.integers(1, head_dim // 2)) / head_dim
    elif arch == "mistral":
        cfg["sliding_window"] = draw(window)
    elif arch == "qwen3":
        cfg["attention_bias"] = draw(st.booleans())
    elif arch == "gemma2":
        layers = cfg["num_hidden_layers"]
        pattern = draw(st.sampled_from(["alternating", "sliding", "full"]))
        cfg["layer_types"] = [{"alternating": ("sliding_attention", "full_attention")[i % 2],
                               "sliding": "sliding_attention", "full": "full_attention"}[pattern]
                              for i in range(layers)]
        cfg.update(sliding_window=draw(window),
                   attn_logit_softcapping=draw(st.one_of(st.none(), st.floats(0.5, 50.0).map(lambda x: round(x, 3)))),
                   final_logit_softcapping=draw(st.one_of(st.none(), st.floats(1.0, 50.0).map(lambda x: round(x, 3)))),
                   query_pre_attn_scalar=draw(st.one_of(st.just(head_dim), st.integers(1, 64))))
    return {"family": arch, "config": cfg}


@st.composite
def caches(draw, names: tuple[str, ...], tokens: int) -> dict[str, Any]:
    """A cache for `tokens` positions at least: one kind or a kind per tensor, qblock, residual ring, split-K."""
    one_kind = st.integers(0, 9).flatmap(lambda i: st.just("bf16") if i == 9 else st.sampled_from(KINDS[:5]))
    if draw(st.integers(0, 4)) == 4:  # mixed: a kind per tensor
        kind: Any = {n: draw(one_kind) for n in names}
    else:
        kind = draw(one_kind)
    kinds = set(kind.values()) if isinstance(kind, dict) else {kind}
    ring = 0
    if kinds & set(QUANTIZED) and draw(st.booleans()):  # the fp16 residual ring: block-scaled kinds only
        ring = draw(st.integers(1, 9))
    max_seq_len = tokens + draw(st.integers(0, 8))
    return {"kind": kind, "qblock": draw(st.sampled_from([32, 8, 4, 16, 2, 6, 12, 24])),
            "residual_len": min(ring, max_seq_len),  # a ring longer than the cache is refused (CacheConfig)
            "max_seq_len": max_seq_len,
            "partitions": draw(st.sampled_from([None, 1, 2, 3]))}


# prompt lengths: mostly short, some at or across the kernels' key and query tiles (16, 32 and 64 positions: Metal's
# simdgroups, Triton's decode block_n of 32 / 64 keys and its 64 x 64 prefill tiles)
LENGTHS = st.one_of(st.integers(1, 9), st.sampled_from([16, 17, 33, 64, 65]))


@st.composite
def draws(draw) -> Draw:
    model = draw(st.one_of(caramba_models(), hf_models()))
    rows = draw(st.lists(LENGTHS, min_size=1, max_size=3))
    rollback = st.integers(2, 4).flatmap(
        lambda n: st.lists(st.integers(0, n - 1), min_size=len(rows), max_size=len(rows)).map(lambda d: [n, *d]))
    steps = draw(st.lists(st.one_of(st.just(1), st.integers(2, 4), rollback), min_size=1, max_size=4))
    d = Draw(model=model, seed=draw(st.integers(0, 2 ** 16)), cache={}, rows=rows, steps=steps)
    d.cache = draw(caches(d.names, d.tokens))
    if d.cache["residual_len"]:  # extra ring slots keep windows exact across rollbacks (KVCache's ring_slack)
        d.cache["ring_slack"] = draw(st.integers(0, 3))
    d.options = {"onnx": {"mode": draw(st.sampled_from(["scatter", "concat", "shadow", "contrib"]))},
                 "cuda": {"gemv": draw(st.booleans())}}
    return d


def tags(d: Draw) -> set[str]:
    """What a draw exercises, for the summary's coverage counts."""
    cfg, out = d.model["config"], {d.family}
    if d.family == "caramba":
        out.add(cfg["attention"])
        if cfg["attention"] == "decoupled":
            out.add(f"gate {cfg['gate']}")
    else:
        if cfg.get("sliding_window") and d.family in ("mistral", "gemma2"):
            out.add("sliding window")
        if cfg.get("attn_logit_softcapping") or cfg.get("final_logit_softcapping"):
            out.add("soft cap")
        if cfg.get("partial_rotary_factor", cfg["rope_parameters"].get("partial_rotary_factor", 1.0)) < 1.0:
            out.add("partial rotary")
    kind = d.cache["kind"]
    out |= {f"kind {k}" for k in (kind.values() if isinstance(kind, dict) else [kind])}
    if isinstance(kind, dict):
        out.add("mixed kinds")
    if d.cache["residual_len"]:
        out.add("ring")
        if d.tokens > d.cache["residual_len"] + d.cache.get("ring_slack", 0):
            out.add("ring wraps")
    if len(set(d.rows)) > 1:
        out.add("ragged")
    if 1 in d.rows:
        out.add("a 1-token row")
    if any(not isinstance(s, int) and any(s[1:]) for s in d.steps):
        out.add("rollback")
    if d.tokens > 64:
        out.add("past 64 keys")
    elif d.tokens > 32:
        out.add("past 32 keys")
    elif d.tokens > 16:
        out.add("past 16 keys")
    if d.cache.get("partitions", 1) not in (None, 1):
        out.add("split-K forced")
    return out
