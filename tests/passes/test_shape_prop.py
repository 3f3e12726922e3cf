"""shape_prop: shapes and dtypes on every node without real compute; the RMS of the real inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import graph_code, pipeline_until, rms, run_pass
from unit_scale_fx import UnitScaleError
from unit_scale_fx.capture import capture
from unit_scale_fx.examples import GPT, gpt_batch
from unit_scale_fx.passes import PassContext, shape_prop


def test_shape_prop_puts_fake_values_on_every_node_without_real_compute():
    m = GPT(vocab=64, d=32, layers=1, heads=2)
    idx, tgt = gpt_batch(vocab=64, batch=2, seq=8)
    gm, ctx, p = pipeline_until(m, (idx, tgt), "shape_prop")
    before = graph_code(gm)
    run_pass(gm, ctx, p)
    assert graph_code(gm) == before
    lin = next(n for n in gm.graph.nodes if n.target is F.linear)
    assert tuple(lin.meta["val"].shape) == (2, 8, 96)
    assert lin.meta["val"].device.type in ("cpu", "meta")
    # every value has one (fx's FakeTensorProp skips attribute reads like ``x.shape``)
    missing = [n.name for n in gm.graph.nodes if n.op != "output" and n.target is not getattr and "val" not in n.meta]
    assert not missing
    assert ctx.real_values is not None and ctx.real_values[0] is idx
    assert ctx.input_rms == {}  # integer inputs have no RMS


def test_input_rms_is_measured_unless_given():
    x, y = 3 * torch.randn(8, 4), torch.randn(8, 4)
    gm = capture(nn.Linear(4, 4), (x,))
    ctx = PassContext(example_args=(x,), input_rms={})
    shape_prop(gm, ctx)
    (name,) = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    assert ctx.input_rms == {name: pytest.approx(rms(x), rel=2.0 ** -8)}  # rounded to 8 bits (passes/stats.py)
    ctx = PassContext(example_args=(y,), input_rms={name: 5.0})
    shape_prop(gm, ctx)
    assert ctx.input_rms == {name: 5.0}


def test_a_meta_model_gets_shapes_and_no_real_values():
    with torch.device("meta"):
        m = nn.Sequential(nn.Linear(4, 16), nn.GELU())
        x = torch.randn(2, 4)
    gm = capture(m, (x,))
    ctx = PassContext(example_args=(x,))
    result = shape_prop(gm, ctx)
    assert result.info.startswith("meta propagation")
    assert ctx.real_values is None and ctx.input_rms == {}
    assert tuple(list(gm.graph.nodes)[-2].meta["val"].shape) == (2, 16)


def test_no_example_inputs_is_an_error():
    gm = capture(nn.Linear(4, 4), None)
    with pytest.raises(UnitScaleError, match="needs example inputs"):
        shape_prop(gm, PassContext())
