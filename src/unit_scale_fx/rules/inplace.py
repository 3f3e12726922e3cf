"""Writes through views, as one out-of-place op.

``h.narrow(1, 0, 1).mul_(0)``, ``h[:, 0] = 0``, ``h[:, 1:3].masked_fill_(m, 0)``,
``h.narrow(0, 0, 2).index_put_(...)`` change ``h``. ``passes/normalize.py`` turns each
such write into ``write_through_view(h, views, op)``: it clones ``h``, takes the same
views of the clone, applies the same in-place op to the last one, and returns
``(new h, the written view)``. Running the user's own ops on a clone computes exactly
what the user wrote (also where a "view" copies, like advanced indexing), and autograd
differentiates it as usual. Targets are stored as names (:func:`op_name`), so the
graph pickles.

The written values pass through unchanged, so the op preserves scale: the rule is
``preserve`` (no scale op, true gradients to every input).
"""

from __future__ import annotations

import importlib
import operator
from typing import Any

import torch
from torch.fx.node import _get_qualified_name

from .registry import register
from .shape import PreserveRule

#: one step: ``(kind, name, args, kwargs)``, kind ``"method"`` (a Tensor method) or ``"function"``
Step = tuple[str, str, tuple, dict]


def op_name(target: Any) -> str:
    """A picklable, importable name of a function or aten overload (``"aten.narrow.default"``)."""
    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    return _get_qualified_name(target)


def resolve(name: str) -> Any:
    """Inverse of :func:`op_name`."""
    if name.startswith("aten."):
        _, packet, overload = name.split(".")
        return getattr(getattr(torch.ops.aten, packet), overload)
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):  # the longest importable prefix, then attributes
        try:
            obj: Any = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for part in parts[i:]:
            obj = getattr(obj, part)
        return obj
    raise ImportError(f"cannot resolve {name!r}")


def _apply(step: Step, x: Any) -> Any:
    kind, name, args, kwargs = step
    if kind == "method":
        return getattr(x, name)(*args, **kwargs)
    return resolve(name)(x, *args, **kwargs)


def write_through_view(base: torch.Tensor, views: tuple, op: Step) -> tuple[torch.Tensor, Any]:
    """``base`` after the in-place ``op`` on ``views`` of it, and that view after the write (out of place)."""
    out = base.clone()
    v: Any = out
    for step in views:
        v = _apply(step, v)
    res = _apply(op, v)
    if op[0] == "function" and resolve(op[1]) is operator.setitem:
        res = v  # setitem returns None; the written view is v
    return out, res


register(write_through_view)(PreserveRule())
