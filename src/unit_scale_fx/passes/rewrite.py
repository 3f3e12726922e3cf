"""rewrite: put each record's scales into the graph as ``scale`` nodes.

* ops with weights (residual adds): each input becomes ``scale(x, w, w)``;
* single-input ops: the output becomes ``scale(y, fwd, bwd)``;
* other ops: each input with a backward scale becomes ``scale(x, 1, bwd)`` and the
  output ``scale(y, fwd, 1)``. Backward scales sit after the op's own backward,
  so the gradients that matmuls consume stay unit.
"""

from __future__ import annotations

import logging

import torch.fx as fx

from ..record import META_KEY, ScaleRecord
from ..rules.registry import float_tensor_inputs
from ..scale import scale
from .base import PassContext, PassResult

log = logging.getLogger(__name__)


def _insert_scale(gm: fx.GraphModule, src: fx.Node, fwd: float, bwd: float, where: str) -> fx.Node:
    ctx = gm.graph.inserting_after(src) if where == "after" else gm.graph.inserting_before(src)
    with ctx:
        new = gm.graph.call_function(scale, (src, float(fwd), float(bwd)))
    new.meta["unit_scale_inserted"] = True
    new.meta["unit_scale_role"] = ("output", src.name)  # read by analysis.track / draw
    for key in ("val", "nn_module_stack", "tensor_meta"):
        if key in src.meta:
            new.meta[key] = src.meta[key]
    return new


def _scale_input(gm: fx.GraphModule, node: fx.Node, inp: fx.Node, fwd: float, bwd: float) -> None:
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(scale, (inp, float(fwd), float(bwd)))
    new.meta["unit_scale_inserted"] = True
    new.meta["unit_scale_role"] = ("input", node.name)  # read by analysis.track / draw
    for key in ("val", "nn_module_stack"):
        if key in inp.meta:
            new.meta[key] = inp.meta[key]
    node.replace_input_with(inp, new)


def rewrite(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    count = 0
    # Last node first: an op's inputs are still the original nodes when it is rewritten.
    for node in reversed(list(gm.graph.nodes)):
        rec: ScaleRecord | None = node.meta.get(META_KEY)
        if rec is None or not rec.changes_anything:
            continue
        by_name = {n.name: n for n in float_tensor_inputs(node)}
        if rec.weights:
            for name, w in rec.weights.items():
                if w != 1.0:
                    _scale_input(gm, node, by_name[name], w, w)
        else:
            bwd = {by_name[k]: v for k, v in rec.bwd.items() if k in by_name}
            single = len(bwd) == 1 and len(by_name) == 1
            out_bwd = next(iter(bwd.values())) if single else 1.0
            if not single:
                for inp, b in bwd.items():
                    if b != 1.0:
                        _scale_input(gm, node, inp, 1.0, b)
            if rec.fwd != 1.0 or out_bwd != 1.0:
                out = _insert_scale(gm, node, rec.fwd, out_bwd, "after")
                node.replace_all_uses_with(out, delete_user_cb=lambda u: u is not out)
        log.debug("rewrite: %s %s fwd=%.4g bwd=%s weights=%s", rec.rule, node.name, rec.fwd, rec.bwd, rec.weights)
        count += 1
    return PassResult(count > 0, f"{count} nodes scaled")
