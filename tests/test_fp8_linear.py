"""The real-FP8 linear path (torch._scaled_mm with unit scales)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from unit_scale_fx import unit_scale
from unit_scale_fx.lowp.fp8_linear import fp8_linear, fp8_supported, use_fp8_linear
from unit_scale_fx.examples import GPT, gpt_batch

E4, E5 = torch.float8_e4m3fn, torch.float8_e5m2


def _check_against_rounded_reference(device: str, dtype: torch.dtype, m: int) -> None:
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(m, 64, generator=g).to(device, dtype).requires_grad_()
    w = torch.randn(32, 64, generator=g).to(device, dtype).requires_grad_()
    b = torch.randn(32, generator=g).to(device, dtype).requires_grad_()
    gy = torch.randn(m, 32, generator=g).to(device, dtype)
    y = fp8_linear(x, w, b)
    y.backward(gy)
    qx, qw, qg = (t.detach().to(f).float() for t, f in ((x, E4), (w, E4), (gy, E5)))
    tol = dict(rtol=2e-2, atol=2e-2) if dtype != torch.float32 else dict(rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(y.float(), qx @ qw.T + b.detach().float(), **tol)
    torch.testing.assert_close(x.grad.float(), qg @ qw, **tol)
    torch.testing.assert_close(w.grad.float(), qg.T @ qx, **tol)
    torch.testing.assert_close(b.grad.float(), gy.float().sum(0), **tol)


@pytest.mark.skipif(not fp8_supported("cpu"), reason="this torch build has no CPU FP8 _scaled_mm")
@pytest.mark.parametrize("m", [48, 50])  # 50: not a multiple of 16 -> the float32 fallback
def test_fp8_linear_matches_rounded_matmuls_cpu(m):
    _check_against_rounded_reference("cpu", torch.float32, m)


@pytest.mark.skipif(not torch.cuda.is_available() or not fp8_supported("cuda"), reason="needs a CUDA GPU with FP8")
def test_fp8_linear_matches_rounded_matmuls_cuda():
    _check_against_rounded_reference("cuda", torch.bfloat16, 64)


def test_use_fp8_linear_swaps_linears_only():
    x, y = gpt_batch(64, 2, 16)
    us = unit_scale(GPT(vocab=64, d=32, layers=1, heads=2, max_len=16), (x, y))
    n_lin = sum(1 for n in us.graph.nodes if n.target is F.linear)
    assert use_fp8_linear(us) == n_lin == 5
    assert not any(n.target is F.linear for n in us.graph.nodes)
    if fp8_supported("cpu"):
        loss = us(x, y)
        loss.backward()
        assert torch.isfinite(loss)
        assert all(torch.isfinite(p.grad).all() for p in us.parameters())


@pytest.mark.skipif(not torch.cuda.is_available() or not fp8_supported("cuda"), reason="needs a CUDA GPU with FP8")
def test_unit_scaled_gpt_trains_in_real_fp8_cuda():
    from unit_scale_fx.lowp.precision import MasterWeights, half_precision

    torch.manual_seed(0)
    x, y = (t.cuda() for t in gpt_batch(64, 8, 64))
    us = unit_scale(GPT(vocab=64, d=64, layers=2, heads=4, max_len=64).cuda(), (x, y))
    half_precision(us, torch.bfloat16)
    use_fp8_linear(us)
    opt = MasterWeights(us.parameters(), torch.optim.AdamW, lr=1e-2)
    losses = []
    for _ in range(30):
        loss = us(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.5
