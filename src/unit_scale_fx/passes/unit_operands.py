"""unit_operands: a matmul of two activations reads unit operands, whatever the model scaled them by.

A model may scale an operand itself before a matmul: DeBERTa divides its keys by
``sqrt(d)`` *before* ``bmm(q, k^T / sqrt(d))``. The plan keeps that constant (it is the
model's attention temperature), so the operand reaches the matmul with RMS ``1 / sqrt(d)``,
out of the range that low-precision formats cover best. A matmul is bilinear, so the
factor can move across it without changing anything: with ``ua``, ``ub`` powers of two,

    y = scale(scale(a, ua, 1 / ub) @ scale(b, ub, 1 / ua), 1 / (ua ub), 1)

computes ``a @ b`` bit for bit (multiplying by a power of two is exact), and sends back
``g @ b^T`` and ``a^T @ g`` exactly: the backward scale of each operand undoes the other
operand's factor, which the matmul's backward multiplies in. Forward, both operands are
unit; backward, the matmul reads the unit gradient ``g`` and the unit operands.

Only plain matmuls of two tensors (``matmul`` / ``bmm`` / ``mm``) are rewritten: ops with a bias
(``linear``, ``addmm``) would add it at the wrong scale.
"""

from __future__ import annotations

import math
import operator
from typing import Any, Optional

import torch
import torch.fx as fx

from ..record import META_KEY, SCALE_ROLE
from ..rules.registry import aten, many, tensor_method
from ..scale import scale
from .base import PassContext, PassResult, declare
from .rewrite import scale_input, scale_output

#: bilinear ops of two tensors, no bias
MATMULS = frozenset(many([torch.matmul, torch.bmm, torch.mm, operator.matmul, tensor_method("matmul"),
                          tensor_method("bmm"), tensor_method("mm"), tensor_method("__matmul__"),
                          aten("matmul"), aten("bmm"), aten("mm")]))

#: an operand whose planned RMS lies outside this band is made unit
BAND = (0.5, 2.0)


def _is_scale(n: Any) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_function" and n.target is scale


def planned_rms(n: Any) -> Optional[float]:
    """The planned RMS of the value ``n``: its producer's record (RMS after the producer's own output
    scale), times the factors of the other scale nodes between them."""
    factor = 1.0
    while _is_scale(n):
        src = n.args[0]
        role = n.meta.get(SCALE_ROLE) or ("", "")
        if not (role[0] == "output" and isinstance(src, fx.Node) and role[1] == src.name):
            factor *= float(n.args[1])
        n = src
    rec = n.meta.get(META_KEY) if isinstance(n, fx.Node) else None
    r = getattr(rec, "fwd_rms", None)
    return r * factor if isinstance(r, float) and r > 0 and math.isfinite(r) else None


def _unit_factor(n: Any) -> float:
    r = planned_rms(n)
    if r is None or BAND[0] <= r <= BAND[1]:
        return 1.0
    return 2.0 ** round(-math.log2(r))


def _times(gm: fx.GraphModule, s: fx.Node, fwd: float, bwd: float) -> None:
    """Multiply the factors of the scale node ``s``; a scale that becomes (1, 1) is removed."""
    x, a, b = s.args
    a, b = float(a) * fwd, float(b) * bwd
    if a == 1.0 and b == 1.0:
        s.replace_all_uses_with(x)
        gm.graph.erase_node(s)
    else:
        s.args = (x, a, b)


def _scale_edge(gm: fx.GraphModule, node: fx.Node, x: fx.Node, fwd: float, bwd: float) -> None:
    """Scale the edge ``x -> node`` by ``(fwd, bwd)``: in the matmul's own input scale if it has one."""
    if fwd == 1.0 and bwd == 1.0:
        return
    role = x.meta.get(SCALE_ROLE) or ("", "")
    if _is_scale(x) and len(x.users) == 1 and role == ("input", node.name):
        _times(gm, x, fwd, bwd)
    else:
        scale_input(gm, node, x, fwd, bwd)


@declare('unit_operands')
def unit_operands(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    done = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in MATMULS or len(node.args) < 2:
            continue
        a, b = node.args[0], node.args[1]
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)) or a is b:
            continue
        ua, ub = _unit_factor(a), _unit_factor(b)
        if ua == 1.0 and ub == 1.0:
            continue
        _scale_edge(gm, node, a, ua, 1.0 / ub)
        _scale_edge(gm, node, b, ub, 1.0 / ua)
        out = next(iter(node.users)) if len(node.users) == 1 else None
        if _is_scale(out) and out.args[0] is node and (out.meta.get(SCALE_ROLE) or ("",))[0] == "output":
            _times(gm, out, 1.0 / (ua * ub), 1.0)  # the matmul's own output scale takes the factor
        else:
            scale_output(gm, node, 1.0 / (ua * ub), 1.0)
        done += 1
    return PassResult(done > 0, f"{done} matmuls read unit operands")
