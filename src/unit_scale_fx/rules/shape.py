"""Ops that move or select values without changing their scale."""

from __future__ import annotations

import functools
import math
import operator
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..layers import detach_values
from .registry import Kind, OpView, OptionalTarget, Rule, Scales, aten, many, register, resolve_target, tensor_method


class PreserveRule(Rule):
    """Values moved, selected or repeated: the RMS is kept.

    The gradient is not always: an op of one tensor whose output has ``f`` times its input's
    elements sends back a gradient of RMS ``sqrt(f)`` times the output's. A slice (``f < 1``)
    leaves the rest of the input's gradient zero (a classifier reading the first token, one half
    of a partial rotary embedding); an expand or repeat (``f > 1``, grouped key/value heads) sums
    ``f`` independent gradients into each input value.
    """

    name = "preserve"
    kind = Kind.PRESERVE
    preserves_scale = True

    def scales(self, op: OpView) -> Scales:
        inputs = op.inputs
        x0 = op.node.args[0] if op.node.args else None
        if resolve_target(op.node) in _LIKE and x0 in inputs:
            inputs = [x0]  # ``x.type_as(other)``: ``other`` gives a dtype or shape, not values
        s = Scales(out_rms=values_rms(op, inputs))
        if len(op.inputs) == 1:
            (x,) = op.inputs
            xs, os_ = op.shape(x), op.out_shape
            if xs is not None and os_ is not None and math.prod(xs) > 0 and math.prod(os_) > 0 \
                    and math.prod(xs) != math.prod(os_):
                s.grad_gain[x] = math.sqrt(math.prod(os_) / math.prod(xs))
                if s.grad_gain[x] > 1.0:
                    # the ideal factor of a gradient that sums copies: the op has no scale of its own, so this
                    # acts only where the input is a parameter's (``balance.parameter_edges``: a class token
                    # expanded over the batch, a table of rows gathered by index)
                    s.bwd[x] = 1.0 / s.grad_gain[x]
            spread = _positions_per_value(op, xs, os_)
            if spread is not None:
                s.grad_rho_factor[x] = spread
        return s


def values_rms(op: OpView, inputs: Any) -> Optional[float]:
    """The RMS of values taken from ``inputs`` (their RMS values, in quadrature over the inputs): None where none
    is known."""
    rs = [op.in_rms.get(n) for n in inputs]
    rs = [r for r in rs if r is not None and math.isfinite(r)]
    return math.sqrt(sum(r * r for r in rs) / len(rs)) if rs else None


def _positions_per_value(op: OpView, xs: Any, os_: Any) -> Optional[float]:
    """The share of a gradient's correlation across positions that the input's gradient keeps, where an op moves
    the input's positions apart (``None``: all of it): a strided slice takes every ``k``-th position (Swin's patch
    merging takes four such slices side by side), so its gradient, zero between them, keeps its shared part on
    ``1 / k`` of the input's positions; ``pixel_unshuffle`` by ``r`` puts each position of an ``r x r`` block in a
    channel of its own, whose shared parts differ (``1 / r^2``). A stride on the last dimension alone is taken for
    a split of channels (interleaved rotary halves), which keeps the correlation."""
    node = op.node
    target = resolve_target(node)
    if xs is None or os_ is None or math.prod(xs) <= 0:
        return None
    fraction = math.prod(os_) / math.prod(xs)
    if target is operator.getitem and len(node.args) == 2:
        strided = _strided_dims(node.args[1], len(xs))
        if len(strided) >= 2 or strided and strided[0] != len(xs) - 1:
            return min(1.0, fraction)
    elif target is aten("slice", "Tensor"):
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        step = node.kwargs.get("step", node.args[4] if len(node.args) > 4 else 1)
        if isinstance(step, int) and step > 1 and isinstance(dim, int) and dim % len(xs) != len(xs) - 1:
            return min(1.0, fraction)
    elif target in _UNSHUFFLE:
        r = node.kwargs.get("downscale_factor", node.args[1] if len(node.args) > 1 else None)
        if isinstance(r, int) and r > 1:
            return 1.0 / (r * r)
    return None


def _strided_dims(index: Any, ndim: int) -> list[int]:
    """The dimensions an indexing expression (``x[:, 0::2, 0::2]``, ``x[..., ::2]``) slices with a step over 1."""
    index = index if isinstance(index, tuple) else (index,)
    consumed = sum(1 for i in index if i is not None and i is not Ellipsis)
    dims, d = [], 0
    for i in index:
        if i is Ellipsis:
            d += ndim - consumed
        elif i is not None:
            if isinstance(i, slice) and isinstance(i.step, int) and i.step > 1:
                dims.append(d)
            d += 1
    return dims


#: ops that take their values from the first tensor and only a dtype or shape from the second
_LIKE = {t for n in ("type_as", "view_as", "reshape_as", "expand_as") for t in (tensor_method(n), aten(n))} \
    | {aten("to", "other")}
_LIKE.discard(None)

_METHODS = [
    "view", "view_as", "reshape", "reshape_as", "transpose", "permute", "contiguous", "flatten", "unflatten",
    "unsqueeze", "squeeze", "expand", "expand_as", "t", "flip", "roll", "split", "chunk", "unbind", "narrow",
    "select", "repeat", "repeat_interleave", "clone", "to", "type", "type_as", "float", "half", "bfloat16",
    "double", "masked_fill", "index_select", "gather", "movedim", "swapaxes", "tril", "triu", "detach",
    "sort", "scatter", "unfold",  # (``Tensor.unfold``: windows of one dimension, a view)
]
#: (``getattr``: a field of a named tuple of tensors, ``x.max(-1).values``, or a view, ``x.T``, as torch.fx records them)
_FUNCTIONS = [
    operator.getitem, getattr, torch.reshape, torch.transpose, torch.permute, torch.flatten, torch.unflatten,
    torch.unsqueeze, torch.squeeze, torch.cat, torch.concat, torch.stack, torch.split, torch.chunk,
    torch.unbind, torch.narrow, torch.select, torch.flip, torch.roll, torch.clone, torch.masked_fill,
    torch.index_select, torch.gather, torch.movedim, torch.swapaxes, torch.tril, torch.triu, torch.t,
    torch.repeat_interleave, torch.where, torch.detach, torch.sort, torch.scatter, detach_values,
    F.dropout, F.dropout1d, F.dropout2d, F.alpha_dropout, F.pad,
    torch.nn.Dropout, torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.Dropout3d, torch.nn.AlphaDropout,
    torch.nn.Identity, torch.nn.Flatten, torch.nn.Unflatten,
    # permutations of elements between channels and positions (super-resolution, ShuffleNet)
    torch.pixel_shuffle, torch.pixel_unshuffle, F.pixel_shuffle, F.pixel_unshuffle, torch.channel_shuffle,
    # stochastic depth drops whole rows and rescales the rest by 1 / (1 - p), as dropout drops elements
    # (the module stays one call, so train / eval mode is read when it runs, as for Dropout)
    OptionalTarget("torchvision.ops.stochastic_depth", "StochasticDepth"),
    OptionalTarget("torchvision.ops.stochastic_depth", "stochastic_depth"),
]
_ATEN = [aten(n) for n in ("view", "_unsafe_view", "reshape", "permute", "transpose", "t", "clone", "expand",
                           "contiguous", "squeeze", "alias", "detach", "dropout", "flatten")] + [
    aten("unsqueeze"), aten("cat"), aten("stack"), aten("split", "Tensor"), aten("split_with_sizes"),
    aten("chunk"), aten("select", "int"), aten("slice", "Tensor"), aten("transpose", "int"),
    aten("squeeze", "dim"), aten("masked_fill", "Scalar"), aten("masked_fill", "Tensor"), aten("_to_copy"),
    aten("to", "dtype"), aten("unbind", "int"), aten("where", "self"), aten("index", "Tensor"),
    aten("flatten", "using_ints"), aten("unflatten", "int"), aten("broadcast_tensors"), aten("expand_as"),
    aten("view_as"), aten("reshape_as"), aten("squeeze", "dims"), aten("contiguous"), aten("repeat"),
    aten("slice", "Tensor"), aten("index_select"), aten("gather"), aten("flip"), aten("roll"),
    aten("movedim", "int"), aten("tril"), aten("triu"), aten("clone"), aten("sort"),
    aten("scatter", "value"),  # a constant written at some places, as masked_fill with a scalar
    # values written at some places (what torch.export makes of ``h[idx] = v`` and ``scatter_(dim, idx, src)``)
    aten("scatter", "src"), aten("slice_scatter"), aten("select_scatter"), aten("diagonal_scatter"),
    aten("index_put"), aten("repeat_interleave", "self_int"), aten("repeat_interleave", "self_Tensor"),
    aten("unfold"),  # ``Tensor.unfold``: windows of one dimension, a view (each value in the windows holding it)
    aten("pixel_shuffle"), aten("pixel_unshuffle"), aten("channel_shuffle"), aten("native_channel_shuffle"),
]
register(*dict.fromkeys(many(tensor_method(m) for m in _METHODS) + _FUNCTIONS + many(_ATEN)))(PreserveRule())
#: space to depth: each position of a block to a channel of its own
_UNSHUFFLE = frozenset(many([torch.pixel_unshuffle, F.pixel_unshuffle, aten("pixel_unshuffle")]))


class FillRule(Rule):
    """A new tensor shaped like its input (``zeros_like``, ``ones_like``, ``full_like``, ``x.new_empty``, ...).

    The input gives a shape and a dtype, never values: the output's RMS is that of the fill (1 for
    ones, ``|v|`` for ``full_like(x, v)``, 1 for ``randn_like``; unknown for zeros and empty memory,
    as for ``torch.zeros``), and no gradient flows back to the input.
    """

    name = "fill"
    kind = Kind.PRESERVE
    preserves_scale = True  # needs no scale (and is not a value-changing member of a fused chain)

    def scales(self, op: OpView) -> Scales:
        name = getattr(resolve_target(op.node), "__name__", "")
        name = name.split(".")[0]  # aten overloads: "full_like.default"
        if name in ("ones_like", "new_ones"):
            out: float | None = 1.0
        elif name in ("full_like", "new_full"):
            v = op.node.args[2] if name == "new_full" and len(op.node.args) > 2 else (
                op.node.args[1] if len(op.node.args) > 1 else op.node.kwargs.get("fill_value"))
            out = abs(float(v)) if isinstance(v, (int, float)) else None
        elif name == "randn_like":
            out = 1.0
        elif name == "rand_like":
            out = 1.0 / math.sqrt(3.0)
        else:
            out = None
        return Scales(out_rms=out, grad_gain={x: 0.0 for x in op.inputs},
                      note="a fill shaped like its input; no gradient to it")


_FILLS = ("zeros_like", "ones_like", "full_like", "empty_like", "rand_like", "randn_like")
_NEW = ("new_zeros", "new_ones", "new_full", "new_empty")
register(*dict.fromkeys(many([getattr(torch, n, None) for n in _FILLS] + [tensor_method(n) for n in _NEW]
                             + [aten(n) for n in _FILLS + _NEW])))(FillRule())
_DETERMINISTIC = ("zeros_like", "ones_like", "full_like", "new_zeros", "new_ones", "new_full")
#: fills whose values are fixed by their arguments: they read the input's shape and dtype, never its values, so
#: what is built from them alone is data (:func:`~unit_scale_fx.passes.constants.live_nodes`)
SHAPE_ONLY_FILLS = frozenset(many([getattr(torch, n, None) for n in _DETERMINISTIC]
                                  + [tensor_method(n) for n in _DETERMINISTIC] + [aten(n) for n in _DETERMINISTIC]))


@functools.lru_cache(maxsize=256)
def top_order_moments(n: int, k: int) -> tuple[float, float]:
    """``(E[z], E[z^2])`` over the ``k`` largest of ``n`` independent unit Gaussians (a seeded sample)."""
    rows = max(256, (1 << 18) // max(1, n))
    z = torch.randn(rows, n, generator=torch.Generator().manual_seed(1234), dtype=torch.float64)
    top = z.topk(min(k, n), dim=-1).values
    return float(top.mean()), float(top.pow(2).mean())


class TopkRule(Rule):
    """The ``k`` largest (or smallest) of ``n`` values: order statistics, not a plain selection.

    With inputs of RMS ``r`` and first moment ``m r`` (``x = r (m + sd z)``), the values are
    ``r (m + sd z_top)``: their RMS and first moment come from the order statistics of ``n``
    Gaussians (the top 2 of 4 softmax weights have a first moment 0.9 of their RMS, all 4 of them
    0.6). Each value's gradient goes back to one of ``n`` places: gradient RMS ``sqrt(k / n)``.
    """

    name = "topk"
    kind = Kind.PRESERVE
    preserves_scale = True

    def scales(self, op: OpView) -> Scales:
        if len(op.inputs) != 1:
            return Scales(note="topk of unexpected inputs")
        (x,) = op.inputs
        xs = op.shape(x)
        k, dim, largest = op.arg(1, "k"), op.arg(2, "dim", -1), op.arg(3, "largest", True)
        if not xs or not isinstance(k, int) or not isinstance(dim, int) or k < 1:
            return Scales(out_rms=op.in_rms.get(x), note="topk: k or dim unknown")
        return top_values(op, x, xs[dim], k, bool(largest), f"k={k} of n={xs[dim]}")


def top_values(op: OpView, x: Any, n: int, k: int, largest: bool, note: str) -> Scales:
    """The scales of the ``k`` largest (or smallest) of ``n`` values of ``x``: RMS and first moment from the
    order statistics of ``n`` Gaussians with ``x``'s first moment; gradient RMS ``sqrt(k / n)``."""
    sign = 1.0 if largest else -1.0
    m = sign * op.mean(x)
    sd = math.sqrt(max(0.0, 1.0 - m * m))
    e1, e2 = top_order_moments(n, k)
    ms = max(1e-12, m * m + 2.0 * m * sd * e1 + sd * sd * e2)
    return Scales(out_rms=op.rms(x) * math.sqrt(ms), out_mean=sign * (m + sd * e1) / math.sqrt(ms),
                  grad_gain={x: math.sqrt(min(k, n) / max(1, n))}, note=note)


register(*many([torch.topk, tensor_method("topk"), aten("topk")]))(TopkRule())


class ExtremumRule(Rule):
    """``max`` / ``min`` / ``amax`` / ``amin`` over dimensions, and elementwise ``maximum`` / ``minimum`` /
    ``fmax`` / ``fmin`` (``torch.max(a, b)``): values selected, never made.

    Over ``n`` values (a dimension, several, or all), the largest is the top 1 of ``n``: the order statistics
    of :class:`TopkRule` (RMS and first moment), and each output's gradient goes back to one of ``n`` places
    (gradient RMS ``sqrt(1 / n)``). Elementwise between tensors (or a tensor and a constant, as a mask floor
    ``max(x, finfo.min)``), each value is one of its inputs': the scale is kept as ``where`` keeps it, and
    each input gets the gradient where it is chosen (``1 / sqrt(2)`` of it between two alike tensors).
    """

    name = "extremum"
    kind = Kind.PRESERVE
    preserves_scale = True

    def __init__(self, largest: bool) -> None:
        self.largest = largest

    def scales(self, op: OpView) -> Scales:
        node = op.node
        other = node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
        if len(op.inputs) != 1 or isinstance(other, fx.Node):  # elementwise, between tensors
            return _elementwise_extremum(op)
        (x,) = op.inputs
        xs, os_ = op.shape(x), op.out_shape
        if xs is None:
            return Scales(out_rms=op.in_rms.get(x), note="max / min: shapes unknown")
        if os_ is None:  # a (values, indices) pair: the values' shape is the indices'
            val = node.meta.get("val")
            first = val[0] if isinstance(val, (tuple, list)) and val else None
            os_ = tuple(int(s) for s in first.shape) if isinstance(first, torch.Tensor) else None
        if os_ is None:
            return Scales(out_rms=op.in_rms.get(x), note="max / min: shapes unknown")
        n = max(1, math.prod(xs) // max(1, math.prod(os_)))
        return top_values(op, x, n, 1, self.largest, f"the {'largest' if self.largest else 'smallest'} of n={n}")


def _elementwise_extremum(op: OpView) -> Scales:
    s = Scales(out_rms=values_rms(op, op.inputs), note="elementwise max / min: values selected")
    if len(op.inputs) == 2:
        for n in op.inputs:
            s.grad_gain[n] = math.sqrt(0.5)
    return s


def _extrema(kind: str) -> list:
    """The ``max`` (``kind="max"``) or ``min`` family: over dimensions, and elementwise between tensors."""
    a, e, f = {"max": ("amax", "maximum", "fmax"), "min": ("amin", "minimum", "fmin")}[kind]
    return many([getattr(torch, n, None) for n in (kind, a, e, f)] + [tensor_method(n) for n in (kind, a, e, f)]
                + [aten(kind, "dim"), aten(kind, "default"), aten(kind, "other"), aten(a), aten(e), aten(f)])


register(*dict.fromkeys(_extrema("max")))(ExtremumRule(largest=True))
register(*dict.fromkeys(_extrema("min")))(ExtremumRule(largest=False))


class CopyRule(Rule):
    """``aten.copy(self, src)``: ``src``'s values (broadcast) in ``self``'s place; ``self`` gets no gradient.
    What torch.export makes of a write of one tensor into another (``h[:, :k] = y``, ``h.copy_(y)``)."""

    name = "copy"
    kind = Kind.PRESERVE
    preserves_scale = True

    def scales(self, op: OpView) -> Scales:
        src = op.node.args[1] if len(op.node.args) > 1 else op.node.kwargs.get("src")
        dst = op.node.args[0] if op.node.args else None
        s = Scales(out_rms=op.in_rms.get(src) if src in op.inputs else None, note="copy: the source's values")
        if dst in op.inputs:
            s.grad_gain[dst] = 0.0
        if src in op.inputs:
            xs, os_ = op.shape(src), op.out_shape
            if xs and os_ and math.prod(xs) > 0:
                s.grad_gain[src] = math.sqrt(max(1.0, math.prod(os_) / math.prod(xs)))  # broadcast copies sum
        return s


register(*many([aten("copy")]))(CopyRule())


class BatchDimRule(PreserveRule):
    """``torch.vmap``'s entry and exit in a traced graph (``_add_batch_dim`` / ``_remove_batch_dim``): the same values,
    seen one batch entry at a time inside. The shapes a graph records for the inside leave the batch dimension out,
    so the element counts of :class:`PreserveRule` do not apply: values and gradients keep their RMS."""

    name = "vmap_batch_dim"

    def scales(self, op: OpView) -> Scales:
        return Scales(out_rms=values_rms(op, op.inputs), note="vmap batch dimension: values kept")


def _predispatch(name: str) -> Any:
    try:
        from torch._functorch import predispatch
    except ImportError:  # pragma: no cover - older torch
        return None
    return getattr(predispatch, name, None)


register(*many([_predispatch("_add_batch_dim"), _predispatch("_remove_batch_dim")]))(BatchDimRule())
