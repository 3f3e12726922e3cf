"""Mean and sum reductions over ``n`` values (``n = in numel / out numel``).

The mean of ``n`` values with RMS ``r`` has RMS ``r / sqrt(n)`` if they are
independent and ``r`` if they are identical; activations pooled over tokens or
space sit in between, so the rule takes the geometric middle ``r n^(-1/4)`` (as the
average-pooling rule does). Gradients are exact: each input of a mean gets ``g / n``,
of a sum ``g``. So mean: forward ``n^(1/4) / r``, backward ``n``; sum: forward
``n^(-3/4) / r``, backward ``1``. A reduction to a single number is treated as a
loss: its value is left alone (it means something), only the gradient into it is
made unit.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx

from .registry import OpView, Rule, Scales, aten, many, register, tensor_method


class ReduceRule(Rule):
    kind = "reduce"

    def __init__(self, name: str, mean: bool) -> None:
        self.name = name
        self.mean = mean

    def scales(self, op: OpView) -> Scales:
        if len(op.inputs) != 1:
            return Scales(out_rms=None, note="reduction of unexpected inputs")
        (x,) = op.inputs
        xs, os_ = op.shape(x), op.out_shape
        if xs is None or os_ is None:
            return Scales(out_rms=None, note="shapes unknown")
        n = max(1, math.prod(xs) // max(1, math.prod(os_)))
        r = op.rms(x)
        bwd = float(n) if self.mean else 1.0
        note = f"n={n}"
        if not os_:  # a single number: a loss-like value
            out = r * n ** -0.25 if self.mean else r * n ** 0.75
            return Scales(fwd=1.0, fixed_fwd=True, bwd={x: bwd}, grad_gain={x: 1.0 / bwd}, out_rms=out,
                          note=note + ", reduced to one number: value kept")
        fwd = n ** 0.25 / r if self.mean else n ** -0.75 / r
        return Scales(fwd=fwd, bwd={x: bwd}, grad_gain={x: 1.0 / bwd}, note=note)


register(*many([torch.mean, tensor_method("mean"), aten("mean", "dim"), aten("mean", "default")]))(
    ReduceRule("mean", mean=True))
register(*many([torch.sum, tensor_method("sum"), aten("sum", "dim_IntList"), aten("sum", "default")]))(
    ReduceRule("sum", mean=False))
