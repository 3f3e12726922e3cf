"""Two things a model's own code does with what the scaled ops give it, which used to fail with an error from
inside autograd or functorch:

* **``torch.vmap`` in the forward** (the associative scan of Hugging Face's Mamba): planning measured values that
  were batched wrappers (``vmap: ... data-dependent control flow``), and the scales, Python ``autograd.Function`` s
  without ``setup_context``, could not run under the transform.
* **Writes into a returned tensor** (``hidden_states[mask] = embedding`` in Wav2Vec2, on the tensor the graph before
  a graph break returned): autograd forbids writing in place into a view a custom ``autograd.Function`` returned,
  and the fused linear returned its GEMM's result as a view; a backward-only ``scale`` returns a view of its input.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx
import torch.nn as nn

from helpers import rms
from unit_scale_fx import backend, unit_scale
from unit_scale_fx.passes.stats import Stats
from unit_scale_fx.scale import scale, scaled_linear


def test_a_scale_runs_under_vmap_with_its_two_factors():
    x = torch.randn(4, 8, requires_grad=True)
    y = torch.vmap(lambda t: scale(t, 2.0, 3.0))(x)
    torch.testing.assert_close(y, 2.0 * x.detach())
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(x.grad, torch.full_like(x, 3.0))


def test_the_fused_linear_runs_under_vmap_as_its_chain_of_scales():
    x, w = torch.randn(3, 5, 8, requires_grad=True), torch.randn(6, 8, requires_grad=True)
    kw = dict(x_scale=(1.0, 0.5), weight_scale=(1.0, 0.25), out_scale=(2.0, 1.0))
    y = torch.vmap(lambda t: scaled_linear(t, w, **kw))(x)
    g = torch.randn_like(y)
    y.backward(g)
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y2 = scaled_linear(x2, w2, **kw)
    y2.backward(g)
    torch.testing.assert_close(y, y2)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(w.grad, w2.grad)


def test_planning_measures_a_batched_value_as_the_values_it_holds():
    x = torch.randn(6, 10) * 3.0
    seen = []
    torch.vmap(lambda t: seen.append(Stats().rms(t)) or t)(x)
    assert math.isclose(seen[0], rms(x), rel_tol=1e-2)


class _Scan(nn.Module):
    """Gates from two projections, combined by a product under ``torch.vmap`` (as an associative scan combines)."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.a, self.b, self.out = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        h = torch.vmap(lambda u, v: u * v + v)(a, b)
        return self.out(h).pow(2).mean()


def test_a_model_with_vmap_in_its_forward_compiles_and_trains_unit_scaled():
    torch.manual_seed(0)
    model = _Scan()
    be = backend(inner="eager")
    compiled = torch.compile(model, backend=be)
    x = torch.randn(8, 12, 16)
    compiled(x).backward()
    assert be.graphs, "the backend was never called"
    assert not [u.op for g in be.graphs for u in g.unsupported]  # vmap's entry and exit keep values
    grads = {k: rms(p.grad) for k, p in model.named_parameters() if p.dim() == 2}
    assert all(0.5 <= g <= 2.0 for g in grads.values()), grads


class _Masked(nn.Module):
    """A projection whose output the model then writes into in place, after a graph break (Wav2Vec2's masking)."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.proj, self.out = nn.Linear(d, d), nn.Linear(d, d)
        self.embed = nn.Parameter(torch.randn(d))

    def forward(self, x, mask):
        h = self.proj(x)
        torch._dynamo.graph_break()
        h[mask] = self.embed
        return self.out(h).pow(2).mean()


def test_writing_into_a_tensor_a_compiled_graph_returned_works_and_keeps_the_gradient_direction():
    torch.manual_seed(0)
    model = _Masked()
    x, mask = torch.randn(4, 10, 16), torch.rand(4, 10) < 0.3
    compiled = torch.compile(model, backend=backend(inner="eager"))
    compiled(x, mask).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert 0.5 <= rms(model.proj.weight.grad) <= 2.0


def test_writing_into_what_a_unit_scaled_model_returns():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
    us = unit_scale(model, (torch.randn(4, 10, 16),))
    y = us(torch.randn(4, 10, 16))
    y[:, 0] = 0.0  # raised "a view ... created inside a custom Function ... is being modified inplace"
    y.sum().backward()
    bias = dict(us.named_parameters())["2.bias"].grad
    # the true gradient is the same for every output feature (36 positions kept): a positive multiple of it
    assert (bias > 0).all() and torch.allclose(bias, bias[0].expand_as(bias))


def test_a_returned_backward_only_scale_is_a_copy():
    """In the generated code, a backward-only ``scale`` the graph returns, itself or through views, is
    :func:`scale_returned`: a copy the caller may write into; with the same factors forward and backward."""
    from unit_scale_fx.passes.fold_scales import copy_returned_views, fuse_ops
    from unit_scale_fx.scale import scale_returned

    g = fx.Graph()
    x = g.placeholder("x")
    s = g.call_function(scale, (x, 1.0, 0.5))
    v = g.call_method("view", (s, -1))
    t = g.call_function(scale, (x, 2.0, 0.5))  # a forward factor: a new tensor already
    g.output((v, t))
    assert fuse_ops(g) == 1 and copy_returned_views(g) == 0
    assert s.target is scale_returned and t.target is scale
    a = torch.randn(3, 4, requires_grad=True)
    out = fx.GraphModule(nn.Module(), g)(a)[0]
    assert not out._base._is_view() and out._base is not a
    out[0] = 1.0
    out.sum().backward()
    expected = torch.full_like(a, 0.5)
    expected[0, 0] = 0.0  # overwritten
    torch.testing.assert_close(a.grad, expected)
