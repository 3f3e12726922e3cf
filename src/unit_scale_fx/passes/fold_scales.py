"""fold_scales: one scale node where the rewrite left two in a row.

An op's output scale ``scale(y, a1, b1)`` read only by the next op's input scale
``scale(., a2, b2)`` is the same as ``scale(y, a1 * a2, b1 * b2)``: the product of
two linear maps, forward and backward. Folding halves the elementwise kernels and
autograd nodes between ops in eager mode. The folded node keeps the output role,
and records the consumer's part under ``FOLDED`` so reports can still show the
value and gradient as the producer's readers see them.
"""

from __future__ import annotations

import torch.fx as fx

from ..scale import scale
from .base import PassContext, PassResult, declare
from ..record import FOLDED, INSERTED, SCALE_ROLE

#: ``(a2, b2)``: the factors of the consumer's input scale folded into this node


def _is_scale(n: object) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_function" and n.target is scale and bool(n.meta.get(INSERTED))


@declare('fold_scales')
def fold_scales(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    folded = 0
    for node in list(gm.graph.nodes):
        if not _is_scale(node):
            continue
        inner = node.args[0]
        if not _is_scale(inner) or len(inner.users) != 1 or FOLDED in inner.meta:
            continue
        if (inner.meta.get(SCALE_ROLE) or ("",))[0] != "output" or (node.meta.get(SCALE_ROLE) or ("",))[0] != "input":
            continue
        x, a1, b1 = inner.args
        _, a2, b2 = node.args
        node.args = (x, float(a1) * float(a2), float(b1) * float(b2))
        node.meta[SCALE_ROLE] = inner.meta[SCALE_ROLE]
        node.meta[FOLDED] = (float(a2), float(b2))
        gm.graph.erase_node(inner)
        folded += 1
    return PassResult(folded > 0, f"{folded} scale pairs folded")
