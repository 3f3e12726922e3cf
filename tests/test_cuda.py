"""The fused ops' eager native paths on a CUDA device: factors held as 0-dim CPU tensors (``scale._factor``,
``scale._fresh``) multiply CUDA tensors, and backward factors set after forward (``scale._set_saved``)
reach the CUDA kernels. Run where a GPU is (CI has none: they skip there, and the reason says so)."""

from __future__ import annotations

import copy

import pytest
import torch

from passes.test_fold_scales import MODELS, _seeded_step, _unfused
from unit_scale_fx import unit_scale
from unit_scale_fx.scale import scale, scaled_add, scaled_batch_norm, scaled_conv, scaled_layer_norm

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _to(batch: tuple, device: str, dtype: torch.dtype) -> tuple:
    return tuple(t.to(device, dtype) if t.is_floating_point() else t.to(device) for t in batch)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_fused_code_on_cuda_computes_the_graph_with_its_scales(name):
    """On CUDA in float64 the generated code (native fused ops) is the graph's function with its scales, one
    op per node: the same loss, gradients and batch-norm statistics."""
    model, batch = MODELS[name]()
    us = unit_scale(copy.deepcopy(model), batch).double().cuda()
    plain = _unfused(us)
    batch = _to(batch, "cuda", torch.float64)
    a, b = _seeded_step(us, batch), _seeded_step(plain, batch)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=0)
    grads = dict(plain.named_parameters())
    for k, p in us.named_parameters():
        assert p.grad is not None and p.grad.is_cuda, k
        torch.testing.assert_close(p.grad, grads[k].grad, rtol=1e-8, atol=1e-12, msg=k)
    bufs = dict(plain.named_buffers())
    for k, t in us.named_buffers():
        torch.testing.assert_close(t, bufs[k], rtol=1e-10, atol=0, msg=k)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_unit_scaled_model_on_cuda_matches_it_on_the_cpu(name):
    """The same unit-scaled model (float64) on CUDA and on the CPU: the same loss and gradients."""
    model, batch = MODELS[name]()
    us = unit_scale(copy.deepcopy(model), batch).double()
    gpu = copy.deepcopy(us).cuda()
    a = _seeded_step(us, _to(batch, "cpu", torch.float64))
    b = _seeded_step(gpu, _to(batch, "cuda", torch.float64))
    torch.testing.assert_close(b.cpu(), a, rtol=1e-9, atol=0)
    grads = dict(us.named_parameters())
    for k, p in gpu.named_parameters():
        torch.testing.assert_close(p.grad.cpu(), grads[k].grad, rtol=1e-7, atol=1e-12, msg=k)


def _chain_and_fused(fused, chain, inputs: list[torch.Tensor]) -> None:
    """``fused`` and ``chain`` (the same function as separate scales) on CUDA float64: the same output and
    input gradients."""
    xs = [t.detach().cuda().double().requires_grad_() for t in inputs]
    ys = [t.detach().cuda().double().requires_grad_() for t in inputs]
    a, b = fused(*xs), chain(*ys)
    g = torch.randn_like(a)
    a.backward(g)
    b.backward(g)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    for u, v in zip(xs, ys):
        torch.testing.assert_close(u.grad, v.grad, rtol=1e-12, atol=1e-14)


def test_native_conv_on_cuda_is_the_chain_of_scales():
    """An input gradient with a factor and a weight smaller than the input: every factor in the weight copy."""
    x, w, b = torch.randn(4, 3, 12, 12), torch.randn(5, 3, 3, 3), torch.randn(5)
    s = dict(x_scale=(1.0, 0.3), weight_scale=(1.2, 0.7), bias_scale=(0.9, 1.6), out_scale=(1.0, 0.8))

    def chain(x, w, b):
        c = torch.conv2d(scale(x, 1.0, 0.3), scale(w, 1.2, 0.7), scale(b, 0.9, 1.6), padding=1)
        return scale(c, 1.0, 0.8)

    _chain_and_fused(lambda x, w, b: scaled_conv(x, w, b, 1, 1, **s), chain, [x, w, b])


def test_native_batch_norm_on_cuda_is_the_chain_of_scales():
    """Training mode: the output, gradients and running statistics of the chain."""
    bn_a, bn_b = torch.nn.BatchNorm2d(5).cuda().double(), torch.nn.BatchNorm2d(5).cuda().double()
    with torch.no_grad():
        for m in (bn_a, bn_b):
            m.weight.copy_(torch.linspace(0.5, 1.5, 5))
            m.bias.copy_(torch.linspace(-0.2, 0.2, 5))
    _chain_and_fused(lambda x: scaled_batch_norm(bn_a, x, x_scale=(0.25, 1.5), out_scale=(1.3, 0.6)),
                     lambda x: scale(bn_b(scale(x, 0.25, 1.5)), 1.3, 0.6), [torch.randn(4, 5, 6, 6)])
    for k in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(bn_a, k), getattr(bn_b, k), rtol=1e-12, atol=1e-14)
    for k in ("weight", "bias"):
        torch.testing.assert_close(getattr(bn_a, k).grad, getattr(bn_b, k).grad, rtol=1e-12, atol=1e-14)


def test_native_add_and_layer_norm_on_cuda_are_the_chain_of_scales():
    """A residual add whose skip alone has factors (one ``addcmul`` with a 0-dim CPU factor), and a layer
    norm with backward factors in its gain."""
    _chain_and_fused(lambda a, b: scaled_add(a, b, b_scale=(0.7, 1.9)),
                     lambda a, b: a + scale(b, 0.7, 1.9), [torch.randn(6, 8), torch.randn(6, 8)])
    s = dict(x_scale=(1.0, 0.4), weight_scale=(1.0, 1.7), bias_scale=(1.0, 0.6), out_scale=(1.2, 0.9))
    _chain_and_fused(
        lambda x, w, b: scaled_layer_norm(x, 8, w, b, **s),
        lambda x, w, b: scale(torch.nn.functional.layer_norm(scale(x, 1.0, 0.4), (8,), scale(w, 1.0, 1.7),
                                                             scale(b, 1.0, 0.6)), 1.2, 0.9),
        [torch.randn(6, 8), torch.randn(8), torch.randn(8)])
