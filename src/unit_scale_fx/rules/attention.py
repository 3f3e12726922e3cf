"""Softmax and scaled-dot-product attention.

For logits with standard deviation ``s`` over ``n`` entries, softmax weights have
``sum(w^2) ~= exp(s^2) / n`` (at most 1); attention outputs are such weighted
averages of values, so their RMS is ``RMS(v) * sqrt(sum(w^2))`` averaged over
query rows (rows of a causal mask see ``i + 1`` keys).
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..record import MASK_KEYS
from .registry import Kind, OpView, Rule, Scales, aten, register, tensor_method


def mean_sq_weight(logit_std: float, n_keys: list[int] | int) -> float:
    """Mean over rows of ``sum_j w_ij^2`` for softmax of Gaussian logits."""
    e = math.exp(min(logit_std, 6.0) ** 2)
    ns = [n_keys] if isinstance(n_keys, int) else n_keys
    return sum(min(1.0, e / max(1, n)) for n in ns) / len(ns)


@register(torch.softmax, F.softmax, tensor_method("softmax"), aten("softmax", "int"), aten("_softmax"))
class SoftmaxRule(Rule):
    name = "softmax"
    kind = Kind.SOFTMAX

    def scales(self, op: OpView) -> Scales:
        if len(op.inputs) != 1:
            return Scales(note="softmax with several tensor inputs")
        (x,) = op.inputs
        shape = op.shape(x)
        dim = op.arg(1, "dim", -1)
        if shape is None or not isinstance(dim, int):
            return Scales(note="softmax dim unknown")
        n = shape[dim]
        out_rms = math.sqrt(mean_sq_weight(op.rms(x), n) / n)
        a = 1.0 / out_rms
        return Scales(fwd=a, bwd={x: a}, grad_gain={x: out_rms}, note=f"n={n}", calibrate=True, calibrate_bwd=True)


@register(F.scaled_dot_product_attention, aten("scaled_dot_product_attention"))
class SDPARule(Rule):
    name = "sdpa"
    kind = Kind.ATTENTION

    def scales(self, op: OpView) -> Scales:
        q, k, v = op.arg(0, "query"), op.arg(1, "key"), op.arg(2, "value")
        qs, ks = op.shape(q), op.shape(k)
        if qs is None or ks is None:
            return Scales(note="shapes unknown")
        d, tq, tk = qs[-1], qs[-2], ks[-2]
        scale = op.arg(6, "scale", None)
        scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
        logit_std = scale * math.sqrt(d) * op.rms(q) * op.rms(k)
        causal = bool(op.arg(5, "is_causal", False))
        # with a causal mask, query row i sees keys 0 .. i + (tk - tq)
        n_keys = [min(tk, i + 1 + tk - tq) for i in range(tq)] if causal else tk
        mask = op.arg(3, "attn_mask")
        if isinstance(mask, fx.Node) and mask.meta.get(MASK_KEYS):  # measured by the constants pass
            n_keys = [max(1, k) for k in mask.meta[MASK_KEYS]]
        out_rms = op.rms(v) * math.sqrt(mean_sq_weight(logit_std, n_keys))
        a = 1.0 / out_rms
        # Forward: values of nearby positions grow correlated with depth, so the output RMS
        # is measured when possible. Backward: the gradient into the values is A^T g with
        # g uncorrelated across positions, so the analytic estimate stays right.
        s = Scales(fwd=a, note=f"d={d} tq={tq} tk={tk} causal={causal}", calibrate=True)
        for n in op.inputs:
            s.bwd[n], s.grad_gain[n] = a, out_rms
        return s
