"""Batch normalisation: in training mode the output is unit, like layer norm.

The input gradient is ``g / std(x)`` (scale ``std(x)``: the RMS less the part of it shared by
all positions of a channel, ``RMS(x) sqrt(1 - rho)``), times ``sqrt((n - 2) / (n - 3))`` for a
channel normalised over ``n`` values (the batch std of few values is often small); gain and bias gradients sum
over every position but the channel (``N * prod(spatial)`` rows). Scales are planned
for training (batch statistics), whatever mode the module is in while planning; in
eval mode the running statistics stand in for the batch ones.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..layers import batch_norm_layer
from ..tensor_stats import mean_square
from .registry import Kind, OpView, Rule, Scales, aten, register


def _args(node: fx.Node) -> dict[str, Any]:
    if node.op == "call_module":
        names: tuple[str, ...] = ("input",)
    elif node.target is batch_norm_layer:
        names = ("module", "input", "weight", "bias")
    elif node.target is aten("batch_norm"):
        names = ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps")
    else:
        names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
    out = dict(zip(names, node.args))
    out.update(node.kwargs)
    return out


def few_values_gain(n: int) -> float:
    """The input gradient's RMS times ``std(x)`` when each channel is normalised over ``n`` values.

    The gradient ``(g - mean(g) - x_hat mean(g x_hat)) / sigma_b`` is ``g`` projected off two of the
    ``n`` directions, divided by the *batch* standard deviation: ``n sigma_b^2 / sigma^2`` is
    chi-squared with ``n - 1`` degrees of freedom, and ``E[1 / chi2_k] = 1 / (k - 2)``, so the mean
    square is ``(n - 2) / (n - 3)`` of ``g^2 / sigma^2`` (sqrt 2 for a batch of 4 on 1 x 1 maps;
    1.02 at 64 values). Three values: the expectation diverges (only ``eps`` bounds it), taken as 2;
    two or fewer: the gradient vanishes and nothing is predicted.
    """
    if n >= 4:
        return math.sqrt((n - 2) / (n - 3))
    return 2.0 if n == 3 else 1.0


class BatchNormRule(Rule):
    name = "batch_norm"
    kind = Kind.NORM

    def scales(self, op: OpView) -> Scales:
        a = _args(op.node)
        x = a.get("input")
        if not isinstance(x, fx.Node) or x not in op.inputs:
            return Scales(out_rms=None, note="normalised input is not a float tensor")
        rx = op.rms(x)
        xs = op.shape(x)
        rows = max(1, math.prod(xs) // xs[1]) if xs and len(xs) > 1 else 1
        # the input is divided by each channel's standard deviation, not its RMS: the part shared by all
        # positions (a conv of a ReLU output carries one per channel: rho of its square) is removed first
        sd = rx * math.sqrt(max(1e-3, 1.0 - op.rho(x)))
        gain = few_values_gain(rows) / sd
        # each channel's mean over batch and positions is removed, forward (out_rho) and backward: the input
        # gradient of each channel sums to zero over the batch's rows, so a later sum over them (a bias before
        # it) finds nothing shared (grad_rho; its square is then about half that of independent rows)
        s = Scales(fwd=1.0, bwd={x: 1.0 / gain}, grad_gain={x: gain}, note=f"rows={rows} rho={op.rho(x):.2f}",
                   out_rho=0.0, grad_rho={x: 0.0})
        out2 = 1.0
        w, b = a.get("weight"), a.get("bias")
        if op.module is not None:
            wt, bt = getattr(op.module, "weight", None), getattr(op.module, "bias", None)
            if isinstance(wt, torch.Tensor) and wt.device.type != "meta":
                out2 = mean_square(wt) + (mean_square(bt) if isinstance(bt, torch.Tensor) else 0.0)
        else:
            if isinstance(w, fx.Node):
                out2 = op.rms(w) ** 2
            if isinstance(b, fx.Node):
                out2 += op.rms(b, default=0.0) ** 2
        for p in (w, b):
            if isinstance(p, fx.Node) and p in op.inputs:
                s.bwd[p], s.grad_gain[p] = 1.0 / math.sqrt(rows), math.sqrt(rows)
        if xs and len(xs) > 2:
            # the bias sums its gradient over a sample's positions coherently where they share it, the gain where
            # the gradient follows the normalised values (a ReLU after it, near a pooled readout)
            coherent = math.sqrt(rows * math.prod(xs[2:]))
            if isinstance(b, fx.Node) and b in op.inputs:
                s.shared_grad_gain[b] = coherent
            if isinstance(w, fx.Node) and w in op.inputs:
                s.value_grad_gain[w] = coherent
        s.out_rms = math.sqrt(out2) if out2 > 0 else 1.0
        return s

    def init_kinds(self, node: fx.Node) -> dict[fx.Node, str]:
        a = _args(node)
        roles: dict[fx.Node, str] = {}
        if isinstance(a.get("weight"), fx.Node):
            roles[a["weight"]] = "one"
        if isinstance(a.get("bias"), fx.Node):
            roles[a["bias"]] = "zero"
        return roles


register(F.batch_norm, aten("batch_norm"), batch_norm_layer, nn.BatchNorm1d, nn.BatchNorm2d,
         nn.BatchNorm3d)(BatchNormRule())
