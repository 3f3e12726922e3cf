"""normalize: in-place ops become out-of-place without changing what the model computes.

Writes through views (``narrow().mul_()``, ``h[:, 0] = v``, ``index_put_`` and
``masked_fill_`` on a slice, ``relu(inplace=True)`` on a slice, a view read after its
base was written) are kept, under torch.fx and torch.export capture: the scale-erased
model equals the original (float64, relative error <= 1e-9) and the gradients stay
valid. ``F.max_pool2d`` (a local closure) pickles.
"""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from unit_scale_fx import UnitScaleError, unit_scale
from unit_scale_fx.analysis import check_equivalence, gradient_cosines
from unit_scale_fx.rules.inplace import write_through_view
from fixtures.writes import EXTRA_COLUMNS, WRITES, narrow_mul

MIN_COS = 1 - 1e-6


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
    targets = {n.target for n in us.graph.nodes}
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

    with pytest.raises(UnitScaleError, match="cannot be pickled") as info:
        unit_scale(M(), (torch.randn(2, 4),))
    assert "double" in str(info.value)
