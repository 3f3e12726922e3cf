"""inline_functions: a call with no rule becomes the ops it runs, where each of them has a rule."""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F

from unit_scale_fx.passes.base import PassContext
from unit_scale_fx.passes.inline_functions import inline_functions
from unit_scale_fx.rules.registry import lookup


def _projected(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, None]:
    h = F.linear(x, w, b).relu()
    return h.transpose(0, 1).reshape(x.shape[1], -1), None


def _odd(x: torch.Tensor) -> torch.Tensor:
    return torch.special.erfcx(x) * 2.0


fx.wrap("_projected")
fx.wrap("_odd")


class _Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(6, 4))
        self.b = torch.nn.Parameter(torch.randn(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = _projected(x, self.w, self.b)
        return _odd(h).sum(-1)


def _with_values(gm: fx.GraphModule, x: torch.Tensor) -> None:
    """Give every node the ``val`` that torch.export and dynamo give theirs."""
    class _Record(fx.Interpreter):
        def run_node(self, n: fx.Node):
            out = super().run_node(n)
            n.meta["val"] = out
            return out

    with torch.no_grad():
        _Record(gm).run(x)


def test_a_call_made_of_ruled_ops_is_inlined_and_one_with_an_unruled_op_stays():
    torch.manual_seed(0)
    model = _Model()
    x = torch.randn(3, 5, 4)
    gm = fx.symbolic_trace(model)
    _with_values(gm, x)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert _projected in targets and _odd in targets
    result = inline_functions(gm, PassContext())
    gm.recompile()
    assert result.modified
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    # the call of ruled ops became them (named after the call); the one with erfcx (no rule) is kept whole
    assert _projected not in targets and _odd in targets
    assert torch.ops.aten.linear.default in targets and torch.ops.aten.relu.default in targets
    inlined = [n for n in gm.graph.nodes if n.meta.get("inlined_from")]
    assert inlined and all(n.name.startswith("_projected") for n in inlined)
    assert all(lookup(n) is not None for n in inlined if isinstance(n.meta.get("val"), torch.Tensor)
               and n.meta["val"].is_floating_point())
    # the same function, forward and backward
    xg = x.clone().requires_grad_()
    out, ref = gm(xg), model(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    out.sum().backward()
    ref_grads = torch.autograd.grad(model(x).sum(), [model.w, model.b])
    torch.testing.assert_close(model.w.grad, ref_grads[0])
    torch.testing.assert_close(model.b.grad, ref_grads[1])


def test_a_graph_without_values_is_left_as_it_is():
    gm = fx.symbolic_trace(_Model())
    before = [n.target for n in gm.graph.nodes]
    assert not inline_functions(gm, PassContext()).modified
    assert [n.target for n in gm.graph.nodes] == before
