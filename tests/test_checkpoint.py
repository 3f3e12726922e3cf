"""Checkpoints: state_dict names, save/load/resume, deepcopy, pickling, reproducible plans."""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from unit_scale_fx import UnitScaledModule, UnitScaleError, unit_scale
from unit_scale_fx.examples import GPT, ResidualMLP, gpt_batch, mlp_batch


class Extras(nn.Module):
    """A model with a non-persistent buffer, a persistent buffer and a parameter forward never uses."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.unused = nn.Parameter(torch.ones(3))
        self.register_buffer("shift", torch.zeros(8))
        self.register_buffer("cache", torch.ones(8), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(self.fc(x + self.shift) * self.cache, x)


def _gpt():
    return GPT(vocab=32, d=16, layers=2, heads=2, max_len=8, tied=True)


def _gpt_batch(seed=0):
    return gpt_batch(vocab=32, batch=2, seq=8, seed=seed)


CASES = {
    "gpt_tied": (_gpt, _gpt_batch),
    "residual_mlp": (lambda: ResidualMLP(d_in=8, d=16, layers=2, d_out=4), lambda seed=0: mlp_batch(8, 4, 8, seed)),
    "extras": (Extras, lambda seed=0: (torch.randn(4, 8, generator=torch.Generator().manual_seed(seed)),)),
}


def _roundtrip_torch_save(m):
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


COPIES = {
    "deepcopy": copy.deepcopy,
    "pickle": lambda m: pickle.loads(pickle.dumps(m)),
    "torch.save": _roundtrip_torch_save,
}


def _plan(us: UnitScaledModule) -> dict:
    return {k: (r.rule, r.fwd, dict(r.bwd), dict(r.weights)) for k, r in us.scale_plan(all_nodes=True).items()}


def _train(model, batches, opt):
    losses = []
    for batch in batches:
        opt.zero_grad()
        loss = model(*batch)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("case", sorted(CASES))
def test_state_dict_keys_equal_original(case):
    make, batch = CASES[case]
    model = make()
    for us in (unit_scale(model, batch()), unit_scale(model)):
        us(*batch())
        assert list(us.state_dict()) == list(model.state_dict())
        assert [n for n, _ in us.named_parameters()] == [n for n, _ in model.named_parameters()]


@pytest.mark.parametrize("case", sorted(CASES))
def test_copies_are_equivalent_and_independent(case):
    """deepcopy, pickle and torch.save(module) give the same module: state, plan, outputs, gradients."""
    make, batch = CASES[case]
    torch.manual_seed(0)
    model = make()
    us = unit_scale(model, batch())
    out = us(*batch(1))
    out.backward()
    for how, copy_fn in COPIES.items():
        c = copy_fn(us)
        assert isinstance(c, UnitScaledModule) and c.us_planned, how
        assert list(c.state_dict()) == list(model.state_dict()), how
        assert _plan(c) == _plan(us), how
        assert c.us_config == us.us_config and c.code == us.code, how
        for k, v in us.state_dict().items():
            assert torch.equal(c.state_dict()[k], v), (how, k)
        out_c = c(*batch(1))
        torch.testing.assert_close(out_c, out, rtol=0, atol=0)
        c.zero_grad(set_to_none=True)
        out_c.backward()
        compared = 0
        for (n, p), (_, q) in zip(us.named_parameters(), c.named_parameters()):
            assert p is not q
            assert (p.grad is None) == (q.grad is None), (how, n)
            if p.grad is not None:
                torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0)
                compared += 1
        assert compared, how
    # training a copy leaves the original alone
    before = {k: v.clone() for k, v in us.state_dict().items()}
    _train(c, [batch(2)], torch.optim.SGD(c.parameters(), lr=0.1))
    for k, v in us.state_dict().items():
        assert torch.equal(v, before[k]), k
    # and a copy can be planned again
    c.replan(*batch())
    assert c.us_planned and list(c.state_dict()) == list(model.state_dict())


def test_unplanned_copy_plans_lazily():
    make, batch = CASES["gpt_tied"]
    us = unit_scale(make())
    copies = {how: fn(us) for how, fn in COPIES.items()}
    out = us(*batch())
    for how, c in copies.items():
        assert not c.us_planned, how
        torch.testing.assert_close(c(*batch()), out, rtol=0, atol=0)
        assert c.us_planned and _plan(c) == _plan(us), how


@pytest.mark.parametrize("case", ["gpt_tied", "residual_mlp"])
def test_save_load_into_fresh_model_resumes_identically(case, tmp_path):
    """Resume = the same construction (seed, example batch), load_state_dict, optimizer state.

    The plan is measured on the example batch with the weights as unit_scale
    made them, so the fresh model is planned *before* loading the weights.
    """
    make, batch = CASES[case]
    torch.manual_seed(0)
    us = unit_scale(make(), batch(0))
    opt = torch.optim.Adam(us.parameters(), lr=1e-2)
    _train(us, [batch(s) for s in range(3)], opt)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": us.state_dict(), "opt": opt.state_dict()}, path)
    reference = _train(us, [batch(s) for s in range(3, 6)], opt)

    torch.manual_seed(0)
    fresh = unit_scale(make(), batch(0))
    ckpt = torch.load(path)  # weights_only: a state_dict needs no pickled code
    fresh.load_state_dict(ckpt["model"])
    opt2 = torch.optim.Adam(fresh.parameters(), lr=1e-2)
    opt2.load_state_dict(ckpt["opt"])
    assert _plan(fresh) == _plan(us)  # the plan the saved model trained with
    resumed = _train(fresh, [batch(s) for s in range(3, 6)], opt2)
    assert resumed == reference
    for k, v in us.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[k], v, rtol=0, atol=0)


def test_whole_module_checkpoint_resumes_identically(tmp_path):
    """torch.save(module) carries the plan too: resuming needs no example batch or seed."""
    make, batch = CASES["residual_mlp"]
    torch.manual_seed(0)
    us = unit_scale(make(), batch(0))
    opt = torch.optim.Adam(us.parameters(), lr=1e-2)
    _train(us, [batch(s) for s in range(2)], opt)
    torch.save({"model": us, "opt": opt.state_dict()}, tmp_path / "full.pt")
    reference = _train(us, [batch(s) for s in range(2, 4)], opt)
    ckpt = torch.load(tmp_path / "full.pt", weights_only=False)
    fresh = ckpt["model"]
    opt2 = torch.optim.Adam(fresh.parameters(), lr=1e-2)
    opt2.load_state_dict(ckpt["opt"])
    assert _train(fresh, [batch(s) for s in range(2, 4)], opt2) == reference


def test_loading_into_an_unplanned_module_warns():
    make, batch = CASES["residual_mlp"]
    us = unit_scale(make(), batch(0))
    lazy = unit_scale(make())
    with pytest.warns(UserWarning, match="not planned"):
        lazy.load_state_dict(us.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        unit_scale(make(), batch(0)).load_state_dict(us.state_dict())


def test_original_checkpoint_loads_into_unit_scaled_model():
    """A checkpoint of the plain model loads into the unit-scaled one (same names, same shapes)."""
    make, batch = CASES["gpt_tied"]
    model = make()
    us = unit_scale(make(), batch())
    missing, unexpected = us.load_state_dict(model.state_dict())
    assert not missing and not unexpected
    for k, v in model.state_dict().items():
        assert torch.equal(us.state_dict()[k], v)


@pytest.mark.parametrize("case", sorted(CASES))
def test_plan_is_reproducible(case):
    make, batch = CASES[case]
    torch.manual_seed(0)
    model = make()
    a, b = unit_scale(model, batch()), unit_scale(model, batch())
    assert _plan(a) == _plan(b)
    assert a.code == b.code
    for k, v in a.state_dict().items():
        assert torch.equal(b.state_dict()[k], v), k
    # replanning on the same weights and batch gives the same plan
    code = a.code
    a.replan(*batch())
    assert _plan(a) == _plan(b) and a.code == code


class ShapeBranch(nn.Module):
    """Python control flow on a shape: torch.fx cannot trace it, torch.export can."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 2:
            return self.lin(x).relu().pow(2).mean()
        return self.lin(x).pow(2).mean()


@pytest.mark.parametrize("how", sorted(COPIES))
def test_export_captured_module_copies(how):
    """A model torch.fx cannot trace keeps its class; copies and pickles carry the plan (not the graphs,
    which torch.export cannot pickle): the copy captures again and takes the same scales, measuring nothing."""
    x = torch.randn(4, 8)
    us = unit_scale(ShapeBranch(), (x,))
    assert us.us_capture == "torch.export" and isinstance(us, ShapeBranch)
    out = us(x)
    c = COPIES[how](us)
    assert isinstance(c, ShapeBranch) and type(c) is type(us)
    assert list(c.state_dict()) == list(us.state_dict()) and _plan(c) == _plan(us)
    torch.testing.assert_close(c(x), out, rtol=0, atol=0)
