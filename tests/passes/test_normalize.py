"""normalize: in-place ops become out-of-place; later readers read the new value."""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from helpers import golden, graph_code
from unit_scale_fx.capture import capture
from unit_scale_fx.passes import PassContext, normalize

aten = torch.ops.aten


class InPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        y = self.lin(x)
        y.add_(x)          # in-place method
        z = F.relu(y, inplace=True)
        return z * 2 + y   # reads the mutated y


def test_normalize_makes_inplace_ops_out_of_place_and_keeps_semantics():
    m = InPlace()
    x = torch.randn(4, 8)
    expected = m(x.clone())
    gm = capture(m, (x,))
    result = normalize(gm, PassContext(example_args=(x,)))
    gm.recompile()
    assert result.modified and result.info == "2 in-place ops made out-of-place"
    # golden: the method is out of place, relu is not in place, and the last add reads relu's output
    # (the value y holds after both in-place updates), not the linear's
    assert graph_code(gm) == golden("""
        x = input
        lin_weight = self.lin.weight
        lin_bias = self.lin.bias
        linear = linear(x, lin_weight, lin_bias)
        add_ = linear.add(x)
        relu = relu(add_, inplace=False)
        mul = mul(relu, 2)
        add = add(mul, relu)
        return add
    """)
    gm.graph.lint()
    torch.testing.assert_close(gm(x.clone()), expected)


def test_aten_inplace_on_values_is_rewritten_but_buffer_updates_are_kept():
    g = fx.Graph()
    x, buf = g.placeholder("x"), g.get_attr("buf")
    h = g.call_function(aten.mul.Tensor, (x, x))
    h2 = g.call_function(aten.add_.Tensor, (h, x))  # on an intermediate value: made out of place
    upd = g.call_function(aten.add_.Tensor, (buf, h))  # a buffer update: its side effect is the point
    g.output((h, upd))
    root = nn.Module()
    root.register_buffer("buf", torch.zeros(3))
    gm = fx.GraphModule(root, g)
    x_val = torch.randn(3)
    normalize(gm, PassContext())
    gm.recompile()
    assert h2.target is aten.add.Tensor and upd.target is aten.add_.Tensor
    assert graph_code(gm) == golden("""
        x = input
        buf = self.buf
        mul_tensor = aten.mul.Tensor(x, x)
        add__tensor = aten.add.Tensor(mul_tensor, x)
        add__tensor_1 = aten.add_.Tensor(buf, add__tensor)
        return (add__tensor, add__tensor_1)
    """)
    out, new_buf = gm(x_val)
    torch.testing.assert_close(out, x_val * x_val + x_val)
    torch.testing.assert_close(gm.buf, out)  # the buffer was updated in place, with the new value
    assert new_buf is gm.buf


def test_nothing_in_place_nothing_changed():
    gm = capture(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), (torch.randn(2, 4),))
    before = graph_code(gm)
    assert not normalize(gm, PassContext()).modified
    assert graph_code(gm) == before
