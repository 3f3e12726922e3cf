"""Issue 11's done-when for every Hugging Face family in tests: the unit-scaled model keeps its API.

Each family (the library's default config, tiny sizes) is unit-scaled lazily and trained two steps
with ``transformers.Trainer``, whose logged losses and ``evaluate`` are the model's own; then ``save_pretrained``, a plain ``from_pretrained`` (refused: the weights mean nothing without
the plan), ``unit_scale_fx.from_pretrained`` (the same function), and one more step on both the
model and the loaded copy gives the same loss and the same weights, bit for bit. Models that
generate text run ``generate``.
"""

from __future__ import annotations

import math

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


def _rows(fam, seed: int) -> list[dict]:
    args, kwargs = fam.batch(seed)
    assert not args
    n = next(iter(kwargs.values())).shape[0]
    return [{k: v[i] for k, v in kwargs.items()} for i in range(n)]


def _trainer_steps_log_the_true_loss(us: torch.nn.Module, fam, tmp_path) -> None:
    """Two ``Trainer`` steps and ``evaluate`` run, and log the losses the model returned (whose value is not
    rescaled: ``tests/test_hf.py`` checks that against the cross entropy of the logits)."""
    pytest.importorskip("accelerate")
    data = _rows(fam, 7)
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "trainer"), per_device_train_batch_size=len(data),
                                          per_device_eval_batch_size=len(data), max_steps=2, logging_steps=1,
                                          learning_rate=1e-3, report_to=[], save_strategy="no", use_cpu=True,
                                          dataloader_num_workers=0, disable_tqdm=True, max_grad_norm=0)
    returned: dict[bool, list[float]] = {True: [], False: []}

    class Recording(transformers.Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, **kw):
            loss, out = super().compute_loss(model, inputs, return_outputs=True, **kw)
            returned[model.training].append(float(fam.loss(out).detach()))
            return (loss, out) if return_outputs else loss

    trainer = Recording(model=us, args=args, train_dataset=data, eval_dataset=data)
    trainer.train()
    assert us.us_capture == "torch.export" and len(_state(us).graphs) == 1
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2 and len(returned[True]) == 2
    for got, want in zip(logged, returned[True]):
        assert math.isfinite(got) and abs(got - want) < 1e-4 * abs(want), (logged, returned)
    metrics = trainer.evaluate()  # eval mode, no gradient: another captured graph, the same scales
    (want,) = returned[False]
    assert abs(metrics["eval_loss"] - want) < 1e-4 * abs(want), (metrics["eval_loss"], want)
    us.train()  # evaluate leaves the model in eval mode


@pytest.mark.parametrize("name", HF)
def test_trainer_save_load_resume_and_generate(name, tmp_path):
    fam = FAMILIES[name]
    model = fam.make()
    base = type(model)
    us = unit_scale(model)
    assert isinstance(us, base) and isinstance(us, UnitScaledModel)
    _trainer_steps_log_the_true_loss(us, fam, tmp_path)
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
