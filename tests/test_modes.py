"""Train / eval mode: a forward that reads ``self.training`` and a submodule left in another mode.

torch.fx bakes the mode it traced in (``F.dropout(x, p, training=self.training)`` became ``training=True``):
the unit-scaled model dropped activations in evaluation. And ``unit_scale`` set every module to the model's
mode, so a batch norm frozen in evaluation inside a model in training normalised with batch statistics and
updated its running ones. Both silently changed the forward.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from unit_scale_fx import unit_scale
from unit_scale_fx.analysis import check_equivalence


class ReadsMode(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 4)

    def forward(self, x):
        h = F.dropout(F.relu(self.a(x)), 0.5, training=self.training)
        if self.training:
            h = h * 0.5
        return self.b(h)


def test_a_forward_that_reads_its_mode_computes_the_original_in_both_modes():
    torch.manual_seed(0)
    model = ReadsMode()
    x = torch.randn(32, 16)
    us = unit_scale(copy.deepcopy(model), (x,))
    us.eval()
    model.eval()
    torch.testing.assert_close(us(x), us(x), rtol=0, atol=0)  # no dropout in evaluation
    with torch.no_grad():
        assert check_equivalence(model, us, x).ok
    us.train()
    model.train()
    report = check_equivalence(model, us, x)  # the same dropout masks: equivalence draws the same numbers
    assert report.ok, report


def test_a_frozen_batch_norm_stays_frozen():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    with torch.no_grad():  # statistics of its own, as a pretrained network's
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    model.train()
    model[1].eval()
    x = torch.randn(4, 3, 8, 8)
    us = unit_scale(copy.deepcopy(model), (x,), init_weights=False)
    bns = [m for m in us.modules() if isinstance(m, nn.BatchNorm2d)]
    assert us.training and len(bns) == 1 and not bns[0].training
    before = bns[0].running_mean.clone()
    us(x).sum().backward()
    torch.testing.assert_close(bns[0].running_mean, before, rtol=0, atol=0)
    report = check_equivalence(model, us, x)
    assert report.ok, report


class NormEval(nn.Module):
    """A backbone whose ``train()`` keeps its batch norms in evaluation (mmdetection's ``norm_eval=True``)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)
        self.head = nn.Linear(8 * 6 * 6, 4)
        with torch.no_grad():  # statistics of its own, as a pretrained backbone's
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2)

    def train(self, mode: bool = True) -> "NormEval":
        super().train(mode)
        self.bn.eval()
        return self

    def forward(self, x):
        return self.head(F.relu(self.bn(self.conv(x))).flatten(1))


@pytest.mark.parametrize("roundtrip", [False, True], ids=["as_returned", "deepcopied"])
def test_a_train_override_of_the_model_is_kept(roundtrip):
    """``us.train()`` set every module to training: the batch norm the model's own ``train()`` keeps in evaluation
    then normalised with batch statistics and updated its running ones."""
    torch.manual_seed(0)
    model = NormEval()
    x = torch.randn(4, 3, 8, 8)
    us = unit_scale(copy.deepcopy(model), (x,), init_weights=False)
    if roundtrip:
        us = copy.deepcopy(us)
    us.eval()
    us.train()
    model.train()
    bn = next(m for m in us.modules() if isinstance(m, nn.BatchNorm2d))
    assert us.training and not bn.training
    before = bn.running_mean.clone()
    us(x).sum().backward()
    torch.testing.assert_close(bn.running_mean, before, rtol=0, atol=0)
    report = check_equivalence(model, us, x)
    assert report.ok, report


class AutocastBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = self.a(x)
        return self.b(h.float())


def test_an_autocast_block_keeps_its_precision():
    # torch.fx records a torch.autocast block's ops but not its dtype: the block ran in float32 (relative error
    # 2e-3 against the original). Such a forward is captured with torch.export, which keeps the block
    torch.manual_seed(0)
    model = AutocastBlock()
    x = torch.randn(8, 16)
    with pytest.warns(UserWarning, match="wrap_with_autocast"):  # the block is kept whole, and left unscaled
        us = unit_scale(copy.deepcopy(model), (x,))
    assert us.us_capture == "torch.export"
    report = check_equivalence(model, us, x)
    assert report.ok, report
