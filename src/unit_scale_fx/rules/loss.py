"""Losses: the forward value is left alone; the gradient into the prediction is made unit."""

from __future__ import annotations

import math

import torch
import torch.fx as fx
import torch.nn.functional as F

from .registry import Kind, OpView, Rule, Scales, aten, register

_REDUCTIONS = {0: "none", 1: "mean", 2: "sum"}  # aten's integer encoding


def _reduction(op: OpView, pos: int, aten_pos: int) -> str:
    if isinstance(op.node.target, torch._ops.OpOverload):
        r = op.arg(aten_pos, "reduction", 1)
        return _REDUCTIONS.get(r, "mean") if isinstance(r, int) else str(r)
    r = op.arg(pos, "reduction", "mean")
    return r if isinstance(r, str) else "mean"


@register(F.cross_entropy, aten("cross_entropy_loss"))
class CrossEntropyRule(Rule):
    """Gradient of mean cross-entropy into logits has RMS ``1 / (N sqrt(V))``."""

    name = "cross_entropy"
    kind = Kind.LOSS

    def scales(self, op: OpView) -> Scales:
        x = op.arg(0, "input")
        xs = op.shape(x)
        if not isinstance(x, fx.Node) or x not in op.inputs or xs is None:
            return Scales(fixed_fwd=True, out_rms=None, note="logits unknown")
        vocab = xs[1] if len(xs) > 1 else xs[0]
        rows = max(1, math.prod(xs) // vocab)
        red = _reduction(op, 6, 3)
        gain = 1.0 / (math.sqrt(vocab) * (rows if red == "mean" else 1))
        s = Scales(fwd=1.0, fixed_fwd=True, out_rms=None, note=f"V={vocab} N={rows} reduction={red}")
        s.bwd[x], s.grad_gain[x] = 1.0 / gain, gain
        return s


@register(F.mse_loss, aten("mse_loss"))
class MSELossRule(Rule):
    """Gradient of mean squared error is ``2 (x - t) / M``: RMS ``2 sqrt(rx^2 + rt^2) / M``."""

    name = "mse_loss"
    kind = Kind.LOSS

    def scales(self, op: OpView) -> Scales:
        x, t = op.arg(0, "input"), op.arg(1, "target")
        xs = op.shape(x)
        if xs is None:
            return Scales(fixed_fwd=True, out_rms=None, note="shape unknown")
        m = max(1, math.prod(xs))
        red = _reduction(op, 4, 2)
        diff = math.sqrt(op.rms(x) ** 2 + op.rms(t) ** 2)
        gain = 2.0 * diff / (m if red == "mean" else 1)
        s = Scales(fwd=1.0, fixed_fwd=True, out_rms=None, note=f"M={m} reduction={red}")
        for n in op.inputs:
            s.bwd[n], s.grad_gain[n] = 1.0 / gain, gain
        return s
