"""Convolutions: a matmul whose fan-in is ``C_in / groups * prod(kernel)``.

For ``y = conv(x, w)`` with ``w: [C_out, C_in / groups, *K]`` and input RMS ``rx``,
weight RMS ``rw``: forward ``1 / (rx rw sqrt(fan_in))``; each input value is read by
``C_out / groups * prod(K) / prod(stride)`` outputs, so its gradient scale is
``1 / (rw sqrt(that))``; the weight gradient sums over ``N * prod(out spatial)``
positions (scale ``1 / (rx sqrt(rows))``), the bias gradient over the same rows.
Zero padding: border outputs read fewer inputs. The share of kernel taps that land inside the
input (:func:`valid_tap_fraction`, exact from the shapes) multiplies the fan-in, the reads and
the rows; on a 3 x 3 map with a 3 x 3 kernel it is 0.6, not a detail.
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


def valid_tap_fraction(in_size: tuple[int, ...], kernel: tuple[int, ...], stride: tuple[int, ...],
                       padding: Any, dilation: tuple[int, ...], out_size: tuple[int, ...], side: str = "out") -> float:
    """The share of (output position, kernel tap) pairs that read an input inside the borders (not padding).

    ``side="in"``: the reads per input position relative to ``kernel / stride`` (what the input's
    gradient sums), which differs where the padding is wider than the kernel's half.
    """
    nd = len(kernel)
    if isinstance(padding, str):
        if padding == "valid":
            return 1.0
        pads = tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation))  # "same": the extra one goes right
    else:
        pads = _tuple(padding, nd)
    frac = 1.0
    for L, K, S, P, D, O in zip(in_size, kernel, stride, pads, dilation, out_size):
        if O <= 0 or K <= 0:
            continue
        valid = sum(1 for o in range(O) for t in range(K) if 0 <= o * S - P + t * D < L)
        frac *= valid / (O * K) if side == "out" else valid * S / (L * K)
    return max(frac, 1e-6)


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
            return _transposed_scales(op, a)
        x, w, b = a.get("input"), a.get("weight"), a.get("bias")
        xs, ws, os_ = op.shape(x), op.shape(w), op.out_shape
        if xs is None or ws is None or os_ is None:
            return Scales(out_rms=None, note="shapes unknown")
        nd = len(ws) - 2
        groups = int(a.get("groups", 1) or 1)
        stride = _tuple(a.get("stride", 1), nd)
        k = math.prod(ws[2:])
        frac = frac_in = 1.0
        if len(xs) == nd + 2 and len(os_) == nd + 2:
            geometry = (xs[2:], tuple(ws[2:]), stride, a.get("padding", 0), _tuple(a.get("dilation", 1), nd), os_[2:])
            frac, frac_in = valid_tap_fraction(*geometry), valid_tap_fraction(*geometry, side="in")
        fan_in = ws[1] * k * frac
        reads = max(1.0, ws[0] / groups * k / math.prod(stride)) * frac_in
        rows = max(1, math.prod(os_) // os_[1] if len(os_) > 1 else 1) * frac
        return _matmul_scales(op, x, w, b, fan_in, reads, rows, rows,
                              f"fan_in={fan_in:.4g} reads={reads:.3g} rows={rows:.4g} (inside the padding: {frac:.3g})")

    def init_kinds(self, node: fx.Node) -> dict[fx.Node, str]:
        a = self._args(node)
        roles: dict[fx.Node, str] = {}
        if isinstance(a.get("weight"), fx.Node):
            roles[a["weight"]] = "unit"
        if isinstance(a.get("bias"), fx.Node):
            roles[a["bias"]] = "zero"
        return roles


def _transposed_scales(op: OpView, a: dict[str, Any]) -> Scales:
    """A transposed convolution ``y = A^T x`` is the adjoint of the convolution ``A`` from ``y``'s shape to
    ``x``'s with the same weight (``[C_in, C_out / groups, *K]``, read as ``A``'s ``[C_out, C_in / groups, *K]``),
    stride, padding and dilation. So its roles swap with ``A``'s: an output sums what an input of ``A`` is
    read by (``C_in / groups * prod(K) / prod(stride)`` taps, times the share inside the borders), an input's
    gradient sums ``A``'s fan-in (``C_out / groups * prod(K)``), the weight's gradient sums over ``A``'s
    output rows (``N * prod(x spatial)``) and the bias's over ``y``'s."""
    x, w, b = a.get("input"), a.get("weight"), a.get("bias")
    xs, ws, ys = op.shape(x), op.shape(w), op.out_shape
    if xs is None or ws is None or ys is None or len(xs) != len(ws) or len(ys) != len(ws):
        return Scales(out_rms=None, note="transposed convolution: shapes unknown")
    nd = len(ws) - 2
    groups = int(a.get("groups", 1) or 1)
    stride = _tuple(a.get("stride", 1), nd)
    k = math.prod(ws[2:])
    # A reads y's shape and writes x's
    geometry = (ys[2:], tuple(ws[2:]), stride, a.get("padding", 0), _tuple(a.get("dilation", 1), nd), xs[2:])
    frac, frac_in = valid_tap_fraction(*geometry), valid_tap_fraction(*geometry, side="in")
    fan_in = max(1.0, ws[0] / groups * k / math.prod(stride)) * frac_in
    reads = ws[1] * k * frac
    rows_w = max(1, xs[0] * math.prod(xs[2:])) * frac
    rows_b = max(1, ys[0] * math.prod(ys[2:]))
    return _matmul_scales(op, x, w, b, fan_in, reads, rows_w, rows_b,
                          f"transposed: fan_in={fan_in:.4g} reads={reads:.3g} rows={rows_w:.4g}")


def _matmul_scales(op: OpView, x: Any, w: Any, b: Any, fan_in: float, reads: float, rows_w: float, rows_b: float,
                   note: str) -> Scales:
    """The scales of a matmul-like op from its counts: forward ``1 / (rx rw sqrt(fan_in))``, the input's
    gradient gain ``rw sqrt(reads)``, the weight's ``rx sqrt(rows_w)``, the bias's ``sqrt(rows_b)``."""
    rx, rw = op.rms(x), op.rms(w)
    s = Scales(fwd=1.0 / (rx * rw * math.sqrt(fan_in)), note=note)
    for node, gain in ((x, rw * math.sqrt(reads)), (w, rx * math.sqrt(rows_w)), (b, math.sqrt(rows_b))):
        if isinstance(node, fx.Node) and node in op.inputs:
            s.bwd[node], s.grad_gain[node] = 1.0 / gain, gain
    out2 = 1.0
    if isinstance(b, fx.Node) and b in op.inputs:
        out2 += (s.fwd * op.rms(b, default=0.0)) ** 2
        os_ = op.out_shape
        if os_ and len(os_) > 2:  # the bias sums its gradient over a sample's positions coherently where shared
            s.shared_grad_gain[b] = math.sqrt(rows_b * math.prod(os_[2:]))
    s.out_rms = math.sqrt(out2)
    return s


class ConvTransposeRule(ConvRule):
    """``F.conv_transpose1d/2d/3d`` (and aten ``conv_transpose*d``): :func:`_transposed_scales`."""

    name = "conv_transpose"

    def _args(self, op_node: fx.Node) -> dict[str, Any]:
        names = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")
        out = dict(zip(names, op_node.args))
        out.update(op_node.kwargs)
        out["transposed"] = True
        return out


register(*dict.fromkeys(t for t in (
    F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
    getattr(torch, "conv_transpose1d", None), getattr(torch, "conv_transpose2d", None),
    getattr(torch, "conv_transpose3d", None),
    aten("conv_transpose1d"), aten("conv_transpose2d", "input"), aten("conv_transpose3d", "input"),
) if t is not None))(ConvTransposeRule())


register(*dict.fromkeys(t for t in (
    F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d,
    aten("conv1d"), aten("conv2d"), aten("conv3d"), aten("convolution"),
    aten("conv1d", "padding"), aten("conv2d", "padding"), aten("conv3d", "padding"),  # padding="valid" / "same"
) if t is not None))(ConvRule())
