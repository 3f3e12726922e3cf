"""Each pass alone on small graphs: the structure it leaves and graph.lint()."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from unit_scale_fx.capture import capture
from unit_scale_fx.config import UnitScaleConfig
from unit_scale_fx.examples import GPT, gpt_batch
from unit_scale_fx.passes import PassContext, init_weights, normalize, plan, rewrite, shape_prop, topology
from unit_scale_fx.passes.balance import balance
from unit_scale_fx.record import META_KEY
from unit_scale_fx.scale import scale


class InPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        y = self.lin(x)
        y.add_(x)          # in-place method
        z = F.relu(y, inplace=True)
        return z * 2 + y   # reads the mutated y


def _prepared(model, *inputs, **cfg):
    gm = capture(model, inputs)
    ctx = PassContext(config=UnitScaleConfig(**cfg), example_args=inputs)
    normalize(gm, ctx)
    gm.recompile()
    return gm, ctx


def test_normalize_makes_inplace_ops_out_of_place_and_keeps_semantics():
    m = InPlace()
    x = torch.randn(4, 8)
    expected = m(x.clone())
    gm, _ = _prepared(m, x)
    targets = [n.target for n in gm.graph.nodes if n.op in ("call_method", "call_function")]
    assert "add_" not in targets and "add" in targets
    relu = next(n for n in gm.graph.nodes if n.target is F.relu)
    assert relu.kwargs.get("inplace") is False
    gm.graph.lint()
    torch.testing.assert_close(gm(x.clone()), expected)


def test_shape_prop_puts_fake_values_on_every_node_without_real_compute():
    m = GPT(vocab=64, d=32, layers=1, heads=2)
    idx, tgt = gpt_batch(vocab=64, batch=2, seq=8)
    gm, ctx = _prepared(m, idx, tgt)
    shape_prop(gm, ctx)
    lin = next(n for n in gm.graph.nodes if n.target is F.linear)
    assert tuple(lin.meta["val"].shape) == (2, 8, 96)
    assert lin.meta["val"].device.type in ("cpu", "meta")
    assert ctx.real_values is not None


def test_topology_bridges_on_a_prenorm_gpt():
    """DESIGN.md: bridges are the embedding outputs, unshared parameter edges and all after the last residual add."""
    m = GPT(vocab=64, d=32, layers=2, heads=2)
    idx, tgt = gpt_batch(vocab=64, batch=2, seq=8)
    gm, ctx = _prepared(m, idx, tgt)
    shape_prop(gm, ctx)
    topology(gm, ctx)
    topo = ctx.topology
    nodes = {n.name: n for n in gm.graph.nodes}
    # every parameter edge is a bridge (no weight is shared)
    for n in gm.graph.nodes:
        if n.op == "get_attr" and n in topo.graph:
            for v in topo.graph.successors(n):
                assert topo.is_cut(n, v), n.name
    # the embeddings' outputs, the final norm, readout and loss are bridges
    assert topo.is_cut(nodes["embedding"], nodes["add"])
    assert topo.is_cut(nodes["embedding_1"], nodes["add"])
    ce = next(n for n in gm.graph.nodes if n.target is F.cross_entropy)
    head = next(n for n in gm.graph.nodes if n.target is F.linear and n.args[1].target == "head.weight")
    assert topo.is_cut(head.args[0], head)
    assert topo.is_cut(ce.args[0], ce)
    # nothing inside the blocks: every activation edge between the first and last residual add is not a bridge
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    adds = sorted(topo.residuals, key=order.get)
    assert len(adds) == 4
    lo, hi = order[adds[0]], order[adds[-1]]
    inside = [(u, v) for u, v in topo.graph.edges
              if lo <= order[v] <= hi and u.op != "get_attr" and order[u] >= order[nodes["add"]]]
    assert inside and not any(topo.is_cut(u, v) for u, v in inside)
    # residual kinds: attention then MLP, skip = the stream
    kinds = [topo.residuals[a].kind for a in adds]
    assert kinds == ["attn", "mlp", "attn", "mlp"]
    assert topo.residuals[adds[1]].skip is adds[0]


def test_tied_weight_edges_are_not_bridges():
    m = GPT(vocab=64, d=32, layers=1, heads=2, tied=True)
    idx, tgt = gpt_batch(vocab=64, batch=2, seq=8)
    gm, ctx = _prepared(m, idx, tgt)
    shape_prop(gm, ctx)
    topology(gm, ctx)
    w = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == "tok.weight"]
    assert len(w) == 1 or all(n in ctx.topology.graph for n in w)
    for node in w:
        for v in ctx.topology.graph.successors(node):
            assert not ctx.topology.is_cut(node, v)


def test_init_weights_roles():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(16, 16)
            self.ln = nn.LayerNorm(16)
            self.w = nn.Parameter(torch.zeros(16, 4))  # a bare, zero-initialised matmul weight
            nn.init.normal_(self.lin.bias)
            nn.init.normal_(self.ln.weight)

        def forward(self, x):
            return self.ln(self.lin(x)) @ self.w

    m = M()
    gm, ctx = _prepared(m, torch.randn(3, 16))
    init_weights(gm, ctx)
    assert abs(float(gm.lin.weight.detach().pow(2).mean().sqrt()) - 1.0) < 1e-5
    assert torch.count_nonzero(gm.lin.bias) == 0
    assert torch.all(gm.ln.weight == 1) and torch.all(gm.ln.bias == 0)
    assert abs(float(gm.w.detach().pow(2).mean().sqrt()) - 1.0) < 0.2  # re-sampled from N(0, 1)
    # the direction of a non-zero weight is kept (divided by its RMS)
    torch.testing.assert_close(gm.lin.weight / gm.lin.weight.norm(), m.lin.weight / m.lin.weight.norm())


def _planned(model, *inputs, **cfg):
    gm, ctx = _prepared(model, *inputs, **cfg)
    init_weights(gm, ctx)
    ctx.init_kinds = {}
    shape_prop(gm, ctx)
    topology(gm, ctx)
    plan(gm, ctx)
    balance(gm, ctx)
    return gm, ctx


def test_plan_records_analytic_linear_scales():
    m = nn.Sequential(nn.Linear(64, 256), nn.Linear(256, 16))
    x = torch.randn(32, 64)
    x = x / x.pow(2).mean().sqrt()  # unit RMS input
    gm, _ = _planned(m, x, measure=False)
    recs = [n.meta[META_KEY] for n in gm.graph.nodes if n.target is F.linear]
    assert [r.rule for r in recs] == ["matmul", "matmul"]
    assert recs[0].ideal_fwd == pytest.approx(1 / 8, rel=1e-3)      # 1/sqrt(fan_in)
    assert recs[1].ideal_fwd == pytest.approx(1 / 16, rel=1e-3)
    w1 = next(k for k in recs[1].ideal_bwd if "weight" in k)
    assert recs[1].ideal_bwd[w1] == pytest.approx(1 / (32 ** 0.5), rel=1e-3)  # 1/sqrt(rows)
    # a chain is a tree: every ideal backward scale is met exactly
    for r in recs:
        for k, b in r.bwd.items():
            assert b == pytest.approx(r.ideal_bwd[k], rel=1e-5)
        assert not r.constrained


def test_local_constraint_ties_non_bridge_edges():
    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(32, 128)
            self.b = nn.Linear(128, 32)

        def forward(self, x):
            h = self.a(x) * 1.0
            return (x + self.b(torch.relu(h))).sum()

    gm, ctx = _planned(Res(), torch.randn(16, 32), constraint="gmean", measure=False)
    lin = [n for n in gm.graph.nodes if n.target is F.linear]
    for node in lin:
        rec = node.meta[META_KEY]
        act = node.args[0].name
        if not ctx.topology.is_cut(node.args[0], node):
            assert rec.bwd[act] == pytest.approx(rec.fwd)
            assert rec.constrained


def test_rewrite_inserts_scale_nodes_and_lints():
    m = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 16))
    x = torch.randn(32, 64)
    gm, ctx = _planned(m, x)
    rewrite(gm, ctx)
    gm.graph.lint()
    gm.recompile()
    scales = [n for n in gm.graph.nodes if n.target is scale]
    assert scales and all(n.meta.get("unit_scale_inserted") for n in scales)
    # the gelu gets one combined output scale; each linear an output scale and input-side gradient scales
    gelu = next(n for n in gm.graph.nodes if n.target is F.gelu)
    assert [u.target for u in gelu.users] == [scale]
    out = gm(x)
    assert 0.5 < float(out.pow(2).mean().sqrt()) < 2
