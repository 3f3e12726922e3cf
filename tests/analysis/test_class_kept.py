"""The analysis and low-precision tools on a model that kept its class (``api.UnitScaledModel``).

``unit_scale`` returns the user's own class (a subclass, same name) when torch.fx cannot give the
model's output as it is (a ``ModelOutput``, most Hugging Face models): each call signature is
captured with torch.export. ``track_scales``, ``check_equivalence``, ``gradient_cosines`` and
``simulate_format`` work on it as on a GraphModule, keyword inputs included.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.utils import ModelOutput

from unit_scale_fx import UnitScaleError, simulate_format, track_scales, unit_scale
from unit_scale_fx.analysis import check_equivalence, equivalence, gradient_cosines
from unit_scale_fx.api import UnitScaledModel, _state
from unit_scale_fx.lowp.simulate import format_counts, format_sites, track_formats


@dataclasses.dataclass
class Out(ModelOutput):
    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None


class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.norm, self.b = nn.Linear(32, 64), nn.LayerNorm(64), nn.Linear(64, 8)

    def forward(self, x, y):
        logits = self.b(self.norm(F.gelu(self.a(x))))
        return Out(loss=F.cross_entropy(logits, y), logits=logits)


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(16, 32, generator=g), "y": torch.randint(0, 8, (16,), generator=g)}


def _class_kept():
    torch.manual_seed(0)
    model = Classifier()
    us = unit_scale(model, example_kwargs=_batch())
    assert isinstance(us, UnitScaledModel) and isinstance(us, Classifier)
    return model, us


def test_track_scales_measures_the_graph_of_the_call():
    _, us = _class_kept()
    report = track_scales(us, kwargs=_batch(1))
    assert report.mode == "graph" and report.unit_scaled
    linears = [r for r in report if "linear" in r.op]
    assert len(linears) == 2 and all(r.pred_fwd_rms is not None and r.fwd_scale != 1.0 for r in linears)
    assert report.matmul_operands().fraction_in_band() >= 0.9
    with torch.no_grad():
        assert report.loss == pytest.approx(float(us(**_batch(1)).loss), rel=1e-6)  # the true loss
    # positional inputs: another call signature, captured now with the same scales
    report2 = track_scales(us, *_batch(1).values())
    assert [r.fwd_scale for r in report2 if "linear" in r.op] == [r.fwd_scale for r in linears]
    assert len(_state(us).graphs) == 3  # keywords, keywords under no_grad, positional


def test_track_scales_refuses_keywords_for_other_models():
    with pytest.raises(UnitScaleError, match="keyword"):
        track_scales(Classifier(), kwargs=_batch())


def test_equivalence_and_gradient_cosines_with_keyword_inputs(monkeypatch):
    model, us = _class_kept()
    report = check_equivalence(model, us, kwargs=_batch(2), loss_fn=lambda o: o.loss + o.logits.pow(2).mean())
    assert report.ok and len(report.grads) == 6, report
    cos = gradient_cosines(us, kwargs=_batch(2), loss_fn=lambda o: o.loss + o.logits.pow(2).mean())
    assert len(cos) == 6 and min(cos.values()) >= 1 - 1e-6
    # negative control: with the scales left in, the class-kept copy is not the user's model
    monkeypatch.setattr(equivalence, "_erase_module", lambda gm: None)
    assert not check_equivalence(model, us, kwargs=_batch(2)).ok


def test_the_erased_copy_runs_the_captured_graphs_without_capturing_again(monkeypatch):
    """The scale-erased copy erases the graphs that train (no second export); a new signature still captures."""
    from unit_scale_fx import api

    model, us = _class_kept()
    us(**_batch(1))
    erased = equivalence.scale_erased_copy(us)
    erased.load_state_dict(model.state_dict())  # the user's own weights (unit_scale re-initialised its copy's)
    calls: list = []
    real = api.export_call
    monkeypatch.setattr(api, "export_call", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    want = model(**_batch(1))
    got = erased(**_batch(1))
    assert calls == [] and len(_state(erased).graphs) == len(_state(us).graphs)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-6)
    us.load_state_dict(model.state_dict())
    assert not torch.allclose(us(**_batch(1)).logits, want.logits, rtol=1e-3)  # the scales are really gone
    us.zero_grad(set_to_none=True)
    # the erased graphs train the copy's own parameters, not the unit-scaled model's
    got.loss.backward()
    assert all(p.grad is not None for p in erased.parameters()) and all(p.grad is None for p in us.parameters())
    erased(*_batch(1).values())  # positional: another signature, captured and erased now
    assert calls == [1]


def test_simulate_format_joins_every_captured_graph():
    _, us = _class_kept()
    with torch.no_grad():
        plain = us(**_batch(3)).logits
    assert simulate_format(us, "e4m3", "e5m2") is us
    graphs = sum(len(g) for g in _state(us).graphs.values())  # with gradients, and the no_grad call above
    first = format_sites(us)
    per_graph = len([n for n in first if n.startswith("graph0.")])
    assert graphs == 2 and per_graph == 6 and len(first) == graphs * per_graph  # 2 linears: 2 operands, 1 grad
    track_formats(us)
    with torch.no_grad():
        rounded = us(**_batch(3)).logits
    assert not torch.equal(rounded, plain)  # the matmul operands are rounded to e4m3
    assert float((rounded - plain).norm() / plain.norm()) < 0.1  # e4m3 keeps ~3 bits of mantissa
    assert format_counts(us)["fwd:e4m3"].total > 0
    us(*_batch(3).values())  # a new call signature is captured with the simulation too
    assert len(format_sites(us)) == (graphs + 1) * per_graph
    with pytest.raises(UnitScaleError, match="already simulates"):
        simulate_format(us)
    with pytest.raises(UnitScaleError, match="simulate"):
        check_equivalence(Classifier(), us, kwargs=_batch())
