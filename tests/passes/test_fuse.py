"""fuse: a hand-written single-input function is scaled once, as a whole."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import rms
from unit_scale_fx import unit_scale
from unit_scale_fx.rules.fused import FusedRegion, probe_moments


def new_gelu(x):
    """GPT-2's NewGELU, written out by hand."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class HandMLP(nn.Module):
    def __init__(self, d: int = 64) -> None:
        super().__init__()
        self.up = nn.Linear(d, 4 * d)
        self.down = nn.Linear(4 * d, d)

    def forward(self, x):
        return self.down(new_gelu(self.up(x)))


class HandRMSNorm(nn.Module):
    """Llama's RMSNorm: ``w * (x * rsqrt(mean(x^2) + eps))``."""

    def __init__(self, d: int = 64) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.weight * h.to(x.dtype)


def _fused(us):
    return [m for name, m in us.named_children() if isinstance(m, FusedRegion)]


def test_hand_written_gelu_is_one_fused_function():
    x = torch.randn(8, 16, 64)
    us = unit_scale(HandMLP(), (x,), measure=False, unsupported="error")
    (region,) = _fused(us)
    assert {"pow", "tanh"} <= set(region.ops) and len(region.ops) >= 7
    rec = next(r for r in us.scale_plan(all_nodes=True).values() if r.rule == "fused")
    # the chain is GELU (tanh form): its scales are GELU's, from the quadrature of F.gelu
    from unit_scale_fx.rules.pointwise import gaussian_moments

    f_rms, d_rms = gaussian_moments(lambda z: F.gelu(z, approximate="tanh"), std=1.0)
    assert math.isclose(rec.ideal_fwd, 1 / f_rms, rel_tol=0.05)
    # no op inside the chain was scaled on its own
    assert not any(r.op.endswith(("pow", "tanh")) for r in us.scale_plan(all_nodes=True).values())


def test_hand_written_rms_norm_comes_out_unit():
    us = unit_scale(HandRMSNorm(), (3 * torch.randn(8, 16, 64),), measure=False, unsupported="error")
    assert len(_fused(us)) == 1
    x = (3 * torch.randn(8, 16, 64)).requires_grad_()
    y = us(x)
    assert 0.9 <= rms(y) <= 1.1
    y.backward(torch.randn_like(y))
    assert 0.5 <= rms(x.grad) <= 2.0  # the true gradient is ~1/3 here; the input's scale is undone
    rec = next(r for r in us.scale_plan(all_nodes=True).values() if r.rule == "fused")
    assert math.isclose(rec.ideal_fwd, 1.0, rel_tol=0.05)  # scale-invariant: nothing to do forward


def test_a_value_read_outside_is_not_swallowed():
    class Shared(nn.Module):
        def forward(self, x):
            h = torch.tanh(x) * 2.0
            return torch.sigmoid(h) * 3.0, h  # h is also an output: a region must end at h

    x = torch.randn(4, 8)
    us = unit_scale(Shared(), (x,), measure=False)
    regions = _fused(us)
    assert len(regions) == 2
    assert all(not ({"sigmoid", "tanh"} <= set(r.ops)) for r in regions)
    a, h = us(x)
    ref_a, ref_h = Shared()(x)
    assert torch.allclose(h / ref_h, (h / ref_h).mean().expand_as(h), rtol=1e-4)  # one factor, same function


def test_single_ops_and_views_are_not_fused():
    class Plain(nn.Module):
        def forward(self, x):
            return F.gelu(x.view(4, 2, 4).transpose(1, 2)).reshape(4, 8)

    x = torch.randn(4, 8)
    us = unit_scale(Plain(), (x,))
    assert not _fused(us)


def test_probe_moments_match_the_quadrature():
    from unit_scale_fx.rules.pointwise import gaussian_moments

    f, d = probe_moments(torch.tanh, (64, 512), std=1.0)
    qf, qd = gaussian_moments(torch.tanh)
    assert math.isclose(f, qf, rel_tol=0.02) and math.isclose(d, qd, rel_tol=0.02)


def test_golden_code_of_the_fused_region():
    """The pass on its own: the hand-written GELU becomes one call, its ops move into the region."""
    from helpers import golden, graph_code, pipeline_until, run_pass

    x = torch.randn(2, 8)
    gm, ctx, p = pipeline_until(HandMLP(d=8), (x,), "fuse")
    expected = gm(x)
    result = run_pass(gm, ctx, p)
    assert result.info == "1 single-input subgraphs fused"
    assert graph_code(gm) == golden("""
        x = input
        up_weight = self.up.weight
        up_bias = self.up.bias
        linear = linear(x, up_weight, up_bias)
        us_fused_0 = self.us_fused_0(linear)
        down_weight = self.down.weight
        down_bias = self.down.bias
        linear_1 = linear(us_fused_0, down_weight, down_bias)
        return linear_1
    """)
    assert graph_code(gm.us_fused_0) == golden("""
        x = input
        mul = mul(0.5, x)
        pow_1 = pow(x, 3)
        mul_1 = mul(0.0447, pow_1)
        add = add(x, mul_1)
        mul_2 = mul(0.798, add)
        tanh = tanh(mul_2)
        add_1 = add(1, tanh)
        mul_3 = mul(mul, add_1)
        return mul_3
    """)
    torch.testing.assert_close(gm(x), expected)  # the same function, one call


class GeluThenHalves(nn.Module):
    """A fused region whose output the model then indexes with slices (``h[..., :d]``), as rotary halves are."""

    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.up = nn.Linear(d, 2 * d)
        self.left, self.right = nn.Linear(d, d), nn.Linear(d, d)
        self.d = d

    def forward(self, x):
        h = new_gelu(self.up(x))
        return self.left(h[..., :self.d]) + self.right(h[..., self.d:])


def test_a_fused_region_indexed_with_slices_is_planned():
    # measured planning reads which pieces of a tuple result are used: a tensor indexed with slices is no tuple
    # (on Python 3.11 a slice is unhashable, and planning failed with a TypeError)
    x = torch.randn(4, 8, 32)
    us = unit_scale(GeluThenHalves(), (x,), unsupported="error")
    assert _fused(us)
    y = us(x)
    assert 0.5 < rms(y) < 2.0
