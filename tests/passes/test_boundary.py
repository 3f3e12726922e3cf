"""boundary_outputs: a graph's float tensor outputs join ctx.boundary (a graph that is one piece of a program)."""

from __future__ import annotations

import torch
import torch.nn as nn

from helpers import graph_code, pipeline_until, run_pass
from unit_scale_fx.passes.boundary import output_leaves


class Piece(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, ids):
        h = self.lin(x)
        return h, h.pow(2).mean(), ids + 1, {"act": torch.tanh(h)}


def _piece():
    return pipeline_until(Piece(), (torch.randn(3, 4), torch.arange(3)), "boundary_outputs", boundary=True)


def test_float_tensor_outputs_join_the_boundary():
    gm, ctx, p = _piece()
    assert [getattr(n, "name", n) for n in output_leaves(gm)] == ["linear", "mean", "add", "tanh"]
    before = graph_code(gm)
    result = run_pass(gm, ctx, p)
    # a float tensor that later code may read joins; a 0-d loss and an integer tensor do not
    assert ctx.boundary == {"linear", "tanh"}
    assert result.info == "2 boundary outputs" and not result.modified
    assert graph_code(gm) == before


def test_names_given_by_the_caller_are_kept_and_not_counted_twice():
    gm, ctx, p = _piece()
    ctx.boundary.update({"x", "linear"})
    result = run_pass(gm, ctx, p)
    assert ctx.boundary == {"x", "linear", "tanh"} and result.info == "1 boundary outputs"


def test_only_in_the_pipeline_when_asked():
    gm, ctx, p = pipeline_until(Piece(), (torch.randn(3, 4), torch.arange(3)), "topology")
    ran = [name for name, _ in ctx.timings]
    assert "shape_prop" in ran and "boundary_outputs" not in ran
    assert ctx.boundary == set()
