"""shape_prop: shapes and dtypes on every node, without touching real memory.

Runs the graph under a FakeTensorMode (meta-backed tensors). Where an op cannot
run on fake tensors, the graph is run for real under ``no_grad`` instead.
Also records the RMS of real floating-point example inputs (unless ``ctx.input_rms`` already has one).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.fx as fx
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from ..errors import UnitScaleError
from .base import PassContext, PassResult

log = logging.getLogger(__name__)


def placeholder_values(gm: fx.GraphModule, args: tuple, kwargs: dict) -> list[Any]:
    """Values for the graph's placeholders from call arguments (positional, keyword, defaults)."""
    out: list[Any] = []
    i = 0
    for node in gm.graph.find_nodes(op="placeholder"):
        name = str(node.target).lstrip("*")
        if str(node.target).startswith("*"):
            out.append(tuple(args[i:]))
            i = len(args)
        elif i < len(args):
            out.append(args[i])
            i += 1
        elif name in kwargs:
            out.append(kwargs[name])
        elif node.args:
            out.append(node.args[0])
        else:
            out.append(None)
    return out


class _RealProp(fx.Interpreter):
    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        n.meta["val"] = torch.utils._pytree.tree_map_only(torch.Tensor, lambda t: t.detach(), result)
        return result


def shape_prop(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    if ctx.example_args is None and ctx.example_kwargs is None:
        raise UnitScaleError(
            "shape propagation needs example inputs",
            where="pass shape_prop",
            fix="call the module once, or pass example_inputs=(...) to unit_scale",
        )
    values = placeholder_values(gm, ctx.example_args or (), ctx.example_kwargs or {})
    for node, v in zip(gm.graph.find_nodes(op="placeholder"), values):
        if isinstance(v, torch.Tensor) and v.is_floating_point() and v.device.type != "meta" and v.numel():
            ctx.input_rms.setdefault(node.name, float(v.detach().float().pow(2).mean().sqrt()))
    try:
        from torch._subclasses.fake_tensor import FakeTensorMode

        mode = FakeTensorMode(allow_non_fake_inputs=True)
        fake = [mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for v in values]
        with torch.no_grad():
            FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*fake)
        return PassResult(False, "fake-tensor propagation")
    except Exception as exc:  # fall back to a real run
        log.info("fake-tensor shape propagation failed (%s: %s); running the graph for real", type(exc).__name__, exc)
    if any(isinstance(v, torch.Tensor) and v.device.type == "meta" for v in values):
        raise UnitScaleError(
            "shape propagation failed on meta inputs",
            where="pass shape_prop",
            fix="pass real example inputs",
        )
    try:
        with torch.no_grad():
            _RealProp(gm).run(*values)
    except Exception as exc:
        raise UnitScaleError(
            f"running the captured graph on the example inputs failed: {type(exc).__name__}: {exc}",
            where="pass shape_prop",
            fix="check that example_inputs match the model's forward signature",
        ) from exc
    return PassResult(False, "real propagation")
