"""calibrate_grads: make gradients unit by measurement, keeping them valid.

After ``balance``, every node ``u`` receives ``phi_u`` times its true gradient.
When real example inputs are known, this pass runs the planned model once,
forward and backward (from the loss as :func:`~unit_scale_fx.tensor_stats.loss_outputs`
defines it: the scalar outputs, else a unit random gradient at every output), and measures the gradient RMS ``m_u`` at every class of
nodes that shares a potential. The true gradient's RMS is ``m_u / phi_u``; the new
potential ``phi_u = 1 / (m_u / phi_u)`` makes the measured gradient exactly unit.
Any positive potentials give valid gradients, so this only changes their size.
Where rules cannot know the gradient (attention queries and keys, correlated
values), this is what makes backward RMS land near 1.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from ..record import META_KEY, ScaleRecord
from ..rules.registry import float_tensor_inputs
from ..scale import scale
from ..tensor_stats import output_loss, rms
from .balance import FIXED_KINDS
from .base import PassContext, PassResult, declare, preserved_state

log = logging.getLogger(__name__)


class _ScaledRun(fx.Interpreter):
    """Runs the planned (not yet rewritten) graph with its scales applied, as the rewrite will."""

    def __init__(self, gm: fx.GraphModule, output_bwd: dict[str, float]) -> None:
        super().__init__(gm, garbage_collect_values=False)
        self.exposed: dict[fx.Node, torch.Tensor] = {}
        self.output_bwd = output_bwd

    def run_node(self, n: fx.Node) -> Any:
        rec: ScaleRecord | None = n.meta.get(META_KEY)
        if n.op == "output":  # the backward scales between the returned values and the caller
            for u in n.all_input_nodes:
                b = self.output_bwd.get(u.name, 1.0)
                if b != 1.0 and isinstance(self.env.get(u), torch.Tensor):
                    self.env[u] = scale(self.env[u], 1.0, b)
            return super().run_node(n)
        if rec is None or rec.kind in FIXED_KINDS or n.op in ("placeholder", "get_attr", "output"):
            value = super().run_node(n)
        else:
            saved = {}
            for u in float_tensor_inputs(n):
                f = rec.weights.get(u.name, 1.0) if rec.weights else 1.0
                b = rec.bwd.get(u.name, f)
                if (f, b) != (1.0, 1.0) and isinstance(self.env.get(u), torch.Tensor):
                    saved[u] = self.env[u]
                    self.env[u] = scale(saved[u], f, b)
            value = super().run_node(n)
            self.env.update(saved)
            if not rec.weights and rec.fwd != 1.0 and isinstance(value, torch.Tensor):
                value = scale(value, rec.fwd, 1.0)
        if isinstance(value, torch.Tensor) and value.requires_grad and n.op != "output":
            value.retain_grad()
            self.exposed[n] = value
        return value


#: measured gradients this far below the typical one are rounding noise, not signal
_NO_SIGNAL = 1e-4
#: calibration moves a potential by at most this (log) factor from the analytic fit
_MAX_STEP = math.log(2.0 ** 10)


@declare('calibrate_grads', needs=('potentials',), produces=('measured_grads',))
def calibrate_grads(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    pots = ctx.potentials
    if pots is None or ctx.real_values is None or not ctx.config.measure:
        return PassResult(False, "skipped (no real inputs or not the potential constraint)")
    with preserved_state(gm), torch.enable_grad():
        run = _ScaledRun(gm, pots.output_bwd())
        out = run.run(*ctx.real_values)
        try:
            # a piece of a larger program (dynamo graph breaks): its outputs feed later graphs, probe them all
            output_loss(out, where="calibrate_grads", scalars_first=not ctx.boundary).backward()
        except RuntimeError as exc:  # UnitScaleError (no output carries a gradient) included
            log.info("calibrate_grads: no backward possible (%s); keeping analytic scales", exc)
            return PassResult(False, "skipped (no gradient)")
        # read now: leaving preserved_state clears the parameters' .grad
        grads = {n: rms(v.grad)
                 for n, v in run.exposed.items() if v.grad is not None}
        sizes = {n: v.numel() for n, v in run.exposed.items()}
    new = pots.log_phi.copy()
    old = pots.log_phi
    true_rms: dict[int, float] = {}
    for cls, members in pots.members().items():
        measured = [n for n in members if n in grads]
        if measured:
            node = max(measured, key=sizes.__getitem__)  # the fullest view of the class
            g = grads[node] / math.exp(old[cls])
            if g > 0 and math.isfinite(g):
                true_rms[cls] = g
    updated = 0
    if true_rms:
        typical = float(np.median(list(true_rms.values())))
        for cls, g in true_rms.items():
            if g < _NO_SIGNAL * typical:
                continue  # a gradient that is zero up to rounding (a bias before a norm): no signal to scale
            new[cls] = float(np.clip(-math.log(g), old[cls] - _MAX_STEP, old[cls] + _MAX_STEP))
            updated += 1
    # The outputs' class (and every value shared with other graphs) keeps potential 1 exactly: gradients
    # that the caller sends into several outputs keep their relative weights. The measured potentials are
    # already relative to it: they make gradients unit for a unit gradient (1 into a loss) at the outputs.
    for c in pots.pinned():
        new[c] = 0.0
    pots.log_phi = new
    pots.assign()
    # what the gradients will measure with the new potentials
    ctx.measured_grads = {n: g * math.exp(new[pots.cls(n)] - old[pots.cls(n)])
                          for n, g in grads.items() if n in pots.g}
    for rec in pots.recs.values():
        if rec.kind not in FIXED_KINDS:
            rec.note = (rec.note + "; " if rec.note else "") + "gradient scales calibrated"
    return PassResult(False, f"{updated} of {len(pots.index)} potentials measured")
