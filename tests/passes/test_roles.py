"""roles: each parameter's role from the graph alone (the op that consumes it, where it sits)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import graph_code, pipeline_until, run_pass
from unit_scale_fx import UnitScaleError
from unit_scale_fx.passes.roles import roles_of
from unit_scale_fx.record import ROLES_META_KEY

V, D = 16, 8


class Tiny(nn.Module):
    """Embedding -> input projection -> two residual MLP branches -> norm -> readout (misleading names)."""

    def __init__(self) -> None:
        super().__init__()
        self.readout = nn.Embedding(V, D)
        self.norm = nn.Linear(D, D)
        self.emb = nn.ModuleList(nn.Linear(D, D) for _ in range(2))
        self.inp = nn.LayerNorm(D)
        self.hidden = nn.Linear(D, V, bias=False)

    def forward(self, ids, y):
        h = self.norm(self.readout(ids))
        for lin in self.emb:
            h = h + F.relu(lin(h))
        return F.cross_entropy(self.hidden(self.inp(h)), y)


def test_roles_follow_the_ops_not_the_names():
    ids, y = torch.randint(0, V, (6,)), torch.randint(0, V, (6,))
    gm, ctx, p = pipeline_until(Tiny(), (ids, y), "roles")
    before = graph_code(gm)
    run_pass(gm, ctx, p)
    assert graph_code(gm) == before
    analysis = gm.meta[ROLES_META_KEY]
    assert roles_of(gm) is analysis
    got = {name: (r.role, r.fan_in, r.fan_out, r.depth) for name, r in analysis.params.items()}
    assert got == {
        "readout.weight": ("embedding", V, D, None),
        "norm.weight": ("input", D, D, None),  # no weighted op upstream of it
        "norm.bias": ("bias", None, None, None),
        "emb.0.weight": ("hidden", D, D, 2),  # inside a branch of a stream of two residual adds
        "emb.0.bias": ("bias", None, None, 2),
        "emb.1.weight": ("hidden", D, D, 2),
        "emb.1.bias": ("bias", None, None, 2),
        "inp.weight": ("norm_gain", None, None, None),
        "inp.bias": ("bias", None, None, None),
        "hidden.weight": ("readout", D, V, None),  # nothing weighted and no residual add downstream
    }
    assert analysis.readouts == {"linear_3": D}
    assert analysis.residual_streams == [["add", "add_1"]]


def test_an_unplanned_module_has_no_roles():
    with pytest.raises(UnitScaleError, match="no parameter-role analysis"):
        roles_of(Tiny())
