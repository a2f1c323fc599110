"""target "onnx": the cached graph as one ONNX model run by ONNX Runtime, against the interpreter (target "eager")
at every step: prefill, ragged rows, decode and multi-token steps, for every attention mode, cache kind and runner
mode (concat, scatter, shadow, contrib: com.microsoft GroupQueryAttention); the "optimum" export layout with a
left-padded batch under attention_mask; greedy generation through the public API; the checker; refusals."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("onnxruntime")

import caramba
from caramba.codegen import backend as targets
from caramba.codegen.onnx.model import build_model, check
from caramba.errors import UnsupportedOpError
from caramba.models import Transformer, preset
from caramba.compiler import lower
from caramba.runtime.executor import CacheConfig, build_executor, vocab_size_of
from caramba.runtime.kernel_executor import InterpreterExecutor
from tests.helpers import hf_model, rel_err

MODES = ("decoupled", "standard", "gqa")
RUNNER_MODES = ("concat", "scatter", "shadow", "contrib")
_COMPILED: dict = {}


def compiled(attention: str, dtype: str = "fp32"):
    key = (attention, dtype)
    if key not in _COMPILED:
        torch.manual_seed(0)
        model = Transformer(preset("tiny", attention=attention)).eval()
        _COMPILED[key] = caramba.compile(model, target="onnx", dtype=dtype)
    return _COMPILED[key]


def pair(cm, kind: str, mode: str, max_seq_len: int = 48):
    program = lower(cm, CacheConfig.of(cm.cache_layout, kind, max_seq_len=max_seq_len))
    vocab = vocab_size_of(cm.graph)
    return InterpreterExecutor(program, vocab), OnnxExecutor(program, vocab, mode=mode)


def steps(vocab: int = 256, seed: int = 0):
    """A ragged prefill (rows of 6 and 3 real tokens), then decode steps of one and of two tokens."""
    g = torch.Generator().manual_seed(seed)
    yield torch.randint(0, vocab, (2, 6), generator=g), [6, 3]
    for i in range(7):
        yield torch.randint(0, vocab, (2, 1 + (i % 3 == 2)), generator=g), None


def run_both(ref, ex, tol: float) -> None:
    c_ref, c_ex = ref.new_cache(2), ex.new_cache(2)
    for i, (ids, keep) in enumerate(steps(ref.vocab_size)):
        start = torch.tensor(c_ref.lengths(0))[:, None]
        pos = start + torch.arange(ids.shape[1])
        want, got = ref.forward(ids, pos, c_ref), ex.forward(ids, pos, c_ex)
        assert got.shape == want.shape
        err = rel_err(got, want)
        assert err <= tol, f"step {i}: relative error {err:.2e} > {tol:.0e}"
        if keep is not None:
            c_ref.truncate_rows(keep)
            c_ex.truncate_rows(keep)
        assert c_ex.lengths(0) == c_ref.lengths(0)
    return c_ref, c_ex


@pytest.mark.parametrize("mode", RUNNER_MODES)
@pytest.mark.parametrize("attention", MODES)
def test_fp32_cache_logits_match_the_interpreter_at_every_step(attention, mode):
    ref, ex = pair(compiled(attention), "fp32", mode)
    c_ref, c_ex = run_both(ref, ex, 1e-4)
    for name in c_ref.spec.names:  # the cache the ORT session wrote holds the same values
        n = c_ref.max_length
        assert torch.allclose(c_ex.view(1, name).codes[:, :n], c_ref.view(1, name).codes[:, :n],
                              rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["q8_0", "q4_0", "nf4", "fp16"])
@pytest.mark.parametrize("attention", MODES)
def test_quantized_and_fp16_caches_match_the_interpreters_reference(attention, kind):
    for mode in RUNNER_MODES:
        ref, ex = pair(compiled(attention), kind, mode)
        c_ref, c_ex = run_both(ref, ex, 1e-4)
        if kind == "fp16":
            continue  # fp16 storage of values that differ in the last fp32 bits may round one ulp apart
        for layer in range(c_ref.spec.n_layers):
            for name in c_ref.spec.names:
                a, b = c_ref.view(layer, name), c_ex.view(layer, name)
                for row, n in enumerate(c_ref.lengths(layer)):
                    codes_differ = (a.codes[row, :n].int() != b.codes[row, :n].int()).float().mean().item()
                    assert codes_differ < 1e-3, f"{mode} {name} layer {layer}: {codes_differ:.1%} of codes differ"
                    assert torch.allclose(a.scales[row, :n].float(), b.scales[row, :n].float(), rtol=1e-3)


@pytest.mark.parametrize("mode", ["scatter", "shadow", "contrib"])
def test_fp16_compute_matches_the_interpreter(mode):
    ref, ex = pair(compiled("decoupled", "fp16"), "fp16", mode)
    run_both(ref, ex, 2e-2)


@pytest.mark.parametrize("attention", MODES)
def test_a_compiled_model_call_runs_onnx_runtime_and_equals_eager(attention):
    """cm(ids) on target onnx runs the ids through an ONNX Runtime session (an fp32 cache for an fp32 model), not
    the reference interpreter; the logits equal eager's, for two lengths sharing one lowered program."""
    cm = compiled(attention)
    eager = caramba.compile(_tiny_model(attention), target="eager")  # the same weights as compiled()
    for seq in (5, 11):
        ids = torch.randint(0, 256, (2, seq), generator=torch.Generator().manual_seed(seq))
        want, got = eager(ids), cm(ids)
        assert rel_err(got, want) < 1e-5
    runner = cm.executor(cm._stateless_config(11)).runner  # the executor the calls used (kept per config)
    assert type(runner).__name__ == "OnnxRunner" and runner.session is not None


def _tiny_model(attention: str):
    torch.manual_seed(0)
    return Transformer(preset("tiny", attention=attention)).eval()


def test_every_built_model_passes_the_full_checker():
    cm = compiled("decoupled")
    program = lower(cm, CacheConfig.of(cm.cache_layout, {"k_sem": "q8_0", "k_geo": "q4_0", "v": "fp16"},
                                       max_seq_len=48))
    for mode in RUNNER_MODES:
        model = build_model(program.prefill, program.layout, program.config.kind_map, max_seq_len=48, mode=mode)
        check(model.proto)
        names = [i.name for i in model.proto.graph.input]
        assert names[:3] == ["input_ids", "position_ids", "past_key_values.0.key_sem"]
        assert "past_key_values.0.key_sem_scales" in names and "past_key_values.1.value" in names
        assert [o.name for o in model.proto.graph.output][:2] == ["logits", "present.0.key_sem"]
        assert ("past_attention.1.key" in names) == (mode in ("shadow", "contrib"))
        ops = {n.op_type for n in model.proto.graph.node}
        assert {"DequantizeLinear", "RMSNormalization", "MatMul"} <= ops
        assert ("TensorScatter" in ops) == (mode != "concat")
        assert ("GroupQueryAttention" in ops) == (mode == "contrib")
        assert ("Attention" in ops) == (mode != "contrib")


def greedy(cm, prompt, n: int = 32):
    config = caramba.GenerateConfig(max_new_tokens=n, cache_kind="fp32", temperature=0, max_seq_len=64)
    return caramba.Generator(cm, config).generate(prompt)


HF = [("llama", {}), ("mistral", {"sliding_window": None}), ("qwen2", {})]  # the cache needs plain causal masks


@pytest.mark.parametrize("family, overrides", HF, ids=[f for f, _ in HF])
def test_transformers_models_match_the_interpreter_and_generate_the_same_tokens(family, overrides):
    model = hf_model(family, **overrides)
    cm = caramba.compile(model, target="onnx", dtype="fp32")
    for mode in ("concat", "scatter"):
        run_both(*pair(cm, "fp32", mode), 1e-4)
    prompt = [[5, 17, 3, 88, 41], [9, 2]]
    assert torch.equal(greedy(cm, prompt), greedy(caramba.compile(model, target="eager", dtype="fp32"), prompt))


def test_torch_onnx_export_is_a_second_oracle():
    """Llama through torch.onnx.export (dynamo) and ORT gives the logits our model gives at prefill."""
    pytest.importorskip("onnxscript")
    import onnxruntime as ort

    model = hf_model("llama")

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, ids):
            return self.m(input_ids=ids, use_cache=False).logits

    ids = torch.tensor([[5, 17, 3, 88, 41, 7, 60]])
    oracle = torch.onnx.export(Logits(), (ids,), dynamo=True,
                               dynamic_shapes={"ids": {1: torch.export.Dim("seq", max=128)}})
    sess = ort.InferenceSession(oracle.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    want = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: ids.numpy()})[0])
    _, ex = pair(caramba.compile(model, target="onnx", dtype="fp32"), "fp32", "concat")
    got = ex.forward(ids, torch.arange(ids.shape[1])[None], ex.new_cache(1))
    assert rel_err(got, want) <= 1e-4


@pytest.mark.parametrize("attention", MODES)
def test_greedy_tokens_equal_eager_for_every_attention_mode(attention):
    torch.manual_seed(0)
    model = Transformer(preset("tiny", attention=attention)).eval()
    prompt = [[1, 2, 3, 4, 5, 6, 7]]
    assert torch.equal(greedy(caramba.compile(model, target="onnx"), prompt),
                       greedy(caramba.compile(model, target="eager"), prompt))


@pytest.mark.parametrize("mode", RUNNER_MODES)
def test_a_cache_moves_between_targets(mode):
    """Prefill on the interpreter, decode on ORT with the same KVCache (one layout for every target)."""
    ref, ex = pair(compiled("decoupled"), "q8_0", mode)
    cache, shadow = ref.new_cache(1), ref.new_cache(1)
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    pos = torch.arange(5)[None]
    ref.forward(ids, pos, cache)
    ref.forward(ids, pos, shadow)
    step, at = torch.tensor([[9]]), torch.tensor([[5]])
    assert rel_err(ex.forward(step, at, cache), ref.forward(step, at, shadow)) <= 1e-4


@pytest.mark.parametrize("mode", ["concat", "shadow", "contrib"])
def test_rollback_then_decode_resyncs_the_runners_buffers(mode):
    ref, ex = pair(compiled("standard"), "q4_0", mode)
    c_ref, c_ex = ref.new_cache(1), ex.new_cache(1)
    ids, pos = torch.arange(10, 18)[None], torch.arange(8)[None]
    ref.forward(ids, pos, c_ref)
    ex.forward(ids, pos, c_ex)
    c_ref.rollback(3)
    c_ex.rollback(3)
    step, at = torch.tensor([[7]]), torch.tensor([[5]])
    assert rel_err(ex.forward(step, at, c_ex), ref.forward(step, at, c_ref)) <= 1e-4


def test_refusals_name_the_fix():
    cm = compiled("standard")
    layout = cm.cache_layout
    with pytest.raises(UnsupportedOpError, match="residual ring.*cache_residual_len=0"):
        caramba.Generator(cm, caramba.GenerateConfig(cache_kind="q8_0", cache_residual_len=8, max_seq_len=32,
                                                     max_new_tokens=2)).generate([[1, 2]])
    with pytest.raises(UnsupportedOpError, match="bf16"):
        cm.executor(CacheConfig.of(layout, "bf16", max_seq_len=32))
    program = lower(cm, CacheConfig.of(layout, "fp32", max_seq_len=32))
    with pytest.raises(ValueError, match="TensorScatter, which is opset 24"):
        build_model(program.prefill, layout, program.config.kind_map, max_seq_len=32, mode="scatter", opset=23)
    with pytest.raises(ValueError, match="mode must be one of"):
        OnnxExecutor(program, 256, mode="inplace")
    with pytest.raises(ValueError, match="GroupQueryAttention.*mode='scatter'"):
        OnnxExecutor(program, 256, mode="scatter", ort_contrib=True)
    with pytest.raises(ValueError, match="optimum.*'concat'"):
        build_model(program.prefill, layout, program.config.kind_map, max_seq_len=32, mode="shadow",
                    cache_layout="optimum")


def test_ort_contrib_opts_into_group_query_attention_and_grows_its_buffers():
    """ort_contrib=True is mode contrib; the attention buffers start at one capacity step and grow past it."""
    from caramba.codegen.onnx.cache import CAPACITY_STEP

    cm = compiled("gqa")
    program = lower(cm, CacheConfig.of(cm.cache_layout, "fp16", max_seq_len=CAPACITY_STEP + 40))
    ex, ref = OnnxExecutor(program, 256, ort_contrib=True), InterpreterExecutor(program, 256)
    assert ex.mode == "contrib"
    c_ex, c_ref = ex.new_cache(1), ref.new_cache(1)
    ids = torch.randint(0, 256, (1, CAPACITY_STEP - 1), generator=torch.Generator().manual_seed(3))
    pos = torch.arange(ids.shape[1])[None]
    assert rel_err(ex.forward(ids, pos, c_ex), ref.forward(ids, pos, c_ref)) <= 1e-4
    assert ex._attn.capacity == CAPACITY_STEP
    for p in range(CAPACITY_STEP - 1, CAPACITY_STEP + 2):
        step, at = torch.tensor([[p % 256]]), torch.tensor([[p]])
        assert rel_err(ex.forward(step, at, c_ex), ref.forward(step, at, c_ref)) <= 1e-4
    assert ex._attn.capacity == CAPACITY_STEP + 40  # the next step, capped at max_seq_len


def optimum_session(attention: str, kind):
    from caramba.codegen.onnx.runner import make_session

    cm = compiled(attention)
    program = lower(cm, CacheConfig.of(cm.cache_layout, kind, max_seq_len=48))
    model = build_model(program.prefill, program.layout, program.config.kind_map, max_seq_len=48,
                        cache_layout="optimum")
    check(model.proto)
    return program, make_session(model, 1)


OPTIMUM_KINDS = [("decoupled", "fp32"), ("decoupled", {"k_sem": "fp16", "k_geo": "q4_0", "v": "q8_0"}),
                 ("gqa", "fp16"), ("standard", {"k": "q8_0", "v": "fp32"})]


@pytest.mark.parametrize("attention, kind", OPTIMUM_KINDS, ids=[f"{a}-{k}" for a, k in OPTIMUM_KINDS])
def test_optimum_layout_honours_attention_mask_on_a_left_padded_batch(attention, kind):
    """Head-major float caches, attention_mask (batch, past + seq): a left-padded batch, then decode steps, gives
    each row's logits as the interpreter gives them for that row alone (padding masked, not just ignored)."""
    import numpy as np

    numpy = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int8)": np.int8,
             "tensor(uint8)": np.uint8}
    program, sess = optimum_session(attention, kind)
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (6, 3)]
    width = max(map(len, rows))
    ids, mask, pos = (np.full((2, width), 99, np.int64), np.zeros((2, width), np.int64),
                      np.zeros((2, width), np.int64))
    for b, r in enumerate(rows):
        ids[b, width - len(r):], mask[b, width - len(r):], pos[b, width - len(r):] = r, 1, range(len(r))
    caches = {i.name: i for i in sess.get_inputs() if i.name.startswith("past_key_values.")}
    feed = {n: np.zeros([2 if d == "batch_size" else 0 if isinstance(d, str) else d for d in i.shape],
                        numpy[i.type]) for n, i in caches.items()}
    names = [o.name for o in sess.get_outputs()]
    steps, tokens = [], [[7, 11], [8, 12], [9, 13]]
    for i in range(len(tokens) + 1):
        out = dict(zip(names, sess.run(None, {"input_ids": ids, "attention_mask": mask, "position_ids": pos,
                                              **feed})))
        steps.append(torch.from_numpy(out["logits"]).float())
        if i == len(tokens):
            break
        feed = {n: out[n.replace("past_key_values.", "present.")] for n in caches}
        ids, pos = np.array(tokens[i])[:, None], pos[:, -1:] + 1
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
    for name, info in caches.items():  # float caches head-major, block kinds in caramba's layout
        assert len(info.shape) == (3 if out[name.replace("past_key_values.", "present.")].dtype in
                                   (np.int8, np.uint8) or name.endswith("_scales") else 4)
    ref = InterpreterExecutor(program, 256)
    for b, r in enumerate(rows):
        cache = ref.new_cache(1)
        want = ref.forward(torch.tensor([r]), torch.arange(len(r))[None], cache)[0]
        assert rel_err(steps[0][b, width - len(r):], want) <= 1e-4
        for i, toks in enumerate(tokens):
            want = ref.forward(torch.tensor([[toks[b]]]), torch.tensor([[len(r) + i]]), cache)[0]
            assert rel_err(steps[i + 1][b], want) <= 1e-4, f"row {b}, decode step {i}"


def test_auto_picks_onnx_without_a_gpu(monkeypatch):
    from caramba.compiler import resolve_target

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_target("auto") == "onnx"


# -- rope -> RotaryEmbedding ---------------------------------------------------------------------------------------
def _rope_count(graph) -> int:
    return sum(n.op == "rope" for n in graph.nodes)


@pytest.mark.parametrize("layout", ["caramba", "optimum"])
@pytest.mark.parametrize("attention", MODES)
def test_every_attention_family_exports_standard_rotary_embedding(attention, layout):
    """Each rope of the cached graph is one RotaryEmbedding (opset 23, half-width caches, position_ids), none is
    spelled out (no Neg), the full-width tables are gone, and the model passes the full checker."""
    cm = compiled(attention)
    program = lower(cm, CacheConfig.of(cm.cache_layout, "fp16", max_seq_len=48))
    for mode in RUNNER_MODES if layout == "caramba" else ("concat",):
        om = build_model(program.prefill, program.layout, program.config.kind_map, max_seq_len=48, mode=mode,
                         cache_layout=layout)
        check(om.proto)
        nodes = om.proto.graph.node
        rotary = [n for n in nodes if n.op_type == "RotaryEmbedding"]
        assert len(rotary) == _rope_count(program.prefill) == 2 * program.layout.n_layers
        assert not any(n.op_type == "Neg" for n in nodes)
        assert all(n.domain == "" and list(n.input)[3] == "position_ids" for n in rotary)
        assert om.proto.opset_import[0].version >= 23
        shapes = {i.name: tuple(i.dims) for i in om.proto.graph.initializer}
        r = {a.name: a.i for a in rotary[0].attribute}["rotary_embedding_dim"]
        assert shapes[rotary[0].input[1]] == shapes[rotary[0].input[2]] == (cm.max_positions, r // 2)
        assert (cm.max_positions, r) not in shapes.values()  # the full-width tables were pruned


@pytest.mark.parametrize("family, overrides", HF, ids=[f for f, _ in HF])
def test_transformers_models_export_standard_rotary_embedding(family, overrides):
    cm = caramba.compile(hf_model(family, **overrides), target="onnx", dtype="fp32")
    program = lower(cm, CacheConfig.of(cm.cache_layout, "fp32", max_seq_len=48))
    om = build_model(program.prefill, program.layout, program.config.kind_map, max_seq_len=48,
                     cache_layout="optimum")
    check(om.proto)
    ops = [n.op_type for n in om.proto.graph.node]
    assert ops.count("RotaryEmbedding") == _rope_count(program.prefill) == 4 and "Neg" not in ops


def _rope_graph(x_dtype: str, angles: torch.Tensor, d: int, r: int, interleaved: bool,
                table_dtype: torch.dtype = torch.float32, table_input: bool = False):
    """position_ids -> cos/sin rows of (N, r) tables -> rope(x (batch, 3, seq, d)), as insert_kv_cache builds it
    (embedding of the reshaped constant, reshape, unsqueeze). The tables are computed in fp32 and rounded to
    table_dtype, as fold_tables stores them; table_input: they are graph inputs instead of constants."""
    from caramba.ir import symbolic
    from caramba.ir.graph import Graph
    from caramba.ir.registry import get_op
    from caramba.ir.types import DType, TensorType

    g = Graph("rope")
    g.add_symbol("batch", 1, 8)
    g.add_symbol("seq", 1, 64)
    bsz, seq, n_pos = symbolic.symbol("batch"), symbolic.symbol("seq"), angles.shape[0]
    x = g.add_input("x", TensorType((bsz, 3, seq, d), DType(x_dtype)))
    pos = g.add_input("position_ids", TensorType((bsz, seq), DType.i64))

    def node(op, inputs, **attrs):
        attrs = get_op(op).full_attrs(attrs)
        return g.add_node(op, inputs, get_op(op).infer([v.type for v in inputs], attrs), attrs).outputs[0]

    tabs = []
    for i, t in enumerate((angles.cos(), angles.sin())):
        t = t.to(table_dtype)[None]
        ttype = TensorType((1, n_pos, r), DType.from_torch(table_dtype))
        src = g.add_input(f"table{i}", ttype) if table_input else g.add_param(f"const.{i}", ttype, t)
        flat = node("reshape", [src], shape=(n_pos, r))
        rows = node("reshape", [node("embedding", [flat, pos])], shape=(bsz, seq, r))
        tabs.append(node("unsqueeze", [rows], dim=1))
    g.outputs = [node("rope", [x, *tabs], rotary_dim=r, interleaved=interleaved)]
    return g


def _run_rope_graph(g, feeds: dict):
    """Lower g's nodes as build_model does and run the model in ONNX Runtime; returns (output, op types)."""
    import onnxruntime as ort

    from caramba.codegen.onnx.emit import Builder
    from caramba.codegen.onnx.ops import OPS, Lowering
    from caramba.ir.graph import Node
    from caramba.ir.registry import get_op

    b = Builder(23)
    lw = Lowering(b, lambda v: None, g)
    for v in g.inputs:
        lw.names[v] = b.add_input(v.name, v.type.dtype, [str(d) for d in v.type.shape])
    b.bind_dim("batch", b.op("Shape", ["position_ids"], start=0, end=1))
    b.bind_dim("seq", b.op("Shape", ["position_ids"], start=1, end=2))
    for name, v in g.params.items():
        lw.names[v] = b.initializer(name, g.weights[name])
    for n in g.nodes:
        n = Node(n.op, n.inputs, n.outputs, get_op(n.op).full_attrs(n.attrs), n.loc)
        for v, out in zip(n.outputs, OPS[n.op](lw, n)):
            lw.names[v] = out
    y = g.outputs[0]
    b.add_output(lw[y], "y", y.type.dtype, [str(d) for d in y.type.shape])
    model = b.model("rope")
    check(model)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    out = sess.run(None, {k: v.numpy() for k, v in feeds.items() if k in names})[0]
    return torch.from_numpy(out), [n.op_type for n in model.graph.node]


def _angles(n_pos: int, r: int, interleaved: bool, distinct: bool = False) -> torch.Tensor:
    """(n_pos, r) fp32 angles as RoPE tables repeat them (halves, or each angle twice); distinct: no repetition."""
    inv = 1.0 / (10000 ** (torch.arange(0, r, 2, dtype=torch.float32) / r))
    f = torch.arange(n_pos, dtype=torch.float32)[:, None] * inv
    if distinct:
        return torch.cat((f, f * 1.5), dim=-1)
    return torch.repeat_interleave(f, 2, dim=-1) if interleaved else torch.cat((f, f), dim=-1)


ROPE_CASES = [  # x dtype, table dtype, head dim, rotary dim, interleaved
    ("f32", torch.float32, 16, 16, False), ("f32", torch.float32, 16, 16, True),
    ("f32", torch.float32, 24, 16, False), ("f32", torch.float32, 24, 8, True),
    ("f16", torch.float16, 16, 16, False), ("f16", torch.float16, 12, 8, True),
    ("f16", torch.float32, 16, 16, False),  # promoted: computed in fp32 from fp16 x and fp32 tables
]


def _run_and_interpret(g, x_dtype: str, d: int, table_feeds: bool = False):
    from caramba.ir.interpreter import interpret
    from caramba.ir.types import DType

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, d, generator=gen).to(DType(x_dtype).torch)
    pos = torch.tensor([[0, 1, 2, 3, 4], [17, 18, 19, 20, 39]])  # ragged rows, up to the last table row
    feeds = {"x": x, "position_ids": pos}
    extra = []
    if table_feeds:
        extra = [g.inputs[2].name, g.inputs[3].name]
        feeds.update({n: torch.randn(1, 40, g.inputs[2].type.shape[-1], generator=gen) for n in extra})
    got, ops = _run_rope_graph(g, feeds)
    want = interpret(g, *[feeds[v.name] for v in g.inputs])[0]
    assert got.dtype == want.dtype
    return got, want, ops


@pytest.mark.parametrize("x_dtype, table_dtype, d, r, interleaved", ROPE_CASES)
def test_rope_lowers_to_rotary_embedding_for_every_form_it_can_express(x_dtype, table_dtype, d, r, interleaved):
    """Rotate-half and interleaved, full and partial rotation, fp32 and fp16 (tables rounded as the reference
    rounds them), ragged positions: one RotaryEmbedding, within one ulp of the reference (ops_fused.rope; the op
    rounds once where the reference rounds each product and the sum)."""
    g = _rope_graph(x_dtype, _angles(40, r, interleaved), d, r, interleaved, table_dtype)
    got, want, ops = _run_and_interpret(g, x_dtype, d)
    assert ops.count("RotaryEmbedding") == 1 and "Neg" not in ops and "Gather" not in ops
    ulp = torch.finfo(want.dtype).eps * want.abs().float().clamp_min(1.0)
    assert ((got.float() - want.float()).abs() <= ulp).all()
    if want.dtype == torch.float32:
        assert rel_err(got, want) <= 1e-6


FALLBACKS = {  # what RotaryEmbedding cannot express exactly keeps the basic-op spelling
    "halves differ": {"distinct": True},
    "tables are inputs": {"table_input": True},
}


@pytest.mark.parametrize("case", FALLBACKS)
@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_the_op_cannot_express_keeps_the_basic_op_spelling(case, interleaved):
    kw = FALLBACKS[case]
    g = _rope_graph("f32", _angles(40, 8, interleaved, kw.get("distinct", False)), 12, 8, interleaved,
                    table_input=kw.get("table_input", False))
    got, want, ops = _run_and_interpret(g, "f32", 12, table_feeds=kw.get("table_input", False))
    assert "RotaryEmbedding" not in ops and "Neg" in ops
    assert rel_err(got, want) <= 1e-6


def OnnxExecutor(program, vocab_size, **options):
    """The onnx backend's executor for a lowered program, with its runner options (mode, ort_contrib, ...)."""
    return build_executor(program, targets.get("onnx"), vocab_size, options)
