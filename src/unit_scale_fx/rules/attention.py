"""Softmax and scaled-dot-product attention.

For logits with standard deviation ``s`` over ``n`` entries, softmax weights have
roughly ``sum(w^2) ~= exp(s^2) / n`` (at most 1); attention outputs are such weighted
averages of values, so their RMS is ``RMS(v) * sqrt(sum(w^2))`` averaged over
query rows (rows of a causal mask see ``i + 1`` keys). That closed form is off for
sharp weights, so both rules here average over draws of Gaussian logits instead
(:func:`softmax_gains`, :func:`attention_gains`), which also give the gradients.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..record import MASK_KEYS
from .registry import Kind, OpView, Rule, Scales, aten, register, tensor_method


@functools.lru_cache(maxsize=512)
def softmax_gains(logit_std: float, n: int) -> tuple[float, float]:
    """``(RMS of softmax's output, RMS of its input gradient)`` over ``n`` entries of Gaussian logits of standard
    deviation ``logit_std``, for a unit Gaussian output gradient ``g`` independent of them.

    With ``p`` a row's weights, the input gradient is ``p * (g - sum(p g))``, whose mean square over the row is
    ``(sum p^2 - 2 sum p^3 + (sum p^2)^2) / n`` for such ``g``; the output's is ``sum p^2 / n``. Both are averaged
    over rows drawn from a fixed generator (4096, fewer for long rows). The gradient's gain is the output's RMS
    for a diffuse softmax and falls to 0 for a sharp one (a one-hot row sends nothing back): for logits of
    standard deviation 4 over 16 entries (attention without the ``1 / sqrt(d)``, GPT-Neo's), 0.078 against
    an output RMS of 0.19. Over more than 2**20 entries (no draws of that size), ``sum p^2 ~ exp(s^2) / n``
    (at most 1) and ``sum p^3 ~ (sum p^2)^2``."""
    if n <= 1:
        return 1.0, 0.0
    if n > 1 << 20:
        s2 = min(1.0, math.exp(min(logit_std, 6.0) ** 2) / n)
        out = math.sqrt(s2 / n)
        return out, out * math.sqrt(1.0 - s2)
    rows = max(8, min(4096, (1 << 20) // n))
    gen = torch.Generator().manual_seed(1234)
    z = torch.randn(rows, n, generator=gen, dtype=torch.float64) * min(logit_std, 30.0)
    p = torch.softmax(z, dim=1)
    s2, s3 = p.pow(2).sum(1), p.pow(3).sum(1)
    out = math.sqrt(float(s2.mean()) / n)
    grad = math.sqrt(max(float((s2 - 2.0 * s3 + s2 * s2).mean()), 0.0) / n)
    return out, grad


@register(torch.softmax, F.softmax, tensor_method("softmax"), aten("softmax", "int"), aten("_softmax"))
class SoftmaxRule(Rule):
    """Forward: ``1 / RMS(softmax)``; backward: ``1 / RMS`` of the input gradient per unit output gradient,
    both for Gaussian logits of the input's predicted RMS (:func:`softmax_gains`). Measured planning
    re-measures the forward and moves the backward with it."""

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
        try:
            n = int(shape[dim])
        except (TypeError, ValueError, IndexError):  # a symbolic size: no number to plan with
            return Scales(note="softmax size unknown")
        out_rms, grad = softmax_gains(round(op.rms(x), 2), n)
        a = 1.0 / out_rms
        # a row's gradient vanishes only for one entry (the output is then 1): no factor to give it
        b = 1.0 / grad if grad > 1e-6 * out_rms else a
        # every weight is positive and a row's weights sum to one: E[w] = 1 / n
        return Scales(fwd=a, bwd={x: b}, grad_gain={x: 1.0 / b}, note=f"n={n}", calibrate=True, calibrate_bwd=True,
                      out_mean=min(1.0, (1.0 / n) / out_rms))


#: the probe's query rows (longer sequences are sampled: rows are independent given the keys)
_PROBE_ROWS = 256
#: the probe draws enough heads for about this many query rows in all
_PROBE_TOTAL_ROWS = 4096


@functools.lru_cache(maxsize=512)
def attention_gains(logit_std: float, d: int, dv: int, n_keys: tuple[int, ...],
                    tk: int) -> tuple[float, float, float, float, float]:
    """``(out, dq, dk, dv, cross)``: RMS of attention on unit Gaussian q, k, v and a unit Gaussian gradient.

    A Gaussian probe, cached: ``softmax(c q k^T + mask) v`` with ``c = logit_std / sqrt(d)``, query
    row ``i`` seeing the first ``n_keys[i]`` keys, run forward and backward in float64 on a
    fixed seed. It gives what closed forms only approximate: the query and key gains depend on the
    softmax's own Jacobian (``A * (dP - rowsum(A dP))``), which vanishes for rows that see one key
    and is ``c``-proportional for diffuse rows. For long sequences a sample of query rows is run;
    each row's contribution to the key and value gradients is independent, so their mean squares
    are scaled up by ``rows / sampled``. ``cross``: the mean over distinct query rows of
    ``sum_k A_ik A_jk`` (how much two outputs share; the output correlation for independent values).
    """
    tq = len(n_keys)
    rows = list(range(tq)) if tq <= _PROBE_ROWS else [round(i * (tq - 1) / (_PROBE_ROWS - 1)) for i in range(_PROBE_ROWS)]
    r = len(rows)
    heads = max(1, min(64, _PROBE_TOTAL_ROWS // r))
    gen = torch.Generator().manual_seed(1234)
    q = torch.randn(heads, r, d, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(heads, tk, d, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(heads, tk, dv, generator=gen, dtype=torch.float64, requires_grad=True)
    visible = torch.tensor([n_keys[i] for i in rows]).unsqueeze(1) > torch.arange(tk).unsqueeze(0)
    with torch.enable_grad():
        logits = (q @ k.transpose(-1, -2)) * (logit_std / math.sqrt(d))
        a = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
        out = a @ v
        g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
        gq, gk, gv = torch.autograd.grad(out, (q, k, v), g)

    def ms(t: torch.Tensor) -> float:
        return float(t.pow(2).mean())

    up = tq / r
    with torch.no_grad():  # mean over distinct query rows of sum_k A_ik A_jk: what rows share
        aat = a @ a.transpose(-1, -2)
        cross = float((aat.sum((-1, -2)) - aat.diagonal(dim1=-2, dim2=-1).sum(-1)).mean()) / max(1, r * (r - 1))
    return (math.sqrt(ms(out.detach())), math.sqrt(ms(gq)), math.sqrt(ms(gk) * up), math.sqrt(ms(gv) * up),
            cross)


def _probe_weights(logit_std: float, d: int, n_keys: tuple[int, ...], tk: int) -> tuple[torch.Tensor, int]:
    """Attention weights ``A`` of the probe (unit Gaussian queries and keys, float64, a fixed seed; query row
    ``i`` sees the first ``n_keys[i]`` keys; long sequences sampled, as in :func:`attention_gains`), and the
    number of query rows sampled."""
    tq = len(n_keys)
    rows = list(range(tq)) if tq <= _PROBE_ROWS else [round(i * (tq - 1) / (_PROBE_ROWS - 1)) for i in range(_PROBE_ROWS)]
    heads = max(1, min(64, _PROBE_TOTAL_ROWS // len(rows)))
    gen = torch.Generator().manual_seed(1234)
    q = torch.randn(heads, len(rows), d, generator=gen, dtype=torch.float64)
    k = torch.randn(heads, tk, d, generator=gen, dtype=torch.float64)
    visible = torch.tensor([n_keys[i] for i in rows]).unsqueeze(1) > torch.arange(tk).unsqueeze(0)
    logits = (q @ k.transpose(-1, -2)) * (logit_std / math.sqrt(d))
    return torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1), len(rows)


@functools.lru_cache(maxsize=512)
def shared_value_gain(logit_std: float, d: int, n_keys: tuple[int, ...], tk: int) -> float:
    """RMS of the value gradient ``A^T g`` when ``g`` is the same unit Gaussian row at every query
    position (the gradient of a mean over positions): the column sums of ``A``, not their squares."""
    a, sampled = _probe_weights(logit_std, d, n_keys, tk)
    col = a.sum(-2) * (len(n_keys) / sampled)  # [heads, tk]: what each key receives of the shared gradient
    return float(col.pow(2).mean().sqrt())


@functools.lru_cache(maxsize=512)
def value_grad_rho(logit_std: float, d: int, n_keys: tuple[int, ...], tk: int) -> float:
    """The cross-position correlation of the value gradient ``A^T g`` for independent unit Gaussian rows ``g``:
    the part of its square that every key position shares. Each row of ``A`` sums to 1, so the mean over keys
    of ``A^T g`` is ``sum(g) / tk`` whatever ``A`` is: ``rho = tq / (tk sum A^2)``, 1 for attention spread evenly
    (every key gets the mean of ``g``), ``1 / tk`` for attention on one key each. A bias added to the values
    sums its gradient over the key positions, coherently where ``rho`` is high."""
    a, _ = _probe_weights(logit_std, d, n_keys, tk)
    per_row = float(a.pow(2).sum(-1).mean())  # sum over keys of A^2, averaged over query rows
    return min(1.0, 1.0 / (tk * per_row)) if per_row > 0 else 0.0


@register(F.scaled_dot_product_attention, aten("scaled_dot_product_attention"))
class SDPARule(Rule):
    name = "sdpa"
    kind = Kind.ATTENTION

    def scales(self, op: OpView) -> Scales:
        q, k, v = op.arg(0, "query"), op.arg(1, "key"), op.arg(2, "value")
        qs, ks, vs = op.shape(q), op.shape(k), op.shape(v)
        if qs is None or ks is None:
            return Scales(note="shapes unknown")
        d, tq, tk = qs[-1], qs[-2], ks[-2]
        dv = vs[-1] if vs else d
        scale = op.arg(6, "scale", None)
        scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
        rq, rk, rv = op.rms(q), op.rms(k), op.rms(v)
        logit_std = scale * math.sqrt(d) * rq * rk
        causal = bool(op.arg(5, "is_causal", False))
        # with a causal mask, query row i sees keys 0 .. i + (tk - tq)
        n_keys = [max(1, min(tk, i + 1 + tk - tq)) for i in range(tq)] if causal else [tk] * tq
        mask = op.arg(3, "attn_mask")
        if isinstance(mask, fx.Node) and mask.meta.get(MASK_KEYS):  # measured by the constants pass
            n_keys = [max(1, min(tk, k)) for k in mask.meta[MASK_KEYS]][:tq]
            n_keys += [tk] * (tq - len(n_keys))
        out, gq, gk, gv, cross = attention_gains(round(min(logit_std, 8.0), 2), d, dv, tuple(n_keys), tk)
        # values correlated across positions (rho): each output is a weighted mean of them, so
        # RMS^2 = rho + (1 - rho) sum_k w_k^2 (relative to the values'), and outputs share more
        rho = op.rho(v)
        mean_sq = rho + (1.0 - rho) * out * out
        out_rho = min(1.0, (rho + (1.0 - rho) * cross) / mean_sq)
        out = math.sqrt(mean_sq)
        # grouped-query attention: each key / value head serves several query heads
        group = qs[-3] / ks[-3] if len(qs) >= 3 and len(ks) >= 3 and ks[-3] and qs[-3] > ks[-3] else 1.0
        out_rms = rv * out
        a = 1.0 / out_rms
        # Forward: values of nearby positions grow correlated with depth, so the output RMS
        # is measured when possible. Backward: the rule's gains come from a Gaussian probe of
        # the attention's own Jacobian (scaled to the operands' RMS: dq ~ c rk rv, dk ~ c rq rv).
        s = Scales(fwd=a, note=f"d={d} tq={tq} tk={tk} causal={causal} logit std={logit_std:.3g} value rho={rho:.2f}",
                   calibrate=True, out_rho=out_rho)
        # the query and key gradients see dP = g v^T only through the softmax's centring
        # (dP - rowsum(A dP)): the part of v shared by all positions cancels, leaving sqrt(1 - rho)
        shared = math.sqrt(max(0.0, 1.0 - rho))
        gains = {q: gq * rv / rq * shared, k: gk * rv / rk * shared * math.sqrt(group), v: gv * math.sqrt(group)}
        for n in op.inputs:
            g = gains.get(n)
            if g is None or not (g > 0 and math.isfinite(g)):
                g = out_rms
            s.bwd[n], s.grad_gain[n] = 1.0 / g, g
        if isinstance(v, fx.Node) and v in op.inputs and v is not q and v is not k:
            # an output gradient shared by all positions (a mean-pooled readout) reaches each value as
            # g times its key's column sum of A: coherent, not a sum of independent parts
            s.shared_grad_gain[v] = shared_value_gain(round(min(logit_std, 8.0), 2), d, tuple(n_keys), tk) \
                * math.sqrt(group)
            s.grad_rho[v] = value_grad_rho(round(min(logit_std, 8.0), 2), d, tuple(n_keys), tk)
        return s
