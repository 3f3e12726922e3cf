"""CI smoke version of benchmarks/fp8_gap.py: a few FP8-simulated training steps, two tasks.

Asserts only what the issue asks of CI: training the unit-scaled model (u-μP, the recommended FP8
format policy) in simulated FP8 stays finite, and its underflow counters stay below those of the same
model unscaled in the same simulation. The quality comparison (learning-rate grids, seeds) is a
benchmark, not a test.
"""

from __future__ import annotations

import os
import sysconfig

import pytest
import torch

from fixtures.families import TinyResNet
from unit_scale_fx import unit_scale
from unit_scale_fx.examples import GPT
from unit_scale_fx.lowp.formats import FP8_POLICY, FormatCounter
from unit_scale_fx.lowp.simulate import format_counts, simulate_format, track_formats
from unit_scale_fx.training import optim


def _text_batches(n_steps: int, batch: int = 8, seq: int = 32):
    with open(os.path.join(sysconfig.get_paths()["stdlib"], "textwrap.py"), encoding="utf-8") as f:
        data = torch.tensor([min(ord(c), 127) for c in f.read()[:20000]])
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n_steps):
        s = torch.randint(0, len(data) - seq - 1, (batch,), generator=g)
        chunk = torch.stack([data[i:i + seq + 1] for i in s.tolist()])
        out.append((chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()))
    return out


def _image_batches(n_steps: int, batch: int = 8):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n_steps):
        x = torch.randn(batch, 3, 12, 12, generator=g)
        out.append((x, (x[:, 0].mean((1, 2)) > 0).long() + 2 * (x[:, 1].mean((1, 2)) > 0).long()))
    return out


TASKS = {
    "gpt": (lambda: GPT(vocab=128, d=32, layers=1, heads=2, max_len=32), _text_batches),
    "resnet": (lambda: TinyResNet(classes=4, width=8), _image_batches),
}


def _train(model, opt, batches) -> tuple[list[float], dict[str, FormatCounter]]:
    losses = []
    counts: dict[str, FormatCounter] = {}
    for x, y in batches:
        track_formats(model, True)
        loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for k, c in format_counts(model).items():
            counts.setdefault(k, FormatCounter()).merge(c)
        track_formats(model, False)
        opt.step()
        losses.append(float(loss.detach()))
    return losses, counts


@pytest.mark.parametrize("task", sorted(TASKS))
def test_fp8_training_is_finite_and_underflows_less_than_unscaled(task):
    make, batches_of = TASKS[task]
    batches = batches_of(6)
    torch.manual_seed(0)
    us = simulate_format(unit_scale(make(), batches[0], mup=True), high_precision=FP8_POLICY)
    us_losses, us_counts = _train(us, optim.Adam(us, lr=2 ** -2), batches)
    torch.manual_seed(0)
    plain = simulate_format(make(), high_precision=FP8_POLICY, example_inputs=batches[0])
    plain_losses, plain_counts = _train(plain, torch.optim.Adam(plain.parameters(), lr=1e-3), batches)

    assert all(torch.isfinite(torch.tensor(l)) for l in us_losses), us_losses
    assert all(p.isfinite().all() for p in us.parameters())
    assert us_losses[-1] < us_losses[0]  # it trains
    for key in ("fwd:e4m3", "bwd:e5m2"):
        assert us_counts[key].nonzero > 0 and plain_counts[key].nonzero > 0
    # forward operands (E4M3) and gradients (E5M2): the unscaled model flushes far more to zero
    for key in ("fwd:e4m3", "bwd:e5m2"):
        assert us_counts[key].underflow_fraction < plain_counts[key].underflow_fraction / 4, (
            key, us_counts[key], plain_counts[key])
