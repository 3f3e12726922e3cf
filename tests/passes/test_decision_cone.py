"""Values that only decide (comparisons, masks) keep their forward value: passes/plan.py::decision_cone."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from unit_scale_fx import backend, unit_scale


class SparseRouter(nn.Module):
    """A router in PhiMoE's style: experts whose logit is far below the top one are masked, then a softmax."""

    def __init__(self, d: int = 32, experts: int = 4) -> None:
        super().__init__()
        self.router, self.experts, self.head = nn.Linear(d, experts), nn.Linear(d, experts * d), nn.Linear(d, 3)
        self.n = experts

    def forward(self, x, y):
        scores = self.router(x)
        with torch.no_grad():
            top, _ = scores.max(dim=-1, keepdim=True)
            factor = scores.abs().clamp(min=top)
            far = ((top - scores) / factor) > 0.02
        gates = F.softmax(scores.masked_fill(far, float("-inf")), dim=-1)
        out = (self.experts(x).view(*x.shape[:-1], self.n, -1) * gates.unsqueeze(-1)).sum(-2)
        return F.cross_entropy(self.head(out), y)


@pytest.mark.parametrize("path", ["unit_scale", "torch.compile"])
def test_a_mask_from_a_difference_keeps_the_top_expert(path):
    # planned as a weighted add, ``top - scores`` got a factor on each operand: the top expert's difference was no
    # longer 0, every expert was masked, and the softmax of all -inf gave a NaN loss
    torch.manual_seed(0)
    model = SparseRouter()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 32, generator=g), torch.randint(0, 3, (64,), generator=g)
    if path == "unit_scale":
        run = unit_scale(copy.deepcopy(model), (x, y))
        params = run
    else:
        params = copy.deepcopy(model)
        run = torch.compile(params, backend=backend(inner="eager"))
    for _ in range(2):
        loss = run(x, y)
        assert torch.isfinite(loss), float(loss)
        loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in params.parameters() if p.grad is not None)
