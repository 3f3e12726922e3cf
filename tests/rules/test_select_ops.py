"""Ops that select, place or accumulate values, as real models call them and as torch.export records them:
``max`` / ``min`` over a dimension or between tensors, ``cumsum``, ``index_add`` / ``scatter_add``,
``scatter`` of a source, writes into a slice (``copy``), ``repeat_interleave`` and ``1 - x``.

Each had no rule: the op was left unscaled with a warning (``rwkv``, ``gpt_oss``, ``jetmoe``, ``llama4_text``,
``falcon_h1``, ``apertus``, ``xglm`` in ``benchmarks/unseen_hf_text.py``). Each case is planned with
``unsupported="error"``, with the rules alone and on one batch, and a fresh batch must give an output and every
gradient of RMS in [1/2, 2]; the scale-erased model must compute the original's outputs and gradients.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import rms
from unit_scale_fx import unit_scale
from unit_scale_fx.analysis.equivalence import check_equivalence

B, T, D = 8, 16, 64


class Net(nn.Module):
    """``w2 @ fn(w1 @ x)``: the op between two linears, whose weight gradients then show what it sends back.
    ``export``: Python control flow on a shape, which torch.fx cannot trace, so torch.export (aten ops) captures it."""

    def __init__(self, fn, export: bool, d_mid: int = D) -> None:
        super().__init__()
        self.fn, self.export = fn, export
        self.inp = nn.Linear(D, d_mid, bias=False)
        self.out = nn.Linear(d_mid, D, bias=False)

    def forward(self, x):
        h = self.inp(x)
        if self.export and x.shape[0] > 0:
            h = self.fn(h)
        elif not self.export:
            h = self.fn(h)
        return self.out(h)


def _cumsum(h):
    return h.cumsum(1) * 0.25  # a running sum over positions (a state-space layer's log decays)


def _index_add(h):
    # a mixture of experts' combine: each token's two expert outputs summed back into its row
    flat = h.reshape(B * T, D)
    rows = torch.arange(B * T).repeat_interleave(2)
    src = torch.cat([flat, flat.flip(1)], 1).reshape(2 * B * T, D)
    return torch.zeros_like(flat).index_add(0, rows, src).reshape(B, T, D)


def _scatter_add(h):
    idx = torch.arange(T).remainder(T // 2).view(1, T, 1).repeat(B, 1, D)
    return h.new_zeros(B, T // 2, D).scatter_add(1, idx, h).repeat(1, 2, 1)


def _scatter_src(h):
    # routing scores written at each row's top-2 places, as Llama 4's router does
    top = h.topk(2, dim=-1)
    return torch.full_like(h, 0.0).scatter(-1, top.indices, top.values) + h


def _slice_write(h):
    out = torch.zeros_like(h)
    out[:, :, : D // 2] = h[:, :, D // 2 :]
    return out + h.flip(-1)


CASES = {
    "max_dim": (lambda h: h - h.max(dim=-1, keepdim=True).values.detach() + h.max(dim=1, keepdim=True)[0], D),
    "amax": (lambda h: h * 0.5 + torch.amax(h, dim=1, keepdim=True), D),
    "maximum_of_a_constant_floor": (lambda h: torch.max(h, torch.tensor(torch.finfo(torch.float32).min)), D),
    "minimum_of_a_constant_ceiling": (lambda h: torch.min(h, torch.tensor(1e4)), D),
    "maximum_of_two": (lambda h: torch.maximum(h, h.roll(1, -1)) - 0.5, D),
    "cumsum": (_cumsum, D),
    "index_add": (_index_add, D),
    "scatter_add": (_scatter_add, D),
    "scatter_src": (_scatter_src, D),
    "slice_write": (_slice_write, D),
    "repeat_interleave": (lambda h: h.repeat_interleave(2, dim=-1)[..., ::2] + 0.0 * h, D),
    "rsub": (lambda h: 1.0 - h, D),
}


@pytest.mark.parametrize("measure", [False, True], ids=["analytic", "measured"])
@pytest.mark.parametrize("export", [False, True], ids=["fx", "export"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_select_op_is_planned_and_unit_scaled(name, export, measure):
    fn, d_mid = CASES[name]
    torch.manual_seed(0)
    model = Net(fn, export, d_mid)
    x = torch.randn(B, T, D)
    us = unit_scale(model, (x,), measure=measure, unsupported="error")
    if export:
        assert us.us_capture == "torch.export"
    fresh = torch.randn(B, T, D, requires_grad=True)
    y = us(fresh)
    assert 0.5 <= rms(y) <= 2.0, f"{name}: output RMS {rms(y):.3g}"
    y.backward(torch.randn_like(y))
    assert 0.5 <= rms(fresh.grad) <= 2.0, f"{name}: input gradient RMS {rms(fresh.grad):.3g}"
    for pname, p in us.named_parameters():
        assert 0.5 <= rms(p.grad) <= 2.0, f"{name}: gradient of {pname} RMS {rms(p.grad):.3g}"


@pytest.mark.parametrize("export", [False, True], ids=["fx", "export"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_select_op_with_scales_erased_is_the_original(name, export):
    fn, d_mid = CASES[name]
    torch.manual_seed(0)
    model = Net(fn, export, d_mid)
    x = torch.randn(B, T, D)
    us = unit_scale(model, (x,), unsupported="error")
    report = check_equivalence(model, us, x, dtype=torch.float64)
    assert report.ok, report


def test_cumsum_keeps_its_value_and_scales_its_gradient():
    """A running sum is read as what it counts (an ``exp`` of log decays reads it): its forward value is kept;
    its backward, a reversed running sum of ``n`` gradients, has gain ``sqrt((n + 1) / 2)``, which its factor
    undoes. (Inside a chain of one input's ops it is part of the fused function, measured whole.)"""
    torch.manual_seed(0)
    model = Net(lambda h: h.cumsum(1), export=False)
    us = unit_scale(model, (torch.randn(B, T, D),), measure=False, unsupported="error")
    (rec,) = [r for r in us.scale_plan(all_nodes=True).values() if r.rule == "cumsum"]
    assert rec.fwd == 1.0
    (bwd,) = rec.ideal_bwd.values()
    assert math.isclose(bwd, 1.0 / math.sqrt((T + 1) / 2.0), rel_tol=1e-6)
    x = torch.randn(B, T, D, requires_grad=True)
    y = us(x)
    y.backward(torch.randn_like(y))
    assert 0.5 <= rms(x.grad) <= 2.0 and 0.5 <= rms(us.inp.weight.grad) <= 2.0
