"""strip_asserts: drop the tensor-metadata checks that ``torch.export`` adds.

``aten._assert_tensor_metadata(x, dtype=...)`` computes nothing; it only re-checks
a dtype the graph already fixes. As an extra reader of ``x`` it would keep ``x``
from being fused with the ops around it, so it is removed.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .base import PassContext, PassResult, declare

#: side-effect-only checks with no output that are safe to drop.
ASSERTS = tuple(
    t for t in (getattr(getattr(torch.ops.aten, "_assert_tensor_metadata", None), "default", None),) if t is not None
)


@declare('strip_asserts')
def strip_asserts(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    dropped = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in ASSERTS and not node.users:
            gm.graph.erase_node(node)
            dropped += 1
    return PassResult(dropped > 0, f"{dropped} metadata asserts dropped")
