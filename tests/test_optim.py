"""unit_scale_fx.training.optim: parameter groups whose multipliers follow the documented formulas."""

from __future__ import annotations

import math

import pytest
import torch

from unit_scale_fx import UnitScaleError, unit_scale
from unit_scale_fx.training import optim
from unit_scale_fx.examples import GPT, gpt_batch

VOCAB, D, LAYERS, SEQ = 64, 32, 3, 8


@pytest.fixture(scope="module")
def planned():
    torch.manual_seed(0)
    x, y = gpt_batch(VOCAB, 2, SEQ)
    model = GPT(vocab=VOCAB, d=D, layers=LAYERS, heads=2, max_len=SEQ)
    return unit_scale(model, (x, y), mup=True), unit_scale(model, (x, y)), (x, y)


def _expected_mult(name: str, p: torch.Tensor) -> float:
    """The documented formula, written out per GPT parameter (names are fine in a test)."""
    depth = 2 * LAYERS
    in_block = name.startswith("blocks.")
    d = depth ** -0.5 if in_block else 1.0
    if name.startswith(("tok.", "pos.")):
        return p.shape[1] ** -0.5
    if name.startswith("head."):
        return 1.0
    if p.dim() == 2:  # hidden weight [fan_out, fan_in]
        return p.shape[1] ** -0.5 * d
    return d  # bias / norm gain


def test_lr_multipliers_follow_the_formulas(planned):
    us, _, _ = planned
    lr, wd = 0.5, 0.1
    groups = optim.param_groups(us, lr, weight_decay=wd)
    seen = set()
    for g in groups:
        for name, p in zip(g["names"], g["params"]):
            seen.add(name)
            assert g["lr"] == pytest.approx(lr * _expected_mult(name, p)), name
            decays = p.dim() == 2
            assert g["weight_decay"] == pytest.approx(wd if decays else 0.0), name
    assert seen == {n for n, _ in us.named_parameters()}


def test_independent_weight_decay(planned):
    us, _, _ = planned
    groups = optim.param_groups(us, 0.25, weight_decay=0.01, independent_weight_decay=True)
    decayed = [g for g in groups if g["wd_mult"]]
    assert decayed and len(decayed) < len(groups)  # weights decay; biases and gains do not
    assert len({g["lr"] for g in decayed}) > 1  # at several learning rates: the division is seen
    for g in groups:  # AdamW's per-step decay lr * wd is the same for every decayed group
        assert g["lr"] * g["weight_decay"] == pytest.approx(0.01 * g["wd_mult"]), g["names"]


def test_unit_parametrization_has_no_width_rule(planned):
    _, unit, _ = planned
    groups = optim.param_groups(unit, 0.5)
    assert groups and all(g["lr"] == 0.5 for g in groups)


@pytest.mark.parametrize("cls", [optim.Adam, optim.AdamW, optim.SGD])
def test_wrappers_take_the_model_and_step(planned, cls):
    us, _, (x, y) = planned
    opt = cls(us, lr=1e-2, weight_decay=0.01)
    assert opt.param_groups and len(opt.param_groups) == len(optim.param_groups(us, 1e-2))
    before = {n: p.detach().clone() for n, p in us.named_parameters()}
    opt.zero_grad()
    us(x, y).backward()
    opt.step()
    assert any(not torch.equal(before[n], p) for n, p in us.named_parameters())
    # a scheduler keeps the ratios between groups
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    ratios = [g["lr"] / g["initial_lr"] for g in opt.param_groups]
    assert all(math.isclose(r, 0.5) for r in ratios) and sched is not None


def test_unplanned_or_plain_model_is_refused():
    model = GPT(vocab=VOCAB, d=D, layers=1, heads=2, max_len=SEQ)
    with pytest.raises(UnitScaleError):
        optim.param_groups(model, 1e-3)
    with pytest.raises(UnitScaleError):
        optim.param_groups(unit_scale(model), 1e-3)  # not planned yet
