"""Losses: the forward value is left alone; the gradient into the prediction is made unit.

Also ``log_softmax``, the log-probabilities a negative log-likelihood reads (``nll_loss(log_softmax(z), t)``
is ``cross_entropy(z, t)``, the classifier head of PyTorch's own examples): its values are kept as they are
(they are what the loss reads, and a model may return them), and the unit gradient it receives passes to
its logits at unit RMS.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx
import torch.nn.functional as F

from .registry import Kind, OpView, Rule, Scales, aten, register, tensor_method

_REDUCTIONS = {0: "none", 1: "mean", 2: "sum"}  # aten's integer encoding


def _reduction(op: OpView, pos: int, aten_pos: int) -> str:
    if isinstance(op.node.target, torch._ops.OpOverload):
        r = op.arg(aten_pos, "reduction", 1)
        return _REDUCTIONS.get(r, "mean") if isinstance(r, int) else str(r)
    r = op.arg(pos, "reduction", "mean")
    return r if isinstance(r, str) else "mean"


@register(F.cross_entropy, aten("cross_entropy_loss"))
class CrossEntropyRule(Rule):
    """Gradient of mean cross-entropy into logits has RMS ``1 / (N sqrt(V))``."""

    name = "cross_entropy"
    kind = Kind.LOSS

    def scales(self, op: OpView) -> Scales:
        x = op.arg(0, "input")
        xs = op.shape(x)
        if not isinstance(x, fx.Node) or x not in op.inputs or xs is None:
            return Scales(fixed_fwd=True, out_rms=None, note="logits unknown")
        vocab = xs[1] if len(xs) > 1 else xs[0]
        rows = max(1, math.prod(xs) // vocab)
        red = _reduction(op, 6, 3)
        gain = 1.0 / (math.sqrt(vocab) * (rows if red == "mean" else 1))
        s = Scales(fwd=1.0, fixed_fwd=True, out_rms=None, note=f"V={vocab} N={rows} reduction={red}")
        s.bwd[x], s.grad_gain[x] = 1.0 / gain, gain
        return s


@register(F.nll_loss, aten("nll_loss"), aten("nll_loss_nd"), aten("nll_loss2d"))
class NLLLossRule(CrossEntropyRule):
    """Gradient of the mean negative log-likelihood into the log-probabilities: ``-1 / N`` at each row's
    target, 0 elsewhere, so RMS ``1 / (N sqrt(V))``, as cross-entropy's into its logits. (Class weights and
    ignored targets change ``N``; the unweighted count is the plan's estimate, and measured planning
    corrects it.)"""

    name = "nll_loss"


@register(F.log_softmax, torch.log_softmax, tensor_method("log_softmax"), aten("log_softmax", "int"),
          aten("_log_softmax"))
class LogSoftmaxRule(Rule):
    """``z - logsumexp(z)``: values kept (what a likelihood reads); backward ``g - softmax(z) sum(g)``, which
    keeps the RMS of the gradient ``g`` it receives, both of a negative log-likelihood's (one entry a row)
    and of a dense one (the correction ``softmax(z) sum(g)`` is of order ``1 / sqrt(V)`` of it).

    Output RMS: for logits of RMS ``r`` over ``V`` classes, ``logsumexp(z) ~ log V + r**2 / 2``, so values
    ``z - log V - r**2 / 2``: RMS ``sqrt(r**2 + (log V + r**2 / 2)**2)``, all of them negative."""

    name = "log_softmax"
    kind = Kind.SOFTMAX  # computed in float32 under half precision, as softmax is

    def scales(self, op: OpView) -> Scales:
        if len(op.inputs) != 1:
            return Scales(fixed_fwd=True, out_rms=None, note="log_softmax with several tensor inputs")
        (x,) = op.inputs
        shape, dim = op.shape(x), op.arg(1, "dim")
        if shape is None or not isinstance(dim, int) or not shape:
            return Scales(fixed_fwd=True, out_rms=None, bwd={x: 1.0}, grad_gain={x: 1.0}, note="dim unknown")
        v, r = shape[dim], op.rms(x)
        shift = math.log(v) + r * r / 2
        out = math.sqrt(r * r + shift * shift)
        return Scales(fwd=1.0, fixed_fwd=True, bwd={x: 1.0}, grad_gain={x: 1.0}, out_rms=out,
                      out_mean=max(-1.0, -shift / out), note=f"V={v}: values kept")


@register(F.mse_loss, aten("mse_loss"))
class MSELossRule(Rule):
    """Gradient of mean squared error is ``2 (x - t) / M``: RMS ``2 sqrt(rx^2 + rt^2) / M``."""

    name = "mse_loss"
    kind = Kind.LOSS

    def scales(self, op: OpView) -> Scales:
        x, t = op.arg(0, "input"), op.arg(1, "target")
        xs = op.shape(x)
        if xs is None:
            return Scales(fixed_fwd=True, out_rms=None, note="shape unknown")
        m = max(1, math.prod(xs))
        red = _reduction(op, 4, 2)
        diff = math.sqrt(op.rms(x) ** 2 + op.rms(t) ** 2)
        gain = 2.0 * diff / (m if red == "mean" else 1)
        s = Scales(fwd=1.0, fixed_fwd=True, out_rms=None, note=f"M={m} reduction={red}")
        for n in op.inputs:
            s.bwd[n], s.grad_gain[n] = 1.0 / gain, gain
        return s
