"""Property tests: random models built from supported ops go through the whole pipeline.

For every model hypothesis draws (widths, depths, parallel branches, residuals,
shared weights, norms, activations, loss heads):

* ``unit_scale`` accepts it (every op in these models has a rule: a refusal, or an op left
  unscaled, is a bug) and leaves the user's model unchanged;
* the forward output is finite;
* every parameter's gradient is parallel to autograd's gradient of the rewritten
  forward (cosine > 0.999, :func:`gradient_cosines`);
* planning twice (same weights, same batch) gives the same plan.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from unit_scale_fx import UnitScaleError, unit_scale
from unit_scale_fx.analysis.validity import gradient_cosines

ACTS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh, "sigmoid": torch.sigmoid}


class Block(nn.Module):
    """One block: ``kind`` in plain / residual / branches / concat / shared / gated / attention."""

    def __init__(self, d: int, hidden: int, kind: str, act: str, norm: str) -> None:
        super().__init__()
        self.kind, self.act = kind, ACTS[act]
        self.norm = {"none": nn.Identity, "layer": nn.LayerNorm, "rms": nn.RMSNorm}[norm](d)
        self.up = nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, d, bias=kind != "gated")
        if kind in ("branches", "concat", "gated", "attention"):
            self.other = nn.Linear(d, hidden)
        if kind == "attention":
            self.value = nn.Linear(d, hidden)
        if kind == "concat":
            self.down = nn.Linear(2 * hidden, d)
        if kind == "shared":
            self.square = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        if self.kind == "plain":
            return self.down(self.act(self.up(h)))
        if self.kind == "residual":
            return x + self.down(self.act(self.up(h)))
        if self.kind == "branches":
            return x + self.down(self.act(self.up(h)) + self.act(self.other(h)))
        if self.kind == "concat":
            return x + self.down(torch.cat([self.act(self.up(h)), self.other(h)], dim=-1))
        if self.kind == "attention":  # causal self-attention over the rows of the batch
            q, k, v = (lin(h).unsqueeze(0) for lin in (self.up, self.other, self.value))
            return x + self.down(F.scaled_dot_product_attention(q, k, v, is_causal=True).squeeze(0))
        if self.kind == "gated":
            return x + self.down(self.act(self.other(h)) * self.up(h))
        # shared: one weight used twice in a row
        z = self.act(self.up(h))
        return x + self.down(self.square(self.act(self.square(z))))


class RandomNet(nn.Module):
    def __init__(self, d_in: int, d: int, d_out: int, blocks: list, head: str, tied: bool) -> None:
        super().__init__()
        self.head_kind = head
        self.inp = nn.Linear(d_in, d)
        self.blocks = nn.ModuleList(Block(d, h, k, a, n) for h, k, a, n in blocks)
        self.out = nn.Linear(d, d_in if tied else d_out, bias=not tied)
        if tied:  # the readout reuses the input projection (transposed)
            self.out = None

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for b in self.blocks:
            h = b(h)
        logits = h @ self.inp.weight if self.out is None else self.out(h)
        if self.head_kind == "mse":
            return F.mse_loss(logits, y)
        if self.head_kind == "cross_entropy":
            return F.cross_entropy(logits, y.argmax(-1))
        return logits  # no loss: gradient_cosines projects the output on a fixed random direction


block_st = st.tuples(st.sampled_from([8, 16, 24]), st.sampled_from(["plain", "residual", "branches", "concat",
                                                                     "gated", "shared", "attention"]),
                     st.sampled_from(sorted(ACTS)), st.sampled_from(["none", "layer", "rms"]))
model_st = st.fixed_dictionaries({
    "d_in": st.sampled_from([4, 8]),
    "d": st.sampled_from([8, 16]),
    "d_out": st.sampled_from([3, 8]),
    "blocks": st.lists(block_st, min_size=0, max_size=3),
    "head": st.sampled_from(["mse", "cross_entropy", "none"]),
    "tied": st.booleans(),
    "batch": st.sampled_from([4, 16]),
    "seed": st.integers(0, 2**16),
})


def _plan(us) -> dict:
    return {k: (r.rule, r.fwd, dict(r.bwd), dict(r.weights)) for k, r in us.scale_plan(all_nodes=True).items()}


#: CI runs 20 fixed (derandomised) examples; ``USFX_PROPERTY_EXAMPLES=200 pytest tests/test_properties.py``
#: explores that many fresh random ones.
_EXPLORE = os.environ.get("USFX_PROPERTY_EXAMPLES")


@settings(max_examples=int(_EXPLORE or 20), deadline=None, derandomize=not _EXPLORE, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(spec=model_st)
def test_random_models(spec):
    torch.manual_seed(spec["seed"])
    model = RandomNet(spec["d_in"], spec["d"], spec["d_out"], spec["blocks"], spec["head"], spec["tied"])
    d_y = spec["d_in"] if spec["tied"] else spec["d_out"]
    x, y = torch.randn(spec["batch"], spec["d_in"]), torch.randn(spec["batch"], d_y)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    us = unit_scale(model, (x, y), unsupported="error")  # any refusal fails the test, with its reason
    for k, v in model.state_dict().items():  # the user's model is never changed
        assert torch.equal(v, before[k]), k
    assert not us.us_unsupported
    out = us(x, y)
    assert all(torch.isfinite(t).all() for t in (out if isinstance(out, tuple) else (out,)))
    cos = gradient_cosines(us, x, y)
    assert cos and all(c > 0.999 for c in cos.values()), cos
    plan = _plan(us)
    us.replan(x, y)
    assert _plan(us) == plan


class HypotBlock(Block):
    """A block with an op of two tensors that no rule covers (hypot): outside the supported set."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return x + self.down(torch.hypot(self.up(h), self.other(h)))


def test_negative_control_an_unsupported_op_is_refused_by_name():
    """The property test above fails on a model it should fail on: here, with the reason it names."""
    torch.manual_seed(0)
    model = RandomNet(8, 16, 3, [(16, "branches", "relu", "layer")], "mse", False)
    model.blocks[0] = HypotBlock(16, 16, "branches", "relu", "layer")
    x, y = torch.randn(4, 8), torch.randn(4, 3)
    with pytest.raises(UnitScaleError, match=r"no unit-scaling rule(.|\n)*hypot"):
        unit_scale(model, (x, y), unsupported="error")
    with pytest.warns(UserWarning, match="no unit-scaling rule"):
        us = unit_scale(model, (x, y))  # the default policy: scaled around, and reported
    assert [u.node for u in us.us_unsupported] == ["hypot"]
