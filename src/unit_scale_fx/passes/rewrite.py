"""rewrite: put each record's scales into the graph as ``scale`` nodes.

* adds with weights (residual adds): each input becomes ``scale(x, w_fwd, w_bwd)``;
* matmul-class ops (matmul, attention): each input with a backward scale becomes ``scale(x, 1, bwd)``
  and the output ``scale(y, fwd, 1)``: backward scales act after the op's own
  backward, so the gradients that matmuls consume stay unit;
* other ops whose inputs share one backward scale: one ``scale(y, fwd, bwd)``;
* ops with no scale of their own (a concatenation) that a parameter enters beside the batch's values
  (:func:`~unit_scale_fx.passes.balance.parameter_edges`): ``scale(p, 1, bwd)`` on that input.
"""

from __future__ import annotations

import logging
import operator
from typing import Optional

import torch
import torch.fx as fx

from ..errors import UnitScaleError
from ..record import INSERTED, META_KEY, SCALE_ROLE, ScaleRecord, original
from ..rules.registry import Kind
from ..scale import scale
from .base import PassContext, PassResult, declare
from .round_scales import pow2

log = logging.getLogger(__name__)

#: the meta key's former name (it is :data:`~unit_scale_fx.record.SCALE_ROLE`)
ROLE = SCALE_ROLE

#: Op kinds whose backward scales go on the inputs: matmul-class ops, whose backward is itself
#: a matmul, and embedding lookups (kind matmul too), whose backward scatter-adds the output gradient.
INPUT_SIDE_KINDS = frozenset({Kind.MATMUL, Kind.ATTENTION})


def _snap(x: float) -> float:
    """Factors within a millionth of 1 are 1 (no scale node for them)."""
    return 1.0 if abs(x - 1.0) < 1e-6 else float(x)


def _new_scale(gm: fx.GraphModule, src: fx.Node, fwd: float, bwd: float) -> fx.Node:
    new = gm.graph.call_function(scale, (src, float(fwd), float(bwd)))
    new.meta[INSERTED] = True
    for key in ("val", "nn_module_stack"):
        if key in src.meta:
            new.meta[key] = src.meta[key]
    return new


def scale_input(gm: fx.GraphModule, node: fx.Node, inp: fx.Node, fwd: float, bwd: float) -> fx.Node:
    """Insert ``scale(inp, fwd, bwd)`` on the edge ``inp -> node`` only."""
    with gm.graph.inserting_before(node):
        new = _new_scale(gm, inp, fwd, bwd)
    new.meta[SCALE_ROLE] = ("input", node.name)
    node.replace_input_with(inp, new)
    return new


def scale_output(gm: fx.GraphModule, node: fx.Node, fwd: float, bwd: float) -> fx.Node:
    """Insert ``scale(node, fwd, bwd)`` and make every reader of ``node`` read it."""
    with gm.graph.inserting_after(node):
        new = _new_scale(gm, node, fwd, bwd)
    new.meta[SCALE_ROLE] = ("output", node.name)
    node.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)
    return new


def _output_sites(node: fx.Node) -> Optional[list[fx.Node]]:
    """Where ``node``'s output scale goes: the node itself; for a tuple result (an aten op that also returns
    indices: ``embedding_bag``) whose only floating-point element is that output, the ``getitem`` nodes that
    read it; None for a tuple of several floating-point tensors (a scale op cannot sit on a tuple)."""
    val = node.meta.get("val")
    if not isinstance(val, (tuple, list)):
        return [node]
    floats = [i for i, v in enumerate(val) if isinstance(v, torch.Tensor) and v.is_floating_point()]
    if len(floats) != 1:
        return None
    return [u for u in node.users if u.target is operator.getitem and len(u.args) > 1 and u.args[1] == floats[0]]


def _inputs_by_original_name(node: fx.Node) -> dict[str, fx.Node]:
    return {original(n).name: n for n in node.all_input_nodes}


@declare('rewrite', needs=('scales',))
def rewrite(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    count = 0
    # Last node first: an op's inputs are still (close to) the original nodes when it is rewritten.
    for node in reversed(list(gm.graph.nodes)):
        rec: ScaleRecord | None = node.meta.get(META_KEY)
        if rec is None or not rec.changes_anything:
            continue
        inputs = _inputs_by_original_name(node)
        if rec.weights:
            for name, w in rec.weights.items():
                w, b = _snap(w), _snap(rec.bwd.get(name, w))
                if (w, b) != (1.0, 1.0):
                    scale_input(gm, node, inputs[name], w, b)
        else:
            bwd = {inputs[k]: _snap(v) for k, v in rec.bwd.items() if k in inputs}
            shared = set(bwd.values())
            sites = _output_sites(node)
            if rec.kind not in INPUT_SIDE_KINDS and rec.kind != Kind.PRESERVE and len(shared) <= 1 \
                    and sites is not None:
                out_bwd = shared.pop() if shared else 1.0
            else:
                out_bwd = 1.0
                for inp, b in bwd.items():
                    if b != 1.0:
                        scale_input(gm, node, inp, 1.0, b)
            if _snap(rec.fwd) != 1.0 or out_bwd != 1.0:
                if sites is None:
                    raise UnitScaleError(
                        f"{rec.rule} rule gave {node.name} ({rec.op}) a forward scale {rec.fwd:.4g}, but its result is "
                        "a tuple of several floating-point tensors, which one scale cannot act on",
                        where=f"unit_scale_fx.passes.rewrite ({node.name})",
                        fix="a rule for an op with several outputs must keep fwd=1 (fixed_fwd=True)")
                for site in sites:
                    scale_output(gm, site, _snap(rec.fwd), out_bwd)
        log.debug("rewrite: %s %s fwd=%.4g bwd=%s weights=%s", rec.rule, node.name, rec.fwd, rec.bwd, rec.weights)
        count += 1
    if ctx.potentials is not None:  # each returned value: the gradient from the caller, times its potential
        out = gm.graph.find_nodes(op="output")[0]
        inputs = _inputs_by_original_name(out)
        for name, b in ctx.potentials.output_bwd().items():
            if ctx.config.round_scales is not None:  # a power of two up to the last bit: exactly one
                b = pow2(b)
            if _snap(b) != 1.0 and name in inputs:
                scale_input(gm, out, inputs[name], 1.0, _snap(b))
    return PassResult(count > 0, f"{count} nodes scaled")
