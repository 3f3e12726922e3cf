"""Pooling: average and max over windows, fixed and adaptive.

With window size ``k`` (``prod(kernel)``, or ``in / out`` per spatial dim for the
adaptive forms) and independent inputs of RMS ``r``:

* average: output RMS ``r / sqrt(k)`` (forward ``sqrt(k) / r``); each input is in
  ``c = k / prod(stride)`` windows and gets ``g / k`` from each: gradient RMS
  ``sqrt(c) / k`` (backward ``k / sqrt(c)``);
* max: output RMS ``r * m(k)`` with ``m(k)^2 = E[max of k unit Gaussians ^ 2]``
  (quadrature); each output routes its gradient to one input: gradient RMS
  ``sqrt(out numel / in numel)``.

Pooled values are rarely independent: neighbouring features are correlated, and
after a ReLU they share a positive mean, so the pooled output is larger than the
formula says (up to ``r`` for identical values). The forward scale is therefore
marked data-dependent: when planning runs on a real batch it is measured there;
the gradient scales are exact and stay as derived.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F

from .fused import probe_moments
from .registry import Kind, OpView, Rule, Scales, aten, many, register, resolve_target

_X, _W = np.polynomial.hermite_e.hermegauss(200)
_W = _W / _W.sum()


@functools.lru_cache(maxsize=256)
def max_of_gaussians_rms(k: int) -> float:
    """``sqrt(E[M^2])`` for ``M`` the max of ``k`` independent unit Gaussians."""
    if k <= 1:
        return 1.0
    from math import erf

    cdf = np.array([0.5 * (1 + erf(v / math.sqrt(2))) for v in _X])
    return float(math.sqrt(np.sum(_W * k * cdf ** (k - 1) * _X ** 2)))


def _tuple(v: Any, n: int) -> Optional[tuple[int, ...]]:
    if v is None:
        return None
    if isinstance(v, int):
        return (v,) * n
    v = tuple(int(a) for a in v)
    return v * n if len(v) == 1 else v


@functools.lru_cache(maxsize=256)
def max_of_gaussians_mean(k: int) -> float:
    """``E[M]`` for ``M`` the max of ``k`` independent unit Gaussians."""
    if k <= 1:
        return 0.0
    from math import erf

    cdf = np.array([0.5 * (1 + erf(v / math.sqrt(2))) for v in _X])
    return float(np.sum(_W * k * cdf ** (k - 1) * _X))


class PoolRule(Rule):
    def __init__(self, name: str, average: bool, adaptive: bool) -> None:
        self.name = name
        self.kind = Kind.POOL
        self.average = average
        self.adaptive = adaptive

    def scales(self, op: OpView) -> Scales:
        if len(op.inputs) != 1:
            return Scales(out_rms=None, note="pooling of unexpected inputs")
        (x,) = op.inputs
        xs, os_ = op.shape(x), op.out_shape
        if xs is None or os_ is None:
            return Scales(out_rms=None, note="shapes unknown")
        ratio = max(1.0, math.prod(xs) / max(1, math.prod(os_)))
        if self.adaptive:
            k, reads = ratio, 1.0
        else:
            nd = len(os_) - 2 if len(os_) > 2 else 1
            kernel = _tuple(op.arg(1, "kernel_size"), nd) or (1,)
            stride = _tuple(op.arg(2, "stride"), nd) or kernel
            if not stride:
                stride = kernel
            k = float(math.prod(kernel))
            reads = max(1.0, k / math.prod(stride))
        r = op.rms(x)
        rho = op.rho(x)
        m = op.mean(x)
        out_rho = None
        if self.average:
            # positions with correlation rho: the mean of k has RMS r sqrt(rho + (1 - rho) / k)
            mean_sq = rho + (1.0 - rho) / k
            fwd, gain = 1.0 / (r * math.sqrt(mean_sq)), math.sqrt(reads) / k
            out_rho = min(1.0, rho / mean_sq)
            out_mean = m / math.sqrt(mean_sq)  # the first moment is kept
        else:
            # the window as k values m + s z (z unit Gaussians): the max is m + s max(z)
            kk = max(1, round(k))
            sd = math.sqrt(max(0.0, 1.0 - m * m))
            e1, e2 = max_of_gaussians_mean(kk), max_of_gaussians_rms(kk) ** 2
            out = math.sqrt(max(1e-12, m * m + 2 * m * sd * e1 + sd * sd * e2))
            fwd, gain = 1.0 / (r * out), math.sqrt(1.0 / ratio)
            out_mean = (m + sd * e1) / out
        # a global average (one value per channel left): every position gets the same gradient
        shared = self.average and len(os_) > 2 and math.prod(os_[2:]) == 1
        # a max sends each output's gradient to one position of its window: the square of a part shared by
        # every position falls by ratio^2, the whole square by ratio, so the correlation by ratio
        return Scales(fwd=fwd, bwd={x: 1.0 / gain}, grad_gain={x: gain}, calibrate=True, out_rho=out_rho,
                      out_mean=out_mean, note=f"window={k:.3g} reads={reads:.3g} rho={rho:.2f} mean={m:.2f}",
                      grad_rho={x: 1.0} if shared else {},
                      grad_rho_factor={} if self.average else {x: 1.0 / ratio})


register(*many([F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, aten("avg_pool1d"), aten("avg_pool2d"),
                aten("avg_pool3d")]))(PoolRule("avg_pool", average=True, adaptive=False))
register(*many([F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, aten("adaptive_avg_pool1d"),
                aten("adaptive_avg_pool2d"), aten("adaptive_avg_pool3d"), aten("_adaptive_avg_pool2d")]))(
    PoolRule("adaptive_avg_pool", average=True, adaptive=True))


def _dispatched(*fns: object) -> list[object]:
    """``F.max_pool2d`` is a ``boolean_dispatch`` closure; normalize calls the functions it dispatches to."""
    from torch._jit_internal import boolean_dispatched

    out = list(fns)
    for fn in fns:
        info = boolean_dispatched.get(fn)
        if info is not None:
            out += [info["if_true"], info["if_false"]]
    return out


register(*many(_dispatched(F.max_pool1d, F.max_pool2d, F.max_pool3d) + [
    aten("max_pool1d"), aten("max_pool2d"), aten("max_pool3d")]))(PoolRule("max_pool", average=False, adaptive=False))
register(*many(_dispatched(F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d)))(
    PoolRule("adaptive_max_pool", average=False, adaptive=True))


class InterpolateRule(Rule):
    """``F.interpolate`` / ``nn.Upsample`` (and aten's ``upsample_*``): a fixed linear map of each channel's
    positions. Its gains depend on the mode, the sizes and ``align_corners`` (nearest upsampling by 2 keeps
    the RMS and sends each input the gradient of 4 outputs; bilinear averages neighbours), so they come from
    the op itself on a Gaussian probe (:func:`~unit_scale_fx.rules.fused.probe_moments`, as a fused region's
    do) of one batch item and one channel of the input's shape, with the op's own arguments. The output is
    calibrated on the example batch where there is one (real images are smoother than the probe).
    Arguments computed in the graph (a size read from another tensor) leave the op unpredicted."""

    name = "interpolate"
    kind = Kind.POOL

    def scales(self, op: OpView) -> Scales:
        x = op.node.args[0] if op.node.args else op.node.kwargs.get("input")
        xs = op.shape(x)
        rest, kwargs = op.node.args[1:], dict(op.node.kwargs)
        kwargs.pop("input", None)
        if not isinstance(x, fx.Node) or x not in op.inputs or xs is None or len(xs) < 3 \
                or any(isinstance(a, fx.Node) for a in list(rest) + list(kwargs.values())):
            return Scales(out_rms=None, note="arguments computed in the graph: not predicted")
        fn = resolve_target(op.node)
        try:
            with torch.enable_grad():  # planning may run under no_grad
                fwd_gain, bwd_gain = probe_moments(lambda z: fn(z, *rest, **kwargs), (1, 1) + tuple(xs[2:]), 1.0)
        except Exception:  # noqa: BLE001 - an argument the probe cannot replay: nothing predicted
            return Scales(out_rms=None, note="probe failed: not predicted")
        if not (fwd_gain > 0 and bwd_gain > 0):
            return Scales(out_rms=None, note="probe gave no signal: not predicted")
        rx = op.rms(x)
        return Scales(fwd=1.0 / (rx * fwd_gain), bwd={x: 1.0 / bwd_gain}, grad_gain={x: bwd_gain}, calibrate=True,
                      note=f"probe: forward gain {fwd_gain:.3g}, gradient gain {bwd_gain:.3g}")


register(*many([F.interpolate, F.upsample, F.upsample_nearest, F.upsample_bilinear]
               + [aten(n, "vec") for n in ("upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d",
                                           "upsample_linear1d", "upsample_bilinear2d", "upsample_trilinear3d",
                                           "upsample_bicubic2d")]
               + [aten(n) for n in ("upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d",
                                    "upsample_linear1d", "upsample_bilinear2d", "upsample_trilinear3d",
                                    "upsample_bicubic2d")]))(InterpolateRule())


class _PatchRule(Rule):
    """``F.unfold`` and ``F.fold``: patches of an image laid out as columns, and summed back. ``c``: how many
    patch entries an image value is in, or an output value sums, on average (``larger numel / smaller numel``:
    1 for patches that do not overlap, MobileViT's; 9 for 3 x 3 patches at stride 1)."""

    kind = Kind.POOL

    def scales(self, op: OpView) -> Scales:
        if len(op.inputs) != 1:
            return Scales(out_rms=None, note=f"{self.name} of unexpected inputs")
        (x,) = op.inputs
        xs, os_ = op.shape(x), op.out_shape
        if xs is None or os_ is None or not math.prod(xs) or not math.prod(os_):
            return Scales(out_rms=None, note="shapes unknown")
        return self.factors(op, x, max(1.0, max(math.prod(xs), math.prod(os_)) / min(math.prod(xs), math.prod(os_))))

    def factors(self, op: OpView, x: fx.Node, c: float) -> Scales:
        raise NotImplementedError


@register(*many([F.unfold, torch._C._nn.im2col, aten("im2col")]))
class UnfoldRule(_PatchRule):
    """``F.unfold`` (``im2col``): values are copied, not changed (output RMS ``r``, less where padding adds
    zeros: measured on a real batch); each value's gradient sums its ``c`` copies': gain ``sqrt(c)``."""

    name = "unfold"

    def factors(self, op: OpView, x: fx.Node, c: float) -> Scales:
        gain = math.sqrt(c)
        return Scales(fwd=1.0 / op.rms(x), bwd={x: 1.0 / gain}, grad_gain={x: gain}, calibrate=True,
                      out_mean=op.mean(x), note=f"patches per value {c:.3g}")


@register(*many([F.fold, torch._C._nn.col2im, aten("col2im")]))
class FoldRule(_PatchRule):
    """``F.fold`` (``col2im``), the adjoint of ``F.unfold``: each output value sums ``c`` patch entries, RMS
    ``r sqrt(c)`` for independent entries (forward ``1 / (r sqrt(c))``, measured on a real batch); each entry's
    gradient is the one output gradient it was summed into: gain 1."""

    name = "fold"

    def factors(self, op: OpView, x: fx.Node, c: float) -> Scales:
        return Scales(fwd=1.0 / (op.rms(x) * math.sqrt(c)), bwd={x: 1.0}, grad_gain={x: 1.0}, calibrate=True,
                      note=f"entries per output {c:.3g}")
