"""The op families added for real models (issue 6): conv, batch/group norm, pooling,
reductions, einsum, constants, selection ops, rotary embeddings, grouped-query attention.

Each case is checked with the rules alone (``measure=False``) and planned on one
batch (``measure=True``); outputs, input gradients and weight gradients of a
*fresh* batch must have RMS in [1/2, 2].
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import rms
from unit_scale_fx import unit_scale
from unit_scale_fx.record import CONSTANT, CONSTANT_RMS
from unit_scale_fx.rules.einsum import parse
from unit_scale_fx.rules.pool import max_of_gaussians_rms


class Op(nn.Module):
    """``fn(self, *inputs)`` with the given parameters and (constant) buffers."""

    def __init__(self, fn, params=None, buffers=None) -> None:
        super().__init__()
        self.fn = fn
        for k, v in (params or {}).items():
            self.register_parameter(k, nn.Parameter(v))
        for k, v in (buffers or {}).items():
            self.register_buffer(k, v)

    def forward(self, *xs):
        return self.fn(self, *xs)


def _x(*shape):
    return torch.randn(*shape)


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def rope(m, q):
    """Rotary embedding as Llama writes it: cos/sin tables from a float buffer, products and a sum."""
    t = torch.arange(q.shape[-2], dtype=torch.float32)
    freqs = torch.outer(t, m.inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return q * emb.cos() + rotate_half(q) * emb.sin()


INV_FREQ = 1.0 / (10000 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
B, T, D = 8, 32, 64

CASES = {
    "conv1d": (lambda: nn.Conv1d(16, 32, 3, padding=1), lambda: (_x(B, 16, T),)),
    "conv2d": (lambda: nn.Conv2d(8, 16, 3, padding=1), lambda: (_x(4, 8, 12, 12),)),
    "conv2d_strided": (lambda: nn.Conv2d(8, 16, 3, stride=2, padding=1), lambda: (_x(4, 8, 12, 12),)),
    "conv2d_grouped": (lambda: nn.Conv2d(16, 16, 3, padding=1, groups=4), lambda: (_x(4, 16, 10, 10),)),
    # transposed (decoders, U-Nets, GANs): the adjoint of a convolution, its roles swapped
    "conv_transpose1d": (lambda: nn.ConvTranspose1d(16, 32, 3, padding=1), lambda: (_x(B, 16, T),)),
    "conv_transpose2d_upsample": (lambda: nn.ConvTranspose2d(16, 8, 4, stride=2, padding=1),
                                  lambda: (_x(4, 16, 8, 8),)),
    "conv_transpose2d_output_padding": (lambda: nn.ConvTranspose2d(8, 8, 3, stride=2, padding=1, output_padding=1),
                                        lambda: (_x(4, 8, 6, 6),)),
    "conv_transpose2d_grouped": (lambda: nn.ConvTranspose2d(16, 16, 2, stride=2, groups=4),
                                 lambda: (_x(4, 16, 6, 6),)),
    "conv_transpose3d": (lambda: nn.ConvTranspose3d(8, 8, 2, stride=2), lambda: (_x(2, 8, 4, 4, 4),)),
    "instance_norm_affine": (lambda: nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.InstanceNorm2d(8, affine=True)),
                             lambda: (_x(4, 8, 10, 10),)),
    "interpolate_nearest": (lambda: Op(lambda m, x: F.interpolate(x, scale_factor=2)), lambda: (_x(4, 8, 6, 6),)),
    "upsample_bilinear": (lambda: nn.Upsample(scale_factor=2, mode="bilinear"), lambda: (_x(4, 8, 6, 6),)),
    "interpolate_size_bicubic": (lambda: Op(lambda m, x: F.interpolate(x, size=(9, 15), mode="bicubic",
                                                                       align_corners=True)),
                                 lambda: (_x(4, 8, 6, 6),)),
    "interpolate_linear_1d": (lambda: Op(lambda m, x: F.interpolate(x, scale_factor=3, mode="linear")),
                              lambda: (_x(4, 8, 10),)),
    "pixel_shuffle": (lambda: nn.PixelShuffle(2), lambda: (_x(4, 16, 6, 6),)),
    # bilinear pooling / fusion of two inputs (and of one input with itself)
    "bilinear": (lambda: nn.Bilinear(32, 24, 16), lambda: (_x(B, T, 32), _x(B, T, 24))),
    "bilinear_same_input": (lambda: Op(lambda m, x: F.bilinear(x, x, m.w, m.b),
                                       {"w": torch.randn(16, 32, 32) / 32, "b": torch.zeros(16)}),
                            lambda: (_x(B, T, 32),)),
    "pixel_unshuffle": (lambda: nn.PixelUnshuffle(2), lambda: (_x(4, 4, 6, 6),)),
    # patches as columns and back (MobileViT's unfolding into patches, its fold back; overlapping windows)
    "unfold_patches": (lambda: Op(lambda m, x: F.unfold(x, 2, stride=2)), lambda: (_x(4, 8, 8, 8),)),
    "unfold_overlapping": (lambda: Op(lambda m, x: F.unfold(x, 3, padding=1)), lambda: (_x(4, 8, 8, 8),)),
    "fold_patches": (lambda: Op(lambda m, x: F.fold(x, (8, 8), 2, stride=2)), lambda: (_x(4, 32, 16),)),
    "fold_overlapping": (lambda: Op(lambda m, x: F.fold(x, (6, 6), 3, padding=1)), lambda: (_x(4, 72, 36),)),
    "tensor_unfold_windows": (lambda: Op(lambda m, x: x.unfold(1, 4, 2)), lambda: (_x(B, T, 16),)),
    "prelu": (lambda: nn.PReLU(), lambda: (_x(B, T, 16),)),
    "prelu_per_channel": (lambda: nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.PReLU(8)),
                          lambda: (_x(4, 8, 10, 10),)),
    "instance_norm": (lambda: nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.InstanceNorm2d(8)),
                      lambda: (_x(4, 8, 10, 10),)),
    "batch_norm2d": (lambda: nn.BatchNorm2d(8), lambda: (3 * _x(8, 8, 6, 6) + 1,)),
    "batch_norm1d": (lambda: nn.BatchNorm1d(D), lambda: (2 * _x(32, D),)),
    "group_norm": (lambda: nn.GroupNorm(4, 16), lambda: (3 * _x(4, 16, 8, 8),)),
    "avg_pool2d": (lambda: nn.AvgPool2d(2), lambda: (_x(4, 8, 12, 12),)),
    "max_pool2d": (lambda: nn.MaxPool2d(2), lambda: (_x(4, 8, 12, 12),)),
    "max_pool2d_overlapping": (lambda: nn.MaxPool2d(3, 2, 1), lambda: (_x(4, 8, 12, 12),)),
    "adaptive_avg_pool2d": (lambda: nn.AdaptiveAvgPool2d(2), lambda: (_x(4, 8, 12, 12),)),
    "mean_dim": (lambda: Op(lambda m, x: x.mean(1)), lambda: (_x(B, T, D),)),
    "sum_dim": (lambda: Op(lambda m, x: torch.sum(x, dim=-1)), lambda: (_x(B, T, D),)),
    "einsum_weight": (lambda: Op(lambda m, x: torch.einsum("btd,de->bte", x, m.w), {"w": torch.randn(D, 2 * D)}),
                      lambda: (_x(B, T, D),)),
    "einsum_scores": (lambda: Op(lambda m, q, k: torch.einsum("bhqd,bhkd->bhqk", q, k)),
                      lambda: (_x(2, 4, T, 16), _x(2, 4, T, 16))),
    "masked_fill": (lambda: Op(lambda m, x: x.masked_fill(torch.arange(T) > 100, 0.0)), lambda: (_x(B, T),)),
    "where": (lambda: Op(lambda m, a, b: torch.where(torch.arange(D) % 2 == 0, a, b)), lambda: (_x(B, D), _x(B, D))),
    "stack": (lambda: Op(lambda m, a, b: torch.stack([a, b], dim=1)), lambda: (_x(B, D), _x(B, D))),
    "neg_abs_pow": (lambda: Op(lambda m, x: F.linear(torch.abs(-x) ** 3, m.w), {"w": torch.randn(D, D)}),
                    lambda: (_x(B, D),)),
    "rope": (lambda: Op(rope, buffers={"inv_freq": INV_FREQ}), lambda: (_x(2, 4, T, 16),)),
    "sdpa_gqa": (lambda: Op(lambda m, q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                               enable_gqa=True)),
                 lambda: (_x(2, 8, T, 16), _x(2, 2, T, 16), _x(2, 2, T, 16))),
    # squeeze-excitation: a gate per sample and channel, broadcast over the map, receives the sum over it
    "mul_gate": (lambda: Op(lambda m, x, g: x * torch.sigmoid(g)), lambda: (_x(4, 16, 8, 8), _x(4, 16, 1, 1))),
    # mixture-of-experts routing: top-k softmax weights, normalised to sum to one
    "topk_routing_weights": (lambda: Op(lambda m, x: (lambda w: w / w.sum(-1, keepdim=True))(
        torch.softmax(F.linear(x, m.w), -1).topk(2, -1).values) * 4.0, {"w": torch.randn(8, D)}),
        lambda: (_x(B * T, D),)),
    "sdpa_causal_mask_tensor": (
        lambda: Op(lambda m, q, k, v: F.scaled_dot_product_attention(
            q, k, v, attn_mask=torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril())),
        lambda: (_x(2, 4, T, 16), _x(2, 4, T, 16), _x(2, 4, T, 16))),
}


@pytest.mark.parametrize("measure", [False, True], ids=["analytic", "measured"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_op_is_unit_scaled(name, measure):
    make, inputs = CASES[name]
    module = make()
    us = unit_scale(module, inputs(), measure=measure, unsupported="error")
    fresh = [x.requires_grad_() if x.is_floating_point() else x for x in inputs()]
    out = us(*fresh)
    assert 0.5 <= rms(out) <= 2.0, f"{name}: output RMS {rms(out):.3g}"
    out.backward(torch.randn_like(out))
    checked = 0
    for i, x in enumerate(fresh):
        if x.is_floating_point():
            assert 0.5 <= rms(x.grad) <= 2.0, f"{name}: gradient of input {i} RMS {rms(x.grad):.3g}"
            checked += 1
    for pname, p in us.named_parameters():
        if p.dim() >= 2:
            assert 0.5 <= rms(p.grad) <= 2.0, f"{name}: gradient of {pname} RMS {rms(p.grad):.3g}"
            checked += 1
    assert checked, f"{name}: no input or weight gradient to check"


def test_bilinear_gradients_are_valid():
    """Each parameter's gradient is a positive multiple of the true gradient of the rewritten forward."""
    from helpers import gradient_cosines

    torch.manual_seed(0)
    model = Op(lambda m, a, b, t: F.mse_loss(m.b(a, b), t))
    model.b = nn.Bilinear(32, 24, 16)
    batch = lambda: (_x(B, 32), _x(B, 24), _x(B, 16))  # noqa: E731
    us = unit_scale(model, batch(), unsupported="error")
    cos = gradient_cosines(us, *batch())
    assert len(cos) == 2 and min(cos.values()) > 0.9999, cos


def test_conv_scales_follow_fan_in_times_kernel():
    us = unit_scale(nn.Conv2d(8, 16, 3, padding=1, bias=False), (_x(2, 8, 6, 6),), measure=False)
    (rec,) = [r for r in us.scale_plan().values() if r.rule == "conv"]
    x_name = next(k for k in rec.ideal_bwd if "weight" not in k)
    inside = (16 / 18) ** 2  # 6 wide, 3 taps, padding 1: 16 of 18 (position, tap) pairs read the input
    assert math.isclose(rec.ideal_fwd, 1 / math.sqrt(8 * 9 * inside), rel_tol=0.05)  # input RMS ~1, weight RMS 1
    assert math.isclose(rec.ideal_bwd[x_name], 1 / math.sqrt(16 * 9 * inside), rel_tol=1e-6)


@pytest.mark.parametrize("measure", [False, True], ids=["analytic", "measured"])
def test_prelu_keeps_its_slopes_and_gives_them_unit_gradients(measure):
    """``nn.PReLU(C)``: the slopes keep their values (they shape the function), and their gradients, each a sum
    over the negative half of a channel's values, come out near unit (without a rule: left unscaled)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.PReLU(8))
    us = unit_scale(model, (_x(4, 8, 10, 10),), measure=measure, unsupported="error")
    assert torch.equal(us.get_parameter("1.weight"), torch.full((8,), 0.25))
    x = _x(4, 8, 10, 10).requires_grad_()
    out = us(x)
    out.backward(torch.randn_like(out))
    assert 0.5 <= rms(us.get_parameter("1.weight").grad) <= 2.0


def test_conv_transpose_scales_are_those_of_the_adjoint_convolution():
    """A 2 x 2 transposed convolution with stride 2 writes each output from one tap of each of its ``C_in``
    inputs (fan-in 8, not ``8 * 4``) and sends each input the gradient of ``C_out * 4`` outputs; its weight's
    gradient sums over the input's positions (``N * 5 * 5``), its bias's over the output's (``N * 10 * 10``)."""
    us = unit_scale(nn.ConvTranspose2d(8, 16, 2, stride=2), (_x(2, 8, 5, 5),), measure=False)
    (rec,) = [r for r in us.scale_plan().values() if r.rule == "conv_transpose"]
    x_name = next(k for k in rec.ideal_bwd if "weight" not in k and "bias" not in k)
    w_name = next(k for k in rec.ideal_bwd if "weight" in k)
    b_name = next(k for k in rec.ideal_bwd if "bias" in k)
    assert math.isclose(rec.ideal_fwd, 1 / math.sqrt(8), rel_tol=0.1)  # input RMS ~1 (400 draws), weight RMS 1
    assert math.isclose(rec.ideal_bwd[x_name], 1 / math.sqrt(16 * 4), rel_tol=1e-6)
    assert math.isclose(rec.ideal_bwd[w_name], 1 / math.sqrt(2 * 25), rel_tol=0.1)
    assert math.isclose(rec.ideal_bwd[b_name], 1 / math.sqrt(2 * 100), rel_tol=1e-6)


@pytest.mark.parametrize("size,padding", [(3, 1), (4, 2), (5, "same")])
def test_conv_on_small_maps_counts_the_padding(size, padding):
    """On a map not much larger than the kernel, zero padding is a large share of what is read."""
    from unit_scale_fx.rules.conv import valid_tap_fraction

    torch.manual_seed(0)
    conv = nn.Conv2d(32, 32, 3, padding=padding, bias=False)
    us = unit_scale(conv, (_x(8, 32, size, size),), measure=False)
    x = _x(8, 32, size, size).requires_grad_(True)
    y = us(x)
    assert 0.85 <= rms(y) <= 1.15, rms(y)
    y.backward(torch.randn_like(y))
    assert 0.8 <= rms(x.grad) <= 1.25, rms(x.grad)
    out = y.shape[-1]
    pads = 1 if padding == "same" else padding
    brute = sum(0 <= o - pads + t < size for o in range(out) for t in range(3)) / (3 * out)
    assert valid_tap_fraction((size, size), (3, 3), (1, 1), padding, (1, 1), (out, out)) == pytest.approx(brute ** 2)


def test_max_of_gaussians_matches_sampling():
    z = torch.randn(200_000, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sampled = float(z.max(-1).values.pow(2).mean().sqrt())
    assert math.isclose(max_of_gaussians_rms(4), sampled, rel_tol=5e-3)
    assert max_of_gaussians_rms(1) == 1.0


@pytest.mark.parametrize("eq", ["btd,de->bte", "bhqd,bhkd->bhqk", "ij,jk", "bi,bi->b"])
def test_einsum_parse_agrees_with_torch(eq):
    shapes = {"btd,de->bte": [(2, 3, 4), (4, 5)], "bhqd,bhkd->bhqk": [(2, 3, 4, 5), (2, 3, 6, 5)],
              "ij,jk": [(3, 4), (4, 5)], "bi,bi->b": [(3, 4), (3, 4)]}[eq]
    ins, out, size = parse(eq, shapes)
    expected = torch.einsum(eq, *[torch.zeros(s) for s in shapes]).shape
    assert tuple(size[c] for c in out) == tuple(expected)


def test_rope_keeps_its_rotation():
    """Rotary tables are data: the transformed op is the original rotation times one factor."""
    module = Op(rope, buffers={"inv_freq": INV_FREQ})
    x = _x(2, 4, T, 16)
    us = unit_scale(module, (x,), measure=False)
    ratio = us(x) / module(x)
    torch.testing.assert_close(ratio, torch.full_like(ratio, float(ratio.mean())), rtol=1e-4, atol=1e-4)
    plan = us.scale_plan(all_nodes=True)
    assert not any(r.op.endswith(("cos", "sin", "outer")) for r in plan.values()), "rotary tables were scaled"


def test_constant_tensor_counts_as_a_constant():
    """``x * buffer`` is a product with a constant: no scale on it, its size predicted downstream."""
    module = Op(lambda m, x: F.linear(x * m.c, m.w), {"w": torch.randn(D, D)}, {"c": torch.full((D,), 4.0)})
    us = unit_scale(module, (_x(B, D),), measure=False)
    recs = us.scale_plan(all_nodes=True)
    mul = next(r for r in recs.values() if r.rule == "mul")
    assert mul.fwd == 1.0 and not mul.changes_anything  # (every float input has a backward factor, 1 here)
    assert math.isclose(mul.fwd_rms, 4.0, rel_tol=0.05)


@pytest.mark.parametrize("method", ["type_as"])  # (view_as / reshape_as / expand_as are normalised to views)
def test_an_as_op_takes_its_values_from_its_first_argument(method):
    """``x.type_as(h)`` (Gemma's norm casts back to its input's dtype) has ``x``'s values: ``h`` (RMS 8 here)
    gives only a dtype or a shape."""
    module = Op(lambda m, h: F.linear(getattr((h / h.pow(2).mean(-1, keepdim=True).sqrt()) * (1 + m.g), method)(h),
                                      m.w), {"w": torch.randn(D, D), "g": torch.zeros(D)})
    us = unit_scale(module, (8 * _x(B, D),), measure=False)
    recs = us.scale_plan(all_nodes=True)
    like = next(r for r in recs.values() if f".{method}." in f".{r.op}.")
    assert math.isclose(like.fwd_rms, 1.0, rel_tol=0.05), like.fwd_rms
    assert 0.8 < float(rms(us(8 * _x(B, D)))) < 1.25


def test_division_by_a_full_tensor_is_a_constant_division():
    """GPT-2's eager attention divides scores by ``torch.full([], sqrt(d))``: a constant, not a tensor op."""
    module = Op(lambda m, x: (x / torch.full([], 8.0)).softmax(-1))
    us = unit_scale(module, (8 * _x(B, T, T),), measure=False)
    recs = us.scale_plan(all_nodes=True)
    div = next(r for r in recs.values() if r.rule == "div")
    assert div.fwd == 1.0 and not div.changes_anything  # the model's temperature is kept
    assert math.isclose(div.fwd_rms, 1.0, rel_tol=0.05)  # RMS 8 divided by the constant 8


def test_tensor_causal_mask_is_read_as_causal():
    from unit_scale_fx.rules.registry import MASK_KEYS

    make, inputs = CASES["sdpa_causal_mask_tensor"]
    us = unit_scale(make(), inputs(), measure=False)
    masks = [n for n in us.us_module.graph.nodes if MASK_KEYS in n.meta]
    assert len(masks) == 1 and masks[0].meta[MASK_KEYS][:4] == [1, 2, 3, 4]
    causal = unit_scale(CASES["sdpa_gqa"][0](), CASES["sdpa_gqa"][1](), measure=False)
    plain = unit_scale(Op(lambda m, q, k, v: F.scaled_dot_product_attention(q, k, v)), inputs(), measure=False)

    def fwd(m):
        return next(r.fwd for r in m.scale_plan().values() if r.rule == "sdpa")

    assert math.isclose(fwd(us), fwd(causal), rel_tol=0.05)  # a tensor mask reads like is_causal=True
    assert fwd(plain) > 1.3 * fwd(us)  # causal rows average fewer keys: larger output, smaller scale


def test_op_of_an_optional_package_gets_its_rule_once_imported(monkeypatch):
    """Rules for ops of optional packages (torchvision's stochastic depth) are registered by import path:
    the registry never imports the package, and the op is known as soon as the package is."""
    import sys
    import types

    import torch.fx as fx

    from unit_scale_fx.rules import registry

    rule = registry.Rule()
    registry.register(registry.OptionalTarget("unit_scale_fx_test_optional_pkg", "drop_rows"))(rule)
    assert "unit_scale_fx_test_optional_pkg" not in sys.modules

    def drop_rows(x):
        return x

    graph = fx.Graph()
    node = graph.call_function(drop_rows, (graph.placeholder("x"),))
    assert registry.lookup(node) is None  # the package is not imported: nothing is keyed yet
    pkg = types.ModuleType("unit_scale_fx_test_optional_pkg")
    pkg.drop_rows = drop_rows
    monkeypatch.setitem(sys.modules, "unit_scale_fx_test_optional_pkg", pkg)
    assert registry.lookup(node) is rule and drop_rows in registry.registered_targets()


def test_an_optional_op_keeps_its_rule_through_a_partial_import_and_a_reload(monkeypatch):
    """A lookup while the package is still importing (its module in sys.modules, the op not yet defined)
    does not drop the rule, and a second function object of the same op (the module imported again) has it."""
    import sys
    import types

    import torch.fx as fx

    from unit_scale_fx.rules import registry

    name = "unit_scale_fx_test_optional_pkg2"
    rule = registry.Rule()
    registry.register(registry.OptionalTarget(name, "drop_rows"))(rule)

    def make():
        def drop_rows(x):
            return x

        drop_rows.__module__ = name
        return drop_rows

    pkg = types.ModuleType(name)
    monkeypatch.setitem(sys.modules, name, pkg)  # importing: the op is not defined yet
    graph = fx.Graph()
    other = graph.call_function(torch.relu, (graph.placeholder("x"),))
    registry.lookup(other)  # any lookup looks at the pending ops
    first = make()
    pkg.drop_rows = first
    node = graph.call_function(first, (other,))
    assert registry.lookup(node) is rule
    again = make()  # the module imported again: another function object, the same op
    assert again is not first and registry.lookup(graph.call_function(again, (other,))) is rule

    def drop_rows(x):  # same name, defined elsewhere: not that op
        return x

    assert registry.lookup(graph.call_function(drop_rows, (other,))) is None


def test_few_values_gain_matches_sampling():
    """Batch norm's input gradient over n values per channel: (g projected off 1 and x_hat) / batch std."""
    from unit_scale_fx.rules.batchnorm import few_values_gain

    gen = torch.Generator().manual_seed(0)
    for n in (6, 16):
        x = torch.randn(20000, n, generator=gen, dtype=torch.float64).requires_grad_(True)
        y = F.batch_norm(x.T, None, None, training=True, eps=1e-12).T  # each row a channel of n values
        (gx,) = torch.autograd.grad(y, x, torch.randn(y.shape, generator=gen, dtype=torch.float64))
        assert math.isclose(float(gx.pow(2).mean().sqrt()), few_values_gain(n), rel_tol=0.05), n


def test_topk_order_statistics_match_sampling():
    from unit_scale_fx.rules.shape import top_order_moments

    z = torch.randn(100_000, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    top = z.topk(3, -1).values
    e1, e2 = top_order_moments(8, 3)
    assert math.isclose(e1, float(top.mean()), rel_tol=0.01) and math.isclose(e2, float(top.pow(2).mean()), rel_tol=0.01)


class _ExportOnly(nn.Module):
    """``fn(self, x)``, with Python control flow on a shape so that torch.export (aten ops) captures it."""

    def __init__(self, fn, **modules) -> None:
        super().__init__()
        self.fn = fn
        for k, v in modules.items():
            setattr(self, k, v)

    def forward(self, x):
        if x.shape[0] > 0:
            return self.fn(self, x)
        return x


def test_convolution_with_string_padding_has_the_conv_rule_under_export():
    """``Conv2d(padding="valid")`` exports as ``aten.conv2d.padding`` (SigLIP's patch embedding): a convolution."""
    torch.manual_seed(0)
    m = _ExportOnly(lambda m, x: m.conv(x), conv=nn.Conv2d(8, 16, 4, stride=4, padding="valid"))
    us = unit_scale(m, (_x(4, 8, 16, 16),), measure=False, unsupported="error")
    assert us.us_capture == "torch.export"
    assert [r.rule for r in us.scale_plan().values()] == ["conv"]
    x = _x(4, 8, 16, 16).requires_grad_()
    y = us(x)
    y.backward(torch.randn_like(y))
    assert 0.8 < rms(y) < 1.25 and 0.8 < rms(x.grad) < 1.25, (rms(y), rms(x.grad))


def _group_routing(m, x):
    """DeepSeek-V3's group routing: a mask of ones scattered into ``zeros_like`` keeps the chosen groups."""
    s = F.linear(x, m.w).sigmoid()
    mask = torch.zeros_like(s).scatter(1, s.topk(2, dim=-1).indices, 1.0)
    keep = s.masked_fill(mask == 0, 0.0) + torch.ones_like(s) * 0.0 + x.new_zeros(s.shape)
    return F.linear(keep, m.v)


def test_fills_shaped_like_a_tensor_are_constants_not_unsupported_ops():
    """``zeros_like`` / ``ones_like`` / ``new_zeros`` read only their input's shape and dtype, and ``scatter``
    of a scalar into one writes a 0/1 mask: data (constants), not float ops left unscaled."""
    m = _ExportOnly(_group_routing)
    m.register_parameter("w", nn.Parameter(torch.randn(8, D)))
    m.register_parameter("v", nn.Parameter(torch.randn(D, 8)))
    us = unit_scale(m, (_x(B, D),), measure=False, unsupported="error")
    recs = us.scale_plan(all_nodes=True).values()
    # a fill reads its input's shape, never its values: it and what is built from it alone are data (constants,
    # no record), so nothing flows from the activations into them
    fills = {n.target.__name__.split(".")[0]: n for n in us.us_module.graph.nodes
             if getattr(n.target, "__name__", "").split(".")[0] in ("zeros_like", "ones_like", "new_zeros")}
    assert set(fills) == {"zeros_like", "ones_like", "new_zeros"}, sorted(fills)
    assert all(n.meta.get(CONSTANT) for n in fills.values())
    assert fills["ones_like"].meta[CONSTANT_RMS] == 1.0
    assert not any(r.rule == "fill" for r in recs)
    (scatter,) = [n for n in us.us_module.graph.nodes if "scatter" in str(n.target)]
    assert scatter.meta.get(CONSTANT)  # the ones scattered into the zeros: a 0/1 mask, data


class _Cosine(nn.Module):
    """Unit vectors between two projections (cosine attention's queries, a contrastive head): ``F.normalize``,
    which torch.fx records as one call (EdgeNeXt's cross-covariance attention left it unscaled)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, x):
        return self.b(F.normalize(self.a(x), dim=-1))


@pytest.mark.parametrize("measure", [False, True], ids=["analytic", "measured"])
def test_normalize_gives_unit_vectors_a_unit_scale(measure):
    torch.manual_seed(0)
    us = unit_scale(_Cosine(), (_x(B, T, D),), measure=measure, unsupported="error")
    assert us.us_capture == "symbolic_trace"
    (rec,) = [r for r in us.scale_plan().values() if r.rule == "normalize"]
    assert math.isclose(rec.fwd, math.sqrt(D))  # unit vectors have RMS 1 / sqrt(D)
    x = _x(B, T, D).requires_grad_()
    y = us(x)
    y.backward(torch.randn_like(y))
    assert 0.5 <= rms(y) <= 2.0 and 0.5 <= rms(x.grad) <= 2.0, (rms(y), rms(x.grad))
    assert all(0.5 <= rms(p.grad) <= 2.0 for p in (us.a.weight, us.b.weight))


def test_an_op_packet_of_several_overloads_takes_the_rule_of_the_one_its_arguments_call():
    """Dynamo records ``torch.ops.aten.slice(x, 0, 0, -1)`` inside ``torch.vmap`` (Mamba's associative scan) as a call
    of the packet, which has two overloads (``Tensor``, ``str``): it is ``slice.Tensor``, a selection."""
    import torch.fx as fx

    from unit_scale_fx.rules.registry import lookup, resolve_target

    g = fx.Graph()
    x = g.placeholder("x")
    x.meta["val"] = torch.empty(4, 3)
    n = g.call_function(torch.ops.aten.slice, (x, 0, 0, -1))
    g.output(n)
    assert resolve_target(n) is torch.ops.aten.slice.Tensor
    assert lookup(n) is not None and lookup(n).name == "preserve"
