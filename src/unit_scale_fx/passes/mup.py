"""Parameter roles and the u-μP parametrization, as three small passes.

* ``roles`` (always, after topology): :func:`unit_scale_fx.passes.roles.analyse_roles`;
  the result is kept in ``gm.meta["unit_scale_param_roles"]`` for
  :mod:`unit_scale_fx.training.optim`.
* ``mup`` (``parametrization="u-mup"`` only, after topology, before plan): edits
  the graph and the residual plan so that the planned scales follow u-μP:

  - residual shares tied to depth (:func:`depth_taus`);
  - attention logits scaled by ``attn_softmax / d_head``: the scale of each
    ``scaled_dot_product_attention`` (and the input of each softmax inside an
    attention branch) is multiplied by ``attn_softmax / sqrt(d_head)`` on top of
    the model's own ``1 / sqrt(d_head)``;
  - pointwise nonlinearities outside attention branches that follow a weighted
    op get their input multiplied by ``ffn_act``.

* ``mup_readout`` (u-μP only, after plan, before rewrite): the readout matmul's
  forward scale becomes ``loss_softmax / (rms_in * rms_w * fan_in)`` (u-μP's
  ``1 / fan_in`` instead of unit scaling's ``1 / sqrt(fan_in)``). The readout
  sits after the last residual add: when its output edge is a cut edge (the usual
  case, tied readout included) only the forward scale changes, which rescales
  every upstream gradient by the same factor; otherwise the backward scales of
  its tied input edges move with the forward one, so gradients stay valid.
"""

from __future__ import annotations

import logging
import math
import operator

import networkx as nx
import torch.fx as fx
import torch.nn.functional as F

from ..config import MupConfig
from ..record import ARG_SCALE_KEY, META_KEY, ROLES_META_KEY
from ..rules.matmul import logit_matmul_of, matmul_operands
from ..rules.registry import Kind, OpView, aten, float_tensor_inputs, lookup
from .base import PassContext, PassResult, declare
from .roles import branch_regions, residual_streams, weighted_ops
from .topology import ATTN_BRANCH

log = logging.getLogger(__name__)

def depth_taus(kinds: list[str], mup: MupConfig) -> list[float]:
    """Residual shares ``tau_i`` for a stream whose branches have these kinds, in order.

    ``kinds[i]`` is ``ATTN_BRANCH`` or anything else (an MLP-like branch).
    """
    a_attn, a_mlp = mup.branch_weights()
    total = len(kinds) / 2.0
    taus = []
    for kind in kinds:
        w2 = (a_attn if kind == ATTN_BRANCH else a_mlp) ** 2
        total += w2
        taus.append(w2 / total)
    return taus



_SDPA = {F.scaled_dot_product_attention, aten("scaled_dot_product_attention")} - {None}


def _is_mup(ctx: PassContext) -> bool:
    return ctx.config.parametrization == "u-mup"


def _insert_mul(gm: fx.GraphModule, topo, node: fx.Node, inp: fx.Node, factor: float) -> fx.Node:
    """Put ``inp * factor`` between ``inp`` and ``node``; keep the topology's graph and bridges in step."""
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(operator.mul, (inp, float(factor)))
    new.meta[ARG_SCALE_KEY] = {"bypass": True}
    for key in ("val", "nn_module_stack", "tensor_meta", "stack_trace"):
        if key in inp.meta:
            new.meta[key] = inp.meta[key]
    node.replace_input_with(inp, new)
    g: nx.DiGraph = topo.graph
    if g.has_edge(inp, node):
        g.remove_edge(inp, node)
        g.add_edge(inp, new)
        g.add_edge(new, node)
        if (inp, node) in topo.bridges:
            topo.bridges.discard((inp, node))
            topo.bridges.update({(inp, new), (new, node)})
    return new


def _logit_dim(softmax: fx.Node, gm: fx.GraphModule) -> int | None:
    """d_head of an explicit attention softmax: the reduced size of the q @ k^T matmul feeding it."""
    n = softmax
    for _ in range(16):
        ins = float_tensor_inputs(n)
        if len(ins) != 1:
            return None
        n = ins[0]
        ops = matmul_operands(n, gm)
        if ops:
            shape = OpView.shape(ops[0])
            return shape[-1] if shape else None
    return None


@declare('mup', needs=('topology',))
def mup(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    if not _is_mup(ctx):
        return PassResult(False, "parametrization 'unit': nothing to do")
    hp = ctx.config.mup
    topo = ctx.topology
    streams, _ = residual_streams(topo, gm)
    for stream in streams:
        kinds = [topo.residuals[a].kind for a in stream]
        for add, tau in zip(stream, depth_taus(kinds, hp)):
            topo.residuals[add].tau = tau
            log.debug("mup: residual %s (%s) tau=%.4g (depth %d)", add.name, topo.residuals[add].kind, tau, len(stream))
    regions = branch_regions(topo)
    attn_nodes: set[fx.Node] = set()
    for add, region in regions.items():
        if topo.residuals[add].kind == ATTN_BRANCH:
            attn_nodes |= region
    weighted = weighted_ops(gm)
    n_attn = n_act = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in _SDPA:
            q = node.args[0] if node.args else node.kwargs.get("query")
            shape = OpView.shape(q)
            if shape is None:
                continue
            d = shape[-1]
            old = node.kwargs.get("scale", node.args[6] if len(node.args) > 6 else None)
            new = (1.0 / math.sqrt(d) if old is None else float(old)) * hp.attn_softmax / math.sqrt(d)
            node.meta.setdefault(ARG_SCALE_KEY, {"kwarg": ("scale", 6, old)})
            if len(node.args) > 6:
                node.args = node.args[:6] + (new,) + node.args[7:]
            else:
                node.kwargs = {**node.kwargs, "scale": new}
            n_attn += 1
            continue
        rule = lookup(node, gm)
        if rule is None or not float_tensor_inputs(node):
            continue
        if rule.kind == Kind.SOFTMAX and (node in attn_nodes or logit_matmul_of(node, gm) is not None):
            d = _logit_dim(node, gm)
            if d is None:
                log.info("mup: softmax %s: no q @ k^T matmul found; logits left as they are", node.name)
                continue
            _insert_mul(gm, topo, node, float_tensor_inputs(node)[0], hp.attn_softmax / math.sqrt(d))
            n_attn += 1
        elif rule.kind == Kind.POINTWISE and hp.ffn_act != 1.0 and node not in attn_nodes:
            (x,) = float_tensor_inputs(node)[:1]
            if x in topo.graph and nx.ancestors(topo.graph, node) & weighted:
                _insert_mul(gm, topo, node, x, hp.ffn_act)
                n_act += 1
    gm.graph.lint()
    return PassResult(n_act > 0 or n_attn > 0,
                      f"{sum(map(len, streams))} residual taus tied to depth, {n_attn} attention logit scales, "
                      f"{n_act} activation multipliers")


@declare('mup_readout', needs=('topology', 'scales'))
def mup_readout(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    if not _is_mup(ctx):
        return PassResult(False, "parametrization 'unit': nothing to do")
    analysis = gm.meta.get(ROLES_META_KEY)
    if analysis is None:
        return PassResult(False, "no role analysis")
    topo = ctx.topology
    alpha = ctx.config.mup.loss_softmax
    by_name = {n.name: n for n in gm.graph.nodes}
    done = 0
    for name, fan_in in analysis.readouts.items():
        node = by_name.get(name)
        rec = node.meta.get(META_KEY) if node is not None else None
        if rec is None:
            continue
        factor = alpha / math.sqrt(fan_in)
        old = rec.fwd
        rec.fwd = old * factor
        users = [u for u in node.users if u in topo.graph]
        if not users or not all(topo.is_cut(node, u) for u in users):
            # the logits are not behind a cut edge: keep forward and backward equal on every tied input edge
            ins = {n.name: n for n in float_tensor_inputs(node)}
            for k, b in list(rec.bwd.items()):
                if k in ins and not topo.is_cut(ins[k], node):
                    rec.bwd[k] = b * factor
        if rec.fwd_rms is not None:
            rec.fwd_rms *= factor
        rec.note = (rec.note + "; " if rec.note else "") + f"u-mup readout: x {factor:.4g} (loss_softmax / sqrt(fan_in={fan_in}))"
        log.debug("mup: readout %s fwd %.4g -> %.4g", name, old, rec.fwd)
        done += 1
    return PassResult(False, f"{done} readout(s) scaled by 1/fan_in")
