"""mup and mup_readout: the u-μP graph edits (attention logits, activation inputs, depth-tied residuals)
and the readout's 1/fan_in scale. The end-to-end u-μP tests are in tests/test_mup.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import golden, graph_code, pipeline_until, run_pass
from unit_scale_fx.config import MupConfig
from unit_scale_fx.passes.mup import depth_taus, mup
from unit_scale_fx.record import META_KEY

D, V = 8, 5
HP = MupConfig(attn_softmax=2.0, ffn_act=1.5, loss_softmax=3.0)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(D, 3 * D, bias=False)
        self.up, self.down = nn.Linear(D, 2 * D, bias=False), nn.Linear(2 * D, D, bias=False)
        self.head = nn.Linear(D, V, bias=False)

    def forward(self, x, y):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        h = x + F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.down(F.gelu(self.up(h)))
        return F.cross_entropy(self.head(h).flatten(0, 1), y.flatten())


def _batch():
    return torch.randn(2, 4, D), torch.randint(0, V, (2, 4))


def test_golden_code_of_the_mup_edits():
    gm, ctx, p = pipeline_until(Block(), _batch(), "mup", parametrization="u-mup", mup=HP)
    result = run_pass(gm, ctx, p)
    assert result.info == "2 residual taus tied to depth, 1 attention logit scales, 1 activation multipliers"
    # attention: scale = (1/sqrt(d)) * attn_softmax / sqrt(d) = 2/8; the gelu after a weighted op reads x * ffn_act
    assert graph_code(gm) == golden("""
        x = input
        y = input
        qkv_weight = self.qkv.weight
        linear = linear(x, qkv_weight, None)
        chunk = linear.chunk(3, dim=-1)
        getitem = getitem(chunk, 0)
        getitem_1 = getitem(chunk, 1)
        getitem_2 = getitem(chunk, 2)
        scaled_dot_product_attention = scaled_dot_product_attention(getitem, getitem_1, getitem_2, is_causal=True, scale=0.25)
        add = add(x, scaled_dot_product_attention)
        up_weight = self.up.weight
        linear_1 = linear(add, up_weight, None)
        mul = mul(linear_1, 1.5)
        gelu = gelu(mul)
        down_weight = self.down.weight
        linear_2 = linear(gelu, down_weight, None)
        add_1 = add(add, linear_2)
        head_weight = self.head.weight
        linear_3 = linear(add_1, head_weight, None)
        flatten = linear_3.flatten(0, 1)
        flatten_1 = y.flatten()
        cross_entropy = cross_entropy(flatten, flatten_1, ignore_index=-100, reduction='mean', label_smoothing=0)
        return cross_entropy
    """)
    # the residual shares follow the depth rule, and the topology follows the inserted node
    taus = [r.tau for r in ctx.topology.residuals.values()]
    assert taus == pytest.approx(depth_taus(["attn", "mlp"], HP))
    mul_node = next(n for n in gm.graph.nodes if n.name == "mul")
    assert ctx.topology.graph.has_edge(mul_node, next(n for n in gm.graph.nodes if n.name == "gelu"))


def test_unit_parametrization_edits_nothing():
    gm, ctx, p = pipeline_until(Block(), _batch(), "plan")
    assert "mup" not in [name for name, _ in ctx.timings] and "topology" in [name for name, _ in ctx.timings]
    before = graph_code(gm)
    assert not mup(gm, ctx).modified and graph_code(gm) == before


def test_the_readout_takes_loss_softmax_over_sqrt_fan_in():
    gm, ctx, p = pipeline_until(Block(), _batch(), "mup_readout", parametrization="u-mup", mup=HP)
    head = next(n for n in gm.graph.nodes if n.name == "linear_3")
    others = {n.name: n.meta[META_KEY].fwd for n in gm.graph.nodes if META_KEY in n.meta and n is not head}
    old = head.meta[META_KEY].fwd
    before = graph_code(gm)
    result = run_pass(gm, ctx, p)
    assert result.info == "1 readout(s) scaled by 1/fan_in" and graph_code(gm) == before
    assert head.meta[META_KEY].fwd == pytest.approx(old * HP.loss_softmax / math.sqrt(D))
    assert others == {n.name: n.meta[META_KEY].fwd for n in gm.graph.nodes if META_KEY in n.meta and n is not head}
