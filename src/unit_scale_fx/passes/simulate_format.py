"""simulate_format: round the operands of every matmul-class op to a low-precision format.

For each matmul-class node (:func:`~unit_scale_fx.rules.matmul.is_matmul_class`: linear,
matmul / mm / bmm / addmm, convolutions, einsum of two operands, attention) the pass inserts
:class:`~unit_scale_fx.lowp.formats.Quantise` modules:

* before the op, on each operand (not on an added bias): round to ``fwd`` in forward;
* after the op: round the gradient arriving at its output to ``bwd`` in backward,
  so both matmuls of the op's backward consume rounded values.

Scaled-dot-product attention is replaced by :class:`SimulatedAttention`, which
rounds the operands of its two inner matmuls (Q, K, V, the softmax weights P) and
the gradients at their outputs.

In a unit-scaled graph the pass runs after ``rewrite``: the operand quantisers sit
after the inserted ``scale`` nodes, so what is rounded is exactly what the
matmul consumes, and the output quantiser sits between the op and its output
scale, so what is rounded in backward is the (unit) gradient the op's backward
matmuls consume.

Embedding lookups are left alone: a row gather does no arithmetic and FP8 training
recipes keep embedding tables in higher precision.

Per-op-kind formats (``FormatSimulation.high_precision``): a matmul-class op with no
other matmul-class op downstream of it is a *readout* (the LM head, a classifier);
when the policy keeps readouts in ``high_format``, their quantisers carry the role
``"readout operand"`` / ``"readout grad"`` (otherwise the usual ``"matmul ..."``). Readouts and
attention's inner matmuls can be kept in ``high_format`` while the rest is rounded to
``fwd`` / ``bwd``.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn as nn

from ..errors import UnitScaleError
from ..record import FORMAT_REPLACED, FORMAT_SITE
from ..lowp.formats import FormatSimulation, Quantise
from ..lowp.simulated_attention import SimulatedAttention
from ..rules.matmul import CONV_TARGETS, LAYOUTS, is_matmul_class
from ..rules.registry import Kind, lookup, resolve_target
from .base import PassContext, PassResult, declare

log = logging.getLogger(__name__)

#: Where the container of quantisers lives in the GraphModule.
SITES_ATTR = "us_formats"


def _bias_arg(node: fx.Node, target: Any) -> Any:
    lay = LAYOUTS.get(target)
    if lay is not None and lay.bias is not None:
        pos, name = lay.bias, lay.names[2]
    elif target in CONV_TARGETS:
        pos, name = 2, "bias"
    else:
        return None
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[pos] if len(node.args) > pos else None


def matmul_class(node: fx.Node, gm: fx.GraphModule) -> Optional[str]:
    """``"matmul"``, ``"attention"`` or ``"conv"`` for matmul-class nodes
    (:func:`~unit_scale_fx.rules.matmul.is_matmul_class`), else None."""
    if node.meta.get(FORMAT_SITE) or not is_matmul_class(node, gm):
        return None
    if resolve_target(node, gm) in CONV_TARGETS:
        return "conv"
    rule = lookup(node, gm)
    return "attention" if rule is not None and rule.kind == Kind.ATTENTION else "matmul"


def readout_nodes(gm: fx.GraphModule) -> set[fx.Node]:
    """The matmul-class (non-attention) nodes with no matmul-class node downstream of them."""
    below: dict[fx.Node, bool] = {}  # node -> a matmul-class node lies downstream (node excluded)
    out: set[fx.Node] = set()
    for node in reversed(list(gm.graph.nodes)):
        below[node] = any(below.get(u, False) or matmul_class(u, gm) is not None for u in node.users)
        klass = matmul_class(node, gm)
        if klass in ("matmul", "conv") and not below[node]:
            out.add(node)
    return out


def _operands(node: fx.Node, target: Any) -> list[fx.Node]:
    bias = _bias_arg(node, target)
    out: list[fx.Node] = []
    for n in node.all_input_nodes:
        if n is bias or n in out:
            continue
        val = n.meta.get("val")
        if isinstance(val, torch.Tensor) and not val.is_floating_point():
            continue
        out.append(n)
    return out


def _add_site(gm: fx.GraphModule, name: str, module: nn.Module) -> str:
    if not hasattr(gm, SITES_ATTR):
        gm.add_module(SITES_ATTR, nn.Module())
    getattr(gm, SITES_ATTR).add_module(name, module)
    return f"{SITES_ATTR}.{name}"


def _new_call(gm: fx.GraphModule, target: str, arg: fx.Node) -> fx.Node:
    new = gm.graph.call_module(target, (arg,))
    new.meta[FORMAT_SITE] = True
    for key in ("val", "nn_module_stack", "tensor_meta"):
        if key in arg.meta:
            new.meta[key] = arg.meta[key]
    return new


def apply_format_simulation(gm: fx.GraphModule, sim: FormatSimulation) -> int:
    """Insert the quantisers of ``sim`` into ``gm``'s graph; returns the number of ops simulated.

    Does not recompile.
    """
    if hasattr(gm, SITES_ATTR):
        raise UnitScaleError(
            "this graph already simulates a number format",
            where=f"simulate_format({type(gm).__name__})",
            fix="apply simulate_format once; call it on the model without simulation to change the formats",
        )
    count = 0
    readouts = readout_nodes(gm)
    for node in list(gm.graph.nodes):
        klass = matmul_class(node, gm)
        if klass is None:
            continue
        if klass == "attention":
            if not sim.attention:
                continue
            a_fwd, a_bwd = sim.formats_for("attention")
            name = _add_site(gm, node.name, SimulatedAttention(a_fwd, a_bwd, sim.saturate, sim.passthrough))
            node.meta[FORMAT_REPLACED] = (node.op, node.target)
            node.op, node.target = "call_module", name
            node.meta[FORMAT_SITE] = True
            count += 1
            log.debug("simulate_format: %s -> SimulatedAttention", node.name)
            continue
        target = resolve_target(node, gm)
        if node in readouts and "readout" in sim.high_precision:
            klass = "readout"
        fwd, bwd = sim.formats_for(klass)
        for i, inp in enumerate(_operands(node, target)):
            site = _add_site(gm, f"{node.name}_in{i}",
                             Quantise(fwd, None, sim.saturate, f"{klass} operand", sim.passthrough))
            with gm.graph.inserting_before(node):
                q = _new_call(gm, site, inp)
            node.replace_input_with(inp, q)
        site = _add_site(gm, f"{node.name}_grad",
                         Quantise(None, bwd, sim.saturate, f"{klass} grad", sim.passthrough))
        with gm.graph.inserting_after(node):
            q = _new_call(gm, site, node)
        node.replace_all_uses_with(q, delete_user_cb=lambda u: u is not q)
        count += 1
        log.debug("simulate_format: %s (%s) operands -> %s, grad -> %s", node.name, klass, fwd, bwd)
    log.info("simulate_format: %d matmul-class ops simulated (%s)", count, sim.describe())
    return count


@declare('simulate_format')
def simulate_formats(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Pipeline pass: apply ``ctx.config.simulate_format`` if it is set."""
    sim: Optional[FormatSimulation] = ctx.config.simulate_format
    if sim is None:
        return PassResult(False, "no format simulation")
    if hasattr(gm, SITES_ATTR):  # a replan: drop the previous sites, the graph is fresh
        delattr(gm, SITES_ATTR)
    n = apply_format_simulation(gm, sim)
    return PassResult(n > 0, f"{n} ops simulated ({sim.describe()})")
