"""End to end: unit_scale on GPT-style models and a residual MLP."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import band_fractions, gradient_cosines, rms, true_gradient_copy
from unit_scale_fx import UnitScaleConfig, UnitScaledModule, UnitScaleError, unit_scale
from unit_scale_fx.analysis.recorder import record_matmul_operands
from unit_scale_fx.examples import GPT, ResidualMLP, gpt_batch, mlp_batch
from unit_scale_fx.scale import scale

MODELS = {
    "gpt_gelu_untied": (lambda: GPT(vocab=128, d=64, layers=3, heads=4), lambda s: gpt_batch(128, 4, 32, seed=s)),
    "gpt_gated_tied": (lambda: GPT(vocab=128, d=64, layers=3, heads=4, gated=True, tied=True),
                       lambda s: gpt_batch(128, 4, 32, seed=s)),
    "residual_mlp": (lambda: ResidualMLP(d_in=16, d=64, layers=4, d_out=8), lambda s: mlp_batch(16, 8, 64, seed=s)),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_matmul_operands_are_unit(name):
    make, batch = MODELS[name]
    model = make()
    us = unit_scale(model, batch(0))
    recs = record_matmul_operands(us, *batch(1))  # a fresh batch: scales were planned on another one
    frac = band_fractions(recs)
    assert frac["fwd"] >= 0.9 and frac["bwd"] >= 0.9, frac
    assert all(1 / 8 <= r.rms <= 8 for r in recs), [r for r in recs if not 1 / 8 <= r.rms <= 8]
    # and the original model is far from it (the test can fail)
    assert band_fractions(record_matmul_operands(model, *batch(1)))["bwd"] < 0.5


@pytest.mark.parametrize("constraint", ["potential", "gmean"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_gradients_are_valid(name, constraint):
    make, batch = MODELS[name]
    us = unit_scale(make(), batch(0), constraint=constraint)
    cos = gradient_cosines(us, *batch(1))
    assert len(cos) == len(list(us.parameters()))
    assert min(cos.values()) > 0.999, sorted(cos.items(), key=lambda kv: kv[1])[:3]


def test_validity_check_catches_a_wrong_backward_scale():
    """Negative control: a mismatched scale inside a residual block breaks gradient directions."""
    make, batch = MODELS["gpt_gelu_untied"]
    us = unit_scale(make(), batch(0))
    gelu = next(n for n in us.graph.nodes if n.target is F.gelu)
    s = next(iter(gelu.users))
    assert s.target is scale
    x, f, b = s.args
    s.args = (x, f, b * 10.0)
    us.recompile()
    assert min(gradient_cosines(us, *batch(1)).values()) < 0.999


def test_original_model_untouched_and_names_kept():
    model = GPT(vocab=128, d=64, layers=2, heads=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    idx, tgt = gpt_batch(128, 2, 16)
    us = unit_scale(model)
    loss = us(idx, tgt)
    loss.backward()
    torch.optim.Adam(us.parameters(), lr=1e-3).step()
    assert us.state_dict().keys() == model.state_dict().keys()
    assert list(us.state_dict()) == list(model.state_dict())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())


def test_lazy_planning_at_first_call_and_introspection():
    model = GPT(vocab=128, d=64, layers=2, heads=4)
    us = unit_scale(model)
    assert isinstance(us, UnitScaledModule)
    with pytest.raises(UnitScaleError, match="no scales have been planned"):
        us.scale_plan()
    idx, tgt = gpt_batch(128, 2, 16)
    us(idx, tgt)
    plan = us.scale_plan()
    rules = {r.rule for r in plan.values()}
    assert {"matmul", "embedding", "sdpa", "cross_entropy", "add"} <= rules
    text = us.summary()
    assert "cross_entropy" in text and "grad rms" in text
    # every record predicts / measures its output RMS near 1 (losses excepted)
    checked = 0
    for name, rec in us.scale_plan(all_nodes=True).items():
        if rec.kind not in ("loss", "preserve", "unsupported") and rec.fwd_rms is not None:
            assert 0.5 <= rec.fwd_rms <= 2.0, (name, rec)
            checked += 1
    assert checked >= 10


def test_unit_scaled_gpt_trains():
    make, batch = MODELS["gpt_gelu_untied"]
    us = unit_scale(make(), batch(0))
    opt = torch.optim.Adam(us.parameters(), lr=3e-3)
    idx, tgt = batch(0)
    losses = []
    for _ in range(15):
        loss = us(idx, tgt)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


def test_tau_changes_residual_weights():
    make, batch = MODELS["gpt_gelu_untied"]
    a = unit_scale(make(), batch(0), config=UnitScaleConfig(attn_tau=0.2, mlp_tau=0.6))
    residual = [r for r in a.scale_plan().values() if r.kind == "residual"]
    assert residual
    for r in residual:
        assert "tau=0.2" in r.note or "tau=0.6" in r.note


class WithNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return torch.linalg.vector_norm(self.lin(x), dim=-1, keepdim=True) * self.lin(x)


def test_unsupported_ops_warn_once_listing_them():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        unit_scale(WithNorm(), (torch.randn(4, 8),))
    msgs = [str(w.message) for w in caught if "no unit-scaling rule" in str(w.message)]
    assert len(msgs) == 1 and "linalg_vector_norm" in msgs[0]


def test_unsupported_ops_error_policy():
    with pytest.raises(UnitScaleError, match="no unit-scaling rule") as info:
        unit_scale(WithNorm(), (torch.randn(4, 8),), unsupported="error")
    assert "node_filter" in str(info.value)


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: symbolic tracing cannot follow it
            return self.lin(x).sum()
        return self.lin(-x).sum()


def test_untraceable_model_is_captured_at_the_first_call():
    """torch.fx cannot trace it: unit_scale still returns (the model's own class), and the first call,
    where the inputs are known, captures; a failure there is a UnitScaleError naming the user's line."""
    us = unit_scale(DataDependent(), dynamo_fallback=False)
    assert isinstance(us, DataDependent) and not us.us_planned
    with pytest.raises(UnitScaleError) as info:
        us(torch.randn(4, 8))
    msg = str(info.value)
    assert "neither torch.fx nor torch.export" in msg and "test_api.py" in msg and "fix:" in msg


class ShapeDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        if x.shape[0] > 2:  # Python control flow on a shape: fx cannot trace it, export can
            return self.lin(x).relu().sum()
        return self.lin(x).sum()


def test_untraceable_model_with_example_inputs_is_captured_by_export():
    x = torch.randn(4, 8)
    us = unit_scale(ShapeDependent(), (x,))
    assert us.us_capture == "torch.export"
    assert us.state_dict().keys() == ShapeDependent().state_dict().keys()
    out = us(x)
    out.backward()
    assert us.lin.weight.grad is not None and torch.isfinite(us.lin.weight.grad).all()
    assert {r.rule for r in us.scale_plan().values()} >= {"matmul", "pointwise"}


class ImageAndTokens(nn.Module):
    """An image and token ids in one call; Python control flow on a shape keeps torch.fx out (export captures)."""

    def __init__(self):
        super().__init__()
        self.conv, self.emb, self.lin = nn.Conv2d(3, 8, 3, padding=1), nn.Embedding(16, 8), nn.Linear(8, 8)

    def forward(self, img, ids):
        h = self.conv(img).mean((2, 3)) + self.emb(ids).mean(1)
        if img.shape[0] > 0:
            h = h.relu()
        return self.lin(h).pow(2).mean()


def test_lazy_export_keeps_a_float_inputs_sizes_static_beyond_the_batch():
    """Lazily, each capture exports the batch and every size of an integer input (a sequence length) as
    dynamic, a float input's other sizes (image height and width) as static: symbolic image sizes kept
    torch.export busy for minutes on Swin's window partition (3 s static)."""
    from unit_scale_fx.api import _state

    us = unit_scale(ImageAndTokens())
    us(torch.randn(4, 3, 8, 8), torch.randint(0, 16, (4, 5))).backward()
    (graphs,) = _state(us).graphs.values()
    (g,) = graphs
    img_dims, ids_dims = g.static
    assert img_dims[1:] == (3, 8, 8) and not isinstance(img_dims[0], int), img_dims
    assert not any(isinstance(d, int) for d in ids_dims), ids_dims
    us(torch.randn(2, 3, 8, 8), torch.randint(0, 16, (2, 7)))  # another batch and length: the same graph
    assert len(_state(us).graphs[next(iter(_state(us).graphs))]) == 1
    us(torch.randn(2, 3, 6, 6), torch.randint(0, 16, (2, 7)))  # another image size: captured again
    assert sum(len(v) for v in _state(us).graphs.values()) == 2

class DataDependentResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(16, 64)
        self.fc1 = nn.Linear(64, 256)
        self.fc2 = nn.Linear(256, 64)
        self.out = nn.Linear(64, 4)

    def forward(self, x, y):
        h = self.inp(x)
        if h.mean() > 0:  # data-dependent: a graph break for dynamo, a failure for fx and export
            h = h + self.fc2(torch.relu(self.fc1(h)))
        else:
            h = h - self.fc2(torch.relu(self.fc1(h)))
        return F.mse_loss(self.out(h), y)


class MaskWrite(nn.Module):
    """A branch on a tensor's value (export fails), then a write through a boolean mask after the graph break
    (Wav2Vec2's SpecAugment, ``hidden_states[mask_time_indices] = masked_spec_embed``)."""

    def __init__(self):
        super().__init__()
        self.lin, self.fill = nn.Linear(8, 8), nn.Parameter(torch.randn(8))

    def forward(self, x):
        h = self.lin(x)
        if x.max() > 100:
            h = 2 * h
        h[x[..., 0] > 0] = self.fill
        return h.sum()


class _Alias(torch.autograd.Function):
    """An identity that returns a view of its input (what autograd then forbids writing into)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g


class AliasWrite(MaskWrite):
    """MaskWrite's write into the view a custom ``autograd.Function`` returned: dynamo fails on it as eager does."""

    def forward(self, x):
        h = self.lin(x)
        if x.max() > 100:
            h = 2 * h
        h = _Alias.apply(h)
        h[x[..., 0] > 0] = self.fill
        return h.sum()


def test_a_write_through_a_mask_after_a_graph_break_is_unit_scaled_through_dynamo():
    """The tensor the graph before the break returns is the fused linear's output, which the model writes into: it
    must not be a view made inside a custom ``autograd.Function`` (autograd forbids that write)."""
    torch.manual_seed(0)
    model = MaskWrite()
    x = torch.randn(4, 5, 8)
    us = unit_scale(model, (x,))
    assert us.us_capture == "dynamo"
    us(x).backward()
    model(x).backward()
    fill, true = us.fill.grad, model.fill.grad  # the same count of masked rows in every feature: equal entries
    assert torch.isfinite(us.lin.weight.grad).all()
    assert torch.nn.functional.cosine_similarity(fill, true, dim=0) > 0.999999


class AliasFirst(MaskWrite):
    """The custom Function before the branch: torch.export refuses the Function first (``layers.FunctionCall``)."""

    def forward(self, x):
        h = _Alias.apply(self.lin(x))
        if x.max() > 100:
            h = 2 * h
        h[x[..., 0] > 0] = self.fill
        return h.sum()


def test_the_error_names_the_users_line_not_this_packages():
    us = unit_scale(AliasFirst())
    with pytest.raises(UnitScaleError) as info:
        us(torch.randn(4, 5, 8))
    where = info.value.where
    assert "unit_scale_fx" not in where.split(";")[0] and "_Alias.apply(self.lin(x))" in where, where


def test_when_dynamo_fails_too_the_error_names_both_places_and_does_not_offer_dynamo():
    us = unit_scale(AliasWrite())
    with pytest.raises(UnitScaleError) as info:
        us(torch.randn(4, 5, 8))
    err = info.value
    assert "if x.max() > 100" in err.where and "h[x[..., 0] > 0] = self.fill" in err.where, err.where
    assert "dynamo_fallback" not in err.fix and "torch._check" in err.fix, err.fix

def test_data_dependent_model_is_unit_scaled_through_dynamo():
    model = DataDependentResidual()
    x, y = torch.randn(64, 16), torch.randn(64, 4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    us = unit_scale(model, (x, y))
    assert isinstance(us, DataDependentResidual) and us.us_capture == "dynamo"
    assert us.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert us.us_backend.graphs and us.us_backend.scale_plan()
    loss = us(*mlp_batch(16, 4, 64, seed=3))
    loss.backward()
    # the graph holding the loss sends a unit-sized gradient back across the break (one factor for
    # everything before it), so the first graph's weight is unit-scaled too (it got RMS ~0.003 without)
    for name in ("inp.weight", "fc1.weight", "fc2.weight", "out.weight"):
        assert 0.25 <= rms(us.get_parameter(name).grad) <= 4, name
    recs = record_matmul_operands(us, x, y)
    frac = band_fractions(recs)
    assert frac["fwd"] >= 0.95 and frac["bwd"] >= 0.95, frac
    with pytest.raises(UnitScaleError, match="already unit-scaled"):
        unit_scale(us, (x, y))


def test_uncapturable_model_without_fallback_names_both_attempts():
    with pytest.raises(UnitScaleError, match="neither torch.fx nor torch.export"):
        unit_scale(DataDependent(), (torch.ones(4, 8),), dynamo_fallback=False)


def test_uncapturable_model_without_inputs_goes_through_dynamo_at_the_first_call():
    us = unit_scale(DataDependentResidual())
    assert not us.us_planned
    x, y = torch.randn(64, 16), torch.randn(64, 4)
    us(x, y).backward()
    assert us.us_capture == "dynamo" and us.us_backend.graphs
    assert 0.25 <= rms(us.get_parameter("out.weight").grad) <= 4


def test_node_filter_leaves_parts_alone():
    model = ResidualMLP(d_in=16, d=32, layers=2, d_out=4)
    batch = mlp_batch(16, 4, 32)
    us = unit_scale(model, batch, node_filter=lambda name, node: not name.startswith("fc2"))
    excluded = [n for n, r in us.scale_plan(all_nodes=True).items() if r.rule == "excluded"]
    assert excluded and all("linear" in n for n in excluded)
    assert min(gradient_cosines(us, *batch).values()) > 0.999


def test_bad_input_errors():
    with pytest.raises(UnitScaleError, match="expects a torch.nn.Module"):
        unit_scale(lambda x: x)  # type: ignore[arg-type]
    with pytest.raises(UnitScaleError, match="outside"):
        UnitScaleConfig(attn_tau=1.5)
    with pytest.raises(UnitScaleError, match="unknown option"):
        unit_scale(nn.Linear(2, 2), nonsense=True)
    us = unit_scale(nn.Linear(4, 4), (torch.randn(2, 4),))
    with pytest.raises(UnitScaleError, match="already unit-scaled"):
        unit_scale(us)


def test_true_gradient_copy_differs_only_in_backward():
    make, batch = MODELS["residual_mlp"]
    us = unit_scale(make(), batch(0))
    twin = true_gradient_copy(us)
    torch.testing.assert_close(us(*batch(1)), twin(*batch(1)))


def test_planning_leaves_no_trace_on_buffers_or_rng():
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Dropout(0.5), nn.Linear(16, 4))
    x = torch.randn(32, 8)
    state = torch.random.get_rng_state()
    us = unit_scale(model, (x,), unsupported="ignore")
    assert torch.equal(torch.random.get_rng_state(), state)
    for (k, a), (_, b) in zip(us.named_buffers(), model.named_buffers()):
        assert torch.equal(a, b), k
    assert all(p.grad is None for p in us.parameters())
    assert us.training
