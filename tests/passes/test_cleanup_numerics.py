"""The cleanup passes on real captured graphs: valid IR, the same numbers, and the rewrites real models need."""
from __future__ import annotations

import pytest
import torch

from caramba.codegen import backend as targets
from caramba.ir import Interpreter
from caramba.passes import PassManager, pipeline_for
from caramba.passes.canonicalize import canonicalize
from caramba.passes.cse import cse
from caramba.passes.dce import dce
from caramba.passes.fold_constants import fold_constants
from caramba.passes.manager import Pass
from tests.helpers import hf_logits
from tests.passes.captured import MODELS, captured, example_ids

PASSES = {"canonicalize": canonicalize, "fold_constants": fold_constants, "cse": cse, "dce": dce}


def _run(graph, ids):
    with torch.no_grad():
        return Interpreter(graph, check_types=True).run(ids)[0]


@pytest.mark.parametrize("name", MODELS)
def test_each_cleanup_pass_keeps_numerics(name):
    graph, _ = captured(name)
    ids = example_ids(graph)
    ref = _run(graph, ids)
    for pass_name, fn in PASSES.items():
        result = PassManager([Pass(pass_name, fn)], verify_each=True).run(graph)
        assert torch.equal(_run(result.graph, ids), ref), f"{pass_name} changed the numbers of {name}"


@pytest.mark.parametrize("name", MODELS)
def test_pipeline_matches_eager(name):
    graph, model = captured(name)
    result = PassManager(pipeline_for(targets.get("eager").needs), verify_each=True).run(graph)
    assert len(result.graph.nodes) < len(graph.nodes)
    for batch, seq in [(1, 1), (3, 11)]:
        ids = example_ids(graph, batch, seq)
        want = hf_logits(model, ids) if not name.startswith("tiny") else model(ids)
        torch.testing.assert_close(_run(result.graph, ids), want.detach(), rtol=1e-5, atol=1e-5)


def test_real_graphs_get_the_expected_rewrites():
    llama, _ = captured("llama")
    counts = {r.name: r.counts for r in PassManager(pipeline_for(targets.get("eager").needs)).run(llama).records[1:4]}  # Phase 1
    # HF Llama: `position_ids + 0`, `cos * attention_scaling (1.0)`, a view to the same shape, an all-true mask
    # factor, the unused original_inv_freq buffer, and per-layer duplicates of the position arange
    assert counts["canonicalize"]["add_zero"] == 3 and counts["canonicalize"]["mul_one"] == 2
    assert counts["fold_constants"] == {"identities": 1}
    assert counts["dce"]["params"] == 1
    assert PassManager([Pass("cse", cse)]).run(llama).records[1].counts["nodes"] >= 2
    tiny, _ = captured("tiny-decoupled")
    result = PassManager([Pass("cse", cse)]).run(tiny)
    # the per-layer RoPE table unsqueezes and the two layers' causal masks are shared
    assert result.records[1].counts["nodes"] == 8
    assert result.graph.op_counts()["triu"] == 1
