"""Issue 11's done-when for every Hugging Face family in tests: the unit-scaled model keeps its API.

Each family (the library's default config, tiny sizes) is unit-scaled lazily and trained one step;
then ``save_pretrained``, a plain ``from_pretrained`` (refused: the weights mean nothing without
the plan), ``unit_scale_fx.from_pretrained`` (the same function), and one more step on both the
model and the loaded copy gives the same loss and the same weights, bit for bit. Models that
generate text run ``generate``.
"""

from __future__ import annotations

import pytest
import torch

import unit_scale_fx
from fixtures.families import FAMILIES
from unit_scale_fx import unit_scale
from unit_scale_fx.api import UnitScaledModel, _state

transformers = pytest.importorskip("transformers")

HF = sorted(n for n, f in FAMILIES.items() if f.needs == "transformers")


def _step(model: torch.nn.Module, fam, seed: int) -> float:
    torch.manual_seed(seed)  # the same dropout masks
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    args, kwargs = fam.batch(seed)
    loss = fam.loss(model(*args, **kwargs))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


@pytest.mark.parametrize("name", HF)
def test_save_load_resume_and_generate(name, tmp_path):
    fam = FAMILIES[name]
    model = fam.make()
    base = type(model)
    us = unit_scale(model)
    assert isinstance(us, base) and isinstance(us, UnitScaledModel)
    _step(us, fam, 0)
    us.save_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        base.from_pretrained(tmp_path)
    loaded = unit_scale_fx.from_pretrained(base, tmp_path)
    loaded.train()  # from_pretrained returns eval mode, as for any Hugging Face model
    assert _step(loaded, fam, 1) == _step(us, fam, 1)
    assert _state(loaded).records is not None and not _state(loaded).init_pending
    for (n, a), (_, b) in zip(us.named_parameters(), loaded.named_parameters()):
        assert torch.equal(a, b), n
    if us.can_generate():
        args, kwargs = fam.batch(2)
        ids = kwargs.get("input_ids", args[0] if args else None)
        out = loaded.generate(ids[:1, :4], max_new_tokens=2, do_sample=False)
        assert out.shape[0] == 1 and out.shape[1] >= 2
