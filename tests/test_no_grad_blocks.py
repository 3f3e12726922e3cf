"""What a model computes under its own ``torch.no_grad()`` carries no gradient, in every capture path.

torch.fx records the ops of a ``with torch.no_grad():`` block but not the grad mode: the traced graph sent
gradients through them (a frozen teacher's weights got gradients, silently). The tracer now reads each
value computed in such a block through ``detach_values`` where the code after the block reads it.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from unit_scale_fx import unit_scale
from unit_scale_fx.analysis import check_equivalence


class Distilled(nn.Module):
    """A student trained against a frozen teacher's output, and the teacher's weights used again after."""

    def __init__(self) -> None:
        super().__init__()
        self.student, self.teacher, self.head = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x, y):
        with torch.no_grad():
            target = self.teacher(x)
            halves = target.split(8, dim=-1)  # a tuple, read piece by piece after the block
            n = target.size(-1)  # not a tensor
        h = self.student(x)
        return (F.cross_entropy(self.head(h), y) + F.mse_loss(h, target) + F.mse_loss(h[:, :8], halves[0])
                + F.mse_loss(h.detach() / n, self.teacher(x)))


class DistilledUntraceable(Distilled):
    def forward(self, x, y):
        if x.shape[0] > 1:  # control flow on a size: torch.fx cannot trace it, torch.export can
            return super().forward(x, y)
        return x.sum()


def _batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(32, 16, generator=g), torch.randint(0, 4, (32,), generator=g)


@pytest.mark.parametrize("cls,capture", [(Distilled, "symbolic_trace"), (DistilledUntraceable, "torch.export")])
def test_values_computed_under_no_grad_carry_no_gradient(cls, capture):
    torch.manual_seed(0)
    model = cls()
    x, y = _batch()
    us = unit_scale(copy.deepcopy(model), (x, y))
    assert us.us_capture == capture
    # with every scale erased: the original's loss and gradients (the teacher's come from its use after the
    # block only)
    report = check_equivalence(model, us, x, y)
    assert report.ok, report
