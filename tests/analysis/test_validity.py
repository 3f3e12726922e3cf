"""The gradient-validity helper: true-gradient copy and per-parameter cosines."""

import torch

from unit_scale_fx import unit_scale
from unit_scale_fx.analysis.validity import gradient_cosines, true_gradient_copy
from unit_scale_fx.examples import GPT, ResidualMLP, gpt_batch, mlp_batch
from unit_scale_fx.scale import scale


def test_gpt_gradients_are_valid():
    torch.manual_seed(0)
    model = GPT(vocab=64, d=32, layers=2, heads=2, max_len=16)
    x, y = gpt_batch(vocab=64, batch=2, seq=16)
    us = unit_scale(model, (x, y))
    cos = gradient_cosines(us, x, y)
    assert set(cos) == {n for n, _ in us.named_parameters()}
    assert min(cos.values()) > 0.999, cos


def test_true_copy_has_no_rescaled_backward_and_same_forward():
    torch.manual_seed(0)
    x, y = mlp_batch(batch=16)
    us = unit_scale(ResidualMLP(layers=2), (x, y))
    ref = true_gradient_copy(us)
    scales = [n for n in ref.graph.nodes if n.target is scale]
    assert scales and all(n.args[1] == n.args[2] for n in scales)
    assert any(n.args[1] != n.args[2] for n in us.graph.nodes if n.target is scale)
    torch.testing.assert_close(ref(x, y), us(x, y))
    assert ref.get_parameter("inp.weight") is us.get_parameter("inp.weight")


def test_invalid_plan_is_detected():
    """A backward scale on a non-cut edge (inside a residual block) must show as cosine < 1."""
    torch.manual_seed(0)
    x, y = mlp_batch(batch=16)
    us = unit_scale(ResidualMLP(layers=2), (x, y))
    # corrupt: put a backward-only factor on the first residual branch's activation
    relu = next(n for n in us.graph.nodes if n.op == "call_function" and n.target is torch.relu)
    with us.graph.inserting_after(relu):
        bad = us.graph.call_function(scale, (relu, 1.0, 7.0))
    relu.replace_all_uses_with(bad, delete_user_cb=lambda u: u is not bad)
    us.recompile()
    cos = gradient_cosines(us, x, y)
    assert min(cos.values()) < 0.99, cos


def test_grads_and_buffers_untouched():
    torch.manual_seed(0)
    x, y = mlp_batch(batch=8)
    us = unit_scale(ResidualMLP(layers=1), (x, y))
    before = {k: v.clone() for k, v in us.state_dict().items()}
    gradient_cosines(us, x, y)
    assert all(p.grad is None for p in us.parameters())
    for k, v in us.state_dict().items():
        assert torch.equal(v, before[k])


def test_unplanned_module_is_planned_as_its_first_call_would():
    torch.manual_seed(0)
    x, y = mlp_batch(batch=16)
    lazy = unit_scale(ResidualMLP(layers=2))
    cos = gradient_cosines(lazy, x, y)
    assert lazy.us_planned and min(cos.values()) > 0.999
    torch.manual_seed(0)
    eager = unit_scale(ResidualMLP(layers=2), (x, y))
    plan = {k: (r.fwd, r.bwd) for k, r in eager.scale_plan().items()}
    assert {k: (r.fwd, r.bwd) for k, r in lazy.scale_plan().items()} == plan


def test_first_call_under_no_grad_plans_like_any_other():
    torch.manual_seed(0)
    x, y = mlp_batch(batch=16)
    lazy = unit_scale(ResidualMLP(layers=2))
    with torch.no_grad():
        lazy(x, y)
    torch.manual_seed(0)
    eager = unit_scale(ResidualMLP(layers=2), (x, y))
    assert {k: (r.fwd, r.bwd) for k, r in lazy.scale_plan().items()} == \
        {k: (r.fwd, r.bwd) for k, r in eager.scale_plan().items()}
