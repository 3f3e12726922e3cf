"""unit_operands: a plain matmul whose operand the model scaled itself (DeBERTa's ``bmm(q, k^T / sqrt(d))``)
reads unit operands; the rewrite is exact, forward and backward."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import graph_code, pipeline_until, recorded_step, run_pass
from unit_scale_fx import unit_scale
from unit_scale_fx.passes.unit_operands import unit_operands
from unit_scale_fx.scale import scale


class PreScaledAttention(nn.Module):
    """Attention spelled with the key divided by sqrt(d) before the score matmul."""

    def __init__(self, d: int = 64):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x, y):
        q, k, v = self.q(x), self.k(x), self.v(x)
        a = torch.bmm(q, k.transpose(1, 2) / 8.0).softmax(-1)  # 1 / sqrt(d)
        return F.mse_loss(self.o(torch.bmm(a, v)), y)


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 16, 64, generator=g), torch.randn(4, 16, 64, generator=g)


def _chain(n):
    """Forward and backward factors of the scale nodes on top of ``n``'s producer, and the producer."""
    fwd = bwd = 1.0
    while n.op == "call_function" and n.target is scale:
        fwd, bwd = fwd * n.args[1], bwd * n.args[2]
        n = n.args[0]
    return fwd, bwd, n


def test_the_key_is_made_unit_and_the_factor_leaves_after_the_matmul():
    gm, ctx, p = pipeline_until(PreScaledAttention(), _batch(0), "unit_operands", measure=False)
    scores = next(n for n in gm.graph.nodes if n.target is torch.bmm)
    (qf0, qb0, _), (kf0, kb0, _) = _chain(scores.args[0]), _chain(scores.args[1])
    (out,) = scores.users
    assert out.target is scale and out.args[1] == 8.0  # the plan undid the model's 1 / 8 after the matmul
    result = run_pass(gm, ctx, p)
    assert result.modified and result.info == "1 matmuls read unit operands"
    (qf, qb, _), (kf, kb, producer) = _chain(scores.args[0]), _chain(scores.args[1])
    assert "div" in producer.name  # the model's k^T / 8, kept
    assert (kf, kb) == (kf0 * 8, kb0)  # the key reaches the matmul unit
    assert (qf, qb) == (qf0, qb0 / 8)  # the query's gradient takes back the key's factor
    assert not any(u.target is scale for u in scores.users)  # 1/8 times the plan's 8: no output scale left
    values = [n for n in gm.graph.nodes if n.target is torch.bmm][1]
    assert all(_chain(a)[0] != 8.0 for a in values.args)  # in band: untouched


@pytest.mark.parametrize("measure", [False, True])
def test_operands_are_unit_and_gradients_exact(measure):
    torch.manual_seed(0)
    model = PreScaledAttention()
    us = unit_scale(model, _batch(0), measure=measure)
    x, y = _batch(1)
    loss, records = recorded_step(us, x, y)
    fwd = [r.rms for r in records if r.phase == "fwd"]
    assert fwd and all(0.5 <= r <= 2 for r in fwd), [round(r, 3) for r in fwd]
    # the same plan without this pass: the rewrite moved powers of two across a bilinear op, so the loss
    # and every gradient are the same bit for bit
    from unit_scale_fx.passes import unit_operands as mod

    saved = mod.BAND
    try:
        mod.BAND = (0.0, math.inf)  # no operand is out of band: the pass does nothing
        plain = unit_scale(model, _batch(0), measure=measure)
    finally:
        mod.BAND = saved
    assert graph_code(plain) != graph_code(us)
    loss2 = plain(x, y)
    loss2.backward()
    assert torch.equal(loss.detach(), loss2.detach())
    for (n, a), (_, b) in zip(us.named_parameters(), plain.named_parameters()):
        assert torch.equal(a.grad, b.grad), n
