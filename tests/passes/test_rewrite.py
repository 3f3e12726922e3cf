"""rewrite: each record's scales become ``scale`` nodes in the graph, and nothing else changes."""

from __future__ import annotations

import copy

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from helpers import golden, graph_code, hand_planned_small, pipeline_until, rms, run_pass
from unit_scale_fx.passes import PassContext, rewrite
from unit_scale_fx.record import INSERTED, META_KEY, SCALE_ROLE, ScaleRecord
from unit_scale_fx.scale import scale


def test_golden_code_from_hand_written_records():
    _, gm = hand_planned_small()
    result = rewrite(gm, PassContext())
    gm.recompile()
    assert result.modified and result.info == "3 nodes scaled"
    # matmul: backward scales on its inputs (bias: 1, no node), forward scale on its output;
    # a pointwise op: one scale(y, fwd, bwd) on its output; a weighted add: one scale per input
    assert graph_code(gm) == golden("""
        x = input
        lin_weight = self.lin.weight
        lin_bias = self.lin.bias
        scale_3 = scale(x, 1, 0.25)
        scale_4 = scale(lin_weight, 1, 0.125)
        linear = linear(scale_3, scale_4, lin_bias)
        scale_5 = scale(linear, 0.5, 1)
        gelu = gelu(scale_5)
        scale_2 = scale(gelu, 2, 3)
        scale = scale(x, 0.6, 0.6)
        scale_1 = scale(scale_2, 0.8, 0.9)
        add = add(scale, scale_1)
        return add
    """)
    inserted = [n for n in gm.graph.nodes if n.target is scale]
    assert all(n.meta[INSERTED] for n in inserted)
    assert sorted(n.meta[SCALE_ROLE] for n in inserted) == [
        ("input", "add"), ("input", "add"), ("input", "linear"), ("input", "linear"),
        ("output", "gelu"), ("output", "linear")]


def _scales_set_to_one(gm: fx.GraphModule) -> fx.GraphModule:
    graph = copy.deepcopy(gm.graph)
    for n in graph.nodes:
        if n.target is scale:
            n.args = (n.args[0], 1.0, 1.0)
    return fx.GraphModule(gm, graph)


def test_the_rewrite_changes_nothing_but_scales():
    model, gm = hand_planned_small()
    rewrite(gm, PassContext())
    gm.recompile()
    x = torch.randn(3, 4)
    # with the scales: the forward the records describe
    with torch.no_grad():
        expected = 0.6 * x + 0.8 * 2.0 * F.gelu(0.5 * model.lin(x))
        torch.testing.assert_close(gm(x), expected)
    # with every scale set to 1: what the user wrote, forward and backward
    ones = _scales_set_to_one(gm)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_a, out_b = ones(xa), model(xb)
    torch.testing.assert_close(out_a, out_b)
    cot = torch.randn_like(out_a)
    ga = torch.autograd.grad(out_a, [xa, *ones.parameters()], cot)
    gb = torch.autograd.grad(out_b, [xb, *model.parameters()], cot)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b)


def test_records_that_change_nothing_insert_nothing():
    _, gm = hand_planned_small()
    for n in gm.graph.nodes:
        if META_KEY in n.meta:
            n.meta[META_KEY] = ScaleRecord("x", "pointwise", "x", fwd=1.0, bwd={a.name: 1.0 for a in n.all_input_nodes})
    before = graph_code(gm)
    result = rewrite(gm, PassContext())
    assert not result.modified and graph_code(gm) == before


def test_rewrite_inserts_scale_nodes_and_lints():
    m = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 16))
    x = torch.randn(32, 64)
    gm, ctx, p = pipeline_until(m, (x,), "rewrite")
    run_pass(gm, ctx, p)  # the driver lints a graph a pass changed
    scales = [n for n in gm.graph.nodes if n.target is scale]
    assert scales and all(n.meta.get("unit_scale_inserted") for n in scales)
    # the gelu gets one combined output scale; each linear an output scale and input-side gradient scales
    gelu = next(n for n in gm.graph.nodes if n.target is F.gelu)
    assert [u.target for u in gelu.users] == [scale]
    linears = [n for n in gm.graph.nodes if n.target is F.linear]
    assert len(linears) == 2
    for lin in linears:
        assert [u.target for u in lin.users] == [scale]
        assert all(a.target is scale for a in lin.args[:2])
    with torch.no_grad():
        assert 0.5 < rms(gm(x)) < 2
