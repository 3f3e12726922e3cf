"""Tied weights: one parameter used twice (embedding and readout) is not a cut edge.

Its two uses form a cycle through the whole model, so neither edge is a bridge and
no backward scale may differ from the forward one there: both uses must send the
parameter gradients scaled by one common factor.
"""

from __future__ import annotations

import pytest

import torch

from helpers import gradient_cosines, true_gradient_copy
from unit_scale_fx.capture import CallSignature
from unit_scale_fx import unit_scale
from fixtures.families import FAMILIES
from unit_scale_fx.examples import GPT, gpt_batch
from unit_scale_fx.passes import PassContext, shape_prop, topology
from unit_scale_fx.passes.constants import mark_constants


def _topology(model, args):
    us = unit_scale(model)  # captured, not planned
    ctx = PassContext(example_args=args)
    for p in (shape_prop, mark_constants, topology):
        p(us, ctx)
    return us, ctx.topology


def _param_edges(us, topo, target):
    (node,) = [n for n in us.graph.nodes if n.op == "get_attr" and n.target == target]
    return [(node, v) for v in topo.graph.successors(node)]


@pytest.mark.parametrize("tied", [False, True])
def test_tied_weight_edges_are_not_bridges(tied):
    model = GPT(vocab=64, d=32, layers=2, heads=2, max_len=32, tied=tied)
    us, topo = _topology(model, gpt_batch(64, 2, 16))
    edges = _param_edges(us, topo, "tok.weight")
    if tied:
        assert len(edges) == 2  # embedding lookup and readout
        assert not any(e in topo.bridges for e in edges)
    else:
        assert len(edges) == 1 and edges[0] in topo.bridges
        assert all(e in topo.bridges for e in _param_edges(us, topo, "head.weight"))


def test_tied_gpt_keeps_the_tie_and_valid_gradients():
    model = GPT(vocab=64, d=32, layers=2, heads=2, max_len=32, tied=True)
    x, y = gpt_batch(64, 4, 16)
    us = unit_scale(model, (x, y))
    assert list(us.state_dict()) == list(model.state_dict())
    assert us.get_parameter("tok.weight") is us.get_parameter("head.weight")
    cos = gradient_cosines(us, *gpt_batch(64, 4, 16, seed=1))
    assert min(cos.values()) > 0.999, {k: v for k, v in cos.items() if v <= 0.999}


def test_hf_gpt2_tied_readout_gets_valid_gradients():
    fam = FAMILIES["gpt2"]
    model = fam.make()
    assert model.lm_head.weight is model.transformer.wte.weight  # GPT-2 ties by default
    args, kwargs = fam.batch(0)
    us = unit_scale(model, args, example_kwargs=kwargs)
    assert us.get_parameter("lm_head.weight") is us.get_parameter("transformer.wte.weight")
    _, kw2 = fam.batch(1)
    graph = us.us_module  # the planned graph: it takes the call's tensors, flat, and returns the loss first
    twin = true_gradient_copy(graph)  # same forward, every scale's backward = its forward
    flat = CallSignature((), kw2, "test").tensors
    grads = []
    for m in (graph, twin):
        m.zero_grad(set_to_none=True)
        torch.manual_seed(3)  # the default config has dropout on: the same masks in both
        m(*flat)[0].backward()
        grads.append({n: p.grad.flatten().double() for n, p in m.named_parameters() if p.grad is not None})
    for name, g in grads[0].items():
        t = grads[1][name]
        if g.norm() == 0 and t.norm() == 0:
            continue
        cos = float(torch.nn.functional.cosine_similarity(g, t, dim=0))
        assert cos > 0.999, f"{name}: gradient is not a positive multiple of the true one (cos {cos:.4f})"
    assert "transformer.wte.weight" in grads[0]
