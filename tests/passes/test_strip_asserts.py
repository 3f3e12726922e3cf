"""strip_asserts: the tensor-metadata checks torch.export adds are dropped, nothing else."""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

from helpers import golden, graph_code
from unit_scale_fx.capture import export_capture
from unit_scale_fx.passes import PassContext
from unit_scale_fx.passes.strip_asserts import ASSERTS, strip_asserts

aten = torch.ops.aten


def _graph_with_assert() -> fx.GraphModule:
    g = fx.Graph()
    x = g.placeholder("x")
    g.call_function(aten._assert_tensor_metadata.default, (x,), {"dtype": torch.float32})
    y = g.call_function(aten.relu.default, (x,))
    g.output(y)
    return fx.GraphModule(nn.Module(), g)


def test_the_assert_is_dropped_and_the_rest_kept():
    gm = _graph_with_assert()
    assert graph_code(gm) == golden("""
        x = input
        _assert_tensor_metadata_default = aten._assert_tensor_metadata.default(x, dtype=torch.float32)
        relu_default = aten.relu.default(x)
        return relu_default
    """)
    result = strip_asserts(gm, PassContext())
    gm.recompile()
    assert result.modified and result.info == "1 metadata asserts dropped"
    assert graph_code(gm) == golden("""
        x = input
        relu_default = aten.relu.default(x)
        return relu_default
    """)
    # a second run finds nothing
    assert not strip_asserts(gm, PassContext()).modified


def test_export_graphs_lose_their_asserts_and_compute_the_same():
    class Cast(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(x.to(torch.float32)).relu()

    x = torch.randn(2, 4)
    gm = export_capture(Cast(), (x,), None)
    n_asserts = sum(n.target in ASSERTS for n in gm.graph.nodes)
    assert n_asserts >= 1  # torch.export adds one for the .to(float32)
    expected = gm(x)
    n_before = len(gm.graph.nodes)
    strip_asserts(gm, PassContext())
    gm.recompile()
    assert not any(n.target in ASSERTS for n in gm.graph.nodes)
    assert len(gm.graph.nodes) == n_before - n_asserts
    torch.testing.assert_close(gm(x), expected)
