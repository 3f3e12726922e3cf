"""Analytic planning (``measure=False``, the meta device) at any depth, and one attention temperature.

Issue 14: with planning on shapes alone, pre-LN GPTs of 2 to 48 layers keep >= 95% of matmul operands
in [1/2, 2] forward and backward and none outside [1/8, 8] (measured by the dispatch-level recorder,
on a batch the plan never saw), and the residual stream does not collapse: the cross-position cosine
at the last layer is no higher than the unscaled model's. The 48-layer model is also planned on the
meta device, where the plan's own bands prediction is checked (and compared once with measurement at
12 layers). Explicit ``softmax(q @ k.T / sqrt(d))`` and SDPA give the same logit std.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import band_fractions
from unit_scale_fx import unit_scale
from unit_scale_fx.analysis.recorder import MatmulRecorder, last_row_cosine
from unit_scale_fx.analysis.track import predicted_operands
from unit_scale_fx.examples import GPT, gpt_batch
from unit_scale_fx.record import META_KEY

VOCAB, D, HEADS, SEQ, BATCH = 64, 64, 2, 16, 2


def _gpt(layers: int) -> GPT:
    torch.manual_seed(0)
    return GPT(vocab=VOCAB, d=D, layers=layers, heads=HEADS, max_len=32)


def _record(model, batch):
    rec = MatmulRecorder(seq_len=SEQ)
    with rec:
        loss = model(*batch)
        rec.backward()
        loss.backward()
    return rec.records


@pytest.mark.parametrize("layers", [2, 12, 24, 48])
def test_analytic_plan_keeps_bands_and_positions_at_depth(layers):
    model = _gpt(layers)
    test_batch = gpt_batch(VOCAB, BATCH, SEQ, seed=1)
    base = last_row_cosine(_record(model, test_batch))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        us = unit_scale(model, gpt_batch(VOCAB, BATCH, SEQ, seed=0), measure=False)
    records = _record(us, test_batch)
    frac = band_fractions(records)
    assert frac["fwd"] >= 0.95 and frac["bwd"] >= 0.95, f"{layers} layers: in-band fractions {frac}"
    extreme = [(r.op, r.phase, r.role, round(r.rms, 3)) for r in records if not 0.125 <= r.rms <= 8.0]
    assert not extreme, f"{layers} layers: operands outside [1/8, 8]: {extreme}"
    cos = last_row_cosine(records)
    assert cos is not None and cos <= base, f"{layers} layers: last-layer cross-position cosine {cos:.3f} > unscaled {base:.3f}"


def _meta_plan(layers: int):
    with torch.device("meta"):
        model = GPT(vocab=VOCAB, d=D, layers=layers, heads=HEADS, max_len=32)
    idx, tgt = gpt_batch(VOCAB, BATCH, SEQ)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return unit_scale(model, (idx.to("meta"), tgt.to("meta")))


def test_48_layers_on_the_meta_device_predict_bands():
    us = _meta_plan(48)
    pred = predicted_operands(us)
    assert len([p for p in pred if p.phase == "bwd"]) >= 48 * 5
    frac = band_fractions(pred)
    assert frac["fwd"] >= 0.95 and frac["bwd"] >= 0.95
    assert all(0.125 <= p.rms <= 8 for p in pred)


def test_bands_prediction_matches_measurement_at_12_layers():
    """The meta-device prediction, checked once against a real run of the same plan on real weights."""
    pred = predicted_operands(_meta_plan(12))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        real = unit_scale(_gpt(12), gpt_batch(VOCAB, BATCH, SEQ, seed=0), measure=False)
    real_pred = predicted_operands(real)
    # the same plan on the meta device and on real weights (planning on shapes alone)
    assert [p.rms for p in pred] == pytest.approx([p.rms for p in real_pred], rel=1e-6)
    measured = band_fractions(_record(real, gpt_batch(VOCAB, BATCH, SEQ, seed=1)))
    predicted = band_fractions(pred)
    for phase in ("fwd", "bwd"):
        assert abs(measured[phase] - predicted[phase]) <= 0.05, (phase, measured, predicted)


def test_default_residual_taus_follow_the_depth_rule():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        us = unit_scale(_gpt(3), gpt_batch(VOCAB, BATCH, SEQ, seed=0), measure=False)
    adds = [n.meta[META_KEY] for n in us.graph.nodes if META_KEY in n.meta and n.meta[META_KEY].kind == "residual"]
    n = len(adds)
    assert n == 6
    for i, rec in enumerate(adds):  # tau_i = 1 / (2n + i + 1): the stream's input keeps 2/3 at the end
        tau = float(rec.note.split("tau=")[1].split(";")[0])
        assert tau == pytest.approx(1 / (2 * n + i + 1), rel=1e-9)
    keep = math.prod(1 - 1 / (2 * n + i + 1) for i in range(n))
    assert keep == pytest.approx(2 / 3)


# -- one attention temperature ------------------------------------------------------------------------


class _Attn(nn.Module):
    def __init__(self, explicit: bool, d: int = 64, heads: int = 2) -> None:
        super().__init__()
        self.explicit, self.heads = explicit, heads
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in self.qkv(x).split(d, -1))
        if self.explicit:
            a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
            y = a @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(b, t, d)).pow(2).mean()


class _LogitProbe(torch.utils._python_dispatch.TorchDispatchMode):
    """The std of attention logits: the input of a softmax, or ``scale * q k^T`` inside an SDPA kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.std: list[float] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name == "_softmax":
            self.std.append(float(args[0].float().std()))
        elif "scaled_dot_product" in name and "backward" not in name:
            q, k = args[0], args[1]
            scale = kwargs.get("scale") or 1 / math.sqrt(q.shape[-1])
            self.std.append(float((q @ k.transpose(-1, -2) * scale).float().std()))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("parametrization", ["unit", "u-mup"])
@pytest.mark.parametrize("measure", [False, True])
def test_explicit_and_sdpa_attention_have_one_temperature(parametrization, measure):
    x = torch.randn(4, 16, 64, generator=torch.Generator().manual_seed(0))
    stds = {}
    for explicit in (True, False):
        torch.manual_seed(0)
        us = unit_scale(_Attn(explicit), (x,), parametrization=parametrization, measure=measure)
        probe = _LogitProbe()
        with probe, torch.no_grad():
            us(x)
        assert len(probe.std) == 1
        stds[explicit] = probe.std[0]
    assert stds[True] == pytest.approx(stds[False], rel=0.10), stds
    target = 1.0 if parametrization == "unit" else 1 / math.sqrt(32)  # u-muP: attn_softmax * q.k / d_head
    assert stds[False] == pytest.approx(target, rel=0.25)
