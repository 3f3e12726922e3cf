"""Normalisation layers: the output is already unit; the input gradient is ``g / RMS(x)``."""

from __future__ import annotations

import math

import torch.fx as fx
import torch.nn.functional as F

from .registry import Kind, OpView, Rule, Scales, aten, register


class NormRule(Rule):
    kind = Kind.NORM

    def __init__(self, name: str, weight_pos: int, bias_pos: int | None) -> None:
        self.name = name
        self.weight_pos = weight_pos
        self.bias_pos = bias_pos

    def _affine(self, node: fx.Node):
        w = node.kwargs.get("weight", node.args[self.weight_pos] if len(node.args) > self.weight_pos else None)
        b = None
        if self.bias_pos is not None:
            b = node.kwargs.get("bias", node.args[self.bias_pos] if len(node.args) > self.bias_pos else None)
        return w, b

    def scales(self, op: OpView) -> Scales:
        x = op.node.args[0] if op.node.args else op.node.kwargs.get("input")
        if not isinstance(x, fx.Node) or x not in op.inputs:
            return Scales(note="normalised input is not a float tensor")
        w, b = self._affine(op.node)
        xs = op.shape(x)
        rx = op.rms(x)
        s = Scales(fwd=1.0, bwd={x: rx}, grad_gain={x: 1.0 / rx})
        out2 = 1.0
        for p, default in ((w, 1.0), (b, 0.0)):
            if isinstance(p, fx.Node) and p in op.inputs:
                ps = op.shape(p)
                rows = max(1, math.prod(xs) // max(1, math.prod(ps))) if xs and ps else 1
                s.bwd[p], s.grad_gain[p] = 1.0 / math.sqrt(rows), math.sqrt(rows)
                if xs and ps and len(xs) - len(ps) >= 2:
                    # a bias sums its gradient over a sample's positions coherently where they share it, a gain
                    # where the gradient follows the normalised values
                    shared = math.sqrt(rows * math.prod(xs[1:len(xs) - len(ps)]))
                    (s.shared_grad_gain if p is b else s.value_grad_gain)[p] = shared
        if isinstance(w, fx.Node):
            out2 = op.rms(w) ** 2
        if isinstance(b, fx.Node):
            out2 += op.rms(b, default=0.0) ** 2
        s.out_rms = math.sqrt(out2) if out2 > 0 else 1.0
        return s

    def init_kinds(self, node: fx.Node) -> dict[fx.Node, str]:
        w, b = self._affine(node)
        roles = {}
        if isinstance(w, fx.Node):
            roles[w] = "one"
        if isinstance(b, fx.Node):
            roles[b] = "zero"
        return roles


register(F.layer_norm, aten("layer_norm"))(NormRule("layer_norm", 2, 3))
register(getattr(F, "rms_norm", None), aten("rms_norm"))(NormRule("rms_norm", 2, None))
register(F.group_norm, aten("group_norm"))(NormRule("group_norm", 2, 3))
# instance norm (style transfer, GANs): a group norm of one channel per group; the gain and bias sit at
# different positions in the functional and the aten signatures. (With running statistics in evaluation
# mode the output is not normalised by its own input: the rule's unit output is then a guess, as for a
# batch norm.)
register(F.instance_norm)(NormRule("instance_norm", 3, 4))
register(aten("instance_norm"))(NormRule("instance_norm", 1, 2))


class NormalizeRule(Rule):
    """``F.normalize(x, p=2, dim)``: ``x / ||x||`` along ``dim`` (cosine attention, contrastive embeddings).

    Each vector has unit length, so its RMS is ``1 / sqrt(n)``: the forward scale ``sqrt(n)`` makes it
    ``x / RMS(x)`` over the dimension (an RMS norm without a gain). Its backward, ``(I - y y^T) g / ||x||``,
    has gain ``1 / (r sqrt(n))`` for an input of RMS ``r``. Another ``p``, or a dimension not known as a
    number, keeps the scale (left as it is, reported by its note)."""

    name = "normalize"
    kind = Kind.NORM

    def scales(self, op: OpView) -> Scales:
        x = op.node.args[0] if op.node.args else op.node.kwargs.get("input")
        if not isinstance(x, fx.Node) or x not in op.inputs:
            return Scales(note="normalised input is not a float tensor")
        p, dim, xs = op.arg(1, "p", 2.0), op.arg(2, "dim", 1), op.shape(x)
        if p != 2 or not isinstance(dim, int) or not xs or not -len(xs) <= dim < len(xs):
            return Scales(out_rms=None, note="normalize with p != 2 or an unknown dim: scale kept")
        n = xs[dim]
        gain = 1.0 / (op.rms(x) * math.sqrt(n))
        return Scales(fwd=math.sqrt(n), bwd={x: 1.0 / gain}, grad_gain={x: gain}, out_rms=1.0,
                      note=f"unit vectors of n={n}")


register(F.normalize)(NormalizeRule())
