"""Matmul-class ops: linear, matmul / mm / bmm / addmm, embedding.

For ``[.., m, k] @ [k, n]`` with input RMS ``rl``, ``rr``:
forward ``1 / (rl rr sqrt(k))``; gradient of the left operand ``1 / (rr sqrt(n))``;
gradient of the right operand ``1 / (rl sqrt(rows))`` where ``rows`` counts all
positions summed over in the right operand's gradient.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..record import INDEX_RHO
from .einsum import _operands as einsum_operands
from .pool import max_of_gaussians_mean, max_of_gaussians_rms
from .registry import (Kind, OpView, Rule, Scales, aten, lookup, many, register, register_library_op,
                       resolve_library_op, resolve_target, tensor_method)

_EINSUM_TARGETS = frozenset(t for t in (torch.einsum, aten("einsum")) if t is not None)


@dataclass(frozen=True)
class MatmulLayout:
    left: int  # argument position of the left operand
    right: int  # argument position of the right operand
    right_nk: bool  # right operand stored as [n, k] (linear weights)
    bias: Optional[int] = None  # argument position of an added bias
    #: keyword names of the left and right operands and the bias (``aten`` / ``torch`` signatures)
    names: tuple[str, str, str] = ("input", "other", "input")

    def fan(self, right_shape: tuple[int, ...]) -> tuple[int, int]:
        """``(k, n)``: contraction size and output features, from the right operand's shape."""
        if len(right_shape) == 1:
            return right_shape[0], 1
        if self.right_nk:
            return right_shape[-1], right_shape[0]
        return right_shape[-2], right_shape[-1]


_LINEAR = MatmulLayout(0, 1, True, 2, ("input", "weight", "bias"))
_MATMUL = MatmulLayout(0, 1, False)
_ADDMM = MatmulLayout(1, 2, False, 0, ("mat1", "mat2", "input"))
#: ``beta * input + alpha * batch1 @ batch2`` (BLOOM's attention logits: ``alibi.baddbmm(batch1=q, batch2=k, ...)``)
_BADDBMM = MatmulLayout(1, 2, False, 0, ("batch1", "batch2", "input"))

LAYOUTS: dict[object, MatmulLayout] = {}

#: ``OpView.context`` key: this matmul of two activations computes attention logits (its output
#: reaches a softmax through constant factors, masks and views only); set by the plan pass.
LOGITS = "attention_logits"


def _coefficient(op: OpView, name: str) -> float:
    """``|alpha|`` or ``|beta|`` of ``addmm`` / ``baddbmm`` where it is a number (1 where absent or not a
    number; a zero ``alpha`` counts as 1, a zero ``beta`` as 0: the bias is not read)."""
    v = op.node.kwargs.get(name, 1.0)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return 1.0
    return abs(float(v)) if (v != 0 or name == "beta") else 1.0


def _prod(xs) -> int:
    p = 1
    for x in xs:
        p *= int(x)
    return p


class MatmulRule(Rule):
    name = "matmul"
    kind = Kind.MATMUL

    def _operands(self, op: OpView):
        from .registry import resolve_target

        lay = LAYOUTS[resolve_target(op.node, None)]
        left_name, right_name, bias_name = lay.names
        left = op.arg(lay.left, left_name)
        right = op.arg(lay.right, right_name)
        bias = op.arg(lay.bias, bias_name) if lay.bias is not None else None
        return lay, left, right, bias

    def scales(self, op: OpView) -> Scales:
        lay, left, right, bias = self._operands(op)
        ls, rs, os_ = op.shape(left), op.shape(right), op.out_shape
        if ls is None or rs is None or os_ is None:
            return Scales(note="shapes unknown; left unscaled")
        k, n = lay.fan(rs)
        batch_r = _prod(rs[:-2]) if len(rs) > 2 else 1
        rows = max(1, _prod(ls[:-1]) // max(1, batch_r)) if len(ls) > 1 else 1
        rl, rr = op.rms(left), op.rms(right)
        # ``addmm`` / ``baddbmm``: ``beta * bias + alpha * left @ right`` (keyword-only numbers; 1 otherwise)
        alpha, beta = _coefficient(op, "alpha"), _coefficient(op, "beta")
        # attention logits (q @ k^T feeding a softmax, see LOGITS): only the operands are made unit and
        # the sum over k is kept, as scaled_dot_product_attention keeps it; the model's own 1/sqrt(d)
        # then sets the temperature, however the attention is spelled
        logits = bool(op.context.get(LOGITS))
        fwd = 1.0 / (rl * rr * (1.0 if logits else alpha * math.sqrt(k)))
        s = Scales(fwd=fwd)
        gl, gr = alpha * rr * math.sqrt(n), alpha * rl * math.sqrt(rows)
        if isinstance(left, fx.Node) and left in op.inputs:
            s.bwd[left], s.grad_gain[left] = 1.0 / gl, gl
        if isinstance(right, fx.Node) and right in op.inputs:
            s.bwd[right], s.grad_gain[right] = 1.0 / gr, gr
        out_rms2 = alpha * alpha * k if logits else 1.0
        if isinstance(bias, fx.Node) and bias in op.inputs and beta > 0:
            # each element of the bias takes the sum of the gradients of the outputs it is broadcast to
            bs = op.shape(bias)
            summed = max(1, _prod(os_) // max(1, _prod(bs))) if bs is not None else \
                max(1, _prod(os_) // max(1, os_[-1] if os_ else 1))
            gb = beta * math.sqrt(summed)
            s.bwd[bias], s.grad_gain[bias] = 1.0 / gb, gb
            if len(os_) >= 3 and (bs is None or not bs or _prod(bs) == bs[-1]):
                # (batch, positions..., features): a gradient shared by a sample's positions adds up
                s.shared_grad_gain[bias] = gb * math.sqrt(_prod(os_[1:-1]))
            out_rms2 += (fwd * beta * op.rms(bias, default=0.0)) ** 2
        s.out_rms = math.sqrt(out_rms2)
        s.note = f"k={k} n={n} rows={rows}"
        # two activations (attention scores, weighted values) may be correlated: measure
        params = op.context.get("params", set())
        s.calibrate = left not in params and right not in params and not logits
        if logits:
            s.note += "; attention logits: operands unit, the model's temperature kept"
        return s

    def init_kinds(self, node: fx.Node) -> dict[fx.Node, str]:
        from .registry import resolve_target

        lay = LAYOUTS.get(resolve_target(node, None))
        if lay is None:
            return {}
        roles: dict[fx.Node, str] = {}

        def get(pos: int, name: str) -> object:
            if name in node.kwargs:
                return node.kwargs[name]
            return node.args[pos] if len(node.args) > pos else None

        for pos, name in ((lay.left, lay.names[0]), (lay.right, lay.names[1])):
            a = get(pos, name)
            if isinstance(a, fx.Node):
                roles[a] = "unit"
        if lay.bias is not None:
            b = get(lay.bias, lay.names[2])
            if isinstance(b, fx.Node):
                roles[b] = "zero"
        return roles


_MATMUL_TARGETS = {
    _LINEAR: [F.linear, aten("linear")],
    _MATMUL: [
        torch.matmul, operator.matmul, torch.mm, torch.bmm,
        tensor_method("matmul"), tensor_method("mm"), tensor_method("bmm"),
        tensor_method("__matmul__"),
        aten("matmul"), aten("mm"), aten("bmm"),
    ],
    _ADDMM: [torch.addmm, tensor_method("addmm"), aten("addmm")],
    _BADDBMM: [torch.baddbmm, tensor_method("baddbmm"), aten("baddbmm")],
}
_rule = MatmulRule()
for _lay, _targets in _MATMUL_TARGETS.items():
    for _t in _targets:
        if _t is not None:
            LAYOUTS[_t] = _lay
    register(*_targets)(_rule)


def _register_matmul(op: object, lay: MatmulLayout = _MATMUL) -> None:
    LAYOUTS[op] = lay
    register(op)(_rule)


# Grouped matmuls (mixture-of-experts layers): input [tokens, k] sorted by expert, weight [experts, k, n].
# The matmul rule's shapes give k and n, and rows = tokens / experts (the rows each expert's weight sees).
for _t in many([getattr(torch, "_grouped_mm", None), getattr(F, "grouped_mm", None), aten("_grouped_mm")]):
    _register_matmul(_t)
# transformers' fallback for it (an op of its own, known once transformers is imported)
register_library_op("transformers::grouped_mm_fallback.default", _register_matmul)


def logit_matmul_of(softmax: fx.Node, root: Optional[torch.nn.Module] = None) -> Optional[fx.Node]:
    """The matmul of two activations that computes a softmax's input through views, masks and constant
    factors only (``softmax(q @ k.T / sqrt(d) + mask)``), or None."""
    from .registry import float_tensor_inputs, lookup

    n = softmax
    for _ in range(16):
        ins = float_tensor_inputs(n)
        if len(ins) != 1:
            return None
        n = ins[0]
        r = lookup(n, root)
        if r is None:
            return None
        if r.name == "matmul":
            ops = float_tensor_inputs(n)
            return n if len(ops) == 2 and all(i.op != "get_attr" for i in ops) else None
        if not (r.preserves_scale or r.kind in ("mul", "add")):
            return None
    return None


def logit_matmuls(gm: fx.GraphModule) -> set[fx.Node]:
    """Every matmul that computes attention logits (see :func:`logit_matmul_of`)."""
    from .registry import lookup

    out = set()
    for node in gm.graph.nodes:
        rule = lookup(node, gm)
        if rule is not None and rule.kind == "softmax":
            m = logit_matmul_of(node, gm)
            if m is not None:
                out.add(m)
    return out


@register(F.embedding, aten("embedding"))
class EmbeddingRule(Rule):
    """Row lookup: the output has the weight's RMS; each row's gradient sums its uses."""

    name = "embedding"
    kind = Kind.MATMUL

    def scales(self, op: OpView) -> Scales:
        if len(op.inputs) != 1:
            return Scales(note="embedding with unexpected float inputs; left unscaled")
        if _embedding_max_norm(op.node) is not None:
            return Scales(unsupported="max_norm renormalises the looked-up rows in place; pass max_norm=None")
        (w,) = op.inputs
        ws, os_ = op.shape(w), op.out_shape
        if ws is None or os_ is None:
            return Scales(note="shapes unknown")
        vocab = ws[0]
        lookups = max(1, _prod(os_[:-1]))
        gain = math.sqrt(lookups / vocab)
        # an index no input reaches (a buffer of token types): positions that look up one row share it
        idx = op.node.args[1] if op.node.target is aten("embedding") else op.node.args[0]
        rho = idx.meta.get(INDEX_RHO) if isinstance(idx, fx.Node) else None
        return Scales(fwd=1.0 / op.rms(w), bwd={w: 1.0 / gain}, grad_gain={w: gain}, out_rho=rho,
                      note=f"vocab={vocab} lookups={lookups}" + (f" index rho={rho:.2f}" if rho is not None else ""))

    def init_kinds(self, node: fx.Node) -> dict[fx.Node, str]:
        if _embedding_max_norm(node) is not None:
            return {}
        return {a: "unit" for a in node.all_input_nodes}


def _embedding_max_norm(node: fx.Node) -> object:
    """``F.embedding``'s ``max_norm`` (None for aten's embedding, which has none)."""
    if node.target is not F.embedding:
        return None
    return node.kwargs.get("max_norm", node.args[3] if len(node.args) > 3 else None)


_BAG_MODES = {0: "sum", 1: "mean", 2: "max", "sum": "sum", "mean": "mean", "max": "max"}


@register(F.embedding_bag, aten("embedding_bag"), aten("embedding_bag", "padding_idx"), aten("_embedding_bag"))
class EmbeddingBagRule(Rule):
    """``nn.EmbeddingBag``: each bag reduces the rows it looks up by sum, mean or max (sum: optionally
    weighted by ``per_sample_weights``).

    For ``n`` rows a bag (the index tensor's last dimension, or indices over bags with ``offsets``) of
    unit rows drawn uniformly from ``vocab``, the output has RMS ``sqrt(n (1 + (n - 1) / vocab))`` (sum),
    that over ``n`` (mean) or that of the largest of ``n`` Gaussians (max); it is calibrated on the example
    batch (skewed indices, empty bags and padding move it). Each row's gradient sums the bag gradients of its uses, times ``1 / n`` (mean) or
    its weight (weighted sum); with max, each bag sends each feature's gradient to one row. The per-sample
    weights' gradient is a dot product over the features. ``max_norm`` renormalises the looked-up rows in
    place in forward, which undoes the weight's unit initialisation: reported, left unscaled."""

    name = "embedding_bag"
    kind = Kind.MATMUL

    @staticmethod
    def _args(node: fx.Node) -> dict:
        if node.target is F.embedding_bag:
            names = ("input", "weight", "offsets", "max_norm", "norm_type", "scale_grad_by_freq", "mode", "sparse",
                     "per_sample_weights", "include_last_offset", "padding_idx")
            defaults = {"mode": "mean", "include_last_offset": False}
        else:  # aten: weight, indices, offsets, scale_grad_by_freq, mode, sparse, per_sample_weights, ...
            names = ("weight", "input", "offsets", "scale_grad_by_freq", "mode", "sparse", "per_sample_weights",
                     "include_last_offset", "padding_idx")
            defaults = {"mode": 0, "include_last_offset": False}
        out = dict(defaults)
        out.update(zip(names, node.args))
        out.update(node.kwargs)
        return out

    def scales(self, op: OpView) -> Scales:
        a = self._args(op.node)
        w, idx, offsets, psw = a.get("weight"), a.get("input"), a.get("offsets"), a.get("per_sample_weights")
        mode = _BAG_MODES.get(a.get("mode"))
        if a.get("max_norm") is not None:
            return Scales(unsupported="max_norm renormalises the looked-up rows in place; pass max_norm=None")
        ws, xs = op.shape(w), op.shape(idx)
        if not isinstance(w, fx.Node) or w not in op.inputs or ws is None or xs is None or mode is None:
            return Scales(out_rms=None, note="shapes unknown: not predicted")
        lookups = max(1, _prod(xs))
        if len(xs) >= 2:
            n, bags = xs[-1], max(1, lookups // max(1, xs[-1]))
        else:
            os_ = op.shape(offsets)
            bags = max(1, (os_[0] if os_ else 1) - (1 if a.get("include_last_offset") else 0))
            n = lookups / bags
        n = max(1.0, float(n))
        rw, vocab = op.rms(w), ws[0]
        # a row drawn twice in one bag adds coherently: E|sum of n rows|^2 = n (1 + (n - 1) / vocab) rw^2 for
        # uniform indices, and a row's gradient sums its copies in a bag the same way
        dup = math.sqrt(1.0 + (n - 1.0) / vocab)
        spread = math.sqrt(lookups / vocab) * dup  # a row's uses, as for an embedding
        rp = op.rms(psw) if isinstance(psw, fx.Node) and psw in op.inputs else 1.0
        mean = 0.0
        if mode == "sum":
            out, gain = math.sqrt(n) * rw * rp * dup, spread * rp
        elif mode == "mean":
            out, gain = rw * dup / math.sqrt(n), spread / n
        else:
            m1, m2 = max_of_gaussians_mean(round(n)), max_of_gaussians_rms(round(n))
            out, gain, mean = m2 * rw, math.sqrt(bags / vocab), m1 / m2
        s = Scales(fwd=1.0 / out, bwd={w: 1.0 / gain}, grad_gain={w: gain}, calibrate=True, out_mean=mean,
                   note=f"{mode} of {n:.3g} rows a bag, vocab={vocab} lookups={lookups}")
        if isinstance(psw, fx.Node) and psw in op.inputs:  # d/dp_i = <row_i, g_bag>: a sum over features
            pg = rw * math.sqrt(ws[-1])
            s.bwd[psw], s.grad_gain[psw] = 1.0 / pg, pg
        return s

    def init_kinds(self, node: fx.Node) -> dict[fx.Node, str]:
        a = self._args(node)
        w = a.get("weight")
        return {w: "unit"} if isinstance(w, fx.Node) and a.get("max_norm") is None else {}


@register(*dict.fromkeys(many([F.bilinear, torch.bilinear, aten("bilinear")])))
class BilinearRule(Rule):
    """``nn.Bilinear``: ``y_k = x1^T W_k x2 + b_k``, a matmul contracting ``in1 * in2`` products.

    For independent operands: the output has RMS ``r1 r2 rw sqrt(in1 in2)``; ``x1``'s gradient
    ``r2 rw sqrt(out in2)``, ``x2``'s ``r1 rw sqrt(out in1)`` (both, added, where one tensor is both operands);
    the weight's ``r1 r2 sqrt(rows)``, the bias's ``sqrt(rows)``. Weight unit, bias zero at init, as a
    linear layer's."""

    name = "bilinear"
    kind = Kind.MATMUL
    _NAMES = ("input1", "input2", "weight", "bias")

    def _args(self, node: fx.Node) -> list:
        return [node.kwargs.get(n, node.args[i] if len(node.args) > i else None) for i, n in enumerate(self._NAMES)]

    def scales(self, op: OpView) -> Scales:
        x1, x2, w, b = self._args(op.node)
        s1, s2, ws, os_ = op.shape(x1), op.shape(x2), op.shape(w), op.out_shape
        if s1 is None or s2 is None or ws is None or os_ is None or len(ws) != 3:
            return Scales(out_rms=None, note="shapes unknown: not predicted")
        out, in1, in2 = ws
        rows = max(1, _prod(os_[:-1]))
        r1, r2, rw = op.rms(x1), op.rms(x2), op.rms(w)
        s = Scales(fwd=1.0 / (r1 * r2 * rw * math.sqrt(in1 * in2)), note=f"in1={in1} in2={in2} out={out} rows={rows}")
        gains: dict[fx.Node, float] = {}
        for x, g in ((x1, r2 * rw * math.sqrt(out * in2)), (x2, r1 * rw * math.sqrt(out * in1))):
            if isinstance(x, fx.Node) and x in op.inputs:
                gains[x] = math.sqrt(gains.get(x, 0.0) ** 2 + g * g)
        if isinstance(w, fx.Node) and w in op.inputs:
            gains[w] = r1 * r2 * math.sqrt(rows)
        if isinstance(b, fx.Node) and b in op.inputs:
            gains[b] = math.sqrt(rows)
            s.out_rms = math.sqrt(1.0 + (s.fwd * op.rms(b, default=0.0)) ** 2)
        for x, g in gains.items():
            s.bwd[x], s.grad_gain[x] = 1.0 / g, g
        s.calibrate = x1 is x2  # a tensor's products with itself: not independent
        return s

    def init_kinds(self, node: fx.Node) -> dict[fx.Node, str]:
        _, _, w, b = self._args(node)
        return {**({w: "unit"} if isinstance(w, fx.Node) else {}), **({b: "zero"} if isinstance(b, fx.Node) else {})}


# -- matmul-class: the one definition ---------------------------------------------
#: Convolutions, transposed ones included: matmul-class even where no rule scales them yet.
CONV_TARGETS = frozenset(t for t in (
    F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
    torch.conv1d, torch.conv2d, torch.conv3d, aten("conv1d"), aten("conv2d"), aten("conv3d"), aten("convolution"),
    aten("conv1d", "padding"), aten("conv2d", "padding"), aten("conv3d", "padding"),
) if t is not None)



def _float_or_unknown(node: fx.Node) -> bool:
    val = node.meta.get("val")
    return val is None or (isinstance(val, torch.Tensor) and val.is_floating_point())


def _arg(node: fx.Node, pos: int, *names: str) -> object:
    if len(node.args) > pos:
        return node.args[pos]
    for name in names:
        if name in node.kwargs:
            return node.kwargs[name]
    return None


def matmul_operands(node: fx.Node, root: Optional[torch.nn.Module] = None,
                    floats: Optional[Callable[[fx.Node], bool]] = None) -> list[fx.Node]:
    """The float operands of a matmul-class op, in order (not its bias, mask or equation); ``[]`` for other ops.

    **Matmul-class** means: the op contracts two (attention: three) floating-point operands, so
    its forward and its backward run as matrix multiplies (what low-precision formats are
    for). It covers ``linear``, ``matmul`` / ``mm`` / ``bmm`` / ``addmm`` (functions, tensor
    methods, ``@`` and aten), convolutions (transposed ones too), ``einsum`` of two operands
    and scaled-dot-product attention. An embedding lookup is not (one float operand: its
    forward is a gather, its backward a scatter-add), nor is a product with a constant.

    ``floats`` decides which inputs count as float tensors (default: a float tensor value, or
    no value known because shapes were not propagated).
    """
    if node.op not in ("call_function", "call_method", "call_module"):
        return []
    target = resolve_target(node, root)
    try:
        resolve_library_op(target)
        lay = LAYOUTS.get(target)
        conv = target in CONV_TARGETS
    except TypeError:  # an unhashable target
        return []
    if lay is not None:
        cand = [_arg(node, lay.left, lay.names[0]), _arg(node, lay.right, lay.names[1], "mat2")]
    elif conv:
        cand = [_arg(node, 0, "input"), _arg(node, 1, "weight")]
    elif target in _EINSUM_TARGETS:
        cand = list(einsum_operands(node)[1])
    else:
        rule = lookup(node, root)
        if rule is None or rule.kind != Kind.ATTENTION:
            return []
        cand = [_arg(node, 0, "query"), _arg(node, 1, "key"), _arg(node, 2, "value")]
    floats = floats or _float_or_unknown
    ops = [a for a in cand if isinstance(a, fx.Node) and floats(a)]
    return ops if len(ops) >= 2 else []


def is_matmul_class(node: fx.Node, root: Optional[torch.nn.Module] = None) -> bool:
    """True for matmul-class ops (see :func:`matmul_operands`)."""
    return bool(matmul_operands(node, root))
