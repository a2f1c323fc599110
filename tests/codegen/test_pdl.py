"""Programmatic dependent launch (jit_helpers): when kernels launch with it, and that every kernel that can be
launched with it waits for the previous kernel before it reads or writes anything.

A kernel launched with launch_pdl=True may start while the previous one still runs; correctness rests on each of
its programs calling gdc_wait before touching what an earlier kernel writes (only the GEMV's first weight tile is
read before, and only for a weight the executor knows is a parameter). The GPU side (bit-identical logits with and without it, 40 replayed steps) is benchmarks/gpu_check.py;
here: the gate (a CUDA GPU of capability >= 9, a Triton that has it, not the interpreter, not switched off) and the
rendered source of every kernel a decode model runs.
"""
from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="target cuda's kernels need triton (pip install triton)")

import caramba  # noqa: E402
from caramba.codegen.triton import jit_helpers, source  # noqa: E402
from caramba.models import Transformer, preset  # noqa: E402
from caramba.runtime.executor import CacheConfig  # noqa: E402

CUDA = torch.device("cuda", 0)


@pytest.fixture
def fake_gpu(monkeypatch):
    """A CUDA GPU of the given capability, outside the interpreter (only the gate is asked, nothing launches)."""
    def install(capability):
        jit_helpers._pdl_supported.cache_clear()
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *_: capability)
        monkeypatch.setattr(source, "interpreting", lambda: False)
    yield install
    jit_helpers._pdl_supported.cache_clear()


def test_on_for_hopper_with_a_triton_that_has_it(fake_gpu):
    fake_gpu((9, 0))
    assert jit_helpers.pdl(CUDA)
    # compiled launches also name FMA fusion (Triton 3.10 turns its default off; the kernels were checked with it)
    assert jit_helpers.launch_kwargs(CUDA) == {"PDL": True, "launch_pdl": True, "enable_fp_fusion": True}
    with jit_helpers.pdl_enabled(False):  # the cuda target option pdl=False
        assert not jit_helpers.pdl(CUDA)
        # no launch_pdl: older Tritons do not know it
        assert jit_helpers.launch_kwargs(CUDA) == {"PDL": False, "enable_fp_fusion": True}
        with jit_helpers.pdl_enabled(True):
            assert jit_helpers.pdl(CUDA)
        assert not jit_helpers.pdl(CUDA)
    assert jit_helpers.pdl(CUDA)


def test_off_before_hopper_on_the_cpu_and_in_the_interpreter(fake_gpu, monkeypatch):
    fake_gpu((8, 0))
    assert not jit_helpers.pdl(CUDA)
    jit_helpers._pdl_supported.cache_clear()
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *_: (9, 0))
    monkeypatch.setattr(source, "interpreting", lambda: True)
    assert not jit_helpers.pdl(CUDA)
    assert jit_helpers.launch_kwargs(torch.device("cpu")) == {"PDL": False}


def test_off_with_a_triton_without_it(fake_gpu, monkeypatch):
    import triton.language.extra.cuda as tl_cuda

    fake_gpu((9, 0))
    monkeypatch.delattr(tl_cuda, "gdc_wait")
    assert not jit_helpers.pdl(CUDA)


def _kernels(path: Path) -> list[ast.FunctionDef]:
    tree = ast.parse(path.read_text())
    return [f for f in tree.body if isinstance(f, ast.FunctionDef)
            and any(a.arg == "PDL" for a in f.args.args)]


def _calls(node: ast.AST) -> list[str]:
    return [ast.unparse(c.func) for c in ast.walk(node) if isinstance(c, ast.Call)]


def _waits(fn: ast.FunctionDef) -> list[ast.If]:
    """The top-level `if PDL...:` statements of a kernel that call gdc_wait."""
    return [s for s in fn.body if isinstance(s, ast.If) and ast.unparse(s.test).startswith("PDL")
            and "tl.extra.cuda.gdc_wait" in _calls(s)]


def _forget_loaded_kernels() -> None:
    """Empty each kernel module's memo of loaded kernels (functools caches defined in the module), so the next
    launch renders and loads its source again."""
    from caramba.codegen.triton import gemv, kv_append, norms, rope, swiglu
    from caramba.codegen.triton.attention import launch

    for mod in (gemv, kv_append, norms, rope, swiglu, launch):
        for obj in vars(mod).values():
            if hasattr(obj, "cache_clear") and getattr(obj, "__module__", None) == mod.__name__:
                obj.cache_clear()


def test_every_kernel_a_decode_step_runs_waits_before_it_touches_memory(tmp_path, monkeypatch):
    """The kernels a DBA model runs (prefill and decode, q8_0 and fp16 caches, one row and three: GEMV, fused norm
    GEMVs, norms, RoPE, the cache append, decode and prefill attention and split-K's combine): each launchable
    kernel takes the PDL constexpr and calls gdc_wait under it before any load, store or atomic; the GEMV alone
    reads its first weight tile (w_ptrs) before its second wait, taken instead of the first when the executor says
    the weight is a parameter (CONST_W), which it does for every product of the model."""
    monkeypatch.setenv("CARAMBA_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(source, "_LOADED", {})  # render and write every kernel again, into tmp_path ...
    _forget_loaded_kernels()  # ... also those an earlier test in this worker already holds
    torch.manual_seed(0)
    model = Transformer(preset("tiny", attention="decoupled", n_layers=1)).eval()
    cm = caramba.compile(model, target="cuda")
    for kind, batch, partitions in (("q8_0", 1, 3), ("fp16", 3, None)):
        ex = cm.executor(CacheConfig.of(cm.cache_layout, kind, max_seq_len=16), partitions=partitions)
        cache = ex.new_cache(batch)
        ids = torch.randint(0, 256, (batch, 6))
        ex.forward(ids[:, :5], torch.arange(5)[None].expand(batch, -1), cache)
        ex.forward(ids[:, 5:], torch.full((batch, 1), 5), cache)
        ex.check()
        products = [st for st in ex._decode._steps if st.node.op.endswith("linear")]
        assert len(products) >= 4 and all(st.impl.keywords == {"constant_weight": True} for st in products)
    files = sorted((tmp_path / "triton").glob("*.py"))
    kernels = {f.name: _kernels(f) for f in files}
    assert {name.split("_")[0] for name in kernels} >= {"gemv", "rope", "kv", "decode", "prefill"}
    assert all(kernels.values()), f"kernel files without a PDL kernel: {[n for n, k in kernels.items() if not k]}"
    names = set()
    for name, defs in kernels.items():
        for fn in defs:
            names.add(fn.name)
            waits = _waits(fn)
            assert waits, f"{name}:{fn.name} never waits"
            gemv = fn.name.startswith("gemv")
            assert len(waits) == (2 if gemv else 1), f"{name}:{fn.name}: {len(waits)} waits"
            for stmt in fn.body[:fn.body.index(waits[-1])]:
                touched = [c for c in _calls(stmt) if c in ("tl.load", "tl.store", "tl.atomic_add")]
                if not touched:
                    continue
                assert fn.body.index(stmt) > fn.body.index(waits[0]) and gemv and "w_ptrs" in ast.unparse(stmt), \
                    f"{name}:{fn.name} accesses memory before gdc_wait: {ast.unparse(stmt)[:120]}"
            if gemv:
                assert [ast.unparse(w.test) for w in waits] == ["PDL and (not CONST_W)", "PDL and CONST_W"]
    assert {"decode_combine", "decode_partial", "prefill", "kv_append", "rope"} <= names
    assert {"gemv_add_rms_norm", "gemv_swiglu"} <= names
