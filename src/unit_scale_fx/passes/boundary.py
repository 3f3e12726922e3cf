"""boundary_outputs: floating-point outputs of a graph that later code may read join ``ctx.boundary``.

Used where a graph is one piece of a larger program (the ``torch.compile`` backend, where
dynamo splits a model at graph breaks): an output may feed a later graph, so its potential
must stay tied to the outside. Runs after ``shape_prop`` (it needs the output shapes) and
before ``topology``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from .base import PassContext, PassResult, declare


def output_leaves(gm: fx.GraphModule) -> list[Any]:
    """The leaves of the graph's output structure, in order."""
    out = gm.graph.find_nodes(op="output")[0]
    return list(torch.utils._pytree.tree_leaves(out.args[0]))


@declare("boundary_outputs", needs=("real_values",))
def boundary_outputs(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    added = 0
    for n in output_leaves(gm):
        if isinstance(n, fx.Node) and n.name not in ctx.boundary:
            val = n.meta.get("val")
            if isinstance(val, torch.Tensor) and val.is_floating_point() and val.dim() > 0:
                ctx.boundary.add(n.name)
                added += 1
    return PassResult(False, f"{added} boundary outputs")
