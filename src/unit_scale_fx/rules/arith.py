"""Adds, subtractions, products and quotients.

* add/sub of a tensor and a constant keeps the scale;
* a residual add (found by the topology pass) becomes
  ``sqrt(1 - tau) * skip / RMS(skip) + sqrt(tau) * branch / RMS(branch)``;
* any other add of two tensors is scaled by ``1 / sqrt(ra^2 + rb^2)``;
* a product of two tensors is scaled by ``1 / (ra rb)`` (gradients ``1 / rb``, ``1 / ra``); the
  factors' cross-position correlations and first moments multiply;
* a product with a constant keeps the constant (it is part of the model's meaning,
  e.g. a temperature) and only the predicted RMS follows it.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx

from .registry import Kind, OpView, Rule, Scales, aten, constant_value, many, register, tensor_method


def _broadcast(op: OpView, x: fx.Node) -> float:
    """How many times ``x`` is repeated by broadcasting into the output."""
    xs, os_ = op.shape(x), op.out_shape
    if not xs or not os_:
        return 1.0
    return max(1.0, math.prod(os_) / max(1, math.prod(xs)))


def _const(op: OpView) -> float:
    """The product of non-tensor numeric arguments (and ``alpha=``)."""
    c = 1.0
    for a in op.node.args[:2]:
        v = constant_value(a)  # numbers, and constant tensors (rotary tables, masks) by their RMS
        if v is not None:
            c *= v
    return c


def _subtracts(op: OpView) -> bool:
    t = op.node.target
    return t in _SUBTRACTS or (op.node.op == "call_method" and t in ("sub", "__sub__", "rsub", "__rsub__"))


_SUBTRACTS = tuple(many([operator.sub, torch.sub, torch.rsub, aten("sub", "Tensor"), aten("rsub", "Tensor"),
                         aten("sub", "Scalar"), aten("rsub", "Scalar")]))


@register(operator.add, operator.sub, torch.add, torch.sub, tensor_method("add"), tensor_method("sub"),
          tensor_method("__add__"), tensor_method("__radd__"), tensor_method("__sub__"),
          aten("add", "Tensor"), aten("sub", "Tensor"), aten("add", "Scalar"), aten("sub", "Scalar"),
          aten("rsub", "Scalar"), aten("rsub", "Tensor"), torch.rsub, tensor_method("__rsub__"))
class AddRule(Rule):
    name = "add"
    kind = Kind.ADD

    def init_kinds(self, node: fx.Node) -> dict[fx.Node, str]:
        # a parameter matrix added to activations (a learned position table) is an embedding: unit RMS
        return {a: "added" for a in node.args[:2] if isinstance(a, fx.Node)}

    def scales(self, op: OpView) -> Scales:
        if len(op.inputs) < 2:
            r = op.rms(op.inputs[0]) if op.inputs else None
            return Scales(out_rms=r, note="add of a tensor and a constant: scale kept")
        a, b = op.inputs[:2]
        ra, rb = op.in_rms.get(a), op.in_rms.get(b)
        if ra is None or rb is None or not (math.isfinite(ra) and math.isfinite(rb)):
            return Scales(out_rms=op.rms(a), note="an operand with non-finite or unknown RMS (a mask?): scale kept")
        alpha = op.arg(2, "alpha", 1.0)
        rb = rb * abs(float(alpha)) if isinstance(alpha, (int, float)) else rb
        residual = op.context.get("residual")
        if residual is not None:
            skip, branch, tau = residual
            rs = max(op.rms(skip), 1e-12)
            rbr = max(op.rms(branch), 1e-12)
            w = {skip: math.sqrt(1 - tau) / rs, branch: math.sqrt(tau) / rbr}
            # independent fluctuations add in quadrature; first moments add (a ReLU output as the skip)
            ms, mb = math.sqrt(1 - tau) * op.mean(skip), math.sqrt(tau) * op.mean(branch)
            out = math.sqrt(max(1e-12, 1.0 + 2.0 * ms * mb))
            s = Scales(weights=w, out_rms=out,
                       note=f"residual tau={tau}; rho skip {op.rho(skip):.3f} branch {op.rho(branch):.3f}",
                       out_rho=min(1.0, ((1 - tau) * op.rho(skip) + tau * op.rho(branch) + 2.0 * ms * mb) / out ** 2),
                       out_mean=(ms + mb) / out)
            for n in (skip, branch):  # an add passes its gradient on unchanged: unit is ideal
                s.bwd[n], s.grad_gain[n] = 1.0, 1.0
            # the output's fluctuation is the skip's (1 - tau of its variance) and the branch's (tau)
            s.grad_value_pass.update({skip: 1.0 - tau, branch: tau})
            return s
        sign = -1.0 if _subtracts(op) else 1.0
        ma, mb = op.mean(a) * ra, sign * op.mean(b) * rb  # first moments: their product adds to the square
        total = math.sqrt(max(0.0, ra * ra + rb * rb + 2.0 * ma * mb))
        if total <= 0:
            return Scales(out_rms=0.0, note="both operands zero")
        s = Scales(fwd=1.0 / total, note="independent add", out_mean=(ma + mb) / total)
        for n, r in ((a, ra), (b, rb)):  # each operand's share of the output's variance
            s.grad_value_pass[n] = r * r / (total * total)
        for n in (a, b):
            # an add passes its gradient on unchanged; an operand broadcast over k copies receives
            # the sum of k independent gradients: the Jacobian's gain is sqrt(k) (not the forward scale)
            gain = math.sqrt(_broadcast(op, n))
            s.bwd[n], s.grad_gain[n] = 1.0 / gain, gain
        return s


def _shared_rho(op: OpView, x: fx.Node) -> float:
    """A factor's cross-position correlation as the product sees it: 1 for one the same at every position
    it is broadcast over (a gate per sample and channel, a per-feature parameter), else its own."""
    if x in op.context.get("params", ()):
        return 1.0
    xs, os_ = op.shape(x), op.out_shape
    if xs and os_ and len(xs) <= len(os_):
        padded = (1,) * (len(os_) - len(xs)) + tuple(xs)
        if any(p == 1 and o > 1 for p, o in zip(padded[1:], os_[1:])):
            return 1.0
    return op.rho(x)


@register(operator.mul, torch.mul, tensor_method("mul"), tensor_method("__mul__"), tensor_method("__rmul__"),
          aten("mul", "Tensor"))
class MulRule(Rule):
    name = "mul"
    kind = Kind.MUL

    def scales(self, op: OpView) -> Scales:
        if len(op.inputs) == 1:
            # no scale op: the constant stays (a temperature, a query scaling); the gradient carries it too
            c = abs(_const(op))
            # a plain number scales the gradient too; a constant tensor (rotary table, mask) is left at gain 1
            numeric = all(not isinstance(a, fx.Node) for a in op.node.args[:2] if a is not op.inputs[0])
            return Scales(out_rms=op.rms(op.inputs[0]) * c, grad_gain={op.inputs[0]: c} if numeric else {},
                          note="product with a constant: kept")
        if len(op.inputs) != 2:
            return Scales(note="product of more than two tensors")
        a, b = op.inputs
        ra, rb = op.rms(a), op.rms(b)
        # independent factors: the uncentered cross-position correlations and the first moments (relative
        # to the RMS) multiply; a gate shared by all positions (squeeze-excitation, rho 1) keeps the other's
        s = Scales(fwd=1.0 / (ra * rb), note="product of two tensors", calibrate=True,
                   out_rho=_shared_rho(op, a) * _shared_rho(op, b), out_mean=op.mean(a) * op.mean(b))
        # a factor broadcast over k copies (a gate per channel, a per-feature weight) receives the sum of
        # k independent products: its gradient gain is sqrt(k) times the other factor's RMS
        ga, gb = rb * math.sqrt(_broadcast(op, a)), ra * math.sqrt(_broadcast(op, b))
        s.bwd[a], s.grad_gain[a] = 1.0 / ga, ga
        s.bwd[b], s.grad_gain[b] = 1.0 / gb, gb
        return s


@register(operator.truediv, torch.div, torch.true_divide, tensor_method("div"), tensor_method("__truediv__"),
          aten("div", "Tensor"))
class DivRule(Rule):
    name = "div"
    kind = Kind.MUL

    def scales(self, op: OpView) -> Scales:
        num = op.node.args[0] if op.node.args else None
        den = op.node.args[1] if len(op.node.args) > 1 else None
        if len(op.inputs) == 1:
            x = op.inputs[0]
            r = op.rms(x)
            cden, cnum = constant_value(den), constant_value(num)
            gain = {}
            if cden:
                r = r / cden
                if not isinstance(den, fx.Node):
                    gain = {x: 1.0 / cden}  # the gradient is divided by a plain number too
            elif cnum is not None:
                r = cnum / r
            elif isinstance(den, fx.Node) and den not in op.inputs and op.in_rms.get(den):
                # divided by a measured integer count (``loss_sum / num_items``): the forward value
                # is kept, the gradient passed back is made as large as before the division
                count = float(op.in_rms[den])
                s = Scales(out_rms=r / count, note=f"quotient with a count ({count:g}): value kept")
                s.bwd[num], s.grad_gain[num] = count, 1.0 / count
                return s
            return Scales(out_rms=r, grad_gain=gain, note="quotient with a constant: kept")
        if len(op.inputs) != 2 or num not in op.inputs or den not in op.inputs:
            return Scales(note="quotient of unexpected operands")
        ra, rb = op.rms(num), op.rms(den)
        s = Scales(fwd=rb / ra, note="quotient of two tensors")
        s.bwd[num], s.grad_gain[num] = rb, 1.0 / rb
        s.bwd[den], s.grad_gain[den] = rb * rb / ra, ra / (rb * rb)
        return s


class ScatterAddRule(Rule):
    """``index_add(self, dim, index, source)`` / ``scatter_add(self, dim, index, src)``: ``self`` plus each
    value of the source added at its index (a mixture of experts' outputs summed back into their tokens).

    A place gets ``k`` source values on average (``k`` = source elements / output elements): with independent
    values, output RMS ``sqrt(r_self^2 + k r_src^2)`` (measured when planning runs on a batch: the indices
    decide). Each source value's gradient is the output gradient at its place, and ``self`` gets the output
    gradient: both pass it on unchanged."""

    name = "scatter_add"
    kind = Kind.ADD

    def scales(self, op: OpView) -> Scales:
        node = op.node
        base = node.args[0] if node.args else node.kwargs.get("self", node.kwargs.get("input"))
        src = next((a for a in list(node.args[1:]) + list(node.kwargs.values()) if a in op.inputs and a is not base),
                   None)
        if src is None:
            return Scales(out_rms=op.rms(base) if base in op.inputs else None, note="scatter-add: no float source")
        xs, os_ = op.shape(src), op.out_shape
        if not xs or not os_ or math.prod(os_) == 0:
            return Scales(out_rms=None, note="scatter-add: shapes unknown")
        k = math.prod(xs) / math.prod(os_)
        alpha = op.arg(4, "alpha", 1.0)
        a = abs(float(alpha)) if isinstance(alpha, (int, float)) else 1.0
        rb = op.rms(base) if base in op.inputs else (constant_value(base) or 0.0)
        total = math.sqrt(rb * rb + k * (a * op.rms(src)) ** 2)
        if not total > 0:
            return Scales(out_rms=0.0, note="scatter-add of zeros")
        s = Scales(fwd=1.0 / total, calibrate=True, note=f"scatter-add, {k:.3g} values a place")
        for n in op.inputs:
            s.bwd[n], s.grad_gain[n] = 1.0, 1.0
        return s


register(*many([torch.index_add, tensor_method("index_add"), aten("index_add"), torch.scatter_add,
                tensor_method("scatter_add"), aten("scatter_add")]))(ScatterAddRule())
