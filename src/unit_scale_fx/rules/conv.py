"""Convolutions: a matmul whose fan-in is ``C_in / groups * prod(kernel)``.

For ``y = conv(x, w)`` with ``w: [C_out, C_in / groups, *K]`` and input RMS ``rx``,
weight RMS ``rw``: forward ``1 / (rx rw sqrt(fan_in))``; each input value is read by
``C_out / groups * prod(K) / prod(stride)`` outputs, so its gradient scale is
``1 / (rw sqrt(that))``; the weight gradient sums over ``N * prod(out spatial)``
positions (scale ``1 / (rx sqrt(rows))``), the bias gradient over the same rows.
Zero padding at the borders is ignored (it lowers border outputs slightly).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from .registry import Kind, OpView, Rule, Scales, aten, register


def _tuple(v: Any, n: int) -> tuple[int, ...]:
    if isinstance(v, int):
        return (v,) * n
    v = tuple(int(a) for a in v)
    return v * n if len(v) == 1 else v


class ConvRule(Rule):
    """``F.conv1d/2d/3d`` (and aten ``conv*d`` / ``convolution``)."""

    name = "conv"
    kind = Kind.MATMUL

    def _args(self, op_node: fx.Node) -> dict[str, Any]:
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
        if op_node.target is aten("convolution"):
            names = ("input", "weight", "bias", "stride", "padding", "dilation", "transposed",
                     "output_padding", "groups")
        out = dict(zip(names, op_node.args))
        out.update(op_node.kwargs)
        return out

    def scales(self, op: OpView) -> Scales:
        a = self._args(op.node)
        if a.get("transposed"):
            return Scales(out_rms=None, note="transposed convolution: no rule")
        x, w, b = a.get("input"), a.get("weight"), a.get("bias")
        xs, ws, os_ = op.shape(x), op.shape(w), op.out_shape
        if xs is None or ws is None or os_ is None:
            return Scales(out_rms=None, note="shapes unknown")
        nd = len(ws) - 2
        groups = int(a.get("groups", 1) or 1)
        stride = _tuple(a.get("stride", 1), nd)
        k = math.prod(ws[2:])
        fan_in = ws[1] * k
        reads = max(1.0, ws[0] / groups * k / math.prod(stride))
        rows = max(1, math.prod(os_) // os_[1] if len(os_) > 1 else 1)
        rx, rw = op.rms(x), op.rms(w)
        s = Scales(fwd=1.0 / (rx * rw * math.sqrt(fan_in)), note=f"fan_in={fan_in} reads={reads:.3g} rows={rows}")
        for node, gain in ((x, rw * math.sqrt(reads)), (w, rx * math.sqrt(rows)), (b, math.sqrt(rows))):
            if isinstance(node, fx.Node) and node in op.inputs:
                s.bwd[node], s.grad_gain[node] = 1.0 / gain, gain
        out2 = 1.0
        if isinstance(b, fx.Node) and b in op.inputs:
            out2 += (s.fwd * op.rms(b, default=0.0)) ** 2
        s.out_rms = math.sqrt(out2)
        return s

    def init_kinds(self, node: fx.Node) -> dict[fx.Node, str]:
        a = self._args(node)
        roles: dict[fx.Node, str] = {}
        if isinstance(a.get("weight"), fx.Node):
            roles[a["weight"]] = "unit"
        if isinstance(a.get("bias"), fx.Node):
            roles[a["bias"]] = "zero"
        return roles


register(*dict.fromkeys(t for t in (
    F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d,
    aten("conv1d"), aten("conv2d"), aten("conv3d"), aten("convolution"),
) if t is not None))(ConvRule())
