"""fold_scales: an output scale read only by the next op's input scale becomes one scale node; scales
move up through positively homogeneous ops; the generated code fuses linears, layer norms and attention
with their scales. Exact rewrites, no scaled copy kept for backward, planning no dearer than a training
step. Memory is counted exactly (storages), never timed."""

from __future__ import annotations

import copy
import operator

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fixtures.families import TinyResNet
from helpers import golden, graph_code, hand_planned_small, pipeline_until, run_pass
from unit_scale_fx import unit_scale
from unit_scale_fx.analysis.draw import graph_text
from unit_scale_fx.analysis.memory import graph_saved_bytes, peak_tensor_bytes, saved_tensor_bytes
from unit_scale_fx.examples import GPT, ResidualMLP, gpt_batch, mlp_batch
from unit_scale_fx.passes import PassContext, rewrite
from unit_scale_fx.passes.fold_scales import fold_scales, fuse_linears
from unit_scale_fx.record import FOLDED, INSERTED, META_KEY, SCALE_ROLE
from unit_scale_fx.scale import scale, scaled_add, scaled_attention, scaled_conv, scaled_layer_norm, scaled_linear

ROLE = SCALE_ROLE


def _rewritten():
    _, gm = hand_planned_small()
    rewrite(gm, PassContext())
    gm.recompile()
    return gm


def test_golden_code_one_pair_folded():
    gm = _rewritten()
    assert "scale_2 = scale(gelu, 2, 3)" in graph_code(gm)  # gelu's output scale, read by add's input scale
    result = fold_scales(gm, PassContext())
    gm.recompile()
    assert result.modified and result.info == "1 scale pairs folded"
    # (2, 3) then (0.8, 0.9) is (1.6, 2.7); the other scales sit next to a non-scale node and stay
    assert graph_code(gm) == golden("""
        x = input
        lin_weight = self.lin.weight
        lin_bias = self.lin.bias
        scale_3 = scale(x, 1, 0.25)
        scale_4 = scale(lin_weight, 1, 0.125)
        linear = linear(scale_3, scale_4, lin_bias)
        scale_5 = scale(linear, 0.5, 1)
        gelu = gelu(scale_5)
        scale = scale(x, 0.6, 0.6)
        scale_1 = scale(gelu, 1.6, 2.7)
        add = add(scale, scale_1)
        return add
    """)
    folded = next(n for n in gm.graph.nodes if n.name == "scale_1")
    assert folded.meta[SCALE_ROLE] == ("output", "gelu") and folded.meta[FOLDED] == (0.8, 0.9)
    assert not fold_scales(gm, PassContext()).modified  # nothing left to fold


def test_folding_changes_neither_values_nor_gradients():
    x, y = torch.randn(16, 32), torch.randn(16, 8)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 8))
    gm, ctx, p = pipeline_until(model, (x,), "fold_scales")
    n_scales = sum(n.target is scale for n in gm.graph.nodes)
    xa = x.clone().requires_grad_()
    out = gm(xa)
    ref = [out.detach()] + list(torch.autograd.grad(out, [xa, *gm.parameters()], y))
    result = run_pass(gm, ctx, p)
    n_folded = int(result.info.split()[0])
    assert n_folded >= 2 and sum(n.target is scale for n in gm.graph.nodes) == n_scales - n_folded
    xb = x.clone().requires_grad_()
    out = gm(xb)
    got = [out.detach()] + list(torch.autograd.grad(out, [xb, *gm.parameters()], y))
    for a, b in zip(got, ref):
        # float32: after the pass the generated code applies factors inside the GEMMs (alpha), which rounds
        # a little differently from separate multiplies
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_an_output_scale_with_two_readers_is_not_folded():
    gm = _rewritten()
    out_scale = next(n for n in gm.graph.nodes if n.name == "scale_2")
    with gm.graph.inserting_after(out_scale):
        extra = gm.graph.call_function(torch.neg, (out_scale,))
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    out_node.args = ((out_node.args[0], extra),)
    gm.recompile()
    assert not fold_scales(gm, PassContext()).modified


def _mlp():
    torch.manual_seed(0)
    return ResidualMLP(d_in=16, d=32, layers=2, d_out=4), mlp_batch(16, 4, batch=64)


def _gpt():
    torch.manual_seed(0)
    return GPT(vocab=64, d=32, layers=2, heads=2, max_len=32), gpt_batch(64, batch=4, seq=16)


def _resnet():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    return TinyResNet(width=8), (torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 10, (4,), generator=g))


class SiluConvNet(nn.Module):
    """Convolutions read a SiLU's, a hardswish's and an in-place SiLU's outputs (a mobile-network block)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16)
        self.c3, self.b3 = nn.Conv2d(16, 8, 1), nn.BatchNorm2d(8)
        self.c4, self.act = nn.Conv2d(8, 8, 1), nn.SiLU(inplace=True)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.b1(self.c1(x)))
        h = F.hardswish(self.b2(self.c2(h)))
        h = self.c4(self.act(self.b3(self.c3(h))))
        return F.cross_entropy(self.fc(F.gelu(h).mean((2, 3))), y)


def _silu_convnet():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    return SiluConvNet(), (torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g))


MODELS = {"relu-mlp": _mlp, "gpt": _gpt, "resnet": _resnet, "silu-convnet": _silu_convnet}


def _grad_nodes(out: torch.Tensor) -> list:
    """The nodes of the autograd graph behind ``out``."""
    seen, todo = {}, [out.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and id(node) not in seen:
            seen[id(node)] = node
            todo.extend(f for f, _ in node.next_functions)
    return list(seen.values())


def _saved(model: nn.Module, batch: tuple) -> int:
    n, loss = saved_tensor_bytes(lambda: model(*batch))
    loss.backward()
    model.zero_grad(set_to_none=True)
    return n


@pytest.mark.parametrize("name", sorted(MODELS))
def test_backward_keeps_no_scaled_copy(name):
    """Counted through saved-tensor hooks (the fused ops then run as ``autograd.Function`` s): the
    unit-scaled model saves exactly the bytes the original saves for backward, less the running
    statistics of batch norms (buffers, alive anyway), which a fused batch norm's backward does not read.

    Read from the autograd graph without hooks (batch norms, layer norms and convolutions with factors
    on their parameters' gradients only then run as native ops): exactly the original's bytes plus one
    0-dim float32 factor per batch norm and layer norm (4 bytes: the saved factor of the multiply that
    sets its gain's and bias's backward factors, ``scale._set_saved``; two where the gain's and the bias's
    factors differ, as a batch norm's may: its bias may sum a gradient shared across positions) and per
    weight and bias of a convolution whose factors are in a copy of its weight (one, shared, where their
    factors agree), saved instead of the weight (``scale._native_conv``: an
    input-gradient factor, a weight no larger than the input, forward factors 1 on input and output).
    Another native convolution saves its weight itself (a hook scales its gradient). And one factor per
    residual add whose skip alone carries factors, with a backward factor other than 1
    (``scale._native_add``), and one for a returned loss's backward-only factor (``scale.scale_returned``).
    (Not for the GPT: reading the attention's saved tensors unpacks them through
    its hook, which makes a new tensor.)"""
    model, batch = MODELS[name]()
    us = unit_scale(copy.deepcopy(model), batch)
    stats = sum(b.numel() * b.element_size() for k, b in model.named_buffers() if k.endswith(("running_mean",
                                                                                            "running_var")))
    assert _saved(us, batch) == _saved(model, batch) - stats
    if name == "gpt":
        return
    n_norms = sum(isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)) for m in model.modules())
    assert n_norms > 0
    sizes = []
    for m in (model, us):
        out = m(*batch)
        sizes.append(graph_saved_bytes(out))
        params = {p.untyped_storage().data_ptr() for p in m.parameters()}
        # per copied weight, the distinct 0-dim factors its and its bias's multiplies saved
        folded = [len({f._saved_other.untyped_storage().data_ptr() for f, _ in n.next_functions[1:]
                       if type(f).__name__ == "MulBackward0"}) for n in _grad_nodes(out)
                  if type(n).__name__ == "ConvolutionBackward0"
                  and n._saved_weight.untyped_storage().data_ptr() not in params]
        # per norm, the distinct 0-dim factors its gain's and bias's multiplies saved
        norms = [len({f._saved_other.untyped_storage().data_ptr() for f, _ in n.next_functions[1:]
                      if type(f).__name__ == "MulBackward0"}) for n in _grad_nodes(out)
                 if type(n).__name__ in ("NativeBatchNormBackward0", "NativeLayerNormBackward0")]
        # residual adds whose skip alone carries factors: one 0-dim factor each (``scale._native_add``)
        adds = sum(type(n).__name__ == "AddcmulBackward0" and n._saved_tensor2.dim() == 0 for n in _grad_nodes(out))
        # a returned loss with a backward-only factor: one 0-dim factor (``scale.scale_returned``)
        returned = type(out.grad_fn).__name__ == "MulBackward0" and out.grad_fn._saved_other.dim() == 0
        out.backward()
        m.zero_grad(set_to_none=True)
    # (an input-gradient factor, the weight no larger than the input, forward factors 1 on input and output:
    # in the ResNet, not in the SiLU network, whose convolutions read inputs with forward factors)
    assert bool(folded) == (name == "resnet")
    assert (adds > 0) == (name != "silu-convnet")
    assert len(norms) == n_norms and all(k in (1, 2) for k in norms)
    assert returned == (name != "relu-mlp")  # (the relu MLP's loss has no backward factor of its own)
    factors = sum(norms) + sum(folded) + adds + returned
    assert sizes[1] == sizes[0] + 4 * factors


@pytest.mark.parametrize("name", sorted(MODELS))
def test_planning_costs_no_more_than_a_training_step(name):
    """Planning at the first call peaks within 1.1x a training step. Not counted: the attention
    rule's probe (a fixed-size float64 sample, ~1.6 MB whatever the model, cached per shape for the
    process): planning a copy first fills that cache, so the models here can stay tiny."""
    model, batch = MODELS[name]()
    unit_scale(copy.deepcopy(model), batch)  # fills the rules' caches
    lazy = unit_scale(copy.deepcopy(model))
    first, _ = peak_tensor_bytes(lambda: lazy(*batch).backward())  # plans, then the step
    lazy.zero_grad(set_to_none=True)
    step, _ = peak_tensor_bytes(lambda: lazy(*batch).backward())
    assert first <= 1.1 * step, (first, step)


def _seeded_step(model: nn.Module, batch: tuple) -> torch.Tensor:
    """``model(*batch)`` (a scalar loss) and its backward, from the same RNG state every time."""
    torch.manual_seed(1)
    loss = model(*batch)
    loss.backward()
    return loss


def _scale_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is scale]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_with_every_scale_one_the_model_is_the_original(name):
    model, batch = MODELS[name]()
    us = unit_scale(copy.deepcopy(model), batch)
    ones = copy.deepcopy(us)
    for n in _scale_nodes(ones):
        n.args = (n.args[0], 1.0, 1.0)
    ones.recompile()
    ref = copy.deepcopy(model)
    ref.load_state_dict(us.state_dict())
    ref.train(us.training)
    a, b = _seeded_step(ones, batch), _seeded_step(ref, batch)
    assert torch.equal(a, b)
    grads = dict(ref.named_parameters())
    for k, p in ones.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, grads[k].grad, rtol=1e-6, atol=1e-7)


def test_generated_code_keeps_every_scale_value_and_dump_names_every_scale():
    model, batch = _gpt()
    us = unit_scale(model, batch)
    assert "scaled_linear" in us.code
    for n in _scale_nodes(us):
        for v in n.args[1:]:
            if float(v) != 1.0:
                assert repr(float(v)) in us.code, (n.name, v)
    text = graph_text(us.graph, us, {})
    for n in _scale_nodes(us):
        assert n.name in text
    for n in us.graph.nodes:
        rec = n.meta.get(META_KEY)
        if rec is not None and rec.changes_anything:
            assert n.name in text


def _chain(x_fwd: float, x_bwd: float, relu_fwd: float, relu_bwd: float) -> fx.GraphModule:
    """x -> linear -> scale (output) -> relu -> scale (relu's output) -> linear, as the rewrite leaves it."""
    g = fx.Graph()
    x = g.placeholder("x")
    w1, w2 = g.get_attr("w1"), g.get_attr("w2")
    lin = g.call_function(F.linear, (x, w1))
    s1 = g.call_function(scale, (lin, x_fwd, x_bwd))
    r = g.call_function(torch.relu, (s1,))
    s2 = g.call_function(scale, (r, relu_fwd, relu_bwd))
    out = g.call_function(F.linear, (s2, w2))
    g.output(out)
    for s, owner in ((s1, lin), (s2, r)):
        s.meta[INSERTED], s.meta[ROLE] = True, ("output", owner.name)
    for n in g.nodes:
        if n.op != "output":
            n.meta["val"] = torch.empty(2, dtype=torch.float64)
    root = nn.Module()
    torch.manual_seed(0)
    root.w1 = nn.Parameter(torch.randn(6, 5, dtype=torch.float64))
    root.w2 = nn.Parameter(torch.randn(3, 6, dtype=torch.float64))
    return fx.GraphModule(root, g)


def _run(gm: fx.GraphModule, x: torch.Tensor):
    gm.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    y = gm(x)
    y.backward(torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y))
    return y.detach(), x.grad, [p.grad for p in gm.parameters()]


def test_scale_moves_up_through_relu_and_merges_exactly():
    gm = _chain(0.3, 1.0, 1.7, 0.2)
    x = torch.randn(4, 5, dtype=torch.float64)
    before = _run(gm, x)
    fold_scales(gm, PassContext())
    gm.recompile()
    scales = _scale_nodes(gm)
    assert len(scales) == 1  # relu's scale moved above relu and merged with the linear's
    (s,) = scales
    assert s.args[1:] == (0.3 * 1.7, 1.0 * 0.2)
    relu = next(n for n in gm.graph.nodes if n.target is torch.relu)
    assert relu.args[0] is s and s.meta[FOLDED] == (1.7, 0.2)
    after = _run(gm, x)
    for a, b in zip(before, after):
        for u, v in zip(a if isinstance(a, list) else [a], b if isinstance(b, list) else [b]):
            torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-14)
    # the code runs the first linear and the merged scale as one scaled_linear; the second has no scale
    assert gm.code.count("scaled_linear(") == 1 and f"out_scale = {(0.3 * 1.7, 0.2)!r}" in gm.code


@pytest.mark.parametrize("pool", [F._max_pool1d, F._adaptive_max_pool1d])
def test_scale_moves_up_through_max_pooling_as_normalize_leaves_it(pool):
    """``F.max_pool1d`` is a boolean_dispatch closure that normalize replaces by ``F._max_pool1d``;
    max pooling is positively homogeneous, so a scale below relu -> pool merges with the one above."""
    g = fx.Graph()
    x = g.placeholder("x")
    s1 = g.call_function(scale, (x, 0.3, 1.0))
    r = g.call_function(torch.relu, (s1,))
    p = g.call_function(pool, (r, 2))
    s2 = g.call_function(scale, (p, 1.7, 0.2))
    g.output(s2)
    for s, owner in ((s1, x), (s2, p)):
        s.meta[INSERTED], s.meta[ROLE] = True, ("output", owner.name)
    for n in g.nodes:
        if n.op != "output":
            n.meta["val"] = torch.empty(2, dtype=torch.float64)
    gm = fx.GraphModule(nn.Module(), g)
    xin = torch.randn(2, 3, 8, dtype=torch.float64)
    before = _run(gm, xin)
    fold_scales(gm, PassContext())
    gm.recompile()
    (s,) = _scale_nodes(gm)
    assert s.args[1:] == (0.3 * 1.7, 1.0 * 0.2)
    after = _run(gm, xin)
    for a, b in zip(before[:2], after[:2]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_negative_forward_factor_does_not_move():
    gm = _chain(0.3, 1.0, -1.7, 0.2)
    fold_scales(gm, PassContext())
    assert len(_scale_nodes(gm)) == 2


@pytest.mark.parametrize("shape", [(5, 7), (2, 3, 7), (7,)])
@pytest.mark.parametrize("bias", [True, False])
def test_scaled_linear_is_the_chain_of_scales(shape, bias):
    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True) if bias else None
    s = dict(x_scale=(0.5, 0.3), weight_scale=(1.2, 0.7), bias_scale=(0.9, 0.2), out_scale=(0.25, 1.7))
    ref = scale(F.linear(scale(x, *s["x_scale"]), scale(w, *s["weight_scale"]),
                         None if b is None else scale(b, *s["bias_scale"])), *s["out_scale"])
    out = scaled_linear(x, w, b, **s)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-14)
    g = torch.randn_like(ref)
    ins = [t for t in (x, w, b) if t is not None]
    for u, v in zip(torch.autograd.grad(out, ins, g), torch.autograd.grad(ref, ins, g)):
        torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-14)
    # every factor 1: exactly F.linear
    assert torch.equal(scaled_linear(x, w, b), F.linear(x, w, b))


def test_scaled_linear_saves_what_linear_saves():
    x = torch.randn(8, 6)  # an input that needs no gradient: the weight is not saved (as in addmm)
    w = torch.randn(5, 6, requires_grad=True)
    n_ref, _ = saved_tensor_bytes(lambda: F.linear(x, w))
    n, _ = saved_tensor_bytes(lambda: scaled_linear(x, w, x_scale=(2.0, 0.5), out_scale=(0.3, 1.0)))
    assert n == n_ref == x.numel() * 4


def _mul_outputs(fn) -> list:
    """The shapes of the out-of-place ``mul`` results that ``fn()`` computes (new scaled tensors)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    shapes: list = []

    class Muls(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket is torch.ops.aten.mul:
                shapes.append(tuple(out.shape))
            return out

    with Muls():
        fn()
    return shapes


def test_an_owned_input_is_scaled_in_place_with_the_same_values_and_gradients():
    """``x_in_place``: the output of a GELU, read by the linear alone, is multiplied in place (no scaled copy
    of it is made); values and gradients are those of the chain of scales. A leaf, a view, or a tensor
    under a transform is left as it is."""
    torch.manual_seed(0)
    x = torch.randn(6, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    s = dict(x_scale=(1.5, 0.3), weight_scale=(1.0, 0.7), bias_scale=(1.0, 0.2), out_scale=(0.25, 1.7))
    ref = scale(F.linear(scale(F.gelu(x), *s["x_scale"]), scale(w, *s["weight_scale"]), scale(b, *s["bias_scale"])),
                *s["out_scale"])
    h = F.gelu(x)
    made = _mul_outputs(lambda: scaled_linear(h, w, b, **s, x_in_place=True))
    assert (6, 7) not in made  # no scaled copy of the input
    torch.testing.assert_close(h, 1.5 * F.gelu(x), rtol=0, atol=0)
    out = scaled_linear(F.gelu(x), w, b, **s, x_in_place=True)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-14)
    g = torch.randn_like(ref)
    for u, v in zip(torch.autograd.grad(out, (x, w, b), g), torch.autograd.grad(ref, (x, w, b), g)):
        torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-14)
    # what the op may not own: a leaf that needs a gradient, and a view
    for t in (x, F.gelu(x)[:, :]):
        before = t.detach().clone()
        assert (6, 7) in _mul_outputs(lambda: scaled_linear(t, w, b, **s, x_in_place=True))
        assert torch.equal(t, before)


@pytest.mark.parametrize("reentrant", [False, True])
def test_an_owned_input_scaled_in_place_under_checkpointing_keeps_its_gradients(reentrant):
    """Activation checkpointing recomputes GELU in backward: the recomputed output is scaled in place again,
    and the gradients are those without checkpointing."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    x = torch.randn(6, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    s = dict(x_scale=(1.5, 0.3), weight_scale=(1.0, 0.7), out_scale=(0.25, 1.7))

    def block(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return scaled_linear(F.gelu(x), w, **s, x_in_place=True)

    g = torch.randn(6, 4, dtype=torch.float64)
    want = torch.autograd.grad(block(x, w), (x, w), g)
    block_ck = checkpoint(block, x, w, use_reentrant=reentrant)
    block_ck.backward(g)
    for u, v in zip((x.grad, w.grad), want):
        torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-14)


def test_a_gelu_output_read_by_one_linear_is_scaled_in_place_in_the_generated_code():
    """The GPT's MLP: GELU's output (its backward reads GELU's input) reaches the down projection, which
    alone reads it, scaled in place; a ReLU's output (which its backward reads) never is."""
    us = unit_scale(*_gpt())
    assert us.code.count("x_in_place = True") == us.code.count("gelu(") > 0
    mlp = unit_scale(*_mlp())
    assert "x_in_place" not in mlp.code


def test_convolutions_scale_activation_outputs_in_place_and_never_an_alias():
    """A SiLU's and a hardswish's outputs reach the convolutions that alone read them scaled in place (the
    model's in-place SiLU too: the rewrite made it out of place). That the fused code computes the graph's
    function: ``test_fused_code_computes_the_graph_with_its_scales``. An op that returns its input
    (``inplace=True``, ``out=``) or a value with a second reader is never scaled in place."""
    from unit_scale_fx.passes.fold_scales import _in_place

    us = unit_scale(*_silu_convnet())
    lines = [ln for ln in us.code.splitlines() if "scaled_conv(" in ln]
    assert ["x_in_place = True" in ln for ln in lines] == [False, True, True, True], lines
    g = fx.Graph()
    x = g.placeholder("x")
    ops = [g.call_function(F.silu, (x,)), g.call_function(F.silu, (x,), {"inplace": True}),
           g.call_function(F.silu, (x, True)), g.call_function(torch.mul, (x, 2.0), {"out": x}),
           g.call_function(F.gelu, (x,)), g.call_function(torch.relu, (x,))]
    readers = [g.call_function(scale, (op, 2.0, 1.0)) for op in ops]
    second = g.call_function(torch.neg, (ops[4],))
    g.output((*readers, second))
    assert [_in_place(r) for r in readers] == [True, False, False, False, False, False]


def test_fuse_linears_absorbs_a_scale_through_views():
    """A backward-only scale whose output goes through views into a linear runs inside the linear."""
    g = fx.Graph()
    x, w = g.placeholder("x"), g.get_attr("w")
    s = g.call_function(scale, (x, 1.0, 0.5))
    s.meta[INSERTED], s.meta[ROLE] = True, ("output", "x")
    t = g.call_method("transpose", (s, 0, 1))
    g.output(g.call_function(F.linear, (t, w)))
    for n in g.nodes:
        if n.op != "output":
            n.meta["val"] = torch.empty(2)
    assert fuse_linears(g) == 1
    (lin,) = [n for n in g.nodes if n.target is scaled_linear]
    assert lin.kwargs == {"x_scale": (1.0, 0.5)} and lin.args[0].target == "transpose"
    assert not [n for n in g.nodes if n.target is scale]


@pytest.mark.parametrize("affine", [True, False])
def test_scaled_layer_norm_is_the_chain_of_scales(affine):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, dtype=torch.float64, requires_grad=True) if affine else None
    b = torch.randn(8, dtype=torch.float64, requires_grad=True) if affine else None
    s = dict(x_scale=(1.0, 0.3), weight_scale=(1.0, 0.7), bias_scale=(1.0, 0.2), out_scale=(0.25, 1.7))
    ref = scale(F.layer_norm(scale(x, *s["x_scale"]), (8,), None if w is None else scale(w, *s["weight_scale"]),
                             None if b is None else scale(b, *s["bias_scale"])), *s["out_scale"])
    out = scaled_layer_norm(x, (8,), w, b, 1e-5, **s)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-14)
    g = torch.randn_like(ref)
    ins = [t for t in (x, w, b) if t is not None]
    for u, v in zip(torch.autograd.grad(out, ins, g), torch.autograd.grad(ref, ins, g)):
        torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-14)
    n_ref, _ = saved_tensor_bytes(lambda: F.layer_norm(x, (8,), w, b))
    n, _ = saved_tensor_bytes(lambda: scaled_layer_norm(x, (8,), w, b, **s))
    assert n == n_ref


def test_a_forward_factor_on_a_gemm_operand_multiplies_the_operand_not_alpha():
    """The GEMM must read the unit (scaled) operand: an input scale's forward factor multiplies the
    operand inside ``scaled_linear`` (its backward factor is the backward GEMM's alpha)."""
    from unit_scale_fx.analysis.recorder import MatmulRecorder

    g = fx.Graph()
    x, w = g.placeholder("x"), g.get_attr("w")
    s = g.call_function(scale, (x, 2.0, 0.5))
    s.meta[INSERTED], s.meta[ROLE] = True, ("output", "x")
    g.output(g.call_function(F.linear, (s, w)))
    for n in g.nodes:
        if n.op != "output":
            n.meta["val"] = torch.empty(2)
    fused = copy.deepcopy(g)
    assert fuse_linears(fused) == 1
    (lin,) = [n for n in fused.nodes if n.target is scaled_linear]
    assert lin.kwargs == {"x_scale": (2.0, 0.5)} and not [n for n in fused.nodes if n.target is scale]
    root = nn.Module()
    gen = torch.Generator().manual_seed(0)
    root.w = nn.Parameter(torch.randn(64, 32, generator=gen))
    xin = (torch.randn(256, 32, generator=gen) / 2).requires_grad_()
    gout = torch.randn(256, 64, generator=gen)
    ref = fx.GraphModule(root, g)(xin)
    ref_grads = torch.autograd.grad(ref, (xin, root.w), gout)
    rec = MatmulRecorder()
    with rec:
        out = fx.GraphModule(root, fused)(xin)
        rec.backward()
        grads = torch.autograd.grad(out, (xin, root.w), gout)
    torch.testing.assert_close(out, ref)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)
    assert {r.phase for r in rec.records} == {"fwd", "bwd"}
    assert all(0.9 <= r.rms <= 1.1 for r in rec.records), [(r.phase, r.role, r.rms) for r in rec.records]


@pytest.mark.parametrize("dims,kw", [(1, dict(stride=2, padding=1)), (2, dict(padding=(1, 0), dilation=2)),
                                     (2, dict(stride=(2, 1), groups=2)), (3, dict())])
@pytest.mark.parametrize("bias", [True, False])
def test_scaled_conv_is_the_chain_of_scales(dims, kw, bias):
    torch.manual_seed(0)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dims]
    x = torch.randn(2, 4, *[7] * dims, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 4 // kw.get("groups", 1), *[3] * dims, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True) if bias else None
    s = dict(x_scale=(0.5, 0.3), weight_scale=(1.2, 0.7), bias_scale=(0.9, 0.2), out_scale=(0.25, 1.7))
    ref = scale(conv(scale(x, *s["x_scale"]), scale(w, *s["weight_scale"]),
                     None if b is None else scale(b, *s["bias_scale"]), **kw), *s["out_scale"])
    out = scaled_conv(x, w, b, **kw, **s)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-14)
    g = torch.randn_like(ref)
    ins = [t for t in (x, w, b) if t is not None]
    for u, v in zip(torch.autograd.grad(out, ins, g), torch.autograd.grad(ref, ins, g)):
        torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-14)
    assert torch.equal(scaled_conv(x, w, b, **kw), conv(x, w, b, **kw))  # every factor 1: the convolution
    one = dict(x_scale=(1.0, 0.3), weight_scale=(1.0, 0.7), out_scale=(0.25, 1.0))  # what the planner leaves
    n_ref, _ = saved_tensor_bytes(lambda: conv(x, w, b, **kw))
    n, _ = saved_tensor_bytes(lambda: scaled_conv(x, w, b, **kw, **one))
    assert n == n_ref


_FOLD_SCALES = dict(x_scale=(1.0, 0.3), weight_scale=(1.2, 0.7), bias_scale=(0.9, 0.2), out_scale=(1.0, 1.7))


def _conv_chain(x, w, b, s, **kw):
    return scale(F.conv2d(scale(x, *s["x_scale"]), scale(w, *s["weight_scale"]),
                          None if b is None else scale(b, *s["bias_scale"]), **kw), *s["out_scale"])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bias,kw", [(True, dict(padding=1)), (False, dict(padding="same")),
                                     (True, dict(stride=2, groups=2))])
def test_convolution_with_a_smaller_weight_carries_every_factor_in_the_weight(dtype, bias, kw):
    """A convolution whose weight is smaller than its input, with an input-gradient factor, other backward
    factors and the weight's and bias's forward factors: the chain of scales forward and backward, as
    native autograd ops that make no pass over the input, the output or their gradients (the factors are
    in a copy of the weight and in 0-dim factors), that read in forward the operands the chain reads, and
    that save what the convolution saves (the copy in place of the weight) and the 0-dim factors."""
    torch.manual_seed(0)
    x = torch.randn(4, 4, 8, 8, dtype=dtype, requires_grad=True)
    w = torch.randn(6, 4 // kw.get("groups", 1), 3, 3, dtype=dtype, requires_grad=True)
    b = torch.randn(6, dtype=dtype, requires_grad=True) if bias else None
    assert w.numel() < x.numel()
    ref = _conv_chain(x, w, b, _FOLD_SCALES, **kw)
    out = scaled_conv(x, w, b, **kw, **_FOLD_SCALES)
    tol = dict(rtol=1e-12, atol=1e-13) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, ref, **tol)
    g = torch.randn_like(ref)
    ins = [t for t in (x, w, b) if t is not None and t.requires_grad]
    for u, v in zip(torch.autograd.grad(out, ins, g, retain_graph=True), torch.autograd.grad(ref, ins, g)):
        torch.testing.assert_close(u, v, **tol)
    seen = _grad_nodes(out)
    assert not any(isinstance(n, torch.autograd.function.BackwardCFunction) for n in seen)
    factors = (1 + bias) * torch.empty((), dtype=dtype).element_size()
    assert graph_saved_bytes(out) == graph_saved_bytes(F.conv2d(x, w, b, **kw)) + factors
    big, operands = [], []  # multiplies of tensors of the input's or the output's size; forward operands

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            res = func(*args, **(kwargs or {}))
            if func.overloadpacket in (torch.ops.aten.mul, torch.ops.aten.mul_) and res.numel() > w.numel():
                big.append(func)
            if func is torch.ops.aten.convolution.default:
                operands.append([t.detach().clone() for t in args[:3] if t is not None])
            return res

    with Count():
        torch.autograd.grad(scaled_conv(x, w, b, **kw, **_FOLD_SCALES), ins, g)
    assert big == []
    want = [x, w * 1.2] + ([b * 0.9] if bias else [])
    assert len(operands) == 1 and all(torch.equal(u, v) for u, v in zip(operands[0], want))


def test_convolution_under_autocast_is_the_chain_of_scales():
    """Under autocast the convolution reads a cast copy of its weight, so its factors do not go into the
    weight (the copy carrying them would not be what backward reads): the chain's gradients, exactly, on
    each path."""
    torch.manual_seed(0)
    x = torch.randn(4, 4, 8, 8, requires_grad=True)
    w = torch.randn(6, 4, 3, 3, requires_grad=True)
    g = torch.randn(4, 6, 8, 8, dtype=torch.bfloat16)
    for s in (dict(x_scale=(1.0, 0.25), weight_scale=(1.0, 4.0), out_scale=(0.5, 1.0)),
              dict(x_scale=(1.0, 0.25), weight_scale=(1.0, 4.0))):
        grads = []
        for fn in (lambda: _conv_chain(x, w, None, {"bias_scale": (1.0, 1.0), **{k: s.get(k, (1.0, 1.0)) for k in
                                                     ("x_scale", "weight_scale", "out_scale")}}, padding=1),
                   lambda: scaled_conv(x, w, None, 1, 1, **s)):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = fn()
            assert out.dtype == torch.bfloat16
            grads.append(torch.autograd.grad(out, (x, w), g))
        for u, v in zip(*grads):
            torch.testing.assert_close(u, v, rtol=0, atol=0)


def _conv_bn(x, w, bn, x_scale=(1.0, 0.3), weight_scale=(1.2, 0.7)):
    from unit_scale_fx.scale import scaled_batch_norm

    h = scaled_conv(x, w, None, 1, 1, x_scale=x_scale, weight_scale=weight_scale)
    return scaled_batch_norm(bn, h, x_scale=(0.4, 1.0), out_scale=(1.5, 0.6))


def _conv_bn_inputs():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    bn = nn.BatchNorm2d(5).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.normal_()
    return x, w, bn


@pytest.mark.parametrize("batch,gx,copied", [(2, 0.3, True), (1, 0.3, False), (2, 1.0, False)])
def test_convolution_and_batch_norm_with_weight_factors_run_as_native_ops(batch, gx, copied):
    """A convolution with factors on its gradients only, and a batch norm with factors: native autograd
    ops (no Python ``autograd.Function`` in the graph), the chain of scales forward and backward. The
    convolution saves a weight of the weight's size: where the input gradient has a factor and the input
    is larger than the weight (batch 2), a copy that carries the factors; else the weight itself, whose
    gradients hooks scale."""
    x, w, bn = _conv_bn_inputs()
    x = x[:batch].detach().requires_grad_()
    assert (w.numel() <= x.numel()) == (batch == 2)
    ref_bn = copy.deepcopy(bn)
    out = _conv_bn(x, w, bn, x_scale=(1.0, gx), weight_scale=(1.0, 0.7))
    seen = _grad_nodes(out)
    assert not any(isinstance(n, torch.autograd.function.BackwardCFunction) for n in seen)
    saved = [n._saved_weight for n in seen if type(n).__name__.startswith("Convolution")]
    assert len(saved) == 1 and saved[0].shape == w.shape
    assert (saved[0].untyped_storage().data_ptr() != w.untyped_storage().data_ptr()) == copied
    ref = scale(ref_bn(scale(F.conv2d(scale(x, 1.0, gx), scale(w, 1.0, 0.7), None, 1, 1), 0.4, 1.0)), 1.5, 0.6)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-13)
    g = torch.randn_like(ref)
    ins, ref_ins = [x, w, bn.weight, bn.bias], [x, w, ref_bn.weight, ref_bn.bias]
    for u, v in zip(torch.autograd.grad(out, ins, g), torch.autograd.grad(ref, ref_ins, g)):
        torch.testing.assert_close(u, v, rtol=1e-11, atol=1e-12)
    for u, v in zip(bn.buffers(), ref_bn.buffers()):
        torch.testing.assert_close(u, v, rtol=1e-12, atol=0)


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointed_convolution_and_batch_norm_keep_their_gradients(reentrant):
    """Under activation checkpointing (saved-tensor hooks; non-reentrant checkpointing stops recomputing
    after the last saved tensor) the fused ops give the gradients they give without it."""
    from torch.utils.checkpoint import checkpoint

    x, w, bn = _conv_bn_inputs()
    bn_ck = copy.deepcopy(bn)
    g = torch.randn(2, 5, 6, 6, dtype=torch.float64)
    _conv_bn(x, w, bn).backward(g)  # (reentrant checkpointing takes .backward only)
    want = [t.grad.clone() for t in (x, w, bn.weight, bn.bias)]
    x.grad = w.grad = None
    checkpoint(_conv_bn, x, w, bn_ck, use_reentrant=reentrant).backward(g)
    for u, v in zip((x.grad, w.grad, bn_ck.weight.grad, bn_ck.bias.grad), want):
        torch.testing.assert_close(u, v, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("s", [dict(a_scale=(0.6, 0.8), b_scale=(0.7, 0.5), out_scale=(1.1, 1.3)),
                               dict(a_scale=(0.97, 0.93)), dict(b_scale=(1.0, 0.4), out_scale=(0.7, 1.0)),
                               dict(a_scale=(0.8, 0.8), out_scale=(0.5, 0.5))])
@pytest.mark.parametrize("shape_b", [(3, 5), (5,), (1, 5)])
def test_scaled_add_is_the_chain_of_scales(s, shape_b):
    torch.manual_seed(0)
    a = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(*shape_b, dtype=torch.float64, requires_grad=True)
    one = (1.0, 1.0)
    ref = scale(scale(a, *s.get("a_scale", one)) + scale(b, *s.get("b_scale", one)), *s.get("out_scale", one))
    out = scaled_add(a, b, **s)
    torch.testing.assert_close(out, ref, rtol=1e-14, atol=1e-15)
    g = torch.randn_like(ref)
    for u, v in zip(torch.autograd.grad(out, (a, b), g), torch.autograd.grad(ref, (a, b), g)):
        torch.testing.assert_close(u, v, rtol=1e-14, atol=1e-15)
    assert torch.equal(scaled_add(a, b), a + b)
    n, _ = saved_tensor_bytes(lambda: scaled_add(a, b, **s))
    assert n == 0
    # a Python autograd.Function only where some forward factor differs from its backward one and not one
    # input alone carries factors with a backward factor other than 1 (a residual add whose skip alone is
    # scaled: a native op; with backward factor 1 the Function passes the gradient on without a multiply)
    (fa, ga), (fb, gb), (fo, go) = (s.get(k, one) for k in ("a_scale", "b_scale", "out_scale"))
    k, c = (fa * fo, fb * fo), (ga * go, gb * go)
    want_fn = k != c and not any((k[i], c[i]) == (1.0, 1.0) and c[1 - i] != 1.0 for i in (0, 1))
    assert any(isinstance(n, torch.autograd.function.BackwardCFunction) for n in _grad_nodes(out)) == want_fn


def test_resnet_convolutions_and_residual_adds_run_as_fused_ops():
    """In a ResNet's generated code no scale is left around a convolution or a residual add, and
    the code keeps every scale value; the graph (what ``dump`` shows) keeps every scale node."""
    model, batch = _resnet()
    us = unit_scale(model, batch)
    assert us.code.count("scaled_conv(") == sum(1 for m in model.modules() if isinstance(m, nn.Conv2d))
    assert us.code.count("scaled_batch_norm(") == sum(1 for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert "scaled_add(" in us.code
    fused = fx.Graph()
    fused.graph_copy(us.graph, {})
    from unit_scale_fx.passes.fold_scales import fuse_ops

    fuse_ops(fused)
    for n in fused.nodes:
        if n.target in (torch.conv2d, operator.add):
            assert not any(a.target is scale for a in n.all_input_nodes), n
            assert not any(u.target is scale for u in n.users), n
    for n in _scale_nodes(us):
        for v in n.args[1:]:
            if float(v) != 1.0:
                assert repr(float(v)) in us.code, (n.name, v)


def test_scaled_attention_is_the_chain_and_keeps_a_learned_mask_gradient():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 8, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    bias = torch.randn(8, 8, dtype=torch.float64, requires_grad=True)
    s = dict(q_scale=(1.0, 0.3), k_scale=(1.0, 0.7), v_scale=(1.0, 0.2), out_scale=(2.5, 1.7))
    for mask in (None, bias):
        ref = scale(F.scaled_dot_product_attention(scale(q, 1.0, 0.3), scale(k, 1.0, 0.7), scale(v, 1.0, 0.2),
                                                   attn_mask=mask), 2.5, 1.7)
        out = scaled_attention(q, k, v, attn_mask=mask, **s)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-14)
        ins = [q, k, v] + ([bias] if mask is not None else [])
        g = torch.randn_like(ref)
        for a, b in zip(torch.autograd.grad(out, ins, g), torch.autograd.grad(ref, ins, g)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    n_ref, _ = saved_tensor_bytes(lambda: F.scaled_dot_product_attention(q, k, v))
    n, _ = saved_tensor_bytes(lambda: scaled_attention(q, k, v, **s))
    assert n == n_ref


@pytest.mark.parametrize("kw", [dict(dropout_p=0.1), dict(dropout_p=0.2, is_causal=True),
                                dict(dropout_p=0.1, attn_mask="bool", scale=0.3), dict(dropout_p=0.1, attn_mask="add"),
                                dict(dropout_p=0.1, enable_gqa=True), dict(heads_kv=1), dict(q_unit=4.0)])
def test_attention_kernels_read_unit_operands_and_compute_the_same_function(kw):
    """Attention with dropout (PyTorch's math path on the CPU), broadcast key/value heads and a query the
    model scaled itself: the same outputs and gradients as ``scaled_dot_product_attention`` on the same RNG
    state, and every matmul inside reads unit operands, forward and backward (the dispatch-level recorder)."""
    from unit_scale_fx.analysis.recorder import MatmulRecorder

    kw = dict(kw)
    q_unit = kw.pop("q_unit", 1.0)
    hk = kw.pop("heads_kv", 2 if kw.get("enable_gqa") else 4)
    gen = torch.Generator().manual_seed(0)
    q = (torch.randn(2, 4, 16, 8, generator=gen) / q_unit).requires_grad_()
    k, v = (torch.randn(2, hk, 16, 8, generator=gen).requires_grad_() for _ in range(2))
    if kw.get("attn_mask") == "bool":
        kw["attn_mask"] = torch.rand(16, 16, generator=gen) > 0.3
    elif kw.get("attn_mask") == "add":
        kw["attn_mask"] = torch.randn(16, 16, generator=gen)
    ref_kw = dict(kw)
    if hk == 1 and not kw.get("enable_gqa"):
        ref_kw["enable_gqa"] = False  # broadcasting over heads, as the model wrote it
    g = torch.randn(2, 4, 16, 8, generator=gen)
    torch.manual_seed(1)
    ref = F.scaled_dot_product_attention(q, k, v, **ref_kw)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    rec = MatmulRecorder()
    torch.manual_seed(1)
    with rec:
        out = scaled_attention(q, k, v, q_unit=q_unit, **kw)
        rec.backward()
        grads = torch.autograd.grad(out, (q, k, v), g)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert {r.phase for r in rec.records} == {"fwd", "bwd"}
    bad = [(r.op, r.phase, r.role, round(r.rms, 3)) for r in rec.records if not 0.5 <= r.rms <= 2.0]
    assert not bad, bad


def _unfused(us: fx.GraphModule) -> fx.GraphModule:
    """``us`` running its graph as it is, one op per node (every scale a separate multiply)."""
    from torch.fx.graph import CodeGen

    plain = copy.deepcopy(us)
    plain.graph.set_codegen(CodeGen())
    plain.recompile()
    return plain


@pytest.mark.parametrize("name", sorted(MODELS))
def test_fused_code_computes_the_graph_with_its_scales(name):
    """The generated code (fused ops, factors moved between them) is the graph's function, forward and
    backward, with the planned scales: the same loss, the same gradients, the same batch-norm statistics."""
    model, batch = MODELS[name]()
    us = unit_scale(copy.deepcopy(model), batch).double()
    plain = _unfused(us)
    batch = tuple(t.double() if t.is_floating_point() else t for t in batch)
    assert "scaled_linear(" in us.code and "scaled_linear(" not in plain.code
    a, b = _seeded_step(us, batch), _seeded_step(plain, batch)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=0)
    grads = dict(plain.named_parameters())
    for k, p in us.named_parameters():
        torch.testing.assert_close(p.grad, grads[k].grad, rtol=1e-9, atol=1e-12, msg=k)
    bufs = dict(plain.named_buffers())
    for k, t in us.named_buffers():
        torch.testing.assert_close(t, bufs[k], rtol=1e-12, atol=0, msg=k)


def _activation_passes(model: nn.Module, batch: tuple) -> int:
    """Multiplies (``mul``, ``mul_``, ``div``) over activations (leading dimension the batch, 2**10 elements
    or more) in one forward and backward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket in (torch.ops.aten.mul, torch.ops.aten.mul_, torch.ops.aten.div) \
                    and isinstance(out, torch.Tensor) and out.numel() >= 2 ** 10 and out.shape[0] == rows:
                Count.n += 1
            return out

    rows = batch[0].shape[0]
    model(*batch).backward()
    with Count():
        model(*batch).backward()
    return Count.n


@pytest.mark.parametrize("name,extra", [("relu-mlp", 2), ("resnet", 2)])
def test_scales_cost_few_passes_over_activations(name, extra):
    """What the scales still cost in one training step, counted exactly: the passes over activations
    that the original model does not make, none of them in forward. Relu MLP: the skip gradient's factor
    of each of the two residual adds (the skip also feeds the next layer norm: its gradient sums two
    terms). ResNet: the input-gradient factor of the one convolution whose input another op reads too and
    whose weight is larger than its input (in place, by a hook on the convolution's view of its input;
    the other convolutions' factors are in a copy of their weight, ``scale._native_conv``: six passes
    before it), and the factor of the one skip that a residual add produces; the other skips' factors go
    into the batch norms that produce them (``factor_shared_grads``). (Before factors were placed between
    fused ops and batch norms were fused: 39.)"""
    model, batch = MODELS[name]()
    us = unit_scale(copy.deepcopy(model), batch)
    assert _activation_passes(us, batch) - _activation_passes(model, batch) == extra


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("affine,momentum,track", [(True, 0.1, True), (False, None, True), (True, 0.3, False)])
def test_scaled_batch_norm_is_the_chain_of_scales(dims, affine, momentum, track):
    from unit_scale_fx.scale import scaled_batch_norm

    torch.manual_seed(0)
    bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims](
        6, affine=affine, momentum=momentum, track_running_stats=track).double()
    if affine:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
    ref_bn = copy.deepcopy(bn)
    x = (3 * torch.randn(4, 6, *[5] * dims, dtype=torch.float64) + 1).requires_grad_()
    s = dict(x_scale=(0.3, 0.7), out_scale=((1.4, 0.05), (1.1, 2.0)))
    for _ in range(2):  # twice: the running statistics are updated from updated statistics
        ref = scale(ref_bn(scale(x, 0.3, 0.7)), 1.4 * 1.1, 0.05 * 2.0)
        out = scaled_batch_norm(bn, x, **s)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        g = torch.randn_like(ref)
        ins = [x] + ([bn.weight, bn.bias] if affine else [])
        ref_ins = [x] + ([ref_bn.weight, ref_bn.bias] if affine else [])
        for u, v in zip(torch.autograd.grad(out, ins, g), torch.autograd.grad(ref, ref_ins, g)):
            torch.testing.assert_close(u, v, rtol=1e-11, atol=1e-12)
        for (k, u), v in zip(bn.named_buffers(), ref_bn.buffers()):
            torch.testing.assert_close(u, v, rtol=1e-12, atol=0, msg=k)
    n_ref, _ = saved_tensor_bytes(lambda: scale(ref_bn(scale(x, 0.3, 0.7)), 1.54, 0.1))
    n, _ = saved_tensor_bytes(lambda: scaled_batch_norm(bn, x, **s))
    assert n <= n_ref
    bn.eval(), ref_bn.eval()  # evaluation: the chain itself
    torch.testing.assert_close(scaled_batch_norm(bn, x, **s), scale(ref_bn(scale(x, 0.3, 0.7)), 1.54, 0.1))
    bn.train()
    assert torch.equal(scaled_batch_norm(bn, x.detach()), ref_bn.train()(x.detach()))  # every factor 1: the layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # the native ops, and the Function
def test_scaled_batch_norm_updates_its_buffers_in_place_and_fails_as_the_original(dtype):
    """The running statistics are updated in the buffers' own storage, as the original's kernel does; one
    value per channel in training raises the original's error; a call that fails inside the kernel leaves
    the buffers as they were."""
    from unit_scale_fx.scale import scaled_batch_norm

    bn = nn.BatchNorm2d(3).to(dtype)
    s = dict(x_scale=(0.25, 1.0), out_scale=(1.0, 0.3))
    ptrs = [t.data_ptr() for t in bn.buffers()]
    x = torch.randn(4, 3, 5, 5, dtype=dtype, requires_grad=True)
    if dtype is torch.float32:  # under saved-tensor hooks: the autograd Function
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            scaled_batch_norm(bn, x, **s).sum().backward()
    else:
        scaled_batch_norm(bn, x, **s).sum().backward()
    assert [t.data_ptr() for t in bn.buffers()] == ptrs
    assert not torch.allclose(bn.running_var, torch.ones(3, dtype=dtype))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        nn.BatchNorm2d(3).to(dtype)(x[:1, :, :1, :1])
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        scaled_batch_norm(bn, x[:1, :, :1, :1], **s)
    before = [t.clone() for t in (bn.running_mean, bn.running_var)]
    with pytest.raises(RuntimeError):
        scaled_batch_norm(bn, torch.randn(4, 5, 5, 5, dtype=dtype, requires_grad=True), **s)  # 5 channels, not 3
    for t, u in zip((bn.running_mean, bn.running_var), before):
        assert torch.equal(t, u)


def test_factors_move_to_where_they_cost_no_pass():
    """In the relu MLP's code, the backward factor of each first linear's output is applied by the
    second linear's input-gradient GEMM (``alpha``), across the relu; the code keeps its value."""
    from unit_scale_fx.passes import fold_scales as fs
    from unit_scale_fx.scale import _pair

    model, batch = _mlp()
    us = unit_scale(model, batch)
    graphs = []
    for place in (False, True):
        g = fx.Graph(owning_module=us)
        g.graph_copy(us.graph, {})
        fs.fuse_batch_norms(g), fs.fuse_linears(g), fs.fuse_layer_norms(g), fs.fuse_adds(g)
        assert (fs.place_grad_factors(g) > 0) if place else True
        graphs.append({n.name: n for n in g.nodes})
    before, after = graphs
    moved = 0
    for name, n in after.items():
        if n.target is scaled_linear and isinstance(n.args[0], fx.Node) and n.args[0].target is torch.relu:
            (p,) = n.args[0].all_input_nodes
            go = _pair(before[p.name].kwargs["out_scale"])[1]
            assert go != 1.0 and _pair(p.kwargs["out_scale"]) == (_pair(before[p.name].kwargs["out_scale"])[0], 1.0)
            fx0, gx0 = _pair(before[name].kwargs.get("x_scale", (1.0, 1.0)))
            assert _pair(n.kwargs["x_scale"]) == (fx0, gx0 * go)
            assert repr(go) in us.code
            moved += 1
    assert moved == 2
