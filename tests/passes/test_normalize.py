"""normalize: in-place ops become out-of-place without changing what the model computes.

Later readers read the new value. Writes through views (``narrow().mul_()``, ``h[:, 0] = v``,
``index_put_`` and ``masked_fill_`` on a slice, ``relu(inplace=True)`` on a slice, a view read
after its base was written) are kept, under torch.fx and torch.export capture: the scale-erased
model equals the original (float64, relative error <= 1e-9) and the gradients stay valid.
``F.max_pool2d`` (a local closure) pickles.
"""

from __future__ import annotations

import io

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fixtures.writes import EXTRA_COLUMNS, WRITES, narrow_mul
from helpers import golden, graph_code
from unit_scale_fx import UnitScaleError, unit_scale
from unit_scale_fx.analysis import check_equivalence, gradient_cosines
from unit_scale_fx.capture import capture
from unit_scale_fx.passes import PassContext, normalize
from unit_scale_fx.rules.inplace import write_through_view

aten = torch.ops.aten
MIN_COS = 1 - 1e-6


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


# -- writes through views, picklable targets (issue 12) ----------------------------------------


CASES = WRITES


class Writer(nn.Module):
    def __init__(self, write, export: bool) -> None:
        super().__init__()
        self.write, self.export = write, export
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8 + EXTRA_COLUMNS.get(write.__name__, 0), 3)

    def forward(self, x):
        if self.export and x.shape[0] > 0:  # Python control flow on a shape: torch.fx cannot trace it
            x = x + 0.0
        h = self.a(x)
        return self.b(self.write(h, x))


def _check(model, *args):
    us = unit_scale(model, args)
    eq = check_equivalence(model, us, *args, dtype=torch.float64)
    assert eq.ok, eq
    cos = gradient_cosines(us, *args)
    assert all(c >= MIN_COS for c in cos.values()), cos
    return us


@pytest.mark.parametrize("export", [False, True], ids=["fx", "export"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_writes_through_views_are_kept(case, export):
    torch.manual_seed(0)
    us = _check(Writer(CASES[case], export), torch.randn(6, 4))
    if case != "setitem":  # torch.fx cannot trace item assignment: that one is always exported
        assert us.us_capture == ("torch.export" if export else "symbolic_trace")
    targets = {n.target for n in us.us_module.graph.nodes}
    assert not {t for t in targets if isinstance(t, str) and t.endswith("_") and not t.startswith("_")}


class AddIntoView(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(4, 8)

    def forward(self, x):
        h = self.a(x).view(-1, 2, 4)
        h += self.b(x).view(-1, 2, 4)  # nothing reads a(x) again: a plain add, planned by its rule
        return h.sum(1)


def test_in_place_op_on_a_view_nobody_reads_through_is_a_plain_op():
    torch.manual_seed(0)
    model, x = AddIntoView(), torch.randn(6, 4)
    us = _check(model, x)
    assert not [n for n in us.graph.nodes if n.target is write_through_view]
    assert any(r.rule == "add" for r in us.scale_plan().values())


def test_dropped_write_is_caught_by_equivalence_not_by_validity():
    """Negative control: the failure this issue found (a write whose result nobody reads)."""
    torch.manual_seed(0)
    model, x = Writer(narrow_mul, False), torch.randn(6, 4)
    us = unit_scale(model, (x,))
    (write,) = [n for n in us.graph.nodes if n.target is write_through_view]
    for u in list(write.users):  # drop the write: readers of the new value read the old one
        for r in list(u.users):
            r.replace_input_with(u, write.args[0])
    us.graph.eliminate_dead_code()
    us.recompile()
    assert not check_equivalence(model, us, x, dtype=torch.float64).ok
    assert all(c >= MIN_COS for c in gradient_cosines(us, x).values())  # validity alone cannot see it


class Pool(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        h = F.max_pool2d(self.conv(x), 2)
        h2, idx = F.max_pool2d(self.conv(x), 2, return_indices=True)
        return h + h2 + F.adaptive_max_pool2d(h, 1)


def test_boolean_dispatch_ops_pickle():
    torch.manual_seed(0)
    model, x = Pool(), torch.randn(2, 3, 8, 8)
    us = unit_scale(model, (x,))
    assert check_equivalence(model, us, x, dtype=torch.float64).ok
    buf = io.BytesIO()
    torch.save(us, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=False)
    assert torch.equal(back(x), us(x))


def test_unpicklable_target_is_refused_at_unit_scale_time():
    """Negative control for pickling: a call target no pickle can store is named at unit_scale time."""

    def double(t):  # a local function that takes part in __torch_function__, as F.max_pool2d's closure does
        if torch.overrides.has_torch_function_unary(t):
            return torch.overrides.handle_torch_function(double, (t,), t)
        return t * 2.0

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)

        def forward(self, x):
            return double(self.a(x))

    # with a rule (here: scale-preserving), torch.fx's graph keeps the call (a call with no rule would send the
    # model to torch.export, which traces through the function)
    from unit_scale_fx.rules import register
    from unit_scale_fx.rules.registry import _RULES
    from unit_scale_fx.rules.shape import PreserveRule

    register(double)(PreserveRule())
    try:
        with pytest.raises(UnitScaleError, match="cannot be pickled") as info:
            unit_scale(M(), (torch.randn(2, 4),))
    finally:
        _RULES.pop(double, None)
    assert "double" in str(info.value)
