"""tensor_stats: the one rms() and the one definition of a model's loss; table: the one formatter."""

from __future__ import annotations

import math

import pytest
import torch

from unit_scale_fx import UnitScaleError
from unit_scale_fx.table import format_table
from unit_scale_fx.tensor_stats import loss_outputs, mean_square, output_loss, rms


def test_rms_and_mean_square():
    t = torch.tensor([3.0, -4.0], requires_grad=True)
    assert math.isclose(rms(t), math.sqrt(12.5)) and math.isclose(mean_square(t), 12.5)
    assert rms(torch.tensor([1, 2], dtype=torch.int64)) == pytest.approx(math.sqrt(2.5))
    assert rms(torch.ones(2, 0)) == 0.0 and mean_square(torch.ones(0)) == 0.0
    assert math.isinf(rms(torch.tensor([float("inf"), 1.0])))
    assert rms(torch.full((4,), 2.0, dtype=torch.bfloat16)) == 2.0


def _outputs():
    w = torch.randn(3, 4, requires_grad=True)
    logits = torch.ones(2, 3) @ w
    return w, logits, logits.square().mean(), logits.abs().mean()


def test_the_scalar_outputs_are_the_loss():
    w, logits, loss, aux = _outputs()
    tensors, grads = loss_outputs({"logits": logits, "loss": (loss, aux), "ids": torch.arange(3)})
    assert len(tensors) == 2 and tensors[0] is loss and tensors[1] is aux and grads == [None, None]
    total = output_loss((logits, loss, aux))
    assert torch.allclose(total, loss + aux)
    (g,) = torch.autograd.grad(total, w, retain_graph=True)
    (g_ref,) = torch.autograd.grad(loss + aux, w)
    assert torch.allclose(g, g_ref)  # the logits beside the loss receive no extra gradient


def test_without_a_scalar_every_output_gets_a_seeded_unit_gradient():
    w, logits, _, _ = _outputs()
    other = logits * 2
    tensors, grads = loss_outputs((logits, other), seed=3)
    assert tensors == [logits, other] and all(g is not None and g.shape == (2, 4) for g in grads)
    assert torch.equal(grads[0], loss_outputs((logits, other), seed=3)[1][0])  # seeded
    assert not torch.equal(grads[0], loss_outputs((logits, other), seed=4)[1][0])
    big = torch.randn(256, 256, requires_grad=True) * 1.0
    assert 0.95 < rms(loss_outputs(big)[1][0]) < 1.05  # unit RMS
    total = output_loss((logits, other), seed=3)
    assert torch.allclose(total, (logits * grads[0]).sum() + (other * grads[1]).sum())


def test_no_output_with_a_gradient_is_an_error():
    with pytest.raises(UnitScaleError, match="no floating-point tensor that requires grad") as e:
        loss_outputs((torch.randn(2), torch.arange(3)), where="here")
    assert e.value.where == "here" and "loss_fn" in e.value.fix


def test_format_table():
    rows = [("name", "value"), ("a", "1"), ("long name", "12.5")]
    assert format_table(rows) == "name       value\n---------  -----\na          1\nlong name  12.5"
    assert format_table(rows, left=1).splitlines()[2] == "a              1"  # numbers right-aligned
    assert format_table(rows, rule=False).splitlines()[1] == "a          1"
    assert format_table([]) == ""
