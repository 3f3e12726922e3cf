"""fold_scales: an output scale read only by the next op's input scale becomes one scale node."""

from __future__ import annotations

import torch
import torch.nn as nn

from helpers import golden, graph_code, hand_planned_small, pipeline_until, run_pass
from unit_scale_fx.passes import PassContext, rewrite
from unit_scale_fx.passes.fold_scales import fold_scales
from unit_scale_fx.record import FOLDED, SCALE_ROLE
from unit_scale_fx.scale import scale


def _rewritten():
    _, gm = hand_planned_small()
    rewrite(gm, PassContext())
    gm.recompile()
    return gm


def test_golden_code_one_pair_folded():
    gm = _rewritten()
    assert "scale_2 = scale(gelu, 2, 3)" in graph_code(gm)  # gelu's output scale, read by add's input scale
    result = fold_scales(gm, PassContext())
    gm.recompile()
    assert result.modified and result.info == "1 scale pairs folded"
    # (2, 3) then (0.8, 0.9) is (1.6, 2.7); the other scales sit next to a non-scale node and stay
    assert graph_code(gm) == golden("""
        x = input
        lin_weight = self.lin.weight
        lin_bias = self.lin.bias
        scale_3 = scale(x, 1, 0.25)
        scale_4 = scale(lin_weight, 1, 0.125)
        linear = linear(scale_3, scale_4, lin_bias)
        scale_5 = scale(linear, 0.5, 1)
        gelu = gelu(scale_5)
        scale = scale(x, 0.6, 0.6)
        scale_1 = scale(gelu, 1.6, 2.7)
        add = add(scale, scale_1)
        return add
    """)
    folded = next(n for n in gm.graph.nodes if n.name == "scale_1")
    assert folded.meta[SCALE_ROLE] == ("output", "gelu") and folded.meta[FOLDED] == (0.8, 0.9)
    assert not fold_scales(gm, PassContext()).modified  # nothing left to fold


def test_folding_changes_neither_values_nor_gradients():
    x, y = torch.randn(16, 32), torch.randn(16, 8)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 8))
    gm, ctx, p = pipeline_until(model, (x,), "fold_scales")
    n_scales = sum(n.target is scale for n in gm.graph.nodes)
    xa = x.clone().requires_grad_()
    out = gm(xa)
    ref = [out.detach()] + list(torch.autograd.grad(out, [xa, *gm.parameters()], y))
    result = run_pass(gm, ctx, p)
    n_folded = int(result.info.split()[0])
    assert n_folded >= 2 and sum(n.target is scale for n in gm.graph.nodes) == n_scales - n_folded
    xb = x.clone().requires_grad_()
    out = gm(xb)
    got = [out.detach()] + list(torch.autograd.grad(out, [xb, *gm.parameters()], y))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_an_output_scale_with_two_readers_is_not_folded():
    gm = _rewritten()
    out_scale = next(n for n in gm.graph.nodes if n.name == "scale_2")
    with gm.graph.inserting_after(out_scale):
        extra = gm.graph.call_function(torch.neg, (out_scale,))
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    out_node.args = ((out_node.args[0], extra),)
    gm.recompile()
    assert not fold_scales(gm, PassContext()).modified
