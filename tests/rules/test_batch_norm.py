"""Batch-norm layers traced by torch.fx: the tracer writes each as ``batch_norm_layer(bn, x, bn.weight, bn.bias)``, so
that planning sees the gain and bias as nodes and gives their gradients factors of their own. Kept as one module
call, their gradients took the output's factor: 14-240 times unit in the ResNet of ``benchmarks/free_scaling.py``,
27% of torchvision ResNet-18's vectors in [1/2, 2] (``benchmarks/param_grads.py``)."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fixtures.families import BasicBlock
from helpers import gradient_cosines, rms
from unit_scale_fx import unit_scale
from unit_scale_fx.analysis.equivalence import assert_equivalent
from unit_scale_fx.capture import symbolic_capture
from unit_scale_fx.layers import batch_norm_layer


class ResNet(nn.Module):
    """The ResNet of ``benchmarks/free_scaling.py`` at a smaller width."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.blocks = nn.Sequential(BasicBlock(width, width, 1), BasicBlock(width, 2 * width, 2),
                                    BasicBlock(2 * width, 2 * width, 1))
        self.fc = nn.Linear(2 * width, 10)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(self.stem(x), 2)
        h = F.adaptive_avg_pool2d(self.blocks(h), 1).flatten(1)
        return F.cross_entropy(self.fc(h), y)


def _batch(seed: int, n: int = 16) -> tuple:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def _norm_vectors(model: nn.Module) -> dict[str, float]:
    bns = {k for k, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    return {k: rms(p.grad) for k, p in model.named_parameters() if k.rpartition(".")[0] in bns}


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("track", [True, False])
def test_batch_norm_layer_is_the_layer(momentum, track):
    """``batch_norm_layer(bn, x, bn.weight, bn.bias)`` is ``bn(x)``: outputs, gradients and every buffer, in training
    and in evaluation (a cumulative average for ``momentum=None``; no statistics without ``track_running_stats``)."""
    torch.manual_seed(0)
    a = nn.BatchNorm2d(4, momentum=momentum, track_running_stats=track)
    with torch.no_grad():
        a.weight.uniform_(0.5, 2.0)
        a.bias.normal_()
    b = copy.deepcopy(a)
    for training in (True, True, False):
        a.train(training), b.train(training)
        x = torch.randn(3, 4, 5, 5, requires_grad=True)
        y = torch.randn(3, 4, 5, 5)
        out_a, out_b = a(x), batch_norm_layer(b, x, b.weight, b.bias)
        ga = torch.autograd.grad((out_a * y).sum(), (x, a.weight, a.bias))
        gb = torch.autograd.grad((out_b * y).sum(), (x, b.weight, b.bias))
        assert torch.equal(out_a, out_b)
        assert all(torch.equal(u, v) for u, v in zip(ga, gb))
        assert all(torch.equal(u, v) for u, v in zip(a.buffers(), b.buffers()))
    with pytest.raises(ValueError):  # the layer's own check of the input's dimensions
        batch_norm_layer(b, torch.randn(3, 4), b.weight, b.bias)


def test_the_tracer_writes_gain_and_bias_as_nodes():
    gm = symbolic_capture(ResNet())
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is batch_norm_layer]
    assert len(calls) == 8 and not [n for n in gm.graph.nodes if n.op == "call_module"]
    for n in calls:
        bn, _, w, b = n.args
        assert isinstance(bn, fx.Node) and bn.op == "get_attr"
        assert (w.op, w.target, b.op, b.target) == ("get_attr", f"{bn.target}.weight", "get_attr", f"{bn.target}.bias")
    assert calls[0].meta["nn_module_stack"]  # where it came from, for reports
    assert [n.name for n in calls][:2] == ["stem_1", "blocks_0_bn1"]


def test_batch_norm_gains_and_biases_get_unit_gradients():
    torch.manual_seed(0)
    us = unit_scale(ResNet(), _batch(0), unsupported="error")
    us(*_batch(1)).backward()
    vectors = _norm_vectors(us)
    assert len(vectors) == 16
    inside = [k for k, v in vectors.items() if 0.5 <= v <= 2.0]
    assert len(inside) >= 9, vectors  # 0 of 16 as a module call (8 to 190)
    # up to 6.0 without the gains' coherence with their values (Scales.value_grad_gain): the three gains before a
    # residual add whose ReLU feeds the pooled readout. What is left above 2 there (2.1-2.7) is the readout's
    # gradient shared across the batch's samples, not only across a sample's positions (benchmarks/README.md)
    assert all(1 / 3 <= v <= 3.0 for v in vectors.values()), vectors
    cos = gradient_cosines(us, *_batch(2))
    assert min(cos.values()) > 0.9999, min(cos.values())


@pytest.mark.parametrize("hooks", [False, True])
def test_fused_code_computes_the_graph(hooks):
    """The generated code (batch norms fused with their input, output, gain and bias scales) against the graph run
    node by node (every scale a separate op): outputs, every gradient and the running statistics. Under saved-tensor
    hooks the fused batch norm is an ``autograd.Function`` instead of native ops."""
    torch.manual_seed(0)
    us = unit_scale(ResNet(), _batch(0), unsupported="error")
    assert "weight_scale" in us.code and "bias_scale" in us.code
    ref = copy.deepcopy(us)
    for step in range(2):
        x, y = _batch(3 + step)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t) if hooks else contextlib.nullcontext():
            out = us(x, y)
        out_ref = fx.Interpreter(ref).run(x, y)
        out.backward(), out_ref.backward()
        torch.testing.assert_close(out, out_ref)
        for (k, p), q in zip(us.named_parameters(), ref.parameters()):  # the same up to float32 rounding
            assert float((p.grad - q.grad).norm() / q.grad.norm()) < 1e-5, k
        for u, v in zip(us.buffers(), ref.buffers()):
            torch.testing.assert_close(u, v)


def test_scales_erased_the_model_is_the_original_in_training_and_evaluation():
    torch.manual_seed(0)
    model = ResNet()
    us = unit_scale(copy.deepcopy(model), _batch(0))
    assert_equivalent(model, us, *_batch(1))
    model.eval(), us.eval()
    assert_equivalent(model, us, *_batch(1))
