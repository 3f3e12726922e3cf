"""Rounding semantics of the simulated formats, checked against torch's own casts."""

from __future__ import annotations

import math

import pytest
import torch

from unit_scale_fx import UnitScaleError
from unit_scale_fx.lowp.formats import FORMATS, Quantise, get_format, round_to_format

NAMES = ["e4m3", "e5m2", "fp16", "bf16"]


def _in_range_values(spec, n: int = 20000) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    # log-uniform magnitudes from below the smallest subnormal to the largest finite value
    lo, hi = math.log2(spec.min_subnormal) - 2, math.log2(spec.max)
    mag = torch.exp2(torch.rand(n, generator=g, dtype=torch.float64) * (hi - lo) + lo)
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).double()
    return (mag * sign).float()


@pytest.mark.parametrize("name", NAMES)
def test_spec_matches_finfo(name):
    spec = FORMATS[name]
    fi = torch.finfo(spec.dtype)
    assert spec.max == float(fi.max)
    assert spec.min_normal == float(fi.smallest_normal)
    # the smallest subnormal is representable and half of it rounds to zero
    assert torch.tensor(spec.min_subnormal).to(spec.dtype).float().item() == spec.min_subnormal
    assert torch.tensor(spec.min_subnormal * 0.49).to(spec.dtype).float().item() == 0.0


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("saturate", [True, False])
def test_rounding_equals_torch_cast_in_range(name, saturate):
    spec = FORMATS[name]
    x = _in_range_values(spec)
    expected = x.to(spec.dtype).float()
    torch.testing.assert_close(round_to_format(x, spec, saturate), expected, rtol=0, atol=0)
    # the result is representable: rounding again changes nothing
    y = round_to_format(x, spec, saturate)
    torch.testing.assert_close(round_to_format(y, spec, saturate), y, rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_overflow_saturates_or_not(name):
    spec = FORMATS[name]
    big = torch.tensor([spec.overflow_threshold * 1.01, -spec.overflow_threshold * 4, float("inf"), float("nan")])
    sat = round_to_format(big, spec, saturate=True)
    assert sat[:3].tolist() == [spec.max, -spec.max, spec.max]
    assert math.isnan(sat[3])
    raw = round_to_format(big, spec, saturate=False)
    if spec.has_inf:
        assert raw[:3].tolist() == [math.inf, -math.inf, math.inf]
        # torch's own cast overflows the same way for formats with infinities
        torch.testing.assert_close(raw[:2], big[:2].to(spec.dtype).float())
    else:  # E4M3FN has no infinity: overflow is NaN
        assert torch.isnan(raw[:3]).all()
    # just below the threshold still rounds to max, not beyond
    edge = torch.tensor([spec.max + 0.9 * (spec.overflow_threshold - spec.max)])
    assert edge.item() > spec.max
    assert round_to_format(edge, spec, saturate=False).item() == spec.max


def test_format_names_and_errors():
    assert get_format("float8_e4m3fn") is FORMATS["e4m3"]
    assert get_format(torch.bfloat16) is FORMATS["bf16"]
    assert get_format(None) is None and get_format("fp32") is None
    with pytest.raises(UnitScaleError, match="unknown number format"):
        get_format("e3m4")


def test_half_input_keeps_dtype():
    x = torch.randn(100, dtype=torch.bfloat16)
    y = round_to_format(x, FORMATS["e4m3"])
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, x.to(torch.float8_e4m3fn).to(torch.bfloat16), rtol=0, atol=0)


def test_quantise_gradient_is_rounded_straight_through():
    x = torch.randn(256, dtype=torch.float64, requires_grad=True)
    g = torch.randn(256, dtype=torch.float64) * 3
    q = Quantise("e4m3", "e5m2")
    y = q(x)
    torch.testing.assert_close(y, x.detach().to(torch.float8_e4m3fn).double(), rtol=0, atol=0)
    y.backward(g)
    torch.testing.assert_close(x.grad, g.to(torch.float8_e5m2).double(), rtol=0, atol=0)


def test_quantise_one_direction_and_passthrough_counts():
    x = torch.tensor([1e-6, 0.0, 1.0, 1000.0], requires_grad=True)
    fwd_only = Quantise("e4m3", None)
    fwd_only.track()
    y = fwd_only(x)
    assert y.tolist() == [0.0, 0.0, 1.0, 448.0]
    y.backward(torch.full_like(x, 1e-9))
    torch.testing.assert_close(x.grad, torch.full_like(x, 1e-9), rtol=0, atol=0)  # no backward rounding
    assert fwd_only.stats.fwd.underflow == 1 and fwd_only.stats.fwd.overflow == 1
    assert fwd_only.stats.fwd.nonzero == 3 and fwd_only.stats.bwd.total == 0

    probe = Quantise("e4m3", "e5m2", passthrough=True)
    x2 = x.detach().clone().requires_grad_()
    probe.track()
    out = probe(x2)
    torch.testing.assert_close(out, x2.detach())  # nothing rounded
    out.backward(torch.full_like(x2, 1e-9))
    torch.testing.assert_close(x2.grad, torch.full_like(x2, 1e-9), rtol=0, atol=0)
    assert probe.stats.fwd.underflow == 1 and probe.stats.bwd.underflow == 4


def test_counter_rms_is_the_rms_of_the_finite_values_seen():
    x = torch.tensor([3.0, -4.0, 0.0, float("inf")])
    q = Quantise("e4m3", None)
    q.track()
    q(x)
    q(torch.tensor([0.0, 0.0, 0.0, 0.0]))
    c = q.stats.fwd
    assert c.finite == 7 and c.total == 8
    assert math.isclose(c.rms, math.sqrt((9 + 16) / 7))


def test_format_simulation_policy_validates_and_routes():
    from unit_scale_fx.lowp.formats import FP8_POLICY, FormatSimulation

    sim = FormatSimulation("e4m3", "e5m2", high_precision=FP8_POLICY)
    assert sim.formats_for("matmul") == ("e4m3", "e5m2")
    assert sim.formats_for("readout") == ("bf16", "bf16")
    assert sim.formats_for("attention") == ("bf16", "bf16")
    assert "readout" in sim.describe()
    assert FormatSimulation(high_precision="readout").high_precision == ("readout",)
    with pytest.raises(UnitScaleError, match="unknown op kind"):
        FormatSimulation(high_precision=("embedding",))
    with pytest.raises(UnitScaleError, match="unknown number format"):
        FormatSimulation(high_format="fp7")
