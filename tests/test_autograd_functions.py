"""A model's own ``torch.autograd.Function`` keeps its backward through capture.

torch.fx and torch.export trace through ``Function.apply`` into ``forward``; the graph's gradient was then
autograd's of the forward's ops, not the Function's ``backward``. A straight-through estimator (``round``
forward, identity backward) gave its inputs' weights a zero gradient, and nothing said so.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from unit_scale_fx import UnitScaleError, unit_scale
from unit_scale_fx.analysis import check_equivalence
from unit_scale_fx.capture import export_capture


class StraightThrough(torch.autograd.Function):
    """Rounds to quarters forward; passes the gradient on times 3 (not the forward's derivative, 0)."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x * 4) / 4

    @staticmethod
    def backward(ctx, g):
        return g * 3.0


class Quantised(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 4)

    def forward(self, x, y):
        return F.cross_entropy(self.b(StraightThrough.apply(self.a(x))), y)


class QuantisedUntraceable(Quantised):
    def forward(self, x, y):
        h = self.a(x)
        if h.shape[0] > 1:  # control flow on a size: torch.fx cannot trace it, torch.export can
            h = StraightThrough.apply(h)
        return F.cross_entropy(self.b(h), y)


def _batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(64, 16, generator=g), torch.randint(0, 4, (64,), generator=g)


def test_a_custom_function_traced_by_torch_fx_keeps_its_backward():
    torch.manual_seed(0)
    model = Quantised()
    x, y = _batch()
    us = unit_scale(model, (x, y))
    assert us.us_capture == "symbolic_trace"
    # with every scale erased: the original's loss and gradients (the straight-through gradient included)
    report = check_equivalence(model, us, x, y)
    assert report.ok, report
    us(x, y).backward()
    g = us.a.weight.grad
    assert g is not None and 0.25 <= float(g.pow(2).mean().sqrt()) <= 4.0  # round's own derivative is 0
    # the graph calls the Function, and a copy of the model does too
    twin = pickle.loads(pickle.dumps(us))
    twin.zero_grad()
    us.zero_grad()
    torch.manual_seed(1)
    us(x, y).backward()
    twin(x, y).backward()
    torch.testing.assert_close(twin.a.weight.grad, us.a.weight.grad, rtol=0, atol=0)


def test_torch_export_refuses_a_custom_function_and_dynamo_keeps_it():
    torch.manual_seed(0)
    model = QuantisedUntraceable()
    x, y = _batch()
    with pytest.raises(UnitScaleError, match="StraightThrough"):
        export_capture(model, (x, y))
    with pytest.warns(UserWarning):
        us = unit_scale(copy.deepcopy(model), (x, y))
    assert us.us_capture == "dynamo"
    us(x, y).backward()
    g = us.a.weight.grad
    assert g is not None and float(g.abs().sum()) > 0  # round's own derivative is 0: the backward ran


class GatedNoGrad(torch.autograd.Function):
    """``x * gate`` forward; the gate gets no gradient (``None``), though it requires one (PhiMoE's router)."""

    @staticmethod
    def forward(ctx, x, gate):
        ctx.save_for_backward(gate)
        return x * gate

    @staticmethod
    def backward(ctx, g):
        (gate,) = ctx.saved_tensors
        return g * gate, None


class Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.g, self.b = nn.Linear(16, 32), nn.Linear(16, 32), nn.Linear(32, 4)

    def forward(self, x, y):
        return F.cross_entropy(self.b(GatedNoGrad.apply(self.a(x), torch.sigmoid(self.g(x)))), y)


def test_a_function_that_returns_no_gradient_for_an_input_is_planned_under_dynamo():
    # planning's gradient hooks got ``None`` for the gate and failed (PhiMoE through the dynamo fallback)
    from unit_scale_fx import backend

    torch.manual_seed(0)
    model = Gated()
    x, y = _batch()
    be = backend(inner="eager")
    torch.compile(model, backend=be)(x, y).backward()
    assert len(be.graphs) == 1
    assert model.g.weight.grad is None or float(model.g.weight.grad.abs().sum()) == 0.0
    assert 0.25 <= float(model.a.weight.grad.pow(2).mean().sqrt()) <= 4.0
