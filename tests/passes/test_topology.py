"""topology: the float dataflow graph, its cut edges (bridges) and residual adds."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import graph_code, pipeline_until, run_pass
from unit_scale_fx.examples import GPT, gpt_batch


class Res(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return self.b(x + self.a(x).relu())


def _topology(model, inputs, **kw):
    gm, ctx, p = pipeline_until(model, inputs, "topology", **kw)
    before = graph_code(gm)
    run_pass(gm, ctx, p)
    assert graph_code(gm) == before  # an analysis: the graph is unchanged
    return gm, ctx.topology, {n.name: n for n in gm.graph.nodes}


def test_a_chain_is_all_bridges():
    gm, topo, _ = _topology(nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 2)), (torch.randn(3, 4),))
    assert topo.graph.number_of_edges() == 7  # x, w1, b1 -> linear -> gelu; gelu, w2, b2 -> linear_1
    assert topo.bridges == set(topo.graph.edges)
    assert not topo.residuals


def test_a_residual_block_has_no_bridge_inside():
    gm, topo, n = _topology(Res(), (torch.randn(3, 8),))
    # x feeds both the skip and the branch: x -> linear -> relu -> add and x -> add form a cycle
    inside = [(n["x"], n["linear"]), (n["linear"], n["relu"]), (n["relu"], n["add"]), (n["x"], n["add"])]
    assert all(topo.graph.has_edge(*e) and not topo.is_cut(*e) for e in inside)
    # parameter edges and the edge after the add are bridges
    assert topo.is_cut(n["a_weight"], n["linear"]) and topo.is_cut(n["add"], n["linear_1"])
    (res,) = topo.residuals.values()
    assert (res.skip.name, res.branch.name, res.kind) == ("x", "relu", "mlp")


def test_values_tied_through_the_outside_are_not_bridges():
    """Names in ctx.boundary meet at one virtual node: a path through the outside closes a cycle."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    gm, topo, n = _topology(model, (torch.randn(3, 4),))
    assert topo.is_cut(n["linear"], n["linear_1"])
    gm, ctx, p = pipeline_until(model, (torch.randn(3, 4),), "topology")
    inp = next(x.name for x in gm.graph.nodes if x.op == "placeholder")
    ctx.boundary.update({inp, "linear_1"})  # the output may feed a later graph that reads the input too
    run_pass(gm, ctx, p)
    nodes = {x.name: x for x in gm.graph.nodes}
    weight = next(x for x in gm.graph.nodes if x.target == "0.weight")
    assert not ctx.topology.is_cut(nodes["linear"], nodes["linear_1"])
    assert ctx.topology.is_cut(weight, nodes["linear"])  # the weight still hangs off one edge


def test_topology_bridges_on_a_prenorm_gpt():
    """DESIGN.md: bridges are the embedding outputs, unshared parameter edges and all after the last residual add."""
    m = GPT(vocab=64, d=32, layers=2, heads=2)
    idx, tgt = gpt_batch(vocab=64, batch=2, seq=8)
    gm, topo, nodes = _topology(m, (idx, tgt))
    # every parameter edge is a bridge (no weight is shared)
    param_edges = [(n, v) for n in gm.graph.nodes if n.op == "get_attr" and n in topo.graph
                   for v in topo.graph.successors(n)]
    assert len(param_edges) >= 2 * 12 + 4  # 12 per block (qkv, proj, up, down, 2 norms: weight and bias) + more
    assert all(topo.is_cut(u, v) for u, v in param_edges)
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
