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


def test_added_tables_are_unit_vectors_and_zero_tables_kept():
    class Added(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(16, 16)
            self.pos = nn.Parameter(torch.randn(5, 16) * 0.02)  # a learned position table
            self.shift = nn.Parameter(torch.full((16,), 0.3))  # a vector added: a bias, left alone
            self.zero_table = nn.Parameter(torch.zeros(5, 16))  # zeroed on purpose: left alone

        def forward(self, x):
            return self.lin(x) + self.pos + self.shift + self.zero_table

    m = Added()
    pos0 = m.pos.detach().clone()
    gm, ctx, p = pipeline_until(m, (torch.randn(2, 5, 16),), "init_weights")
    run_pass(gm, ctx, p)
    assert abs(rms(gm.pos) - 1.0) < 1e-5
    torch.testing.assert_close(gm.pos / gm.pos.norm(), pos0 / pos0.norm())  # direction kept
    assert torch.all(gm.shift == 0.3) and torch.count_nonzero(gm.zero_table) == 0


class Probe(nn.Module):
    """A learned query repeated over the batch and projected (SigLIP's attention-pooling head)."""

    def __init__(self):
        super().__init__()
        self.probe = nn.Parameter(0.1 * torch.randn(1, 1, 16))
        self.lin = nn.Linear(16, 16)

    def forward(self, x):
        q = self.lin(self.probe.repeat(x.shape[0], 1, 1))
        if x.shape[0] > 0:  # Python control flow on a shape: captured by torch.export
            q = q + 0.0
        return (q * x).sum()


def test_a_parameter_repeated_to_the_symbolic_batch_size_is_a_unit_weight():
    """Lazily the batch is symbolic: ``repeat`` reads the size node too, and is still one tensor's values."""
    from unit_scale_fx import unit_scale

    us = unit_scale(Probe())
    us(torch.randn(4, 1, 16)).backward()
    assert abs(rms(us.probe) - 1.0) < 1e-5, rms(us.probe)
