"""Bad or unusual input: a clear ``UnitScaleError`` or a documented behaviour, and the user's model unchanged."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from unit_scale_fx import UnitScaleError, unit_scale
from unit_scale_fx.analysis.validity import gradient_cosines


class MLP(nn.Module):
    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.a = nn.Linear(d, 16)
        self.b = nn.Linear(16, d)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(self.b(F.gelu(self.a(x))) + x, y)


class Snapshot:
    """Everything about a model that unit_scale must leave alone."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.state = {k: (v.clone() if v.device.type != "meta" else v) for k, v in model.state_dict().items()}
        self.flags = [(n, p.requires_grad, p.dtype, p.device) for n, p in model.named_parameters()]
        self.modes = [(n, m.training) for n, m in model.named_modules()]

    def assert_unchanged(self) -> None:
        m = self.model
        assert list(m.state_dict()) == list(self.state)
        for k, v in m.state_dict().items():
            if v.device.type != "meta":
                assert torch.equal(v, self.state[k]), k
        assert [(n, p.requires_grad, p.dtype, p.device) for n, p in m.named_parameters()] == self.flags
        assert [(n, mod.training) for n, mod in m.named_modules()] == self.modes
        assert all(p.grad is None for p in m.parameters())


def _xy(d: int = 8, n: int = 8, dtype=torch.float32):
    return torch.randn(n, d, dtype=dtype), torch.randn(n, d, dtype=dtype)


def _assert_clear(err: UnitScaleError) -> None:
    assert err.what and err.where and err.fix


def _valid(us, *inputs) -> None:
    cos = gradient_cosines(us, *inputs)
    assert cos and min(cos.values()) > 0.999, cos


# -- refused, with a clear error -------------------------------------------------------------

@pytest.mark.parametrize("obj", [lambda x: x, torch.randn(3), "model", None])
def test_not_a_module(obj):
    with pytest.raises(UnitScaleError) as e:
        unit_scale(obj)
    _assert_clear(e.value)
    assert "nn.Module" in e.value.what


def test_no_floating_point_parameters():
    class IntModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.table = nn.Parameter(torch.arange(4), requires_grad=False)

        def forward(self, i: torch.Tensor) -> torch.Tensor:
            return self.table[i]

    m = IntModel()
    snap = Snapshot(m)
    with pytest.raises(UnitScaleError) as e:
        unit_scale(m)
    _assert_clear(e.value)
    assert "floating-point" in e.value.what
    snap.assert_unchanged()


def test_lazy_layers_not_yet_initialised():
    """torch's own error (from deep inside a copy) before; now what, where and how to get past it."""
    m = nn.Sequential(nn.Linear(4, 8), nn.LazyBatchNorm1d(), nn.ReLU(), nn.LazyLinear(2))
    with pytest.raises(UnitScaleError) as e:
        unit_scale(m, (torch.randn(16, 4),))
    _assert_clear(e.value)
    assert "1.weight" in e.value.what and "run the model once" in e.value.fix
    m(torch.randn(16, 4))  # the fix: once initialised, it is unit-scaled
    us = unit_scale(m, (torch.randn(16, 4),))
    assert us(torch.randn(16, 4)).shape == (16, 2)


def test_already_unit_scaled():
    x, y = _xy()
    us = unit_scale(MLP(), (x, y))
    snap = Snapshot(us)
    with pytest.raises(UnitScaleError) as e:
        unit_scale(us)
    _assert_clear(e.value)
    assert "already unit-scaled" in e.value.what and "replan" in e.value.fix
    snap.assert_unchanged()


def test_mixed_meta_and_real_devices():
    m = MLP()
    m.b.to("meta")
    snap = Snapshot(m)
    with pytest.raises(UnitScaleError) as e:
        unit_scale(m, _xy())
    _assert_clear(e.value)
    assert "meta" in e.value.what
    snap.assert_unchanged()


def test_meta_model_with_real_inputs():
    with torch.device("meta"):
        m = MLP()
    with pytest.raises(UnitScaleError) as e:
        unit_scale(m, _xy())
    _assert_clear(e.value)
    assert "meta" in e.value.what and "to_empty" in e.value.fix


# -- accepted, with documented behaviour -----------------------------------------------------

def test_meta_model_with_meta_inputs_is_analysed_without_memory():
    """Shapes-only analysis: a plan on the meta device, nothing allocated."""
    with torch.device("meta"):
        m = MLP()
    snap = Snapshot(m)
    x, y = (t.to("meta") for t in _xy())
    us = unit_scale(m, (x, y))
    assert all(p.device.type == "meta" for p in us.parameters())
    assert us.scale_plan() and {r.rule for r in us.scale_plan().values()} >= {"matmul"}
    snap.assert_unchanged()


def test_integer_and_boolean_inputs():
    class Masked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.fc = nn.Linear(8, 8)

        def forward(self, idx: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            h = self.fc(self.emb(idx)) * mask.unsqueeze(-1)
            return h.pow(2).mean()

    m = Masked()
    snap = Snapshot(m)
    idx, mask = torch.randint(0, 10, (4, 6)), torch.rand(4, 6) > 0.5
    us = unit_scale(m, (idx, mask))
    assert torch.isfinite(us(idx, mask))
    _valid(us, idx, mask)
    snap.assert_unchanged()


def test_integer_input_cast_to_float():
    class Cast(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x.float()).pow(2).mean()

    x = torch.randint(0, 5, (6, 3))
    us = unit_scale(Cast(), (x,))
    _valid(us, x)


def test_in_place_ops_are_made_out_of_place():
    class InPlace(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(8, 8)
            self.b = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            h = F.relu(self.a(x), inplace=True)
            h += x
            h.mul_(2.0)
            return F.mse_loss(self.b(h), y)

    m = InPlace()
    snap = Snapshot(m)
    x, y = _xy()
    x0 = x.clone()
    us = unit_scale(m, (x, y))
    assert not any(str(n.target).endswith("_") and n.op == "call_method" for n in us.graph.nodes)
    out = us(x, y)
    assert torch.isfinite(out)
    assert torch.equal(x, x0)  # the caller's input is not modified either
    _valid(us, x, y)
    snap.assert_unchanged()


def test_frozen_parameters_stay_frozen():
    """requires_grad=False is kept (no gradient); like every weight, the frozen one is re-initialised to
    unit RMS in the copy unless init_weights=False, which keeps its values."""
    m = MLP()
    m.a.weight.requires_grad_(False)
    snap = Snapshot(m)
    x, y = _xy()
    us = unit_scale(m, (x, y))
    assert not us.a.weight.requires_grad
    us(x, y).backward()
    assert us.a.weight.grad is None and us.b.weight.grad is not None
    assert float(us.a.weight.pow(2).mean().sqrt()) == pytest.approx(1.0, rel=1e-5)
    _valid(us, x, y)
    kept = unit_scale(m, (x, y), init_weights=False)
    assert torch.equal(kept.a.weight, m.a.weight) and kept.a.weight is not m.a.weight
    snap.assert_unchanged()


def test_eval_mode_is_kept():
    m = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.5), nn.GELU(), nn.Linear(16, 8)).eval()
    snap = Snapshot(m)
    x = torch.randn(8, 8)
    us = unit_scale(m, (x,))
    assert not us.training and not any(mod.training for mod in us.modules())
    torch.testing.assert_close(us(x), us(x))  # dropout off
    _valid(us, x)
    us.train()
    assert us.training
    snap.assert_unchanged()


def test_batchnorm_running_stats_are_not_touched_by_planning():
    class BN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(8, 8)
            self.bn = nn.BatchNorm1d(8)
            self.b = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return F.mse_loss(self.b(self.bn(self.a(x))), y)

    m = BN()
    snap = Snapshot(m)
    x, y = _xy()
    us = unit_scale(m, (x, y))
    assert int(us.bn.num_batches_tracked) == 0 and torch.equal(us.bn.running_mean, torch.zeros(8))
    us(x, y)  # a training step updates them, as in the original model
    assert int(us.bn.num_batches_tracked) == 1 and us.bn.running_mean.abs().sum() > 0
    stats = {k: v.clone() for k, v in us.state_dict().items() if k.startswith("bn.")}
    us.replan(x, y)  # replanning neither
    for k, v in stats.items():
        assert torch.equal(us.state_dict()[k], v), k
    _valid(us, x, y)
    snap.assert_unchanged()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_parameters(dtype):
    """Parameters and activations keep their dtype; planning measures in float32."""
    m = MLP().to(dtype)
    snap = Snapshot(m)
    x, y = _xy(dtype=dtype)
    us = unit_scale(m, (x, y))
    assert all(p.dtype == dtype for p in us.parameters())
    out = us(x, y)
    assert out.dtype == dtype and torch.isfinite(out)
    out.backward()
    assert all(p.grad.dtype == dtype and torch.isfinite(p.grad).all() for p in us.parameters())
    cos = gradient_cosines(us, x, y)
    assert min(cos.values()) > (0.999 if dtype == torch.float16 else 0.99), cos  # bf16: 8-bit mantissa
    snap.assert_unchanged()


def test_model_without_parameters():
    """Nothing to re-initialise; activations are still scaled."""
    class Fn(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.gelu(x).sum()

    x = torch.randn(4, 8)
    us = unit_scale(Fn(), (x,))
    assert torch.isfinite(us(x))


class _ConvNet(nn.Module):
    """Convolution, batch norm, residual add: the fused ops that set backward factors through what autograd saved."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.b1(self.c1(x)))
        h = F.relu(h + self.b2(self.c2(h)))
        return self.fc(h.mean((2, 3)))


def _conv_net():
    torch.manual_seed(0)
    model, x = _ConvNet(), torch.randn(4, 3, 8, 8)
    return model, x, unit_scale(model, (x,))


def test_second_derivatives_raise_and_first_derivatives_do_not():
    """``create_graph=True`` through a unit-scaled model raises a ``UnitScaleError`` that says what and how
    to get past it (its backward is rescaled, and its fused ops set backward factors through saved
    tensors: a second derivative would be wrong, silently). First-order gradients are unaffected."""
    model, x, us = _conv_net()
    xg = x.clone().requires_grad_()
    with pytest.raises(UnitScaleError, match="create_graph=True") as err:
        torch.autograd.grad(us(xg).square().mean(), xg, create_graph=True)
    assert "where: _ConvNet" in str(err.value) and "fix:" in str(err.value)
    g1, = torch.autograd.grad(us(xg).square().mean(), xg)
    us(xg).square().mean().backward()
    torch.testing.assert_close(xg.grad, g1, rtol=0, atol=0)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in us.parameters())


@pytest.mark.parametrize("inner", ["eager", "callable"])
def test_compiled_second_derivatives_raise_where_the_fused_ops_run_eagerly(inner):
    """The compile backend with an inner compiler that runs the rewritten graph eagerly (``"eager"``, or a
    callable handed the graph) runs the fused ops, whose backward is first-order only: ``create_graph=True``
    raises a ``UnitScaleError`` there too, naming the graph, and first-order gradients still flow. (AOT
    autograd, under every named compiler but ``"eager"``, raises at a double backward itself.)"""
    import copy

    from unit_scale_fx import backend

    model, x, us = _conv_net()
    inner_fn = "eager" if inner == "eager" else (lambda gm, example_inputs: gm.forward)
    torch._dynamo.reset()
    compiled = torch.compile(copy.deepcopy(model), backend=backend(inner=inner_fn))
    xg = x.clone().requires_grad_()
    with pytest.raises(UnitScaleError, match="create_graph=True") as err:
        torch.autograd.grad(compiled(xg).square().mean(), xg, create_graph=True)
    assert "where: unit_scale backend, graph 0" in str(err.value)
    g1, = torch.autograd.grad(compiled(xg).square().mean(), xg)
    assert torch.isfinite(g1).all() and g1.abs().sum() > 0
    torch._dynamo.reset()


def test_first_order_check_leaves_the_callers_graph_alone():
    """An output that is an input returned as it is keeps its own autograd node unhooked (the caller's
    second derivatives through it work); checkpointing the whole model call (reentrant, which runs its
    backward inside another backward) keeps first-order gradients working."""
    from torch.utils.checkpoint import checkpoint
    from unit_scale_fx.scale import first_order_only

    w = torch.randn(4, requires_grad=True)
    y = w * 2.0
    mine = (w * 3.0).sin()
    first_order_only((mine, y), ((y,), {}), "M")  # ``y`` came in, ``mine`` was made inside
    g, = torch.autograd.grad(y.pow(3).sum(), w, create_graph=True)
    gg, = torch.autograd.grad(g.sum(), w)
    torch.testing.assert_close(gg, 48.0 * w.detach())  # d/dw of sum(d/dw sum((2w)^3)) = d/dw sum(24 w^2)
    with pytest.raises(UnitScaleError, match="create_graph=True"):
        torch.autograd.grad(mine.sum(), w, create_graph=True)
    model, x, cs = _conv_net()
    xg = x.clone().requires_grad_()
    ref, = torch.autograd.grad(cs(xg).square().mean(), xg)
    out = checkpoint(cs, xg, use_reentrant=True)
    out.square().mean().backward()
    torch.testing.assert_close(xg.grad, ref)


def test_module_hooks_are_named_in_a_warning():
    # a feature-extraction hook is traced into the graph once; the unit-scaled model never calls it again, so
    # what it stores stays empty: say so instead of failing silently
    stored = {}
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    model[0].register_forward_hook(lambda mod, inp, out: stored.__setitem__("h", out))
    with pytest.warns(UserWarning, match=r"have hooks \(0\)\..*side effects elsewhere"):
        us = unit_scale(model, (torch.randn(4, 8),))
    stored.clear()
    us(torch.randn(4, 8))
    assert not stored  # the limitation the warning names
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no hooks, no warning
        unit_scale(nn.Sequential(nn.Linear(8, 4)), (torch.randn(4, 8),))


def test_a_model_that_cannot_be_copied_is_a_clear_error():
    # torch.nn.utils.weight_norm (the legacy one) keeps a non-leaf weight that deepcopy refuses: a bare RuntimeError
    # from inside copy.deepcopy before; now what failed and the two ways out
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # weight_norm's deprecation, the hooks warning
        model = nn.Sequential(torch.nn.utils.weight_norm(nn.Linear(8, 16)), nn.ReLU(), nn.Linear(16, 4))
        with pytest.raises(UnitScaleError, match="cannot be copied") as err:
            unit_scale(model, (torch.randn(4, 8),))
        assert "inplace=True" in str(err.value) and "parametrizations" in str(err.value)
        us = unit_scale(model, (torch.randn(4, 8),), inplace=True)  # the way out works
        us(torch.randn(4, 8)).sum().backward()
        assert us.get_parameter("0.weight_v").grad is not None
