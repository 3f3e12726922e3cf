"""``nn.EmbeddingBag`` (PyTorch's text-classification tutorial, recommendation models): sum, mean and max bags,
fixed-size (2-D indices) or ragged (indices with ``offsets``), weighted sums, under torch.fx and torch.export
(whose ``aten.embedding_bag`` returns a tuple: the scale goes on the ``getitem`` that reads the bags).

Before the rule the op was left unscaled with a warning: a mean bag of 25 rows has RMS 0.2, and its weight's
gradient sums 1/25 of each bag's."""

from __future__ import annotations

import copy
import operator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import gradient_cosines, rms
from unit_scale_fx import UnitScaleError, unit_scale
from unit_scale_fx.analysis.equivalence import scale_erased_copy
from unit_scale_fx.scale import scale

VOCAB, D, BAGS, N = 500, 32, 16, 25


class Bag(nn.Module):
    """An ``nn.EmbeddingBag``; ``export=True`` reads a shape in Python, which torch.fx cannot trace (so the model
    is captured with torch.export)."""

    def __init__(self, mode: str = "mean", export: bool = False, **kw) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(VOCAB, D, mode=mode, **kw)
        self.export = export

    def forward(self, idx, offsets=None, weights=None):
        if self.export and idx.dim() == 0:
            return idx
        return self.bag(idx, offsets, per_sample_weights=weights)


def _batch(layout: str, seed: int, weighted: bool = False) -> tuple:
    g = torch.Generator().manual_seed(seed)
    if layout == "2d":
        idx, offsets = torch.randint(0, VOCAB, (BAGS, N), generator=g), None
    else:
        idx, offsets = torch.randint(0, VOCAB, (BAGS * N,), generator=g), torch.arange(0, BAGS * N, N)
    weights = torch.rand(idx.shape, generator=g) + 0.5 if weighted else None
    return idx, offsets, weights


CASES = [(mode, layout, capture) for mode in ("sum", "mean", "max") for layout in ("2d", "offsets")
         for capture in ("fx", "export")] + [("sum", "2d", "weighted"), ("sum", "offsets", "weighted")]


@pytest.mark.parametrize("measure", [False, True], ids=["analytic", "measured"])
@pytest.mark.parametrize("mode,layout,capture", CASES)
def test_embedding_bag_output_and_gradients_are_unit(mode, layout, capture, measure):
    torch.manual_seed(0)
    weighted = capture == "weighted"
    us = unit_scale(Bag(mode, export=capture == "export"), _batch(layout, 0, weighted), measure=measure,
                    unsupported="error")
    assert us.us_capture == ("torch.export" if capture == "export" else "symbolic_trace")
    idx, offsets, weights = _batch(layout, 1, weighted)
    if weights is not None:
        weights.requires_grad_()
    out = us(idx, offsets, weights)
    assert 0.8 <= rms(out) <= 1.25, rms(out)
    out.backward(torch.randn_like(out))
    assert 0.7 <= rms(us.bag.weight.grad) <= 1.4, rms(us.bag.weight.grad)
    if weights is not None:
        assert 0.7 <= rms(weights.grad) <= 1.4, rms(weights.grad)


def test_torch_export_tuple_gets_its_scale_on_the_bags():
    """``aten.embedding_bag`` returns the bags and three index tensors: the forward scale sits on the
    ``getitem`` that reads the bags (a scale op cannot sit on the tuple)."""
    us = unit_scale(Bag("mean", export=True), _batch("offsets", 0), measure=False)
    (bag,) = [n for n in us.us_module.graph.nodes if "embedding_bag" in str(n.target)]
    forward = [n for n in us.us_module.graph.nodes if n.target is scale and n.args[1] != 1.0]
    assert len(forward) == 1 and forward[0].args[0].target is operator.getitem
    assert forward[0].args[0].args == (bag, 0)
    assert forward[0].args[1] == pytest.approx(N ** 0.5, rel=0.05)  # a mean of 25 unit rows has RMS 1/5


class TextClassifier(nn.Module):
    """The model of PyTorch's text-classification tutorial: a mean bag of token embeddings, one linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.EmbeddingBag(VOCAB, D)
        self.fc = nn.Linear(D, 4)

    def forward(self, text, offsets, label):
        return F.cross_entropy(self.fc(self.embedding(text, offsets)), label)


def _text_batch(seed: int) -> tuple:
    idx, offsets, _ = _batch("offsets", seed)
    return idx, offsets, torch.randint(0, 4, (BAGS,), generator=torch.Generator().manual_seed(seed + 100))


def test_text_classifier_gradients_are_valid_and_the_scales_change_nothing_else():
    """With the scales: each parameter's gradient is a positive multiple of the rewritten forward's true
    gradient. With every scale 1: the original's loss and gradients, on the same weights."""
    torch.manual_seed(0)
    model = TextClassifier()
    us = unit_scale(copy.deepcopy(model), _text_batch(0), unsupported="error")
    cos = gradient_cosines(us, *_text_batch(1))
    assert min(cos.values()) > 0.9999, cos
    ones = scale_erased_copy(us)
    ref = copy.deepcopy(model)
    ref.load_state_dict(us.state_dict())
    a, b = ones(*_text_batch(2)), ref(*_text_batch(2))
    torch.testing.assert_close(a, b)
    a.backward(), b.backward()
    grads = dict(ref.named_parameters())
    for k, p in ones.named_parameters():
        torch.testing.assert_close(p.grad, grads[k].grad, rtol=1e-6, atol=1e-7, msg=k)


@pytest.mark.parametrize("make", [lambda: Bag("mean", max_norm=1.0), lambda: nn.Embedding(VOCAB, D, max_norm=1.0)],
                         ids=["embedding_bag", "embedding"])
def test_max_norm_is_reported_not_scaled(make):
    """``max_norm`` renormalises looked-up rows in place in forward: unit rows would be cut back to norm 1, and
    the scales would be wrong without a word. It is reported, and its weight is not re-initialised."""
    torch.manual_seed(0)
    model = make()
    idx = torch.randint(0, VOCAB, (BAGS, N))
    with pytest.raises(UnitScaleError, match="max_norm"):
        unit_scale(model, (idx,), unsupported="error")
    with pytest.warns(UserWarning, match="max_norm"):
        us = unit_scale(model, (idx,))
    ref = copy.deepcopy(model)
    ref(idx)  # the renormalisation the planning's forward made (and the original's first call makes)
    torch.testing.assert_close(next(us.parameters()), next(ref.parameters()))
