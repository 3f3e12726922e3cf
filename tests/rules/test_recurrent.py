"""Recurrent layers (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``, captured by ``torch.export`` as one aten op each):
forward as written, every input's gradient made unit by factors measured on the example batch, gradients
valid; analytic planning reports them unscaled, with the way out."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fixtures.families import RecurrentLM
from helpers import gradient_cosines, rms
from unit_scale_fx import unit_scale
from unit_scale_fx.analysis.equivalence import scale_erased_copy

class LastState(nn.Module):
    """A classifier that reads the recurrent layer's last hidden state only (not its output sequence)."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(16, 32, batch_first=True)
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        _, h = self.rnn(x)
        return F.cross_entropy(self.head(h[-1]), y)


def _batch(seed: int, vocab: int = 100) -> tuple:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (8, 16), generator=g), torch.randint(0, vocab, (8, 16), generator=g)


def _grad_rms(model: nn.Module, batch: tuple) -> dict[str, float]:
    model.zero_grad(set_to_none=True)
    model(*batch).backward()
    return {k: rms(p.grad) for k, p in model.named_parameters() if k.startswith("rnn.")}


@pytest.mark.parametrize("cell,bidirectional", [("lstm", False), ("gru", False), ("rnn", False), ("lstm", True)])
def test_recurrent_weights_get_unit_gradients_and_valid_ones(cell, bidirectional):
    """Every weight and bias of the recurrent layer gets a gradient within a factor 2.5 of unit on a batch the
    plan did not see (without the rule, the op was left unscaled: the LSTM's ranged 2.6-184), each a
    positive multiple of the true gradient of the rewritten forward."""
    torch.manual_seed(0)
    model = RecurrentLM(cell, bidirectional=bidirectional)
    us = unit_scale(copy.deepcopy(model), _batch(0))
    assert not us.us_unsupported, us.us_unsupported
    got = _grad_rms(us, _batch(1))
    assert len(got) == len([k for k, _ in model.named_parameters() if k.startswith("rnn.")])
    assert all(0.4 <= v <= 2.5 for v in got.values()), got
    cos = gradient_cosines(us, *_batch(2))
    assert min(cos.values()) > 0.999, sorted(cos.items(), key=lambda kv: kv[1])[:3]


def test_with_every_scale_one_a_recurrent_model_is_the_original():
    """The rule adds backward factors only: the LSTM's weights keep their values (no re-initialisation of the
    recurrent layer), the plan puts factors on its inputs, and with every scale 1 the rewritten model
    computes the original's loss and gradients on the same weights."""
    torch.manual_seed(0)
    model = RecurrentLM("lstm")
    us = unit_scale(copy.deepcopy(model), _batch(0))
    us(*_batch(1))
    mine = dict(model.named_parameters())
    for k, p in us.named_parameters():
        if k.startswith("rnn."):
            assert torch.equal(p, mine[k]), k
    records = [r for r in us.scale_plan().values() if r.rule == "recurrent"]
    assert len(records) == 1 and records[0].fwd == 1.0
    assert any(b != 1.0 for b in records[0].bwd.values()), records[0].bwd
    ones = scale_erased_copy(us)
    ref = copy.deepcopy(model)
    ref.load_state_dict(us.state_dict())
    a, b = ones(*_batch(1)), ref(*_batch(1))
    assert torch.equal(a, b)
    a.backward(), b.backward()
    grads = dict(ref.named_parameters())
    for k, p in ones.named_parameters():
        torch.testing.assert_close(p.grad, grads[k].grad, rtol=1e-6, atol=1e-7, msg=k)


def test_a_recurrent_layer_read_through_its_last_state_is_measured_there():
    """Only the last hidden state is read (the output sequence has no reader): the gains are measured with a
    gradient on that piece alone, and the weights' gradients come out near unit."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    batch = lambda: (torch.randn(32, 12, 16, generator=g), torch.randint(0, 5, (32,), generator=g))  # noqa: E731
    us = unit_scale(LastState(), batch())
    assert not us.us_unsupported
    us(*batch()).backward()
    got = {k: rms(p.grad) for k, p in us.named_parameters() if k.startswith("rnn.")}
    assert all(0.4 <= v <= 2.5 for v in got.values()), got


def test_analytic_planning_reports_a_recurrent_layer_unscaled():
    """Without measurement the gains are unknown: the op is reported (and warned about) as unscaled, with the
    way out, not scaled by guesses."""
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="lstm"):
        us = unit_scale(RecurrentLM("lstm"), _batch(0), measure=False)
    (u,) = us.us_unsupported
    assert "lstm" in u.op and "measure=True" in u.reason


def test_the_compile_backend_scales_a_recurrent_layer_that_dynamo_traces():
    """Through ``torch.compile(backend="unit_scale")`` with ``allow_rnn`` (dynamo's default runs a frame with a
    recurrent module eagerly: the backend never sees it), the LSTM is planned as in eager mode: the same
    gradient RMS for every weight as ``unit_scale``, no op left unscaled."""
    torch.manual_seed(0)
    model = RecurrentLM("lstm")
    eager = unit_scale(copy.deepcopy(model), _batch(0))
    want = _grad_rms(eager, _batch(0))
    torch._dynamo.reset()
    with torch._dynamo.config.patch(allow_rnn=True), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = torch.compile(model, backend="unit_scale")
        compiled(*_batch(0)).backward()
    torch._dynamo.reset()
    assert not [w for w in caught if "left unscaled" in str(w.message)]
    got = {k: rms(p.grad) for k, p in model.named_parameters() if k.startswith("rnn.")}
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=0.05), (k, got[k], v)


def test_the_compile_backend_is_called_for_a_recurrent_layer_by_default():
    """Dynamo's default (``allow_rnn=False``) runs a frame that calls a recurrent layer without calling any
    backend: the model trained unscaled, silently. Resolving ``backend="unit_scale"`` by name (the package not
    imported yet), or making a backend, lets dynamo trace it. In a fresh process: dynamo's config is global."""
    code = textwrap.dedent("""
        import sys, torch, torch.nn as nn, torch.nn.functional as F
        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.rnn, self.head = nn.LSTM(16, 32, batch_first=True), nn.Linear(32, 4)
            def forward(self, x, y):
                return F.cross_entropy(self.head(self.rnn(x)[0][:, -1]), y)
        torch.manual_seed(0)
        x, y = torch.randn(8, 10, 16), torch.randint(0, 4, (8,))
        assert "unit_scale_fx" not in sys.modules and not torch._dynamo.config.allow_rnn
        net = Net()
        torch.compile(net, backend="unit_scale", options={"inner": "eager"})(x, y).backward()
        from unit_scale_fx import backend
        from unit_scale_fx.backend import named_backend
        by_name = len(named_backend({"inner": "eager"}).graphs)
        w = float(net.rnn.weight_hh_l0.grad.pow(2).mean().sqrt())
        torch._dynamo.reset()
        torch._dynamo.config.allow_rnn = False
        be = backend(inner="eager")
        torch.compile(Net(), backend=be)(x, y).backward()
        print(by_name, w, len(be.graphs))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    by_name, w, made = out.stdout.split()[-3:]
    assert int(by_name) >= 1 and int(made) >= 1
    assert 0.5 <= float(w) <= 2.0  # the recurrent weights' gradients unit-scaled (unscaled: below 1e-2)
