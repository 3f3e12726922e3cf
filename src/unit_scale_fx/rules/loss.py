"""Losses: the forward value is left alone; the gradient into the prediction is made unit.

Also ``log_softmax``, the log-probabilities a negative log-likelihood reads (``nll_loss(log_softmax(z), t)``
is ``cross_entropy(z, t)``, the classifier head of PyTorch's own examples): its values are kept as they are
(they are what the loss reads, and a model may return them), and the unit gradient it receives passes to
its logits at unit RMS.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from .attention import softmax_gains
from .registry import Kind, OpView, Rule, Scales, aten, register, tensor_method

_REDUCTIONS = {0: "none", 1: "mean", 2: "sum"}  # aten's integer encoding


def _arg(op: OpView, f_pos: int, aten_pos: int, name: str, default: Any) -> Any:
    """An argument at its position in the ``torch.nn.functional`` signature or the aten one."""
    return op.arg(aten_pos if isinstance(op.node.target, torch._ops.OpOverload) else f_pos, name, default)


def _reduction(op: OpView, pos: int, aten_pos: int) -> str:
    """``reduction`` as a name (aten encodes it as an integer)."""
    r = _arg(op, pos, aten_pos, "reduction", "mean")
    if isinstance(r, int):
        return _REDUCTIONS.get(r, "mean")
    return r if isinstance(r, str) else "mean"


def softmax_grad_rms(v: int, r: float) -> float:
    """RMS over the ``v`` entries of ``softmax(z) - onehot(t)`` (a row of cross-entropy's gradient), for logits
    ``z ~ N(0, r^2)`` and a target independent of them: ``sqrt((E[sum p^2] - 2 / v + 1) / v)``, with
    ``E[sum p^2]`` from :func:`~unit_scale_fx.rules.attention.softmax_gains` (``v`` times its output's mean
    square; cached). Near ``sqrt(v - 1) / v`` for small logits: ``1 / sqrt(v)`` for many classes, ``1 / 2``
    (not ``1 / sqrt 2``) for two."""
    if v <= 1:
        return 0.0
    sq = softmax_gains(r, v)[0] ** 2 * v
    return math.sqrt(max(sq - 2.0 / v + 1.0, 0.0) / v)


@register(F.cross_entropy, aten("cross_entropy_loss"))
class CrossEntropyRule(Rule):
    """Gradient of mean cross-entropy into logits: ``(softmax(z) - onehot(t)) / N``, RMS
    :func:`softmax_grad_rms` ``/ N`` (about ``1 / (N sqrt(V))`` for many classes; a binary head's is 1.25
    times smaller than that for unit logits, ``sqrt 2`` times for small ones). (Class weights, ignored
    targets and label smoothing are not counted.)"""

    name = "cross_entropy"
    kind = Kind.LOSS

    def row_rms(self, vocab: int, r: float) -> float:
        """RMS of one row of the gradient into the input (before the division by the rows averaged)."""
        return softmax_grad_rms(vocab, round(r, 2))  # as the softmax rule rounds: one cache

    def scales(self, op: OpView) -> Scales:
        x = op.arg(0, "input")
        xs = op.shape(x)
        if not isinstance(x, fx.Node) or x not in op.inputs or xs is None:
            return Scales(fixed_fwd=True, out_rms=None, note="logits unknown")
        vocab = xs[1] if len(xs) > 1 else xs[0]
        rows = max(1, math.prod(xs) // vocab)
        red = _reduction(op, 6, 3)
        row = self.row_rms(vocab, op.rms(x))
        if not row > 0:
            return Scales(fwd=1.0, fixed_fwd=True, out_rms=None, note=f"V={vocab}: no gradient")
        gain = row / (rows if red == "mean" else 1)
        s = Scales(fwd=1.0, fixed_fwd=True, out_rms=None, note=f"V={vocab} N={rows} reduction={red}")
        s.bwd[x], s.grad_gain[x] = 1.0 / gain, gain
        return s


@register(F.nll_loss, aten("nll_loss"), aten("nll_loss_nd"), aten("nll_loss2d"))
class NLLLossRule(CrossEntropyRule):
    """Gradient of the mean negative log-likelihood into the log-probabilities: ``-1 / N`` at each row's
    target, 0 elsewhere, so RMS ``1 / (N sqrt(V))`` exactly. (Class weights and ignored targets change
    ``N``; the plan counts every row, unweighted.)"""

    name = "nll_loss"

    def row_rms(self, vocab: int, r: float) -> float:
        return 1.0 / math.sqrt(vocab)


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


def clipped_rms(s: float) -> float:
    """RMS of ``clamp(z, -1, 1)`` for ``z ~ N(0, s^2)``: ``E[z^2; |z| <= 1] + P(|z| > 1)``, with ``a = 1 / s``
    and ``u`` standard normal, ``s^2 (erf(a / sqrt 2) - 2 a phi(a)) + 1 - erf(a / sqrt 2)``."""
    if s <= 0:
        return 0.0
    a = 1.0 / s
    inside = math.erf(a / math.sqrt(2.0))
    phi = math.exp(-a * a / 2) / math.sqrt(2 * math.pi)
    return math.sqrt(max(0.0, s * s * (inside - 2 * a * phi) + 1.0 - inside))


class ElementwiseLossRule(Rule):
    """A loss that sums or averages an elementwise term of a prediction ``x`` and a target ``t``.

    The gradient into each element is the term's derivative divided by ``M`` (the elements averaged:
    all of them for ``mean``, the batch for ``batchmean``, none for ``sum`` and ``none``). A subclass gives
    the derivative's RMS (:meth:`derivative_rms`) and where ``reduction`` is in its two signatures. A target
    that takes a gradient gets the prediction's factor (as the squared error always did): its gradient is a
    positive multiple of the true one, unit where its derivative is of the prediction's size."""

    kind = Kind.LOSS
    #: position of ``reduction`` in the ``torch.nn.functional`` signature and in the aten one
    reduction_pos: tuple[int, int] = (4, 2)

    def derivative_rms(self, op: OpView, x: fx.Node, t: Any) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def scales(self, op: OpView) -> Scales:
        x, t = op.arg(0, "input"), op.arg(1, "target")
        xs = op.shape(x)
        if xs is None or not isinstance(x, fx.Node):
            return Scales(fixed_fwd=True, out_rms=None, note="shape unknown")
        red = _reduction(op, *self.reduction_pos)
        m = max(1, math.prod(xs)) if red == "mean" else (xs[0] if red == "batchmean" and xs else 1)
        d = self.derivative_rms(op, x, t)
        s = Scales(fwd=1.0, fixed_fwd=True, out_rms=None, note=f"M={m} reduction={red}")
        if not d > 0:
            return s
        gain = d / m
        for n in op.inputs:
            s.bwd[n], s.grad_gain[n] = 1.0 / gain, gain
        return s

    @staticmethod
    def diff_rms(op: OpView, x: fx.Node, t: Any) -> float:
        """RMS of ``x - t`` for independent zero-mean prediction and target."""
        return math.sqrt(op.rms(x) ** 2 + op.rms(t) ** 2)


@register(F.mse_loss, aten("mse_loss"))
class MSELossRule(ElementwiseLossRule):
    """Gradient of mean squared error is ``2 (x - t) / M``: RMS ``2 sqrt(rx^2 + rt^2) / M``."""

    name = "mse_loss"

    def derivative_rms(self, op: OpView, x: fx.Node, t: Any) -> float:
        return 2.0 * self.diff_rms(op, x, t)


@register(F.l1_loss, aten("l1_loss"))
class L1LossRule(ElementwiseLossRule):
    """Gradient of the mean absolute error is ``sign(x - t) / M``: RMS ``1 / M``."""

    name = "l1_loss"

    def derivative_rms(self, op: OpView, x: fx.Node, t: Any) -> float:
        return 1.0


@register(F.smooth_l1_loss, aten("smooth_l1_loss"))
class SmoothL1LossRule(ElementwiseLossRule):
    """Gradient ``clamp((x - t) / beta, -1, 1) / M`` (``sign(x - t)`` for ``beta = 0``): its RMS for a Gaussian
    difference (:func:`clipped_rms`)."""

    name = "smooth_l1_loss"

    def derivative_rms(self, op: OpView, x: fx.Node, t: Any) -> float:
        beta = _arg(op, 5, 3, "beta", 1.0)
        if not isinstance(beta, (int, float)):
            return 0.0
        return 1.0 if beta <= 0 else clipped_rms(self.diff_rms(op, x, t) / beta)


@register(F.huber_loss, aten("huber_loss"))
class HuberLossRule(ElementwiseLossRule):
    """Gradient ``clamp(x - t, -delta, delta) / M``: ``delta`` times the RMS of :func:`clipped_rms`."""

    name = "huber_loss"
    reduction_pos = (2, 2)

    def derivative_rms(self, op: OpView, x: fx.Node, t: Any) -> float:
        delta = _arg(op, 3, 3, "delta", 1.0)
        if not isinstance(delta, (int, float)) or delta <= 0:
            return 0.0
        return delta * clipped_rms(self.diff_rms(op, x, t) / delta)


def _binary_target_moments(op: OpView, t: Any) -> tuple[float, float]:
    """``(RMS(t), E[t])`` of a binary cross-entropy's target as planning predicts them; where its mean is not
    predicted, targets in [0, 1] that are 0 or 1, so ``E[t] = E[t^2]``."""
    rt = op.rms(t, 0.0)
    mean_t = op.mean(t) * rt if isinstance(t, fx.Node) else rt
    return rt, (mean_t if mean_t > 0 else rt * rt)


@functools.lru_cache(maxsize=256)
def _sigmoid_logit_spread(rp: float) -> float:
    """The standard deviation ``s`` of zero-mean Gaussian logits whose sigmoid has RMS ``rp``, by bisection:
    ``RMS(sigmoid(z))`` rises from 1/2 (``s = 0``) to ``sqrt(1/2)``; clamped to [0, 8]."""
    from .pointwise import gaussian_moments

    lo, hi = 0.0, 8.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if gaussian_moments(torch.sigmoid, std=mid)[0] < rp:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


@register(F.binary_cross_entropy_with_logits, aten("binary_cross_entropy_with_logits"))
class BCEWithLogitsRule(ElementwiseLossRule):
    """Gradient into the logits ``(sigmoid(x) - t) / M``: ``E[sigmoid(x)^2] - E[t] + E[t^2]`` for zero-mean
    logits (``E[sigmoid(x)] = 1/2``) independent of the target, whose moments are those planning predicts
    (where its mean is not predicted: targets of 0 and 1, ``E[t] = E[t^2]``). (Class and positive weights
    are not counted.)"""

    name = "binary_cross_entropy_with_logits"
    reduction_pos = (5, 4)

    def derivative_rms(self, op: OpView, x: fx.Node, t: Any) -> float:
        from .pointwise import gaussian_moments

        sig2 = gaussian_moments(torch.sigmoid, std=op.rms(x))[0] ** 2
        rt, mean_t = _binary_target_moments(op, t)
        return math.sqrt(max(sig2 - mean_t + rt * rt, 1e-12))


@register(F.binary_cross_entropy, aten("binary_cross_entropy"))
class BCERule(ElementwiseLossRule):
    """Binary cross-entropy of probabilities ``p``: gradient into them ``(p - t) / (p (1 - p)) / M``. Its
    RMS is an expectation over ``p = sigmoid(z)`` for zero-mean Gaussian logits ``z`` whose spread gives
    the RMS planning predicts for ``p`` (found by bisection; a ``p`` that is not a sigmoid's output is read
    as one of the same RMS), with ``E[(p - t)^2] = p^2 - 2 p E[t] + E[t^2]`` for a target independent of
    ``p`` (its moments as for :class:`BCEWithLogitsRule`). The expectation has heavy tails where ``p``
    saturates (``1 / p`` near 0, growing as ``exp(|z|)``): the logits are read within three standard
    deviations (beyond, the value at three), the bulk a batch's RMS shows, so that saturated
    probabilities do not make the factor vanish. (Class weights are not counted.)"""

    name = "binary_cross_entropy"
    reduction_pos = (5, 3)

    def derivative_rms(self, op: OpView, x: fx.Node, t: Any) -> float:
        from .pointwise import gaussian_moments

        rt, mean_t = _binary_target_moments(op, t)
        s = _sigmoid_logit_spread(op.rms(x))

        def derivative(z: torch.Tensor) -> torch.Tensor:
            p = torch.sigmoid(z.clamp(-3 * s, 3 * s))
            num = (p * p - 2 * p * mean_t + rt * rt).clamp_min(1e-30)
            return num.sqrt() / (p * (1 - p)).clamp_min(1e-12)

        return gaussian_moments(derivative, std=s)[0]


@register(F.kl_div, aten("kl_div"))
class KLDivRule(ElementwiseLossRule):
    """``KL(t || exp(x))`` of log-probabilities ``x``: gradient into them ``-t / M`` (``-exp(t) / M`` for
    ``log_target``), RMS the target's (probabilities near ``exp(E[t])`` for log-probabilities ``t``).
    ``batchmean`` averages over the batch (under ``torch.export`` a sum, then a division)."""

    name = "kl_div"

    def derivative_rms(self, op: OpView, x: fx.Node, t: Any) -> float:
        rt = op.rms(t, 0.0)
        if _arg(op, 5, 3, "log_target", False) is True:
            return math.exp(op.mean(t) * rt) if isinstance(t, fx.Node) else math.exp(rt)
        return rt
