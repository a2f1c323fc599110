"""torch.export capture with dynamic batch and sequence, checked against eager."""

import pytest
import torch

from caramba.models import Transformer, preset

DYNAMIC = {"input_ids": {0: torch.export.Dim("batch", max=1024), 1: torch.export.Dim("seq", max=4096)}}

# Together these cover every attention mode, gate option, norm and MLP.
CASES = [
    dict(attention="standard"),
    dict(attention="gqa", norm="layer", mlp="gelu", tie_embeddings=True),
    dict(attention="decoupled", gate="off", mlp="gelu", causal=False),
    dict(attention="decoupled", gate="static", learned_temp=True, norm="layer", bias=True),
    dict(attention="decoupled", gate="dynamic", n_kv_heads=2),
]


@pytest.mark.parametrize("overrides", CASES, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_export_dynamic_batch_and_seq(overrides):
    torch.manual_seed(0)
    model = Transformer(preset("tiny", **overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():  # nonzero gates and temperatures too
            p.add_(torch.randn_like(p) * 0.05)
    program = torch.export.export(model, (torch.randint(0, 256, (2, 5)),), dynamic_shapes=DYNAMIC, strict=False)
    # Parameter names survive capture: they become the weight names of the IR.
    targets = {spec.target for spec in program.graph_signature.input_specs if spec.target}
    assert set(model.state_dict()) | {"rotary.inv_freq"} == targets
    exported = program.module()
    for shape in [(2, 5), (3, 9), (1, 1)]:
        ids = torch.randint(0, 256, shape)
        with torch.no_grad():
            torch.testing.assert_close(exported(ids), model(ids), atol=1e-6, rtol=1e-6)

