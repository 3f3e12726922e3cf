"""round_scales: UnitScaleConfig(round_scales="pow2") makes every inserted scale a power of two (issue 13)."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import band_fractions, gradient_cosines, graph_code, pipeline_until, run_pass, scale_constants
from unit_scale_fx import UnitScaleConfig, UnitScaleError, unit_scale
from unit_scale_fx.analysis import check_equivalence
from unit_scale_fx.analysis.recorder import MatmulRecorder
from unit_scale_fx.examples import GPT, gpt_batch
from unit_scale_fx.passes.round_scales import is_pow2, pow2
from unit_scale_fx.record import META_KEY


def test_pow2_rounds_in_log_scale():
    assert pow2(1.0) == 1.0 and pow2(0.7) == 0.5 and pow2(0.72) == 1.0 and pow2(3.0) == 4.0 and pow2(-0.3) == -0.25
    assert pow2(0.0) == 0.0 and math.isinf(pow2(math.inf))
    assert is_pow2(0.125) and is_pow2(-2.0) and not is_pow2(0.3) and not is_pow2(0.9980468750000001)
    for x in (0.01, 0.3, 1.7, 900.0):
        assert is_pow2(pow2(x)) and 2 ** -0.5 <= pow2(x) / x <= 2 ** 0.5


def test_unknown_rounding_is_refused():
    with pytest.raises(UnitScaleError, match="round_scales"):
        UnitScaleConfig(round_scales="pow3")


def test_the_pass_rounds_potentials_and_derives_backward_scales_from_them():
    """On the planned records: potentials in whole powers of two, and b_uv = f_uv * phi_u / phi_v exactly."""
    torch.manual_seed(0)
    model = GPT(vocab=32, d=16, layers=1, heads=2, max_len=8)
    gm, ctx, p = pipeline_until(model, gpt_batch(32, 4, 8, seed=1), "round_scales", round_scales="pow2")
    pots = ctx.potentials
    assert any(not is_pow2(b) for n in gm.graph.nodes if META_KEY in n.meta for b in n.meta[META_KEY].bwd.values())
    before = graph_code(gm)
    result = run_pass(gm, ctx, p)
    assert "rounded" in result.info and graph_code(gm) == before  # records only; the rewrite comes later
    k = pots.log_phi / math.log(2.0)
    assert abs(k - k.round()).max() < 1e-9  # every potential a power of two
    for u, v in pots.free:
        rec = pots.recs[v]
        f = rec.weights.get(u.name, 1.0) if rec.weights else rec.fwd
        assert is_pow2(f) and is_pow2(rec.bwd[u.name])
        assert rec.bwd[u.name] == f * 2.0 ** round(k[pots.cls(u)] - k[pots.cls(v)]), (u, v)


def _gpt():
    torch.manual_seed(0)
    return GPT(vocab=64, d=32, layers=2, heads=2, max_len=16)


@pytest.mark.parametrize("constraint", ["potential", "gmean"])
def test_every_scale_is_a_power_of_two_and_the_rewrite_is_the_users_model(constraint):
    model, batch = _gpt(), gpt_batch(64, 8, 16, seed=1)
    us = unit_scale(model, batch, round_scales="pow2", constraint=constraint)
    consts = scale_constants(us)
    assert len(consts) > 40 and any(c != 1.0 for c in consts)
    assert [c for c in consts if not is_pow2(c)] == []
    for name, r in us.scale_plan(all_nodes=True).items():  # the plan the user inspects says the same
        assert all(is_pow2(v) for v in [r.fwd, *r.bwd.values(), *r.weights.values()]), (name, r)
    # unrounded, the same plan is not made of powers of two (the test can fail)
    plain = scale_constants(unit_scale(model, batch, constraint=constraint))
    assert sum(not is_pow2(c) for c in plain) > 10
    # scales set to 1: the user's model, outputs and gradients; with the scales: valid gradients
    eq = check_equivalence(model, us, *gpt_batch(64, 4, 16, seed=3))
    assert eq.ok, eq
    cos = gradient_cosines(us, *gpt_batch(64, 4, 16, seed=3))
    assert min(cos.values()) > 1 - 1e-6, cos


def test_rounded_plan_keeps_the_bands():
    """A dispatch-level recorder on a fresh batch: >= 95% of matmul operands in [1/2, 2], none outside [1/8, 8]."""
    us = unit_scale(_gpt(), gpt_batch(64, 16, 16, seed=1), round_scales="pow2")
    rec = MatmulRecorder()
    with rec:
        loss = us(*gpt_batch(64, 16, 16, seed=2))
        rec.backward()
        loss.backward()
    frac = band_fractions(rec.records)
    assert frac["fwd"] >= 0.95 and frac["bwd"] >= 0.95, frac
    assert not [r for r in rec.records if not 0.125 <= r.rms <= 8.0]
