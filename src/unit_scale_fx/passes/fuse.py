"""fuse: collapse each single-input subgraph into one function, scaled once.

A GELU written out by hand (``0.5 * x * (1 + tanh(c * (x + 0.044715 * x**3))))``)
or an RMSNorm written out (``x * rsqrt(mean(x**2) + eps)``) is one function of one
tensor. Scaling each op in it would be wrong twice over: the ops inside see
inputs that are not unit Gaussians (``rsqrt`` of a mean of squares), and the
function's output is what matters. This pass finds such subgraphs and moves each
into a :class:`FusedRegion` submodule; the ``fused`` rule
(:mod:`unit_scale_fx.rules.fused`) then measures the function as a whole.

A region grows from one floating-point value ``x``: an op joins when every
tensor it reads is ``x`` or already in the region (numbers and shape lists are
fine), it is floating point, and it is elementwise-like (pointwise, arithmetic,
shape or reduction ops, or ops with no rule at all). The region must have one
output: every other node in it is read only inside. Ops that reduce to a single
number (a loss) never join: their value must not be rescaled. Regions with fewer than two
ops that change values (views and copies do not count) are left alone.
"""

from __future__ import annotations

import heapq
import logging
from typing import Optional

import torch
import torch.fx as fx

from ..rules.fused import FUSED_RULE, FusedRegion
from ..record import RULE_OVERRIDE
from ..rules.registry import Kind, is_float, lookup
from .base import PassContext, PassResult, declare

log = logging.getLogger(__name__)

#: rule kinds that may sit inside a fused region (``None``: no rule).
FUSABLE_KINDS = frozenset({None, Kind.POINTWISE, Kind.ADD, Kind.MUL, Kind.PRESERVE, Kind.REDUCE, Kind.CALIBRATED})

_PREFIX = "us_fused_"


def _node_args(node: fx.Node) -> list[fx.Node]:
    return list(node.all_input_nodes)


def _tensor_out(node: fx.Node) -> bool:
    return isinstance(node.meta.get("val"), torch.Tensor) and is_float(node)


def _joinable(node: fx.Node, gm: fx.GraphModule, members: set[fx.Node]) -> bool:
    if node.op not in ("call_function", "call_method") or not _tensor_out(node):
        return False
    if node.meta["val"].dim() == 0:  # a single number (a loss): its value is never rescaled
        return False
    if not all(a in members for a in _node_args(node)):
        return False
    rule = lookup(node, gm)
    kind = None if rule is None else rule.kind
    return kind in FUSABLE_KINDS


def _changes_values(node: fx.Node, gm: fx.GraphModule) -> bool:
    rule = lookup(node, gm)
    return rule is None or not rule.preserves_scale


def _grow(x: fx.Node, gm: fx.GraphModule, order: dict[fx.Node, int], taken: set[fx.Node]) -> list[fx.Node]:
    """Nodes (in graph order) computable from ``x`` alone."""
    members = {x}
    grown: list[fx.Node] = []
    heap = [(order[u], u.name) for u in x.users]
    by_name = {u.name: u for u in x.users}
    seen = set(by_name)
    heapq.heapify(heap)
    while heap:
        _, name = heapq.heappop(heap)
        n = by_name[name]
        if n in taken or not _joinable(n, gm, members):
            continue
        members.add(n)
        grown.append(n)
        for u in n.users:
            if u.name not in seen:
                seen.add(u.name)
                by_name[u.name] = u
                heapq.heappush(heap, (order[u], u.name))
    return grown


def _closed_region(out: fx.Node, grown: set[fx.Node]) -> Optional[list[fx.Node]]:
    """The part of ``grown`` that ``out`` depends on, if nothing in it but ``out`` is read outside."""
    region, stack = {out}, [out]
    while stack:
        v = stack.pop()
        for a in _node_args(v):
            if a in grown and a not in region:
                region.add(a)
                stack.append(a)
    for v in region:
        if v is not out and any(u not in region for u in v.users):
            return None
    return list(region)


def find_regions(gm: fx.GraphModule) -> list[tuple[fx.Node, list[fx.Node]]]:
    """``(input, region nodes in graph order)`` for every fusable single-input subgraph."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    taken: set[fx.Node] = set()
    outputs: set[fx.Node] = set()  # a region's output may feed the next region
    found = []
    for x in gm.graph.nodes:
        if (x in taken and x not in outputs) or not _tensor_out(x) or not x.users:
            continue
        grown = _grow(x, gm, order, taken)
        if len(grown) < 2:
            continue
        gset = set(grown)
        for out in reversed(grown):
            region = _closed_region(out, gset)
            if region is None or sum(_changes_values(n, gm) for n in region) < 2:
                continue
            region.sort(key=order.__getitem__)
            found.append((x, region))
            taken.update(region)
            outputs.add(out)
            break
    return found


def _extract(gm: fx.GraphModule, x: fx.Node, region: list[fx.Node]) -> FusedRegion:
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {x: g.placeholder("x")}
    for n in region:
        env[n] = g.node_copy(n, lambda a: env[a])
    g.output(env[region[-1]])
    return FusedRegion(torch.nn.Module(), g, [str(n.target) if n.op == "call_method" else _op_name(n) for n in region])


def _op_name(n: fx.Node) -> str:
    t = n.target
    return str(getattr(t, "__name__", None) or t)


@declare('fuse')
def fuse(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    for name, _ in list(gm.named_children()):
        if name.startswith(_PREFIX):
            delattr(gm, name)
    regions = find_regions(gm)
    replaced: dict[fx.Node, fx.Node] = {}  # a region's output, once fused, is read from its new node
    for i, (x, region) in enumerate(regions):
        x = replaced.get(x, x)
        out = region[-1]
        sub = _extract(gm, x, region)
        name = f"{_PREFIX}{i}"
        gm.add_module(name, sub)
        with gm.graph.inserting_before(out):
            new = gm.graph.call_module(name, (x,))
        for key in ("val", "tensor_meta", "nn_module_stack", "stack_trace"):
            if key in out.meta:
                new.meta[key] = out.meta[key]
        new.meta[RULE_OVERRIDE] = FUSED_RULE
        out.replace_all_uses_with(new)
        replaced[out] = new
        for n in reversed(region):
            gm.graph.erase_node(n)
        log.debug("fuse: %s <- %s over %s", name, ", ".join(sub.ops), x.name)
    return PassResult(bool(regions), f"{len(regions)} single-input subgraphs fused")
