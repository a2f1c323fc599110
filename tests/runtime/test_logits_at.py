"""Executor.forward(..., logits_at): the logits of one offset per row, (B, 1, V), for a prefill that samples only
there. On every target and attention family (and int8 weights) they equal the full logits gathered at those
offsets, and the cache is the one a full forward leaves; greedy generation is unchanged; a bad logits_at is refused
before any work. On a kernel executor the head runs on B rows, not B·S (position_tail: the LM head and the
position-wise ops before it, gathered where they read from the rest of the graph). Target cuda runs through
Triton's interpreter, metal through its emulator, as the codegen tests do."""
from __future__ import annotations

import dataclasses
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (tests/codegen/conftest.py says why)

import pytest  # noqa: E402
import torch  # noqa: E402

import caramba  # noqa: E402
from caramba.errors import InputError  # noqa: E402
from caramba.ir import symbolic  # noqa: E402
from caramba.ir.graph import Graph  # noqa: E402
from caramba.ir.types import DType, TensorType  # noqa: E402
from caramba.models import Transformer, preset  # noqa: E402
from caramba.runtime import GenerateConfig, Generator  # noqa: E402
from caramba.runtime.executor import CacheConfig  # noqa: E402
from caramba.runtime.position_tail import position_tail  # noqa: E402
from caramba.runtime.recompute import RecomputeExecutor  # noqa: E402
from tests.codegen.conftest import kernel_cache_dir  # noqa: E402,F401  (the session fixture, autouse)

MAX = 32
TARGETS = [("eager", None), ("eager", "int8"), ("onnx", None), ("cuda", None), ("metal", None)]
KERNEL_TARGETS = [("eager", None), ("eager", "int8"), ("cuda", None), ("metal", None)]


@pytest.fixture(scope="module")
def emulated():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CARAMBA_METAL_EMULATE", "1")
        yield mp


@pytest.fixture(scope="module", params=["standard", "gqa", "decoupled"])
def family(request, emulated):
    """(model, compile(target, weights)) for one attention family, each compiled model built once."""
    torch.manual_seed(0)
    extra = {"n_kv_heads": 2} if request.param == "gqa" else {}
    model = Transformer(preset("tiny", attention=request.param, n_layers=2, **extra)).eval()
    built = {}

    def compiled(target: str, weights: str | None = None):
        if (target, weights) not in built:
            if target == "cuda":
                pytest.importorskip("triton")
            kw = {"weights": weights} if weights else {}
            built[target, weights] = caramba.compile(model, target=target, **kw)
        return built[target, weights]
    return model, compiled


def executor(cm):
    return cm.executor(CacheConfig.of(cm.cache_layout, "fp32", max_seq_len=MAX))


def positions(cache, n: int) -> torch.Tensor:
    return torch.tensor(cache.lengths(0))[:, None] + torch.arange(n)


def assert_same_cache(a, b) -> None:
    assert a.lengths(0) == b.lengths(0)
    for layer in range(a.spec.n_layers):
        for name in a.spec.names:
            x, y = a.view(layer, name), b.view(layer, name)
            assert torch.equal(x.codes, y.codes), (layer, name)
            assert (x.scales is None) == (y.scales is None) and (x.scales is None or torch.equal(x.scales, y.scales))


@pytest.mark.parametrize("target, weights", TARGETS)
def test_logits_at_are_the_full_logits_gathered_and_the_cache_is_the_same(family, target, weights):
    """Two prefill chunks (the second from ragged starts) and a decode step, ragged offsets per row."""
    _, compiled = family
    ex = executor(compiled(target, weights))
    ids = torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(1))
    full, picked = ex.new_cache(3), ex.new_cache(3)
    for chunk, at in ((ids[:, :6], [5, 0, 3]), (ids[:, 6:11], [0, 4, 2]), (ids[:, 11:], [0, 0, 0])):
        at = torch.tensor(at)
        want = ex.forward(chunk, positions(full, chunk.shape[1]), full)
        got = ex.forward(chunk, positions(picked, chunk.shape[1]), picked, logits_at=at)
        assert got.shape == (3, 1, 256)
        # a head over B rows instead of B·S may round differently (another GEMM blocking): not a bit more
        torch.testing.assert_close(got, want[torch.arange(3), at][:, None], rtol=1e-5, atol=1e-5)
        assert_same_cache(picked, full)
    full.truncate_rows([8, 11, 10])  # ragged rows from here on: positions start at each row's own length
    picked.truncate_rows([8, 11, 10])
    chunk, at = ids[:, :4], torch.tensor([3, 1, 0])
    want = ex.forward(chunk, positions(full, 4), full)
    got = ex.forward(chunk, positions(picked, 4), picked, logits_at=at)
    torch.testing.assert_close(got, want[torch.arange(3), at][:, None], rtol=1e-5, atol=1e-5)
    assert_same_cache(picked, full)


def reference_greedy(ex, rows: list[list[int]], n: int) -> list[list[int]]:
    """Greedy tokens through `ex` with full logits (the loop before logits_at): a ragged prefill, then decode."""
    cache, width = ex.new_cache(len(rows)), max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    logits = ex.forward(ids, positions(cache, width), cache)
    cache.truncate_rows([len(r) for r in rows])
    last, out = logits[torch.arange(len(rows)), torch.tensor([len(r) for r in rows]) - 1], []
    for _ in range(n):
        tok = last.argmax(-1)
        out.append(tok)
        last = ex.forward(tok[:, None], positions(cache, 1), cache)[:, 0]
    return torch.stack(out, dim=1).tolist()


@pytest.mark.parametrize("target, weights", TARGETS)
def test_greedy_generation_is_unchanged(family, target, weights):
    _, compiled = family
    rows, n = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11]], 6
    want = reference_greedy(executor(compiled("eager", weights)), rows, n)
    config = GenerateConfig(temperature=0, cache_kind="fp32", max_seq_len=MAX, max_new_tokens=n)
    out = Generator(compiled(target, weights), config).generate(rows)
    assert out[:, -n:].tolist() == want


@pytest.mark.parametrize("target", ["eager", "onnx"])
@pytest.mark.parametrize("bad, message", [
    ([2, 0, 1], "logits_at must be a \\(batch=3,\\) integer tensor.*got list"),
    (torch.tensor([2, 0]), "logits_at must be a \\(batch=3,\\) integer tensor.*got torch.int64 \\[2\\]"),
    (torch.tensor([[2, 0, 1]]), "integer tensor.*\\[1, 3\\]"),
    (torch.tensor([2.0, 0.0, 1.0]), "integer tensor.*got torch.float32"),
    (torch.tensor([4, 0, 1]), "offsets must lie in \\[0, 4\\).*\\[4, 0, 1\\]"),
    (torch.tensor([0, -1, 1]), "offsets must lie in \\[0, 4\\).*\\[0, -1, 1\\]"),
])
def test_a_bad_logits_at_is_refused_before_any_work(family, target, bad, message):
    _, compiled = family
    ex = executor(compiled(target))
    cache = ex.new_cache(3)
    with pytest.raises(InputError, match=message):
        ex.forward(torch.ones(3, 4, dtype=torch.long), positions(cache, 4), cache, logits_at=bad)
    assert cache.lengths(0) == (0, 0, 0)
    with pytest.raises(InputError, match="offsets must lie in \\[0, 1\\)"):  # a decode step's only offset is 0
        ex.forward(torch.ones(3, 1, dtype=torch.long), positions(cache, 1), cache, logits_at=torch.ones(3).long())


def spy_on_prefill(ex, monkeypatch) -> dict:
    """Record every prefill node's output shapes (the interpreter's steps, wrapped where they are kept)."""
    seen = {}

    def spy(st):
        def run(*args, **attrs):
            out = st.impl(*args, **attrs)
            seen[st.node] = [tuple(x.shape) for x in (out if isinstance(out, tuple) else (out,))]
            return out
        return dataclasses.replace(st, impl=run)
    monkeypatch.setattr(ex._prefill, "_steps", [spy(st) for st in ex._prefill._steps])  # the executor is kept
    return seen


@pytest.mark.parametrize("target, weights", KERNEL_TARGETS)
def test_a_kernel_executor_runs_the_head_on_one_row_per_sequence(family, target, weights, monkeypatch):
    """Behaviour, not timing: with logits_at the node that makes the logits (and every node of the position
    tail: the last layer's MLP and the final norm with it) produces B rows; attention and the cache appends still
    see all B·S positions. Without logits_at the head makes B·S rows."""
    _, compiled = family
    ex = executor(compiled(target, weights))
    g = ex._prefill.graph
    tail = position_tail(g)
    head = next(n for n in g.nodes if g.outputs[0] in n.outputs)
    assert head in tail and any("linear" in n.op for n in tail)
    assert not any(n.op.startswith(("cached_", "kv_")) for n in tail)
    seen = spy_on_prefill(ex, monkeypatch)
    ids = torch.randint(0, 256, (3, 7), generator=torch.Generator().manual_seed(2))
    ex.forward(ids, torch.arange(7).repeat(3, 1), ex.new_cache(3))
    assert seen[head][-1] == (3, 7, 256)
    ex.forward(ids, torch.arange(7).repeat(3, 1), ex.new_cache(3), logits_at=torch.tensor([6, 0, 3]))
    assert seen[head][-1] == (3, 1, 256)
    for node in tail:
        assert all(shape[:2] == (3, 1) for shape in seen[node]), node.op
    attention = [n for n in g.nodes if n.op.startswith("cached_")]
    assert attention and all(seen[n][0][2] == 7 for n in attention)  # (B, H, S, d): every query position


def test_recompute_executor_takes_logits_at():
    """The no-cache fallback runs the whole conversation anyway: it reads back one position per row."""
    torch.manual_seed(0)
    model = Transformer(preset("tiny", n_layers=1)).eval()
    cm = caramba.compile(model, target="eager")
    with torch.no_grad():
        ex = RecomputeExecutor(model, cm.graph, vocab_size=256, max_seq_len=MAX, dtype=DType.f32, device="cpu")
        ids = torch.randint(0, 256, (3, 5), generator=torch.Generator().manual_seed(3))
        full, picked = ex.new_cache(3), ex.new_cache(3)
        at = torch.tensor([4, 0, 2])
        want = ex.forward(ids, positions(full, 5), full)
        got = ex.forward(ids, positions(picked, 5), picked, logits_at=at)
    assert torch.equal(got, want[torch.arange(3), at][:, None])
    assert picked.lengths() == full.lengths() and torch.equal(picked.ids, full.ids)
    with pytest.raises(InputError, match="offsets must lie in"):
        ex.forward(ids, positions(picked, 5), picked, logits_at=torch.tensor([5, 0, 0]))


# -- which nodes the tail takes --------------------------------------------------------------------------------------
def tail_graph(extra_output: bool = False, reshape: bool = False) -> tuple[Graph, dict]:
    """embedding -> cumsum over seq (mixes positions) -> add_rms_norm(x, mixed) -> [reshape] -> linear -> a tanh
    soft cap (div, tanh, mul by scalars); optionally the residual sum is a graph output too."""
    b, s = symbolic.symbol("batch"), symbolic.symbol("seq")
    g = Graph()
    g.add_symbol("batch", 1, 8)
    g.add_symbol("seq", 1, 64)

    def t(*shape, dtype=DType.f32):
        return TensorType(tuple(shape), dtype)
    ids = g.add_input("input_ids", t(b, s, dtype=DType.i64))
    x = g.add_node("embedding", [g.add_param("embed", t(16, 8)), ids], [t(b, s, 8)]).output
    mixed = g.add_node("cumsum", [x], [t(b, s, 8)], {"dim": 1})
    norm = g.add_node("add_rms_norm", [x, mixed.output, g.add_param("nw", t(8))], [t(b, s, 8), t(b, s, 8)],
                      {"eps": 1e-5})
    h = norm.outputs[1]
    if reshape:
        h = g.add_node("reshape", [h], [t(b, s, 8)], {"shape": (b, s, 8)}).output
    head = g.add_node("linear", [h, g.add_param("head", t(16, 8))], [t(b, s, 16)])
    div = g.add_node("div", [head.output], [t(b, s, 16)], {"scalar": 30.0})
    tanh = g.add_node("tanh", [div.output], [t(b, s, 16)])
    cap = g.add_node("mul", [tanh.output], [t(b, s, 16)], {"scalar": 30.0})
    g.outputs = [cap.output] + ([norm.outputs[0]] if extra_output else [])
    return g, {"mixed": mixed, "norm": norm, "head": head, "div": div, "tanh": tanh, "cap": cap}


def test_position_tail_stops_at_what_mixes_positions_or_is_read_elsewhere():
    g, n = tail_graph()
    # the fused residual add joins (both its outputs stay in the tail): it gathers x and the cumsum's output
    assert position_tail(g) == {n["norm"]: (0, 1), n["head"]: (), n["div"]: (), n["tanh"]: (), n["cap"]: ()}
    g, n = tail_graph(extra_output=True)  # the residual sum is read outside the tail: the head gathers instead
    assert position_tail(g) == {n["head"]: (0,), n["div"]: (), n["tanh"]: (), n["cap"]: ()}
    g, n = tail_graph(reshape=True)  # a reshape to (batch, seq, 8) names seq: it ends the tail
    assert position_tail(g) == {n["head"]: (0,), n["div"]: (), n["tanh"]: (), n["cap"]: ()}
