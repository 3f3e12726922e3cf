"""Model families we did not write (tiny, random init, the library's default config): the transform works on all.

Each family is unit-scaled both ways a user calls ``unit_scale``: lazily (``unit_scale(model)``,
then train: the first call captures and plans) and with example inputs (the family's batch, as
positional and keyword inputs). Then, on a fresh batch: capture gave one graph (torch.fx or
torch.export, no dynamo split), the loss is finite, state_dict keys are unchanged, and a
dispatch-level recorder (which knows nothing of our bookkeeping) finds at least 95% of matmul
operands, forward and backward, with RMS in [1/2, 2] and none outside [1/8, 8]. Families that do
not meet the bands yet are marked, with what was measured. For every family, whether the result is
a GraphModule (torch.fx traced) or keeps the model's class (torch.export per call), the rewrite is
also checked to be the user's model plus scales (scale-erased equivalence for the family's loss and
every output) with valid gradients (cosine >= 1 - 1e-6). A family whose library does not import
here (torchvision needs torch 2.14.1; ``.ci/run`` installs it) is skipped, saying so.
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
from fixtures.families import FAMILIES, missing

#: families below the bands today: (forward, backward) in-band fractions measured lazily on batch 1
#: (python benchmarks/model_families.py prints the table)
SHORT: dict[str, str] = {}


def _records(model, fam, args, kwargs):
    rec = MatmulRecorder()
    with rec:
        loss = fam.loss(model(*args, **kwargs))
        rec.backward()
        loss.backward()
    return loss, rec.records


def _needs(name: str) -> list:
    why = missing(FAMILIES[name].needs)
    return [pytest.mark.skip(reason=f"{why}; .ci/run installs it")] if why else []


def _cases():
    for name in sorted(FAMILIES):
        for how in ("lazy", "example"):
            marks = [pytest.mark.xfail(reason=f"below the bands: {SHORT[name]}", strict=False)] if name in SHORT else []
            yield pytest.param(name, how, marks=marks + _needs(name), id=f"{name}-{how}")


def _unit_scale(fam, how):
    model = fam.make()
    args, kwargs = fam.batch(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if how == "lazy":
            us = unit_scale(model)
            fam.loss(us(*args, **kwargs)).backward()  # the first training step plans
            us.zero_grad(set_to_none=True)
        else:
            us = unit_scale(model, args, example_kwargs=kwargs)
    unruled = [str(w.message) for w in caught if "no unit-scaling rule" in str(w.message)]
    assert not unruled, unruled
    return model, us


@pytest.mark.parametrize("name,how", list(_cases()))
def test_family_is_unit_scaled(name, how):
    fam = FAMILIES[name]
    model, us = _unit_scale(fam, how)
    assert us.us_capture in ("symbolic_trace", "torch.export"), f"{name}: captured by {us.us_capture}"
    assert not us.us_unsupported, f"{name}: ops without a rule: {[u.op for u in us.us_unsupported]}"
    assert list(us.state_dict()) == list(model.state_dict()), f"{name}: state_dict keys changed"
    assert isinstance(us, type(model)) or us.us_capture == "symbolic_trace"  # the model's class is kept
    args, kwargs = fam.batch(0)  # the user's model plus scales, whether a GraphModule or the model's class
    # one check for the family's loss and every output: all_outputs_loss is the scalar outputs (the loss)
    # plus a random projection of every other output; a class-kept model captures its erased copy anew
    eq = check_equivalence(model, us, *args, kwargs=kwargs, loss_fn=all_outputs_loss)
    assert eq.ok and eq.grads, f"{name}: {eq}"
    cos = gradient_cosines(us, *args, kwargs=kwargs, loss_fn=all_outputs_loss)  # every output counts
    assert cos and all(c >= 1 - 1e-6 for c in cos.values()), \
        f"{name}: {[(k, c) for k, c in cos.items() if c < 1 - 1e-6]}"

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
    assert frac["fwd"] >= 0.95 and frac["bwd"] >= 0.95, f"{name}: in-band fractions {frac}; outside: {bad}"
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


#: Families where planning on shapes alone (measure=False) meets the bands of issue 14's bar but not its cosine,
#: with what was measured (``python benchmarks/depth.py --layers "" --families all``, benchmarks/README.md) and
#: why. strict: the test fails as soon as the family meets the cosine too; not strict: a margin within
#: run-to-run noise.
_ANALYTIC_GAPS = {
    # bart, falcon, gpt2: the unscaled models' std-0.02 init makes their branches a few percent of the stream
    # at width 64 (bart, post-LN: under 0.1%) and their GELUs nearly linear, so their readout sees little but
    # the embedding; the unit-scaled branches take the depth rule's 1/3 and are more aligned across positions
    # (a unit GELU's mean, ~0.2 of its square, reaches every position through the down projection). Per add:
    # benchmarks/cosine_components.py. At width 768 the unscaled gpt2 and falcon are the more aligned.
    "bart": (True, "bands met (100% / 100%); readout cosine 0.18 against 0.065 unscaled (0.15 measured planning): "
                   "post-LN, the unscaled branches are < 0.1% of the stream at width 64 (unit-scaled: 6-14%, "
                   "cosine 0.17-0.44 each); still 0.16 against 0.094 at width 768"),
    "falcon": (True, "bands met (100% / 100%); cosine 0.054 against 0.028 unscaled (0.053 measured): its parallel "
                     "attention + MLP branch has cosine 0.13-0.17 (GELU's mean) against 0.03 unscaled; at width 768 "
                     "0.063 against 0.18"),
    "gpt2": (True, "bands met (100% / 100%); cosine 0.10 against 0.058 unscaled (0.09 measured): the MLP branch has "
                   "cosine 0.20 (a unit GELU's mean) against 0.05 in the unscaled model, whose GELU inputs have RMS "
                   "0.16; at width 768 0.093 against 0.31"),
    "roberta_classifier": (False, "bands met (100% / 100%); the stream is less aligned than unscaled at every add "
                                  "(0.29 against 0.32 at the last), but the readout input is 4 first-token rows: "
                                  "0.44 against 0.44 unscaled over 3 inits (wins 1 of 3), within the criterion's spread"),
}


#: torchvision families (issue 11), measured with measure=False on torch 2.14.1: the bands are met (batch norm over
#: few values per channel, squeeze-excitation gates and layer scales as broadcast products); the readout input's
#: cosine across the batch is not, for reasons of the unit-scaled model at init rather than of the prediction
_TORCHVISION_ANALYTIC = {
    "tv_resnet18": (False, "bands met (100% / 100%); cosine 0.295 against 0.278 unscaled: the last residual add "
                           "weights its ReLU'd skip sqrt(1 - tau) = 0.82 (depth rule, tau 1/3) where the unscaled "
                           "model adds it 1:1, so the ReLU after it sees a larger mean"),
    "tv_mobilenet_v3_small": (True, "bands met (100% / 100%); cosine 0.105 against 0.065 unscaled: the head's "
                                    "linear layer (init std 0.01) keeps the unscaled hardswish before the readout "
                                    "nearly linear; unit scaling gives it unit inputs, and a larger mean"),
    "tv_vit": (True, "bands met (fwd 100%, bwd 96%); cosine 0.89 against 0.34 unscaled: the class token is zero and "
                     "the position table unit-RMS (std 0.02 unscaled), so the readout row starts as a vector shared "
                     "by every image, which the residual taus keep at 2/3 of its variance"),
    "tv_convnext_tiny": (True, "bands met (100% / 100%); cosine 0.24 against 0.001 unscaled: layer scale 1e-6 makes "
                               "every unscaled block the identity at init; unit scaling normalises it away"),
}


#: families below issue 14's bands with measure=False, with what was measured (measured planning meets them)
_ANALYTIC_SHORT = {
    "tv_swin": "backward 92%: the qkv projections' gradients in two of the four attention blocks come out "
               "2.2-2.7; there the measured plan gives q, k and v backward factors 0.40-0.54 of the analytic ones "
               "(16-token windows; why the attention's gradient gains are half of what the rule assumes is not "
               "investigated yet)",
}


def _analytic_marks(name: str) -> list:
    short = _ANALYTIC_SHORT.get(name)
    return _needs(name) + ([pytest.mark.xfail(reason=f"below the bands: {short}", strict=True)] if short else [])


@pytest.mark.parametrize("name", [pytest.param(n, marks=_analytic_marks(n)) for n in sorted(FAMILIES)])
def test_family_with_analytic_planning(name):
    """Issue 14's bar with measure=False (what the meta device gets): >= 95% of matmul operands in
    [1/2, 2], none outside [1/8, 8], and the readout input no more collapsed across positions than
    the unscaled model's."""
    from unit_scale_fx.analysis.recorder import last_row_cosine

    fam = FAMILIES[name]
    model = fam.make()
    args, kwargs = fam.batch(0)
    args2, kwargs2 = fam.batch(1)
    _, base = _records(model, fam, args2, kwargs2)
    model.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        us = unit_scale(model, args, example_kwargs=kwargs, measure=False)
    _, records = _records(us, fam, args2, kwargs2)
    frac = band_fractions(records)
    assert frac["fwd"] >= 0.95 and frac["bwd"] >= 0.95, f"{name}: in-band fractions {frac}"
    assert all(0.125 <= r.rms <= 8.0 for r in records), f"{name}: operands outside [1/8, 8]"
    # the bands hold for every family; the cosine is a known gap for some (strict: fails once it is met)
    cos, cos_base = last_row_cosine(records), last_row_cosine(base)
    gap = _ANALYTIC_GAPS.get(name) or _TORCHVISION_ANALYTIC.get(name)
    if gap is None:
        assert cos <= cos_base + 1e-6, f"{name}: cosine {cos:.3f} against {cos_base:.3f} unscaled"
    elif cos > cos_base + 1e-6:
        pytest.xfail(f"cosine {cos:.3f} against {cos_base:.3f} unscaled: {gap[1]}")
    else:
        assert not gap[0], f"{name} meets the bar now (cosine {cos:.3f} against {cos_base:.3f}): remove its entry"
