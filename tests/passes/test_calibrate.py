"""calibrate: ops with no rule get measured static scales (``calibrate=True``)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import band_fractions, gradient_cosines
from unit_scale_fx import UnitScaleError, unit_scale
from unit_scale_fx.analysis.recorder import record_matmul_operands
from unit_scale_fx.passes.calibrate import measure


class Tail(nn.Module):
    """Two ops no rule knows: a running log-sum-exp over time (RMS grows ~log T) and hypot."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(16, 64), nn.Linear(64, 64), nn.Linear(64, 8)
        self.bn = nn.BatchNorm1d(32)

    def forward(self, x, y):
        h = torch.logcumsumexp(self.bn(self.fc1(x)), dim=1)
        h = torch.hypot(self.fc2(h), h)
        return F.mse_loss(self.fc3(h), y)


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 32, 16, generator=g), torch.randn(8, 32, 8, generator=g)


def test_without_calibration_the_tail_is_reported_unscaled():
    with pytest.warns(UserWarning, match="no unit-scaling rule"):
        us = unit_scale(Tail(), _batch())
    assert {u.node for u in us.us_unsupported} == {"logcumsumexp", "hypot"}


def test_calibration_scales_every_op_and_says_which():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "unscaled ops" warning
        us = unit_scale(Tail(), _batch(), calibrate=True)
    assert not us.us_unsupported
    plan = us.scale_plan(all_nodes=True)
    calibrated = {name for name, r in plan.items() if r.rule == "calibrated"}
    assert calibrated == {"logcumsumexp", "hypot"}
    assert all("calibrated" in plan[n].note for n in calibrated)
    assert plan["logcumsumexp"].fwd < 0.5  # a running log-sum-exp of 32 steps is large: scaled down
    x, y = _batch(1)
    frac = band_fractions(record_matmul_operands(us, x, y))
    recs = record_matmul_operands(us, x, y)
    assert frac["fwd"] == 1.0 and frac["bwd"] >= 0.9, (frac, [(r.phase, r.shape, round(r.rms, 3)) for r in recs if r.phase == "bwd"])


def test_calibrated_gradients_stay_valid():
    us = unit_scale(Tail(), _batch(), calibrate=True)
    cos = gradient_cosines(us, *_batch(2))
    assert min(cos.values()) > 0.999, cos


def test_calibration_leaves_buffers_and_gradients_alone():
    model = Tail()
    us = unit_scale(model, _batch(), calibrate=False, unsupported="ignore")
    before = {k: v.clone() for k, v in us.state_dict().items()}
    names = [n.name for n in us.graph.nodes if n.op == "call_function"]
    found = measure(us, names, _batch())
    assert found["logcumsumexp"].out_rms > 2.0 and found["logcumsumexp"].grad_out_rms > 0
    assert all(p.grad is None for p in us.parameters())
    for k, v in us.state_dict().items():
        torch.testing.assert_close(v, before[k])


def test_calibration_needs_real_inputs():
    x, y = _batch()
    with pytest.raises(UnitScaleError, match="real example inputs"):
        unit_scale(Tail().to("meta"), (x.to("meta"), y.to("meta")), calibrate=True)


def test_the_pass_pins_measured_rules_and_leaves_the_graph_alone():
    """The pass on its own: each op with no rule gets a CalibratedRule, forward scale 1 / measured RMS."""
    from helpers import graph_code, pipeline_until, rms, run_pass

    from unit_scale_fx.passes.calibrate import CalibratedRule
    from unit_scale_fx.record import RULE_OVERRIDE

    x, y = _batch()
    gm, ctx, p = pipeline_until(Tail(), (x, y), "calibrate", calibrate=True)
    before = graph_code(gm)
    result = run_pass(gm, ctx, p)
    assert result.info == "2 ops calibrated" and graph_code(gm) == before
    pinned = {n.name: n.meta[RULE_OVERRIDE] for n in gm.graph.nodes if RULE_OVERRIDE in n.meta}
    assert set(pinned) == {"logcumsumexp", "hypot"}
    assert all(isinstance(r, CalibratedRule) for r in pinned.values())
    # the running log-sum-exp's raw output, computed here (the trial's upstream scales make its input unit)
    h = gm.bn(F.linear(x, gm.fc1.weight, gm.fc1.bias))
    raw = torch.logcumsumexp(h / rms(h), dim=1)
    assert 0.8 < pinned["logcumsumexp"].fwd * rms(raw) < 1.25
    assert all(r.gains and all(g > 0 for g in r.gains.values()) for r in pinned.values())  # measured backward gains
