"""round_scales: every scale of the plan rounded to a power of two (``UnitScaleConfig(round_scales="pow2")``).

A power-of-two scale is exact in every binary float format (FP8, FP16, BF16, FP32): multiplying
by it changes only the exponent, so the scale ops add no rounding error of their own, and a
scale folded into a low-precision matmul's output is free.

Rounding keeps the gradients valid. Under the ``"potential"`` constraint each backward factor is
``b_uv = f_uv * phi_u / phi_v``: the forward factors ``f`` and the potentials ``phi`` are rounded
to powers of two (pinned classes stay at exactly 1), and the backward factors are derived from
them again, so they are powers of two and every parameter still gets a positive multiple of its
true gradient. Under the local constraints (``"gmean"``, ``"fwd"``, ``"bwd"``) each factor is
rounded on its own: factors that were equal (one scale for both directions) stay equal.

Each rounded factor moves by at most ``sqrt(2)``. The ``plan`` pass already rounds forward
factors and residual weights as it goes, so later ops measure (or predict) the rounded values and
errors do not add up, and ``calibrate_grads`` measures the gradients of the rounded forward. This
pass runs after ``calibrate_grads`` and before ``predict_grads``: it rounds what was set after
``plan`` (u-μP's readout), then the potentials and the backward factors. The forward predictions
(``fwd_rms``) of a record it changes are moved by that record's own factor only.
"""

from __future__ import annotations

import math

import numpy as np
import torch.fx as fx

from ..record import META_KEY, ScaleRecord
from .base import PassContext, PassResult, declare

ROUNDINGS = ("pow2",)


def pow2(x: float) -> float:
    """``x`` rounded to the nearest power of two in log scale, sign kept (0, inf and nan unchanged)."""
    if x == 0 or not math.isfinite(x):
        return x
    return math.copysign(2.0 ** round(math.log2(abs(x))), x)


def is_pow2(x: float) -> bool:
    """Whether ``x`` is plus or minus an exact power of two (or 0)."""
    return x == 0 or (math.isfinite(x) and math.frexp(abs(x))[0] == 0.5)


@declare("round_scales", needs=("scales",))
def round_scales(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    if ctx.config.round_scales is None:
        return PassResult(False, "skipped (round_scales=None)")
    recs: list[ScaleRecord] = [n.meta[META_KEY] for n in gm.graph.nodes if META_KEY in n.meta]
    for rec in recs:
        old = rec.fwd
        rec.fwd = pow2(rec.fwd)
        rec.weights = {k: pow2(w) for k, w in rec.weights.items()}
        if rec.fwd_rms is not None and old:
            rec.fwd_rms *= rec.fwd / old
    pots = ctx.potentials
    if pots is not None:  # potentials in whole powers of two; backward factors derived from them again
        ln2 = math.log(2.0)
        pots.log_phi = np.round(pots.log_phi / ln2) * ln2
        for c in pots.pinned():
            pots.log_phi[c] = 0.0
        # graph breaks: the factor on every returned loss, shared with the program's other graphs
        pots.loss_factor = pow2(pots.loss_factor)
        pots.assign()
    for rec in recs:  # exact powers of two (the derived factors are, up to the last bit)
        rec.bwd = {k: pow2(b) for k, b in rec.bwd.items()}
    return PassResult(False, f"{len(recs)} records rounded to powers of two")
