"""The scale-erased equivalence check, and negative controls for each failure kind of issue 12.

Equivalence (``check_equivalence``): with every inserted scale erased, the rewritten model on the
original's weights computes the original's outputs and gradients. Validity (``gradient_cosines``):
with the scales, every gradient is a positive multiple of the true one. Each negative control
re-creates one failure that used to be silent and shows which check catches it.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.utils import ModelOutput

from unit_scale_fx import UnitScaleError, unit_scale
from unit_scale_fx.analysis import all_outputs_loss, check_equivalence, gradient_cosines, scale_erased_copy
from unit_scale_fx.examples import GPT, ResidualMLP, gpt_batch, mlp_batch
from unit_scale_fx.lowp.formats import FormatSimulation
from unit_scale_fx.record import ARG_SCALE_KEY, INSERTED
from unit_scale_fx.scale import scale

MIN_COS = 1 - 1e-6


def test_erased_copy_has_no_scales_and_the_original_is_untouched():
    torch.manual_seed(0)
    x, y = mlp_batch(batch=16)
    model = ResidualMLP(layers=2)
    us = unit_scale(model, (x, y))
    erased = scale_erased_copy(us)
    assert any(n.target is scale for n in us.us_module.graph.nodes)
    assert not any(n.target is scale for n in erased.graph.nodes)
    before = {k: v.clone() for k, v in us.state_dict().items()}
    report = check_equivalence(model, us, x, y)
    assert report.ok and report.grads and report.max_error <= 1e-6, report
    assert all(torch.equal(v, before[k]) for k, v in us.state_dict().items())
    assert all(p.grad is None for p in us.parameters())


@pytest.mark.parametrize("mup", [False, True], ids=["unit", "u-mup"])
def test_gpt_is_the_users_model_plus_scales(mup):
    """u-μP puts scales into op arguments (attention's ``scale=``) and multiplications: erased too."""
    torch.manual_seed(0)
    model = GPT(vocab=64, d=32, layers=2, heads=2, max_len=16).double()
    x, y = gpt_batch(vocab=64, batch=2, seq=16)
    us = unit_scale(model, (x, y), mup=mup)
    assert check_equivalence(model, us, x, y).ok
    marked = [n for n in us.us_module.graph.nodes if ARG_SCALE_KEY in n.meta]
    assert bool(marked) == mup
    if mup:  # negative control: forget the argument scales and the models differ
        for n in marked:
            del n.meta[ARG_SCALE_KEY]
        assert not check_equivalence(model, us, x, y).ok


def test_changed_op_is_detected():
    """Negative control: an op the rewrite changed (gelu -> relu) shows in outputs and gradients."""
    torch.manual_seed(0)
    x, y = mlp_batch(batch=16)
    model = ResidualMLP(layers=2)
    us = unit_scale(model, (x, y))
    relu = next(n for n in us.us_module.graph.nodes if n.op == "call_function" and n.target is torch.relu)
    relu.target = torch.tanh
    us.us_module.recompile()
    report = check_equivalence(model, us, x, y)
    assert not report.ok
    assert any(f.startswith("output") for f in report.failures)
    assert any(f.startswith("gradient of") for f in report.failures)


class TwoLosses(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 8), nn.Linear(8, 3), nn.Linear(8, 2)

    def forward(self, x, y):
        h = F.gelu(self.a(x))
        return F.cross_entropy(self.b(h), y), F.mse_loss(self.c(h), torch.ones(x.shape[0], 2))


def test_outputs_keep_their_relative_weights():
    """Two returned losses summed outside: valid; negative control: one output not pinned to potential 1."""
    torch.manual_seed(0)
    model = TwoLosses().double()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    us = unit_scale(model, (x, y))
    total = lambda o: o[0] + 3.0 * o[1]  # noqa: E731
    assert check_equivalence(model, us, x, y, loss_fn=total).ok
    assert min(gradient_cosines(us, x, y, loss_fn=total).values()) >= MIN_COS
    out = next(n for n in us.us_module.graph.nodes if n.op == "output")
    second = out.args[0][1]
    with us.us_module.graph.inserting_before(out):  # the second loss's gradient arrives x0.5: what a soft anchor did
        bad = us.us_module.graph.call_function(scale, (second, 1.0, 0.5))
    bad.meta[INSERTED] = True
    out.args = ((out.args[0][0], bad),)
    us.us_module.recompile()
    assert check_equivalence(model, us, x, y, loss_fn=total).ok  # the forward is unchanged ...
    cos = gradient_cosines(us, x, y, loss_fn=total)
    assert min(cos[k] for k in ("a.weight", "a.bias")) < MIN_COS  # ... but the trunk's gradient is not valid


class Distill(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.student, self.teacher = nn.Linear(4, 8), nn.Linear(8, 5), nn.Linear(8, 5)

    def forward(self, x):
        h = F.gelu(self.a(x))
        return F.cross_entropy(self.student(h), F.softmax(self.teacher(h), -1))


def test_soft_target_gets_its_own_backward_scale():
    """A loss input its rule does not list gets its own scale; negative control: it gets another's."""
    torch.manual_seed(0)
    model = Distill().double()
    x = torch.randn(8, 4, dtype=torch.float64)
    us = unit_scale(model, (x,))
    assert check_equivalence(model, us, x).ok
    assert min(gradient_cosines(us, x, loss_fn=all_outputs_loss).values()) >= MIN_COS
    ce = next(n for n in us.us_module.graph.nodes if n.target is F.cross_entropy)
    logits_scale, target_scale = ce.args[0], ce.args[1]
    assert target_scale.target is scale and logits_scale.target is scale
    x_, f, _ = target_scale.args
    target_scale.args = (x_, f, f * logits_scale.args[2] / logits_scale.args[1])  # the logits' backward factor
    us.us_module.recompile()
    cos = gradient_cosines(us, x)
    assert min(cos["a.weight"], cos["a.bias"]) < MIN_COS


def test_simulated_format_is_refused():
    torch.manual_seed(0)
    x, y = mlp_batch(batch=16)
    model = ResidualMLP(layers=1)
    us = unit_scale(model, (x, y), simulate_format=FormatSimulation())
    with pytest.raises(UnitScaleError, match="simulate"):
        check_equivalence(model, us, x, y)


@dataclasses.dataclass
class Out(ModelOutput):
    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    aux: Optional[torch.Tensor] = None


class ReturnsModelOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x, y):
        h = F.gelu(self.a(x))
        logits = self.b(h)
        return Out(loss=F.cross_entropy(logits, y), logits=logits, aux=h.pow(2).mean())


def test_model_output_keeps_its_type_and_gradients_are_valid():
    """torch.fx turns a ModelOutput into a dict: with example inputs such a model is exported instead."""
    torch.manual_seed(0)
    model = ReturnsModelOutput().double()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    us = unit_scale(model, (x, y))
    assert type(us(x, y)) is Out
    user_loss = lambda o: o.loss + 0.1 * o.aux + o.logits.pow(2).mean()  # noqa: E731
    assert check_equivalence(model, us, x, y, loss_fn=user_loss).ok
    assert min(gradient_cosines(us, x, y, loss_fn=user_loss).values()) >= MIN_COS
    # negative control: planned lazily (symbolic tracing only), the output is a dict, and the check says so
    lazy = unit_scale(model)
    lazy(x, y)
    report = check_equivalence(model, lazy, x, y, loss_fn=lambda o: o["loss"])
    assert not report.ok and "structure differs" in report.failures[0]
