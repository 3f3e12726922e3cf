"""normalize: one out-of-place form for in-place ops.

``x.add_(y)``, ``operator.iadd``, ``F.relu(x, inplace=True)`` and aten's
``add_.Tensor`` on intermediate values (export graphs) become their out-of-place
forms; later readers of the mutated tensor read the new value.
"""

from __future__ import annotations

import logging
import operator

import torch
import torch.fx as fx

from .base import PassContext, PassResult, declare

log = logging.getLogger(__name__)

_INPLACE_OPERATORS = {
    operator.iadd: operator.add,
    operator.isub: operator.sub,
    operator.imul: operator.mul,
    operator.itruediv: operator.truediv,
}


def _out_of_place_method(name: str) -> str | None:
    if not name.endswith("_") or name.startswith("_"):
        return None
    base = name[:-1]
    inplace, outplace = getattr(torch.Tensor, name, None), getattr(torch.Tensor, base, None)
    if inplace is None or outplace is None or not callable(outplace):
        return None
    return base


def _redirect_later_readers(gm: fx.GraphModule, mutated: fx.Node, new: fx.Node) -> None:
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for user in list(mutated.users):
        if user is not new and order[user] > order[new]:
            user.replace_input_with(mutated, new)


def _out_of_place_overload(target: object) -> object | None:
    """``aten.add_.Tensor`` -> ``aten.add.Tensor`` (same overload of the out-of-place op)."""
    if not isinstance(target, torch._ops.OpOverload):
        return None
    name = target.overloadpacket.__name__
    if not name.endswith("_") or name.startswith("_"):
        return None
    packet = getattr(torch.ops.aten, name[:-1], None)
    return getattr(packet, target._overloadname, None) if packet is not None else None


@declare('normalize')
def normalize(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    changed = 0
    for node in list(gm.graph.nodes):
        mutated = None
        if node.op == "call_method":
            base = _out_of_place_method(str(node.target))
            if base is not None:
                log.debug("normalize: %s -> Tensor.%s", node.format_node(), base)
                node.target = base
                mutated = node.args[0]
        elif node.op == "call_function" and node.target in _INPLACE_OPERATORS:
            node.target = _INPLACE_OPERATORS[node.target]
            mutated = node.args[0]
        elif (node.op == "call_function" and _out_of_place_overload(node.target) is not None
              and node.args and isinstance(node.args[0], fx.Node)
              and node.args[0].op not in ("get_attr", "placeholder")):  # buffers keep their updates
            node.target = _out_of_place_overload(node.target)
            mutated = node.args[0]
        elif node.op == "call_function" and node.kwargs.get("inplace") is True:
            node.kwargs = {**node.kwargs, "inplace": False}
            mutated = node.args[0] if node.args else None
        if isinstance(mutated, fx.Node):
            _redirect_later_readers(gm, mutated, node)
            changed += 1
    return PassResult(changed > 0, f"{changed} in-place ops made out-of-place")
