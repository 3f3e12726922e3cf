"""topology: cut edges and residual adds of the floating-point dataflow graph (networkx).

Nodes are the graph's floating-point values, parameters included; the output
node is left out (gradients start at the loss). An edge ``u -> v`` is a *cut edge*
when it is a bridge of the undirected graph: every parameter upstream of it then
receives its whole gradient through it, so a backward scale that differs from
the forward one there only rescales those gradients.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import networkx as nx
import torch.fx as fx

from ..rules.registry import Kind, float_tensor_inputs, is_float, lookup
from .base import PassContext, PassResult, declare


#: What a residual branch is (:attr:`Residual.kind`): it holds attention, or not (an MLP-like branch).
ATTN_BRANCH = "attn"
MLP_BRANCH = "mlp"


@dataclass
class Residual:
    """A residual add ``skip + branch`` (``skip`` is an ancestor of ``branch``, or the stream)."""

    skip: fx.Node
    branch: fx.Node
    kind: str  # ATTN_BRANCH or MLP_BRANCH
    tau: Optional[float]  # None: not fixed by the config; the plan pass applies the depth rule


@dataclass
class Topology:
    graph: nx.DiGraph
    bridges: set[tuple[fx.Node, fx.Node]] = field(default_factory=set)
    residuals: dict[fx.Node, Residual] = field(default_factory=dict)

    def is_cut(self, u: fx.Node, v: fx.Node) -> bool:
        return (u, v) in self.bridges


def dataflow_graph(gm: fx.GraphModule) -> tuple[nx.DiGraph, set[tuple[fx.Node, fx.Node]]]:
    """Directed float dataflow graph and the set of edges used more than once by one node."""
    g = nx.DiGraph()
    multi: set[tuple[fx.Node, fx.Node]] = set()
    for node in gm.graph.nodes:
        if node.op == "output" or not is_float(node):
            continue
        g.add_node(node)
        for inp in float_tensor_inputs(node):
            g.add_edge(inp, node)
            uses = sum(1 for a in node.all_input_nodes if a is inp)
            flat = [a for a in _flatten(node.args) + _flatten(list(node.kwargs.values())) if a is inp]
            if max(uses, len(flat)) > 1:
                multi.add((inp, node))
    return g, multi


def _flatten(xs) -> list:
    out = []
    for x in xs:
        if isinstance(x, (list, tuple)):
            out.extend(_flatten(x))
        elif isinstance(x, dict):
            out.extend(_flatten(list(x.values())))
        else:
            out.append(x)
    return out


class _Outside:
    """The virtual node standing for everything outside the graph."""

    name = "<outside>"


def _branch_kind(region: set[fx.Node], gm: fx.GraphModule) -> str:
    for n in region:
        rule = lookup(n, gm)
        if rule is not None and rule.kind in (Kind.SOFTMAX, Kind.ATTENTION):
            return ATTN_BRANCH
    return MLP_BRANCH


def _between(g: nx.DiGraph, a: fx.Node, b: fx.Node, order: dict[fx.Node, int]) -> set[fx.Node]:
    """Ancestors of ``b`` that come after ``a`` in graph order, plus ``b`` (a bounded search)."""
    lo = order[a]
    seen, stack = {b}, [b]
    while stack:
        v = stack.pop()
        for u in g.predecessors(v):
            if u not in seen and order[u] >= lo:
                seen.add(u)
                stack.append(u)
    return seen


def _region(g: nx.DiGraph, skip: fx.Node, branch: fx.Node, order: dict[fx.Node, int]) -> set[fx.Node]:
    """Nodes on paths from ``skip`` to ``branch`` (``skip`` excluded, ``branch`` included)."""
    window = _between(g, skip, branch, order)
    region, stack = set(), [skip]
    while stack:
        v = stack.pop()
        for w in g.successors(v):
            if w in window and w not in region:
                region.add(w)
                stack.append(w)
    return region | {branch}


@declare('topology', produces=('topology',))
def topology(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    g, multi = dataflow_graph(gm)
    und = g.to_undirected(as_view=True)
    if ctx.boundary:
        # Values linked through code outside this graph (other graphs of a model split by dynamo) are
        # joined through one virtual node: contracting the unseen rest of the model to a point only
        # adds cycles, so every bridge found here is a bridge of the whole model.
        und = nx.Graph(und)
        outside = _Outside()
        und.add_edges_from((outside, n) for n in g if n.name in ctx.boundary)
    bridges: set[tuple[fx.Node, fx.Node]] = set()
    for u, v in nx.bridges(und):
        for a, b in ((u, v), (v, u)):
            if g.has_edge(a, b) and (a, b) not in multi:
                bridges.add((a, b))
    topo = Topology(g, bridges)
    cfg = ctx.config
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in gm.graph.nodes:
        if node not in g:
            continue
        rule = lookup(node, gm)
        if rule is None or rule.kind != Kind.ADD:
            continue
        ins = float_tensor_inputs(node)
        if len(ins) != 2:
            continue
        a, b = ins
        if order[a] > order[b]:
            a, b = b, a
        if a in _between(g, a, b, order):
            skip, branch = a, b
        elif a in topo.residuals or b in topo.residuals:
            # parallel branches summed onto a stream: the stream is the skip
            skip, branch = (a, b) if a in topo.residuals else (b, a)
            if not (nx.ancestors(g, skip) & nx.ancestors(g, branch)):
                continue
        else:
            continue
        if skip in _between(g, skip, branch, order):
            region = _region(g, skip, branch, order)
        else:  # parallel branches: no region of their own
            region = {branch}
        kind = _branch_kind(region, gm)
        tau = cfg.attn_tau if kind == ATTN_BRANCH else cfg.mlp_tau
        topo.residuals[node] = Residual(skip, branch, kind, tau)
    ctx.topology = topo
    return PassResult(False, f"{len(bridges)} cut edges, {len(topo.residuals)} residual adds")
