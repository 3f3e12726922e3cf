"""Ops that move or select values without changing their scale."""

from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F

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
        rs = [op.in_rms.get(n) for n in inputs]
        rs = [r for r in rs if r is not None and math.isfinite(r)]
        out = math.sqrt(sum(r * r for r in rs) / len(rs)) if rs else None
        s = Scales(out_rms=out)
        if len(op.inputs) == 1:
            (x,) = op.inputs
            xs, os_ = op.shape(x), op.out_shape
            if xs is not None and os_ is not None and math.prod(xs) > 0 and math.prod(os_) > 0 \
                    and math.prod(xs) != math.prod(os_):
                s.grad_gain[x] = math.sqrt(math.prod(os_) / math.prod(xs))
        return s


#: ops that take their values from the first tensor and only a dtype or shape from the second
_LIKE = {t for n in ("type_as", "view_as", "reshape_as", "expand_as") for t in (tensor_method(n), aten(n))} \
    | {aten("to", "other")}
_LIKE.discard(None)

_METHODS = [
    "view", "view_as", "reshape", "reshape_as", "transpose", "permute", "contiguous", "flatten", "unflatten",
    "unsqueeze", "squeeze", "expand", "expand_as", "t", "flip", "roll", "split", "chunk", "unbind", "narrow",
    "select", "repeat", "repeat_interleave", "clone", "to", "type", "type_as", "float", "half", "bfloat16",
    "double", "masked_fill", "index_select", "gather", "movedim", "swapaxes", "tril", "triu", "detach",
    "topk", "sort",
]
_FUNCTIONS = [
    operator.getitem, torch.reshape, torch.transpose, torch.permute, torch.flatten, torch.unflatten,
    torch.unsqueeze, torch.squeeze, torch.cat, torch.concat, torch.stack, torch.split, torch.chunk,
    torch.unbind, torch.narrow, torch.select, torch.flip, torch.roll, torch.clone, torch.masked_fill,
    torch.index_select, torch.gather, torch.movedim, torch.swapaxes, torch.tril, torch.triu, torch.t,
    torch.repeat_interleave, torch.where, torch.detach, torch.topk, torch.sort,
    F.dropout, F.dropout1d, F.dropout2d, F.alpha_dropout, F.pad,
    torch.nn.Dropout, torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.Dropout3d, torch.nn.AlphaDropout,
    torch.nn.Identity, torch.nn.Flatten, torch.nn.Unflatten,
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
    aten("movedim", "int"), aten("tril"), aten("triu"), aten("clone"), aten("topk"), aten("sort"),
]
register(*dict.fromkeys(many(tensor_method(m) for m in _METHODS) + _FUNCTIONS + many(_ATEN)))(PreserveRule())
