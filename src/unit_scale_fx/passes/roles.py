"""Parameter roles from the graph alone, and the ``roles`` pass that stores them.

:func:`analyse_roles` gives each parameter the role a human would give it (hidden
weight, input weight, embedding, readout, bias, norm gain) from the graph alone:
the rule kind of the op that consumes the parameter, which operand it is, and where
that op sits relative to the residual adds. No names are read. The u-μP passes
(:mod:`.mup`) and the optimiser groups (:mod:`unit_scale_fx.training.optim`) read it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Literal, Optional

import networkx as nx
import torch
import torch.fx as fx

from ..errors import UnitScaleError
from ..record import INSERTED, ROLES_META_KEY
from .base import PassContext, PassResult, declare
from .topology import _region

log = logging.getLogger(__name__)

Role = Literal["hidden", "input", "embedding", "readout", "bias", "norm_gain", "other"]

#: u-μP parameter roles, in the order reports list them. (Not to be confused with a parameter's
#: init kind, :data:`~unit_scale_fx.rules.registry.INIT_KINDS`, or an inserted scale's
#: :data:`~unit_scale_fx.record.SCALE_ROLE`.)
PARAM_ROLES: tuple[str, ...] = ("embedding", "input", "hidden", "readout", "bias", "norm_gain", "other")
#: the former name of :data:`PARAM_ROLES`
ROLES = PARAM_ROLES


# --------------------------------------------------------------------------------------------
# parameter roles


@dataclass
class ParamRole:
    """What one parameter is, from the graph.

    Attributes:
        name: qualified parameter name (as in ``state_dict``).
        role: ``"hidden"``, ``"input"``, ``"embedding"``, ``"readout"``, ``"bias"``,
            ``"norm_gain"`` or ``"other"``.
        shape: the parameter's shape.
        fan_in: size of the dimension a matmul sums over (weights); for an
            embedding, the vocabulary size.
        fan_out: size of the output features (for an embedding, its width).
        depth: the number of residual branches on the stream when the parameter
            is used inside a residual branch, else ``None``.
        consumers: names of the graph nodes that use the parameter.
    """

    name: str
    role: str
    shape: tuple[int, ...]
    fan_in: Optional[int] = None
    fan_out: Optional[int] = None
    depth: Optional[int] = None
    consumers: list[str] = field(default_factory=list)


@dataclass
class RoleAnalysis:
    """The result of :func:`analyse_roles` (stored on the planned module)."""

    params: dict[str, ParamRole]
    readouts: dict[str, int]  # readout matmul node name -> its fan_in
    residual_streams: list[list[str]]  # residual add node names, stream by stream, in order


_PRIORITY = {"embedding": 6, "readout": 5, "hidden": 4, "input": 3, "norm_gain": 2, "bias": 1, "other": 0}


def _users_through_preserve(node: fx.Node, gm: fx.GraphModule) -> list[tuple[fx.Node, fx.Node]]:
    """``(consumer, operand)`` pairs: users of ``node``, looking through views and scales."""
    from ..rules.registry import float_tensor_inputs, lookup

    out: list[tuple[fx.Node, fx.Node]] = []
    stack = [node]
    seen = set()
    while stack:
        n = stack.pop()
        for u in n.users:
            if u in seen:
                continue
            seen.add(u)
            rule = lookup(u, gm)
            if rule is not None and rule.preserves_scale and len(float_tensor_inputs(u)) == 1:
                stack.append(u)
            else:
                out.append((u, n))
    return out


def _operand_slot(consumer: fx.Node, operand: fx.Node, gm: fx.GraphModule) -> tuple[str, Optional[int], Optional[int], Optional[fx.Node]]:
    """``(slot, fan_in, fan_out, activation_input)`` of ``operand`` in ``consumer``.

    slot is ``"weight"``, ``"bias"``, ``"embedding"``, ``"gain"``, ``"add"``, ``"mul"`` or ``"other"``.
    """
    from ..rules.matmul import LAYOUTS, MatmulRule
    from ..rules.registry import Kind, OpView, lookup, resolve_target

    rule = lookup(consumer, gm)
    if rule is None:
        return "other", None, None, None
    shape = OpView.shape(operand)
    if rule.name == "embedding":
        return "embedding", (shape[0] if shape else None), (shape[-1] if shape else None), None
    if rule.kind == Kind.NORM:
        roles = rule.init_kinds(consumer)
        return ("gain" if roles.get(operand) == "one" else "bias"), None, None, None
    if isinstance(rule, MatmulRule):
        lay = LAYOUTS[resolve_target(consumer, None)]
        view = OpView(consumer, [], {})
        _, left, right, bias = rule._operands(view)
        if operand is bias:
            return "bias", None, None, None
        if shape is None:
            return "weight", None, None, None
        if operand is right:
            k, n = lay.fan(shape)
            act = left
        else:  # the parameter is the left operand: [.., m, k] with the activation on the right
            k, n = shape[-1], shape[-2] if len(shape) > 1 else 1
            act = right
        return "weight", k, n, act if isinstance(act, fx.Node) else None
    if rule.kind == Kind.ADD:
        return "add", None, (shape[-1] if shape else None), None
    if rule.kind == Kind.MUL:
        return "mul", None, None, None
    return "other", None, None, None


def residual_streams(topo, gm: fx.GraphModule) -> tuple[list[list[fx.Node]], dict[fx.Node, int]]:
    """Group the residual adds into streams: each add's skip comes from the previous add,
    through views, dropout or a norm (post-norm blocks ``x = norm(x + f(x))`` form one stream)."""
    from ..rules.registry import Kind, lookup

    prev: dict[fx.Node, Optional[fx.Node]] = {}
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for add, r in topo.residuals.items():
        n: Optional[fx.Node] = r.skip
        found = None
        for _ in range(64):  # walk back through views / dropout / inserted scales
            if n is None:
                break
            if n in topo.residuals:
                found = n
                break
            rule = lookup(n, gm)
            ins = n.all_input_nodes
            passes = rule is not None and (rule.preserves_scale or rule.kind == Kind.NORM)  # post-norm streams too
            if (passes or n.meta.get(INSERTED)) and len(ins) >= 1:
                n = ins[0]
            else:
                break
        prev[add] = found
    streams: list[list[fx.Node]] = []
    stream_of: dict[fx.Node, int] = {}
    for add in sorted(topo.residuals, key=order.__getitem__):
        p = prev[add]
        if p is not None and p in stream_of and streams[stream_of[p]][-1] is p:
            stream_of[add] = stream_of[p]
            streams[stream_of[p]].append(add)
        else:
            stream_of[add] = len(streams)
            streams.append([add])
    return streams, stream_of


def branch_regions(topo) -> dict[fx.Node, set[fx.Node]]:
    """``residual add -> nodes of its branch`` (downstream of the skip, upstream of the branch output)."""

    g: nx.DiGraph = topo.graph
    order = {n: i for i, n in enumerate(nx.topological_sort(g))}
    out: dict[fx.Node, set[fx.Node]] = {}
    for add, r in topo.residuals.items():
        if r.skip in g and r.branch in g:
            out[add] = _region(g, r.skip, r.branch, order)
    return out


def _reaches(g: nx.DiGraph, targets: set[fx.Node], downstream: bool) -> set[fx.Node]:
    """Nodes with a node of ``targets`` strictly downstream (or upstream) of them: one linear sweep."""
    nodes = list(nx.topological_sort(g))
    if downstream:
        nodes.reverse()
    nxt = g.successors if downstream else g.predecessors
    hit: set[fx.Node] = set()
    for n in nodes:
        if any(m in targets or m in hit for m in nxt(n)):
            hit.add(n)
    return hit


def weighted_ops(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes that consume a parameter as a matmul weight or an embedding table."""
    params = dict(gm.named_parameters(remove_duplicate=False))
    out: set[fx.Node] = set()
    for p in gm.graph.nodes:
        if p.op == "get_attr" and str(p.target) in params:
            for c, opnd in _users_through_preserve(p, gm):
                if _operand_slot(c, opnd, gm)[0] in ("weight", "embedding"):
                    out.add(c)
    return out


def analyse_roles(gm: fx.GraphModule, topo) -> RoleAnalysis:
    """Give every parameter a role, from the graph's structure and the rules of its consumers.

    * a matmul operand that is a parameter is a weight: ``readout`` when no
      residual add and no other weighted op lies downstream of that matmul,
      ``input`` when no weighted op lies upstream of its activation operand,
      ``hidden`` otherwise;
    * the table of an embedding lookup (or a parameter added to activations,
      such as a learned position table) is an ``embedding``;
    * a matmul's bias, a norm's bias and a 1-d parameter added to activations
      are ``bias``; a norm's weight or a parameter multiplied into activations
      is a ``norm_gain``;
    * anything else is ``other``.

    A parameter used in several places takes the highest of its roles in the
    order embedding > readout > hidden > input > norm gain > bias > other (so a
    tied embedding / readout matrix is an embedding).

    Needs shape propagation (``node.meta["val"]``) and the topology pass.
    """
    g: nx.DiGraph = topo.graph
    params = dict(gm.named_parameters(remove_duplicate=False))
    attrs = [n for n in gm.graph.nodes if n.op == "get_attr" and str(n.target) in params]

    consumers_of: dict[fx.Node, list[tuple[fx.Node, fx.Node]]] = {
        p: _users_through_preserve(p, gm) for p in attrs
    }
    weighted = weighted_ops(gm)

    streams, stream_of = residual_streams(topo, gm)
    residual_adds = set(topo.residuals)
    # which consumer nodes lie inside which residual branch
    branch_depth: dict[fx.Node, int] = {}
    for add, region in branch_regions(topo).items():
        depth = len(streams[stream_of[add]])
        for n in region:
            branch_depth[n] = max(branch_depth.get(n, 0), depth)

    readouts: dict[str, int] = {}
    result: dict[str, ParamRole] = {}
    feeds_later = _reaches(g, residual_adds | weighted, downstream=True)
    fed_by_weighted = _reaches(g, weighted, downstream=False)
    for p in attrs:
        name = str(p.target)
        t = params[name]
        best: Optional[ParamRole] = None
        for c, opnd in consumers_of[p]:
            slot, fan_in, fan_out, act = _operand_slot(c, opnd, gm)
            if slot == "weight":
                if c not in feeds_later:
                    role = "readout"
                    if fan_in is not None:
                        readouts[c.name] = fan_in
                elif act is not None and act in g and act not in fed_by_weighted:
                    role = "input"
                else:
                    role = "hidden"
            elif slot == "embedding":
                role = "embedding"
            elif slot == "add":
                role = "bias" if t.dim() <= 1 else "embedding"
            elif slot == "gain" or slot == "mul":
                role = "norm_gain"
            elif slot == "bias":
                role = "bias"
            else:
                role = "other"
            cand = ParamRole(name, role, tuple(t.shape), fan_in, fan_out, branch_depth.get(c))
            depth = cand.depth if best is None or best.depth is None else best.depth
            if best is None or _PRIORITY[role] > _PRIORITY[best.role]:
                best = cand
            best.depth = depth if depth is not None else cand.depth
        if best is None:
            best = ParamRole(name, "other", tuple(t.shape))
            log.info("roles: parameter %s has no consumer in the graph; role 'other'", name)
        best.consumers = sorted({c.name for c, _ in consumers_of[p]})
        result[name] = best
        log.debug("roles: %s -> %s (fan_in=%s fan_out=%s depth=%s)", name, best.role, best.fan_in,
                  best.fan_out, best.depth)
    return RoleAnalysis(result, readouts, [[a.name for a in s] for s in streams])


def roles_of(model: torch.nn.Module) -> RoleAnalysis:
    """The role analysis of a planned unit-scaled module (or of the planned graph of a unit-scaled model)."""
    meta = getattr(model, "meta", None)
    if not isinstance(meta, dict) and hasattr(model, "us_module"):
        meta = getattr(model.us_module, "meta", None)
    analysis = meta.get(ROLES_META_KEY) if isinstance(meta, dict) else None
    if analysis is None:
        raise UnitScaleError(
            f"{type(model).__name__} has no parameter-role analysis",
            where="unit_scale_fx.passes.roles.roles_of",
            fix="pass a model returned by unit_scale(...) and plan it first (example_inputs=... or one call)",
        )
    return analysis


@declare('roles', needs=('topology',))
def roles(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    try:
        analysis = analyse_roles(gm, ctx.topology)
    except Exception as exc:  # only the optimizer helpers need roles under plain unit scaling
        if ctx.config.parametrization == "u-mup":
            raise
        gm.meta.pop(ROLES_META_KEY, None)
        log.warning("roles: parameter-role analysis failed (%s: %s); unit_scale_fx.training.optim will refuse this model",
                    type(exc).__name__, exc)
        return PassResult(False, "role analysis failed")
    gm.meta[ROLES_META_KEY] = analysis
    counts: dict[str, int] = {}
    for r in analysis.params.values():
        counts[r.role] = counts.get(r.role, 0) + 1
    return PassResult(False, ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
