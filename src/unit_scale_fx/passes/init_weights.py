"""init_weights: unit-RMS weights, zero biases, unit norm gains.

Roles come from the rules of the ops that consume each parameter (a weight of a
matmul, the gain of a norm, ...), never from parameter names. Weights are
divided by their RMS, which keeps the user's initialiser's shape (and zero
rows such as an embedding's padding row); a weight that is all zero is
re-sampled from N(0, 1), and the log says so.
"""

from __future__ import annotations

import logging

import torch
import torch.fx as fx

from ..rules.registry import lookup
from .base import PassContext, PassResult

log = logging.getLogger(__name__)

_PRIORITY = {"unit": 2, "one": 1, "zero": 0}


def _source_param(node: fx.Node, gm: fx.GraphModule) -> fx.Node | None:
    """Follow scale-preserving ops (``.t()``, views) back to a ``get_attr``."""
    seen = 0
    while node.op != "get_attr" and seen < 8:
        rule = lookup(node, gm)
        ins = [n for n in node.all_input_nodes]
        if rule is None or not rule.preserves_scale or len(ins) != 1:
            return None
        node = ins[0]
        seen += 1
    return node if node.op == "get_attr" else None


def parameter_roles(gm: fx.GraphModule) -> dict[str, str]:
    """``qualified parameter name -> role`` from the rules of the consuming ops."""
    roles: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method"):
            continue
        rule = lookup(node, gm)
        if rule is None:
            continue
        for arg, role in rule.param_roles(node).items():
            src = _source_param(arg, gm)
            if src is not None:
                roles_set(roles, str(src.target), role)
    return roles


def roles_set(roles: dict[str, str], name: str, role: str) -> None:
    if name not in roles or _PRIORITY[role] > _PRIORITY[roles[name]]:
        roles[name] = role


def init_weights(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    if not ctx.config.init_weights:
        return PassResult(False, "disabled")
    roles = parameter_roles(gm)
    changed = 0
    with torch.no_grad():
        for name, role in roles.items():
            try:
                t = gm.get_parameter(name)
            except AttributeError:
                continue  # a buffer: not ours to initialise
            if not t.is_floating_point() or t.device.type == "meta":
                continue
            if role == "unit":
                rms = t.float().pow(2).mean().sqrt()
                if not torch.isfinite(rms) or rms == 0:
                    t.normal_()
                    log.warning("init: weight %s was all zero; re-sampled from N(0, 1)", name)
                else:
                    t.div_(rms.to(t.dtype))
                    log.debug("init: weight %s divided by its RMS %.4g", name, float(rms))
            elif role == "zero":
                t.zero_()
                log.debug("init: bias %s set to zero", name)
            elif role == "one":
                t.fill_(1.0)
                log.debug("init: gain %s set to one", name)
            changed += 1
    ctx.param_roles = roles  # type: ignore[attr-defined]
    return PassResult(changed > 0, f"{changed} parameters initialised")
