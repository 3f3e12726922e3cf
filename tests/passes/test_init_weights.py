"""init_weights: unit-RMS weights, zero biases, unit gains; roles from the consuming ops, not names."""

from __future__ import annotations

import torch
import torch.nn as nn

from helpers import graph_code, pipeline_until, rms, run_pass


class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 16)
        self.ln = nn.LayerNorm(16)
        self.w = nn.Parameter(torch.zeros(16, 4))  # a bare, zero-initialised matmul weight
        nn.init.normal_(self.lin.bias)
        nn.init.normal_(self.ln.weight)

    def forward(self, x):
        return self.ln(self.lin(x)) @ self.w


def test_init_weights_roles():
    m = M()
    w0 = m.lin.weight.detach().clone()  # capture shares the parameters: keep the user's values
    gm, ctx, p = pipeline_until(m, (torch.randn(3, 16),), "init_weights")
    before = graph_code(gm)
    result = run_pass(gm, ctx, p)
    assert result.info == "5 parameters initialised"
    assert graph_code(gm) == before  # parameters change, the graph does not
    assert ctx.init_kinds == {"lin.weight": "unit", "lin.bias": "zero", "ln.weight": "one", "ln.bias": "zero",
                               "w": "unit"}
    assert abs(rms(gm.lin.weight) - 1.0) < 1e-5
    assert torch.count_nonzero(gm.lin.bias) == 0
    assert torch.all(gm.ln.weight == 1) and torch.all(gm.ln.bias == 0)
    assert abs(rms(gm.w) - 1.0) < 0.2  # re-sampled from N(0, 1)
    # the direction of a non-zero weight is kept (divided by its RMS)
    assert not torch.equal(gm.lin.weight, w0)
    torch.testing.assert_close(gm.lin.weight / gm.lin.weight.norm(), w0 / w0.norm())


def test_disabled_leaves_every_parameter_alone():
    m = M()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    gm, ctx, p = pipeline_until(m, (torch.randn(3, 16),), "init_weights", init_weights=False)
    assert run_pass(gm, ctx, p).info == "disabled"
    for k, v in gm.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_an_embedding_table_keeps_its_zero_padding_row():
    emb = nn.Embedding(10, 8, padding_idx=0)
    gm, ctx, p = pipeline_until(emb, (torch.tensor([[1, 2, 0]]),), "init_weights")
    run_pass(gm, ctx, p)
    assert ctx.init_kinds == {"weight": "unit"}
    assert torch.count_nonzero(gm.weight[0]) == 0  # divided by its RMS, the zero row stays zero
    assert abs(rms(gm.weight) - 1.0) < 1e-5
