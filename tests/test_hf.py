"""Hugging Face models as people build them: default config, the model's own API, true losses.

One tiny Llama (grouped-query attention, ``use_cache=True`` as the library ships it) is
unit-scaled lazily; the tests check what a Hugging Face user does next: train, call it
without labels, with a smaller last batch, in eval mode, ``generate``, ``save_pretrained``
and ``from_pretrained`` and resume, and ``transformers.Trainer`` with ``evaluate``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import unit_scale_fx
from fixtures.families import FAMILIES
from unit_scale_fx import UnitScaleError, unit_scale
from unit_scale_fx.api import PLAN_ATTR, UnitScaledModel, _state

transformers = pytest.importorskip("transformers")

FAM = FAMILIES["llama"]


def _batch(seed: int = 1, rows: int = 4, seq: int = 16) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (rows, seq), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def _true_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1))


def test_default_config_decoder_keeps_its_api_and_one_graph():
    model = FAM.make()
    assert model.config.use_cache  # the library's default
    us = unit_scale(model)  # torch.fx cannot trace it: nothing is captured yet, and nothing fails
    assert isinstance(us, transformers.LlamaForCausalLM) and isinstance(us, UnitScaledModel)
    assert type(us).__name__ == "LlamaForCausalLM" and us.config is not model.config
    assert list(us.state_dict()) == list(model.state_dict())
    assert hasattr(us, "generate") and hasattr(us, "save_pretrained")

    out = us(**_batch())
    assert type(out).__name__ == "CausalLMOutputWithPast"
    assert type(out.past_key_values).__name__ == "DynamicCache"  # the cache comes out of the one graph
    assert us.us_capture == "torch.export" and len(_state(us).graphs) == 1
    torch.testing.assert_close(out.loss, _true_loss(out.logits, _batch()["labels"]))  # the loss is not rescaled
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in us.parameters())

    # a smaller last batch and another length run the same graph (dimensions are dynamic)
    small = us(**_batch(2, rows=3, seq=11))
    torch.testing.assert_close(small.loss, _true_loss(small.logits, _batch(2, rows=3, seq=11)["labels"]))
    assert len(_state(us).graphs) == 1

    # labels are optional: the same function gives the same logits, with the planned scales
    with torch.no_grad():
        plain = us(input_ids=_batch()["input_ids"])
    assert plain.loss is None
    torch.testing.assert_close(plain.logits, out.logits.detach(), rtol=1e-5, atol=1e-5)
    # eval mode, and generation (cache objects cannot enter a graph: generation recomputes the prefix)
    us.eval()
    with torch.no_grad():
        torch.testing.assert_close(us(input_ids=_batch()["input_ids"]).logits, out.logits.detach(),
                                   rtol=1e-5, atol=1e-5)
    gen = us.generate(_batch()["input_ids"][:2, :5], max_new_tokens=3, do_sample=False)
    assert gen.shape == (2, 8)
    with pytest.raises(UnitScaleError, match="use_cache=False"):
        us(input_ids=_batch()["input_ids"], past_key_values=transformers.DynamicCache(config=us.config))


def test_a_forward_hook_on_the_unit_scaled_model_runs_around_the_call_not_in_the_capture():
    """A hook reading ``output.logits`` (a logger, say) would see the capture's flat tuple if export traced
    it; it used to push the model to dynamo. It now runs once per call, on the model's own output type."""
    us = unit_scale(FAM.make())
    seen: list = []
    handle = us.register_forward_hook(lambda mod, args, out: seen.append(out.logits.detach().clone()))
    pre: list = []
    us.register_forward_pre_hook(lambda mod, args, kwargs: pre.append(sorted(kwargs)), with_kwargs=True)
    out = us(**_batch())
    assert us.us_capture == "torch.export" and len(_state(us).graphs) == 1
    assert len(seen) == 1 and pre == [["input_ids", "labels"]]
    torch.testing.assert_close(seen[0], out.logits.detach(), rtol=0, atol=0)
    handle.remove()
    us(**_batch(2))
    assert len(seen) == 1 and len(pre) == 2


def test_example_kwargs_alone_take_the_export_path():
    model = FAM.make()
    b = _batch(0)
    us = unit_scale(model, example_kwargs=b)
    assert us.us_capture == "torch.export" and us.scale_plan()
    both = unit_scale(model, (b["input_ids"],), example_kwargs={"labels": b["labels"]})  # positional and keyword
    assert both.us_capture == "torch.export"
    assert {k: r.fwd for k, r in both.scale_plan().items()} == {k: r.fwd for k, r in us.scale_plan().items()}


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, seeds: list[int]) -> list[float]:
    losses = []
    for s in seeds:
        loss = model(**_batch(s)).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def test_a_plain_checkpoint_loads_and_plans_at_its_first_call(tmp_path):
    model = FAM.make()
    model.save_pretrained(tmp_path)
    us = unit_scale_fx.from_pretrained(transformers.LlamaForCausalLM, tmp_path)
    assert isinstance(us, UnitScaledModel) and _state(us).records is None
    expected = unit_scale(model)
    # saved before its first call, a unit-scaled model holds the user's own weights: a plain checkpoint
    expected.save_pretrained(tmp_path / "unplanned")
    plain = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "unplanned")
    for (n, a), (_, b) in zip(model.named_parameters(), plain.named_parameters()):
        assert torch.equal(a, b), n
    with torch.no_grad():
        torch.testing.assert_close(us(**_batch(1)).loss, expected(**_batch(1)).loss, rtol=0, atol=0)


def test_trainer_checkpoints_resume_bit_identically(tmp_path):
    """``Trainer`` saves with ``save_pretrained`` (marked weights, plan in config.json) and resumes with
    ``load_state_dict``: a run resumed from its first checkpoint ends where the uninterrupted run ends."""
    pytest.importorskip("accelerate")
    data = [{k: v[i] for k, v in _batch(7, rows=8).items()} for i in range(8)]

    def trainer(model: torch.nn.Module, out: str) -> "transformers.Trainer":
        args = transformers.TrainingArguments(output_dir=out, per_device_train_batch_size=4, max_steps=2,
                                              learning_rate=1e-3, report_to=[], save_strategy="steps",
                                              save_steps=1, use_cpu=True, dataloader_num_workers=0,
                                              disable_tqdm=True, logging_steps=1, seed=0, max_grad_norm=0)
        return transformers.Trainer(model=model, args=args, train_dataset=data)

    model = FAM.make()
    first = unit_scale(model, example_kwargs=_batch(0))
    trainer(first, str(tmp_path / "a")).train()
    ckpt = tmp_path / "a" / "checkpoint-1"
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        transformers.LlamaForCausalLM.from_pretrained(ckpt)
    second = unit_scale(model, example_kwargs=_batch(0))  # the same model, planned the same way
    trainer(second, str(tmp_path / "b")).train(resume_from_checkpoint=str(ckpt))  # AdamW state too
    for (n, a), (_, b) in zip(first.named_parameters(), second.named_parameters()):
        assert torch.equal(a, b), n
    # the checkpoint loads with an Auto class and with the unit-scaled class, plan and weights as saved
    final = tmp_path / "a" / "checkpoint-2"
    for loaded in (unit_scale_fx.from_pretrained(transformers.AutoModelForCausalLM, final),
                   type(first).from_pretrained(final)):
        assert isinstance(loaded, transformers.LlamaForCausalLM) and isinstance(loaded, UnitScaledModel)
        assert getattr(loaded.config, PLAN_ATTR) == getattr(first.config, PLAN_ATTR)
        for (n, a), (_, b) in zip(first.named_parameters(), loaded.named_parameters()):
            assert torch.equal(a, b), n


def test_trainer_and_evaluate_log_the_true_loss(tmp_path):
    pytest.importorskip("accelerate")
    us = unit_scale(FAM.make())
    data = [{k: v[i] for k, v in _batch(7).items()} for i in range(4)]
    before = copy.deepcopy(us)  # the same weights before any step (not planned yet either)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4,
                                          per_device_eval_batch_size=4, max_steps=2, logging_steps=1,
                                          learning_rate=1e-3, report_to=[], save_strategy="no",
                                          use_cpu=True, dataloader_num_workers=0, disable_tqdm=True)
    trainer = transformers.Trainer(model=us, args=args, train_dataset=data, eval_dataset=data)
    trainer.train()  # its first call (with num_items_in_batch: a summed loss divided by a count) plans
    assert len(_state(us).graphs) == 1
    with torch.no_grad():
        out0 = before(**_batch(7))
    first = _true_loss(out0.logits, _batch(7)["labels"])
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert logged and abs(logged[0] - float(first)) < 1e-3 * float(first), (logged, float(first))
    metrics = trainer.evaluate()
    us.eval()
    with torch.no_grad():
        out = us(**_batch(7))
    true = float(_true_loss(out.logits, _batch(7)["labels"]))
    assert abs(metrics["eval_loss"] - true) < 1e-3 * true, (metrics["eval_loss"], true)


def test_a_saved_plan_that_cannot_be_read_is_refused(tmp_path):
    """Loading gives back the same function or refuses: a plan this version cannot read is never replaced
    by a fresh one measured on the trained weights (which would be another function)."""
    import json

    us = unit_scale(FAM.make(), example_kwargs=_batch(0))
    us.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg[PLAN_ATTR]["records"]  # the plan travels in config.json
    cfg[PLAN_ATTR]["version"] = -1  # written by another version of unit_scale_fx
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    loaded = unit_scale_fx.from_pretrained(transformers.LlamaForCausalLM, tmp_path)
    with pytest.raises(UnitScaleError, match="plan"):
        loaded(**_batch(1))
    with pytest.raises(UnitScaleError, match="plan"):
        type(us).from_pretrained(tmp_path)(**_batch(1))


def test_gradient_checkpointing_keeps_the_model_and_names_its_hook():
    # transformers' gradient checkpointing adds a forward hook to the input embeddings, which unit_scale names in its
    # hooks warning; the hook only changes the output, so the model is still its original with the scales erased
    from unit_scale_fx.analysis import check_equivalence

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(cfg)
    model.gradient_checkpointing_enable()
    model.train()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    kwargs = dict(input_ids=ids, labels=ids)
    with pytest.warns(UserWarning, match=r"have hooks \(model\.embed_tokens\)"):
        us = unit_scale(copy.deepcopy(model), example_kwargs=kwargs)
    report = check_equivalence(model, us, kwargs=kwargs, loss_fn=lambda out: out.loss)
    assert report.ok, report
