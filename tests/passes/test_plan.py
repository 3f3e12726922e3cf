"""plan (one ScaleRecord per float node, from the rules) and predict_grads (gradient RMS from the scales)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from helpers import graph_code, pipeline_until, rms, run_pass
from unit_scale_fx import UnitScaleError
from unit_scale_fx.record import META_KEY, SCALE_ROLE


class Res(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(32, 128)
        self.b = nn.Linear(128, 32)

    def forward(self, x):
        h = self.a(x) * 1.0
        return (x + self.b(torch.relu(h))).sum()


class ResLoss(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(32, 128), nn.Linear(128, 32), nn.Linear(32, 32)

    def forward(self, x, y):
        h = x + self.b(torch.relu(self.a(x)))
        return F.mse_loss(self.c(h), y)


def _planned(model, *inputs, **cfg):
    """Planned and balanced (the pipeline up to calibrate_grads)."""
    gm, ctx, _ = pipeline_until(model, inputs, "calibrate_grads", **cfg)
    return gm, ctx


def test_plan_writes_records_and_leaves_the_graph_alone():
    m = nn.Sequential(nn.Linear(16, 32), nn.GELU())
    gm, ctx, p = pipeline_until(m, (torch.randn(8, 16),), "plan", measure=False)
    before = graph_code(gm)
    result = run_pass(gm, ctx, p)
    assert graph_code(gm) == before
    recs = {n.name: n.meta[META_KEY] for n in gm.graph.nodes if META_KEY in n.meta}
    assert {k: (r.rule, r.kind) for k, r in recs.items()} == {"linear": ("matmul", "matmul"),
                                                             "gelu": ("pointwise", "pointwise")}
    assert set(ctx.scales) == {n for n in gm.graph.nodes if n.name in recs}
    assert result.info == "2 records (analytic), 0 unsupported"


def test_plan_records_analytic_linear_scales():
    m = nn.Sequential(nn.Linear(64, 256), nn.Linear(256, 16))
    x = torch.randn(32, 64)
    x = x / x.pow(2).mean().sqrt()  # unit RMS input
    gm, _ = _planned(m, x, measure=False)
    recs = [n.meta[META_KEY] for n in gm.graph.nodes if n.target is F.linear]
    assert [r.rule for r in recs] == ["matmul", "matmul"]
    assert recs[0].ideal_fwd == pytest.approx(1 / 8, rel=1e-3)      # 1/sqrt(fan_in)
    assert recs[1].ideal_fwd == pytest.approx(1 / 16, rel=1e-3)
    w1 = next(k for k in recs[1].ideal_bwd if "weight" in k)
    assert recs[1].ideal_bwd[w1] == pytest.approx(1 / (32 ** 0.5), rel=1e-3)  # 1/sqrt(rows)
    # a chain is a tree: every ideal backward scale is met exactly
    assert all(r.bwd for r in recs)
    for r in recs:
        for k, b in r.bwd.items():
            assert b == pytest.approx(r.ideal_bwd[k], rel=1e-5)
        assert not r.constrained


class Temperature(nn.Module):
    """Contrastive logits with a learned temperature (CLIP's ``logit_scale.exp() * text @ image.T``)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)
        self.logit_scale = nn.Parameter(torch.tensor(2.6592))  # log(1 / 0.07), CLIP's initial value

    def forward(self, x, y):
        logits = self.logit_scale.exp() * (self.a(x) @ self.b(y).t())
        return F.cross_entropy(logits, torch.arange(x.shape[0]))


def test_analytic_plan_reads_a_parameters_first_moment():
    """A one-number parameter is all first moment: analytic planning scales ``exp`` of it by ``1 / exp(v)``
    (its value), not by the ``1 / exp(v**2)`` of a zero-mean Gaussian of that RMS (1e-3 here: CLIP's
    backward operands were 0% in band). A norm's gain of ones on the meta device: first moment 1."""
    from unit_scale_fx.passes.plan import _param_mean

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
    gm, _ = _planned(Temperature(), x, y, measure=False)
    (rec,) = [n.meta[META_KEY] for n in gm.graph.nodes if str(getattr(n.meta.get(META_KEY), "op", "")).endswith("exp")]
    assert rec.ideal_fwd == pytest.approx(math.exp(-2.6592), rel=0.1)
    gain = torch.ones(4, device="meta")
    assert _param_mean(gain, "one", 1.0) == 1.0
    assert _param_mean(gain, "unit", 1.0) == 0.0


def test_local_constraint_ties_non_bridge_edges():
    gm, ctx = _planned(Res(), torch.randn(16, 32), constraint="gmean", measure=False)
    lin = [n for n in gm.graph.nodes if n.target is F.linear]
    tied = [n for n in lin if not ctx.topology.is_cut(n.args[0], n)]
    assert tied  # both linears sit inside the residual branch
    for node in tied:
        rec = node.meta[META_KEY]
        assert rec.bwd[node.args[0].name] == pytest.approx(rec.fwd)
        assert rec.constrained


def test_unsupported_ops_follow_the_policy():
    class Odd(nn.Module):
        def forward(self, x):
            return torch.special.erfcx(x)

    x = torch.randn(4, 4)
    gm, ctx, p = pipeline_until(Odd(), (x,), "plan", unsupported="error")
    with pytest.raises(UnitScaleError, match="no unit-scaling rule"):
        run_pass(gm, ctx, p)
    gm, ctx, p = pipeline_until(Odd(), (x,), "plan", unsupported="ignore")
    run_pass(gm, ctx, p)
    (rec,) = [n.meta[META_KEY] for n in gm.graph.nodes if META_KEY in n.meta]
    assert rec.rule == "unsupported" and not rec.changes_anything
    assert [u.node for u in ctx.unsupported] == ["special_erfcx"]


# -- predict_grads ---------------------------------------------------------------------------------------

class _Grads(fx.Interpreter):
    """Runs a rewritten graph and keeps every value's gradient."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.values: dict[fx.Node, torch.Tensor] = {}

    def run_node(self, n):
        v = super().run_node(n)
        if isinstance(v, torch.Tensor) and v.requires_grad and n.op != "output":
            v.retain_grad()
            self.values[n] = v
        return v


def _measured_grad_rms(gm: fx.GraphModule, *inputs) -> dict[str, float]:
    """RMS of the gradient at each planned node's value as its readers see it (after its output scale)."""
    run = _Grads(gm)
    run.run(*inputs).backward()
    seen = {n.meta[SCALE_ROLE][1]: n for n in gm.graph.nodes if (n.meta.get(SCALE_ROLE) or ("",))[0] == "output"}
    out = {}
    for n in gm.graph.nodes:
        v = run.values.get(seen.get(n.name, n))
        if META_KEY in n.meta and v is not None and v.grad is not None:
            out[n.name] = rms(v.grad)
    return out


@pytest.mark.parametrize("constraint", ["potential", "fwd"])
def test_predicted_gradients_match_measured_ones(constraint):
    """The analytic prediction against a real backward of the rewritten graph."""
    torch.manual_seed(0)
    x, y = torch.randn(64, 32), torch.randn(64, 32)
    # tau 0.5 (not the depth rule's 1/3 for a one-add stream): the 'fwd' bounds below assume an even split
    gm, ctx, p = pipeline_until(ResLoss(), (x, y), "predict_grads", measure=False, constraint=constraint, mlp_tau=0.5)
    before = graph_code(gm)
    run_pass(gm, ctx, p)
    assert graph_code(gm) == before
    predicted = {n.name: n.meta[META_KEY].bwd_rms for n in gm.graph.nodes
                 if META_KEY in n.meta and n.meta[META_KEY].bwd_rms is not None}
    gm2, ctx2, rw = pipeline_until(ResLoss(), (x, y), "fold_scales", measure=False, constraint=constraint,
                                   mlp_tau=0.5)
    measured = _measured_grad_rms(gm2, x, y)
    assert set(predicted) == {"linear", "relu", "linear_1", "add", "linear_2"} <= set(measured)
    for k in predicted:
        assert 0.75 < measured[k] / predicted[k] < 1.35, (k, predicted[k], measured[k])
    if constraint == "fwd":  # tied scales leave the branch's gradients small: the prediction says so
        assert predicted["relu"] < 0.5 and predicted["linear_1"] > 0.6


def test_measured_gradients_replace_the_prediction_and_flow_upstream():
    x, y = torch.randn(64, 32), torch.randn(64, 32)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
    gm, ctx, p = pipeline_until(model, (x,), "predict_grads", measure=False)
    run_pass(gm, ctx, p)
    plain = {n.name: n.meta[META_KEY].bwd_rms for n in gm.graph.nodes if META_KEY in n.meta}
    gelu = next(n for n in gm.graph.nodes if n.target is F.gelu)
    ctx.give("measured_grads", {gelu: 3.0})
    run_pass(gm, ctx, p)
    got = {n.name: n.meta[META_KEY].bwd_rms for n in gm.graph.nodes if META_KEY in n.meta}
    assert got["gelu"] == 3.0
    assert got["linear_1"] == plain["linear_1"]  # downstream of the measurement: unchanged
    assert got["linear"] == pytest.approx(plain["linear"] * 3.0 / plain["gelu"])  # upstream: scaled with it


def test_returned_values_beside_a_loss_get_no_gradient_in_the_sweep():
    """A value returned beside a scalar loss (a cache, a hidden state) receives no gradient in training
    (tensor_stats.loss_outputs): the reverse sweep predicts none there, not a unit gradient that would
    skew the potentials of everything it was computed from."""
    from unit_scale_fx.passes.plan import true_grad_rms

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x, t):
            h = self.a(x)
            cache = h.transpose(0, 1)  # returned only
            return F.mse_loss(self.b(h), t), cache

    gm, ctx, _ = pipeline_until(M(), (torch.randn(16, 8), torch.randn(16, 8)), "balance")
    grads = true_grad_rms(gm, ctx.scales)
    cache = next(n for n in gm.graph.nodes if n.op == "call_method" and n.target == "transpose")
    assert grads[cache] == 0.0
    h = next(n for n in gm.graph.nodes if n.target is F.linear)
    assert 0.0 < grads[h] < 0.5  # only what the loss sends back (mean-squared error of 16 x 8 values)


def test_a_fused_function_of_a_positive_input_is_measured_on_it():
    """Routing weights renormalised (``w / w.sum(-1)`` of top-k softmax probabilities): a Gaussian probe
    (zero mean) puts sums near zero and finds gradient gains of ~1e7; with real inputs the region's
    forward and gradient gains are measured at the real input."""

    class Router(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = nn.Linear(16, 8)

        def forward(self, x):
            w, _ = torch.topk(torch.softmax(self.gate(x), -1), 2, dim=-1)
            return w / w.sum(-1, keepdim=True)

    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    model = Router()
    gm, ctx, _ = pipeline_until(model, (x,), "balance")
    (node,) = [n for n in gm.graph.nodes if getattr(n.meta.get(META_KEY), "rule", "") == "fused"]
    rec = node.meta[META_KEY]
    assert "gradient gain measured" in rec.note
    # the gain at the real input: J^T g for a unit Gaussian g, w of RMS ~0.7 (two weights summing to 1)
    (gain,) = ctx.scales[node].grad_gain.values()
    assert 0.05 < gain < 5.0, rec.note
    assert rec.fwd_rms == pytest.approx(1.0, rel=0.02)  # the forward scale measured too: unit output
    assert "forward calibrated on the example batch" in rec.note


def test_analytic_routing_weights_and_unread_values():
    """Shapes only (measure=False): the top-k softmax weights have a first moment near their RMS, so the
    fused ``w / w.sum(-1)`` is probed on positive values (a zero-mean probe found gradient gains of ~1e7);
    top-k values that a loss term ignores (it reads the indices only) get no gradient in the reverse sweep,
    not the unit one that skewed the router's potentials (mixtral's whole backward at 6% in band)."""
    from unit_scale_fx.passes.plan import true_grad_rms

    class Router(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = nn.Linear(16, 8)

        def forward(self, x):
            p = torch.softmax(self.gate(x), -1)
            w, _ = torch.topk(p, 2, dim=-1)
            _, picked = torch.topk(torch.softmax(self.gate(x), -1), 2, dim=-1)  # values unread
            aux = (p * picked.float().mean()).sum()
            return (w / w.sum(-1, keepdim=True)).sum() + aux

    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    gm, ctx, _ = pipeline_until(Router(), (x,), "balance", measure=False)
    (node,) = [n for n in gm.graph.nodes if getattr(n.meta.get(META_KEY), "rule", "") == "fused"]
    (gain,) = ctx.scales[node].grad_gain.values()
    assert 0.05 < gain < 5.0, node.meta[META_KEY].note
    grads = true_grad_rms(gm, ctx.scales)
    topks = [n for n in gm.graph.nodes if n.target is torch.topk]
    assert grads[topks[1]] == 0.0 and grads[topks[0]] > 0.0
