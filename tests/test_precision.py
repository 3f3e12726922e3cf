"""Real half precision: a unit-scaled model trains in float16 / bfloat16 without loss scaling."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from unit_scale_fx import UnitScaleError, unit_scale
from unit_scale_fx.examples import GPT, gpt_batch
from unit_scale_fx.lowp.precision import MasterWeights, cast_like, half_precision, to_float32
from unit_scale_fx.rules.registry import lookup


def _gpt(**kw):
    torch.manual_seed(0)
    return GPT(**{"vocab": 64, "d": 32, "layers": 1, "heads": 2, "max_len": 32, **kw})


def test_half_precision_keeps_loss_norm_softmax_in_float32():
    x, y = gpt_batch(64, 4, 32)
    us = half_precision(unit_scale(_gpt(), (x, y)), torch.float16)
    assert {p.dtype for p in us.parameters()} == {torch.float16}
    kept = 0
    for n in us.graph.nodes:
        rule = lookup(n, us) if n.op in ("call_function", "call_method") else None
        if rule is not None and rule.kind in ("loss", "norm", "softmax"):
            assert all(a.target is to_float32 for a in n.all_input_nodes if a.meta.get("val") is not None
                       and a.meta["val"].is_floating_point())
            kept += 1
            if rule.kind == "norm":
                assert all(u.target is cast_like for u in n.users)
    assert kept == 4  # three layer norms (ln1, ln2, ln_f) + the loss (attention runs in SDPA)
    loss = us(x, y)
    assert loss.dtype == torch.float32


def test_unscaled_loss_gradient_would_overflow_fp16_without_fp32_loss():
    """N tokens x sqrt(V): the unit-scaled loss gradient exceeds float16's max; the float32 loss keeps it finite."""
    torch.manual_seed(0)
    x, y = gpt_batch(64, 72, 128)  # N * sqrt(V) = 9216 * 8 > 65504
    grads = {}
    for kinds in ((), ("loss", "norm", "softmax")):
        us = unit_scale(GPT(vocab=64, d=16, layers=1, heads=2, max_len=128), (x, y))
        half_precision(us, torch.float16, kinds=kinds)
        us(x, y).backward()
        grads[kinds] = all(torch.isfinite(p.grad).all() for p in us.parameters())
    assert grads[()] is False
    assert grads[("loss", "norm", "softmax")] is True


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_unit_scaled_gpt_trains_in_half_without_grad_scaler(dtype):
    x, y = gpt_batch(64, 8, 32)
    us = half_precision(unit_scale(_gpt(), (x, y)), dtype)
    opt = MasterWeights(us.parameters(), torch.optim.AdamW, lr=3e-2, weight_decay=0.0)
    losses = []
    for _ in range(10):
        loss = us(x, y)
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in us.parameters())
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert all(p.dtype == dtype for p in us.parameters())
    assert losses[-1] < losses[0] - 0.5, losses


def test_master_weights_keep_small_updates():
    p = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    opt = MasterWeights([p], torch.optim.SGD, lr=1e-3)
    for _ in range(10):
        p.grad = torch.ones_like(p)
        opt.step()
    # each update (1e-3) is below bf16's spacing at 1 (2^-7); only the float32 master accumulates them
    torch.testing.assert_close(opt.master[0], torch.full((4,), 0.99))
    assert p.dtype == torch.bfloat16 and p[0].item() == pytest.approx(0.99, abs=4e-3)


def test_half_precision_errors():
    with pytest.raises(UnitScaleError, match="no plan yet"):
        half_precision(unit_scale(_gpt()), torch.float16)
    with pytest.raises(UnitScaleError, match="float16 or bfloat16"):
        half_precision(unit_scale(_gpt(), gpt_batch(64, 2, 32)), torch.float64)
    with pytest.raises(UnitScaleError, match="captured model"):
        half_precision(torch.nn.Linear(2, 2), torch.float16)
