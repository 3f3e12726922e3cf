"""The pass driver: declared needs are checked, PassContext has only typed fields, failures name the pass."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from unit_scale_fx import UnitScaleError
from unit_scale_fx.capture import capture
from unit_scale_fx.passes import PassContext, PassResult, plan, shape_prop, topology
from unit_scale_fx.passes.base import PRODUCIBLE, Pass, declare, run_passes
from unit_scale_fx.passes.balance import balance


def _gm():
    x = torch.randn(4, 8)
    return capture(nn.Sequential(nn.Linear(8, 8), nn.ReLU()), (x,)), (x,)


def test_a_pass_whose_needs_are_missing_is_refused_before_it_runs():
    gm, args = _gm()
    ctx = PassContext(example_args=args)
    with pytest.raises(UnitScaleError, match="'plan' needs init_kinds, topology") as info:
        run_passes(gm, ctx, [plan])
    assert "after: none" in str(info.value) and "build_pipeline" in str(info.value)
    # topology produces one of the two; the other is still missing, and the error names what ran
    with pytest.raises(UnitScaleError, match="'plan' needs init_kinds,") as info:
        run_passes(gm, ctx, [shape_prop, topology, plan])
    assert "after: shape_prop, topology" in str(info.value)
    assert not any(n.meta.get("unit_scale") for n in gm.graph.nodes)  # plan never ran


def test_what_a_pass_produces_or_the_caller_gives_is_available():
    gm, args = _gm()
    ctx = PassContext(example_args=args, init_kinds={"0.weight": "unit"})  # given at construction
    assert ctx.available == {"init_kinds"}
    run_passes(gm, ctx, [shape_prop, topology, plan])
    assert {"real_values", "input_rms", "topology", "scales", "init_kinds"} <= ctx.available
    assert [name for name, _ in ctx.timings] == ["shape_prop", "topology", "plan"]
    ctx2 = PassContext(example_args=args)
    ctx2.give("potentials", object())
    assert ctx2.available == {"potentials"}
    with pytest.raises(UnitScaleError, match="'balance' needs scales, topology"):
        run_passes(gm, ctx2, [balance])


def test_the_context_rejects_fields_it_does_not_declare():
    ctx = PassContext()
    with pytest.raises(AttributeError, match="no field 'my_value'"):
        ctx.my_value = 1
    with pytest.raises(AttributeError, match="no data field 'config'"):
        ctx.give("config", None)  # a field, but not one that flows between passes
    with pytest.raises(ValueError, match="unknown context fields"):
        Pass("bad", lambda gm, c: PassResult(False), needs=frozenset({"my_value"}))
    assert "topology" in PRODUCIBLE and "config" not in PRODUCIBLE


def test_a_failing_pass_is_named_and_a_changed_graph_is_linted():
    gm, args = _gm()

    @declare("boom")
    def boom(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        raise KeyError("nope")

    with pytest.raises(UnitScaleError, match="pass 'boom' failed: KeyError") as info:
        run_passes(gm, PassContext(example_args=args), [shape_prop, boom])
    assert "after: shape_prop" in str(info.value)

    @declare("breaks_the_graph")
    def breaks(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        relu = next(n for n in gm.graph.nodes if n.op == "call_function" and n.target is F.relu)
        relu.args = (relu,)  # a node reading itself
        return PassResult(True, "broken")

    gm2, _ = _gm()
    with pytest.raises(UnitScaleError, match="pass 'breaks_the_graph' failed: RuntimeError: .*used before it has been defined"):
        run_passes(gm2, PassContext(example_args=args), [breaks])
