"""Model families we did not write (tiny, random init): the transform works on all of them.

For each family: capture and transform succeed, the rewrite is the user's model plus
scales (scale-erased equivalence on the original weights, for the family's loss and for
every output), gradients are valid for every output (cosine >= 1 - 1e-6), forward and
backward run, the loss is finite, state_dict keys are unchanged, and a dispatch-level recorder (which
knows nothing of our bookkeeping) finds at least 90% of matmul operands, forward
and backward, with RMS in [1/2, 2] and none outside [1/8, 8].
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from helpers import band_fractions
from unit_scale_fx import unit_scale
from unit_scale_fx.analysis import all_outputs_loss, check_equivalence, gradient_cosines
from unit_scale_fx.analysis.recorder import MatmulRecorder
from fixtures.families import FAMILIES


def _records(model, fam, args, kwargs):
    rec = MatmulRecorder()
    with rec:
        loss = fam.loss(model(*args, **kwargs))
        rec.backward()
        loss.backward()
    return loss, rec.records


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_is_unit_scaled(name):
    fam = FAMILIES[name]
    model = fam.make()
    args, kwargs = fam.batch(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        us = unit_scale(model, args, example_kwargs=kwargs)
    assert not us.us_unsupported, f"{name}: ops without a rule: {[u.op for u in us.us_unsupported]}"
    assert not [w for w in caught if "no unit-scaling rule" in str(w.message)]
    assert list(us.state_dict()) == list(model.state_dict()), f"{name}: state_dict keys changed"
    for loss_fn in (fam.loss, None):  # the family's loss, and a random projection of every output
        eq = check_equivalence(model, us, *args, kwargs=kwargs, loss_fn=loss_fn)
        assert eq.ok, f"{name}: {eq}"
    cos = gradient_cosines(us, *args, kwargs=kwargs, loss_fn=all_outputs_loss)  # every output counts
    assert all(c >= 1 - 1e-6 for c in cos.values()), f"{name}: {[(k, c) for k, c in cos.items() if c < 1 - 1e-6]}"

    args2, kwargs2 = fam.batch(1)  # a fresh batch: the plan must not be fitted to its sample only
    loss, records = _records(us, fam, args2, kwargs2)
    assert math.isfinite(float(loss.detach())), f"{name}: loss {float(loss.detach())}"
    grads = {n: p.grad for n, p in us.named_parameters() if p.grad is not None}
    assert grads, f"{name}: no parameter received a gradient"
    for n, g in grads.items():
        assert torch.isfinite(g).all(), f"{name}: non-finite gradient in {n}"
    assert {r.phase for r in records} == {"fwd", "bwd"}
    frac = band_fractions(records)
    bad = [(r.op, r.phase, r.role, tuple(r.shape), round(r.rms, 3)) for r in records if not 0.5 <= r.rms <= 2.0]
    assert frac["fwd"] >= 0.9 and frac["bwd"] >= 0.9, f"{name}: in-band fractions {frac}; outside: {bad}"
    extreme = [r for r in records if not 0.125 <= r.rms <= 8.0]
    assert not extreme, f"{name}: operands outside [1/8, 8]: {extreme}"


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_unscaled_baseline_is_not_unit(name):
    """The recorder is not trivially satisfied: the same models before the transform are far off."""
    fam = FAMILIES[name]
    args, kwargs = fam.batch(1)
    _, records = _records(fam.make(), fam, args, kwargs)
    frac = band_fractions(records)
    assert frac["fwd"] < 0.5 and frac["bwd"] < 0.5
