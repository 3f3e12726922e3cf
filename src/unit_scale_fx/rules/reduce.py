"""Mean and sum reductions over ``n`` values (``n = in numel / out numel``).

Of ``n`` independent values with RMS ``r``: the mean has RMS ``r / sqrt(n)`` and each
input's gradient is ``g / n``; the sum has RMS ``r sqrt(n)`` and passes ``g`` on.
So mean: forward ``sqrt(n) / r``, backward ``n``; sum: forward ``1 / (r sqrt(n))``,
backward ``1``. Values reduced over tokens or space are correlated (up to RMS ``r``
for a mean of identical values), so the forward scale is marked data-dependent:
measured when planning runs on a real batch. Gradient scales are exact. A
reduction to a single number is treated as a loss: its value is left alone (it
means something), only the gradient into it is made unit.
"""

from __future__ import annotations

import math

import torch

from .registry import Kind, OpView, Rule, Scales, aten, many, register, tensor_method


class ReduceRule(Rule):
    kind = Kind.REDUCE

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
            out = r / math.sqrt(n) if self.mean else r * math.sqrt(n)
            return Scales(fwd=1.0, fixed_fwd=True, bwd={x: bwd}, grad_gain={x: 1.0 / bwd}, out_rms=out,
                          note=note + ", reduced to one number: value kept")
        # over positions (the feature dim kept), values share a part rho of their square: the mean of n
        # has RMS r sqrt(rho + (1 - rho) / n), which a mean-pooled readout input shows
        dims = op.arg(1, "dim")
        dims = [dims] if isinstance(dims, int) else list(dims) if isinstance(dims, (list, tuple)) else []
        rho = op.rho(x) if dims and len(xs) - 1 not in [d % len(xs) for d in dims if isinstance(d, int)] else 0.0
        mean_sq = rho + (1.0 - rho) / n
        fwd = 1.0 / (r * math.sqrt(mean_sq)) if self.mean else 1.0 / (r * n * math.sqrt(mean_sq))
        if rho:
            note += f" rho={rho:.2f}"
        reduced = {d % len(xs) for d in dims if isinstance(d, int)}
        # positions: every dimension but the batch and the features, the features last ((B, T, D) over T) or, for
        # an image's (B, C, H, W) and beyond, first after the batch (a global average over H and W)
        over_positions = bool(dims) and (len(xs) - 1 not in reduced
                                         or (len(xs) >= 4 and reduced == set(range(2, len(xs)))))
        return Scales(fwd=fwd, bwd={x: bwd}, grad_gain={x: 1.0 / bwd}, calibrate=True, note=note,
                      out_rho=min(1.0, rho / mean_sq) if rho else None, out_mean=op.mean(x) / math.sqrt(mean_sq),
                      grad_rho={x: 1.0} if over_positions else {})  # each position gets the same gradient


register(*many([torch.mean, tensor_method("mean"), aten("mean", "dim"), aten("mean", "default")]))(
    ReduceRule("mean", mean=True))
register(*many([torch.sum, tensor_method("sum"), aten("sum", "dim_IntList"), aten("sum", "default")]))(
    ReduceRule("sum", mean=False))


class CumsumRule(Rule):
    """``cumsum`` over ``n`` values: position ``k`` holds the sum of the first ``k``.

    Of independent values with RMS ``r``, position ``k`` has RMS ``r sqrt(k)``: over the ``n`` positions,
    ``r sqrt((n + 1) / 2)``. Backward is the reversed running sum of the gradient, the same gain. The
    forward value is kept (a running sum is read as what it counts: a log-decay an ``exp`` reads in a
    state-space layer, offsets); the input's gradient gets the backward factor."""

    name = "cumsum"
    kind = Kind.REDUCE

    def scales(self, op: OpView) -> Scales:
        if len(op.inputs) != 1:
            return Scales(out_rms=None, note="cumsum of unexpected inputs")
        (x,) = op.inputs
        xs, dim = op.shape(x), op.arg(1, "dim")
        if not xs or not isinstance(dim, int):
            return Scales(out_rms=None, note="cumsum: shape or dim unknown")
        n = xs[dim]
        m = op.mean(x)
        # a shared first moment m r grows as k m r: its square adds E[k^2] = (n + 1)(2n + 1) / 6
        sq = (1.0 - m * m) * (n + 1) / 2.0 + m * m * (n + 1) * (2 * n + 1) / 6.0
        gain = math.sqrt((n + 1) / 2.0)
        return Scales(fwd=1.0, fixed_fwd=True, out_rms=op.rms(x) * math.sqrt(max(sq, 1e-12)),
                      bwd={x: 1.0 / gain}, grad_gain={x: gain}, note=f"running sum of n={n}: value kept")


register(*many([torch.cumsum, tensor_method("cumsum"), aten("cumsum")]))(CumsumRule())
