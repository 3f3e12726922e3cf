"""init_weights: unit-RMS weights, zero biases, unit norm gains.

A parameter table (two or more dims) added to activations, such as a learned position
embedding, is a weight too: unit RMS (a vector added is a bias and a table that is all
zero was zeroed on purpose; both are left as they are).

Roles come from the rules of the ops that consume each parameter (a weight of a
matmul, the gain of a norm, ...), never from parameter names. Weights are
divided by their RMS, which keeps the user's initialiser's shape (and zero
rows such as an embedding's padding row); a weight that is all zero is
re-sampled from N(0, 1), and the log says so.
"""

from __future__ import annotations

import logging
import math
from typing import Collection

import torch
import torch.fx as fx

from ..rules.registry import lookup
from ..tensor_stats import rms
from .base import PassContext, PassResult, declare

log = logging.getLogger(__name__)

_PRIORITY = {"unit": 2, "one": 1, "zero": 0, "added": -1}


def _is_param(node: fx.Node, params: Collection[str]) -> bool:
    return node.op == "get_attr" or (node.op == "placeholder" and node.name in params)


def param_key(node: fx.Node) -> str:
    """How roles name a parameter: the qualified name of a ``get_attr``, the name of a placeholder."""
    return str(node.target) if node.op == "get_attr" else node.name


def _is_size(node: fx.Node) -> bool:
    """A node whose value is a number (a symbolic size under dynamic shapes), not a tensor."""
    val = node.meta.get("val")
    return isinstance(val, (int, float, bool, torch.SymInt, torch.SymFloat, torch.SymBool))


def _source_param(node: fx.Node, gm: fx.GraphModule, params: Collection[str] = ()) -> fx.Node | None:
    """Follow scale-preserving ops (``.t()``, views) back to a ``get_attr`` or parameter placeholder.

    Only tensor inputs count: ``probe.repeat(batch, 1, 1)`` under dynamic shapes also reads the symbolic
    batch size (a node too), and is still one tensor's values repeated.
    """
    seen = 0
    while not _is_param(node, params) and seen < 8:
        rule = lookup(node, gm)
        ins = [n for n in node.all_input_nodes if not _is_size(n)]
        if rule is None or not rule.preserves_scale or len(ins) != 1:
            return None
        node = ins[0]
        seen += 1
    return node if _is_param(node, params) else None


def parameter_init_kinds(gm: fx.GraphModule, params: Collection[str] = ()) -> dict[str, str]:
    """``parameter -> init kind`` (``"unit"``, ``"zero"``, ``"one"``) from the rules of the consuming ops.

    Parameters are ``get_attr`` nodes (keyed by qualified name) and the
    placeholders named in ``params`` (keyed by placeholder name).
    """
    kinds: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method"):
            continue
        rule = lookup(node, gm)
        if rule is None:
            continue
        for arg, kind in rule.init_kinds(node).items():
            src = _source_param(arg, gm, params)
            if src is not None:
                _set_kind(kinds, param_key(src), kind)
    return kinds


#: the former name of :func:`parameter_init_kinds`
parameter_roles = parameter_init_kinds


def _set_kind(kinds: dict[str, str], name: str, kind: str) -> None:
    if name not in kinds or _PRIORITY[kind] > _PRIORITY[kinds[name]]:
        kinds[name] = kind


def init_parameter(t: torch.Tensor, kind: str, name: str) -> bool:
    """Initialise one parameter in place for its init kind; False if it was left alone (meta, integer)."""
    if not t.is_floating_point() or t.device.type == "meta":
        return False
    if kind == "added":  # a parameter added to activations: a table (positions) is a weight, a vector a bias
        if t.dim() < 2 or not bool((t != 0).any()):
            return False  # a vector, or a table the user set to zero on purpose: left as it is
        kind = "unit"
    with torch.no_grad():
        if kind == "unit":
            r = rms(t)
            if not math.isfinite(r) or r == 0:
                t.normal_()
                log.warning("init: weight %s was all zero; re-sampled from N(0, 1)", name)
            else:
                t.div_(torch.tensor(r, dtype=torch.float32).to(t.dtype))
                log.debug("init: weight %s divided by its RMS %.4g", name, r)
        elif kind == "zero":
            t.zero_()
            log.debug("init: bias %s set to zero", name)
        elif kind == "one":
            t.fill_(1.0)
            log.debug("init: gain %s set to one", name)
        else:
            return False
    return True


@declare('init_weights', produces=('init_kinds',))
def init_weights(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    if not ctx.config.init_weights:
        return PassResult(False, "disabled")
    kinds = parameter_init_kinds(gm, ctx.param_inputs)
    changed = 0
    for name, kind in kinds.items():
        t = ctx.param_inputs.get(name)
        if t is None:
            try:
                t = gm.get_parameter(name)
            except AttributeError:
                continue  # a buffer: not ours to initialise
        changed += init_parameter(t, kind, name)
    ctx.init_kinds = kinds
    return PassResult(changed > 0, f"{changed} parameters initialised")
