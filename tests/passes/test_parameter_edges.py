"""A parameter that enters a concatenation (or another op without a scale of its own) beside the batch's values:
a class token, a mask token. It gets a backward-only scale of its own on that edge
(:func:`unit_scale_fx.passes.balance.parameter_edges`). Without it the token shares the potential of the patch
tokens, and its gradient, which sums the batch's rows at the one position a classifier reads, was 46.6 (measured
planning, the ViT below)."""

from __future__ import annotations

import copy

import networkx as nx
import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from helpers import gradient_cosines, rms
from unit_scale_fx import unit_scale
from unit_scale_fx.analysis.equivalence import scale_erased_copy
from unit_scale_fx.passes.balance import parameter_edges
from unit_scale_fx.record import ScaleRecord
from unit_scale_fx.rules.registry import Kind
from unit_scale_fx.scale import scale


class Attention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.n1, self.attn, self.n2 = nn.LayerNorm(d), Attention(d, 4), nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.n1(x))
        return x + self.fc2(F.gelu(self.fc1(self.n2(x))))


class TinyViT(nn.Module):
    """timm's ViT in small: patch convolution, a class token concatenated in front, learned positions, pre-norm
    blocks, the class token's position read out."""

    def __init__(self, d: int = 64, depth: int = 2, masked: bool = False) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, d, 4, 4)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d)) if masked else None
        self.pos_embed = nn.Parameter(torch.randn(1, 17, d) * 0.02)
        self.blocks = nn.Sequential(*[Block(d) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, 10)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        if self.mask_token is not None:  # BEiT / SimMIM: masked patches replaced by a learned token
            keep = torch.arange(x.shape[1], device=x.device) % 3 != 0
            x = torch.where(keep[None, :, None], x, self.mask_token)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return F.cross_entropy(self.head(self.norm(self.blocks(x))[:, 0]), y)


def _batch(seed: int, b: int = 16) -> tuple:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, 16, 16, generator=g), torch.randint(0, 10, (b,), generator=g)


def test_class_token_gets_a_unit_gradient_of_its_own_and_gradients_stay_valid():
    torch.manual_seed(0)
    us = unit_scale(TinyViT(), _batch(0), unsupported="error")
    us(*_batch(1)).backward()
    g = rms(us.cls_token.grad)
    assert 0.5 <= g <= 2.0, g  # 46.6 before: the potential of the patch tokens
    cos = gradient_cosines(us, *_batch(2))
    assert min(cos.values()) > 0.9999, min(cos.values())
    # the factor sits on the token's edge into the concatenation: the patch tokens' input is not scaled
    gm = us.us_module
    cat = next(n for n in gm.graph.nodes if n.target is torch.cat or getattr(n.target, "__name__", "") == "cat.default")
    ins = cat.args[0]
    scaled = [a for a in ins if isinstance(a, fx.Node) and a.target is scale]
    assert len(scaled) == 1 and scaled[0].args[1] == 1.0 and scaled[0].args[2] != 1.0, [a.format_node() for a in ins]


def test_mask_token_through_where_gets_its_own_factor():
    torch.manual_seed(0)
    us = unit_scale(TinyViT(masked=True), _batch(0), unsupported="error")
    us(*_batch(1)).backward()
    grads = {k: rms(p.grad) for k, p in us.named_parameters() if k in ("cls_token", "mask_token")}
    assert all(0.5 <= v <= 2.0 for v in grads.values()), grads
    cos = gradient_cosines(us, *_batch(2))
    assert min(cos.values()) > 0.9999, min(cos.values())


def test_parameter_edges_are_only_a_parameters_edges_into_an_op_that_also_reads_the_batch():
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Parameter(torch.randn(1, 4)), nn.Parameter(torch.randn(1, 4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            both = torch.cat([self.a, self.b])  # parameters alone: no batch, one class as before
            with_x = torch.cat([self.a.expand(3, -1), x])
            return both.sum() + with_x.sum()

    gm = fx.symbolic_trace(M())

    g = nx.DiGraph()
    for n in gm.graph.nodes:
        for u in n.all_input_nodes:
            g.add_edge(u, n)
    recs = {n: ScaleRecord("preserve", Kind.PRESERVE, "cat") for n in gm.graph.nodes if n.target is torch.cat}
    found = {(u.name, v.name) for u, v in parameter_edges(gm, g, recs)}
    # the expand of ``a`` into the concatenation with ``x``; not the edges into ``both`` (parameters alone)
    assert found == {("expand", "cat_1")}, found


def test_hugging_face_deit_class_and_distillation_tokens_get_unit_gradients():
    """DeiT with its distillation token as Hugging Face builds it (default configuration, small sizes): two tokens
    concatenated before the patches. Before, their gradients were 7.2e6 and 6.3e6 (beyond FP16's range), and the
    position embedding's 1.2e3 (``benchmarks/unseen_hf_vision.py``)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.DeiTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                     image_size=32, patch_size=8, num_labels=10)

    class WithLoss(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = transformers.DeiTForImageClassificationWithTeacher(config)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(self.model(pixel_values=x).logits, y)

    def batch(seed: int) -> tuple:
        g = torch.Generator().manual_seed(seed)
        return torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)

    us = unit_scale(WithLoss(), batch(0))
    us(*batch(1)).backward()
    grads = {k.split(".")[-1]: rms(p.grad) for k, p in us.named_parameters() if "embeddings" in k and p.dim() >= 2}
    assert {"cls_token", "distillation_token", "position_embeddings"} <= set(grads), grads
    assert all(0.5 <= v <= 2.0 for v in grads.values()), grads
    cos = gradient_cosines(us, *batch(2))
    assert min(cos.values()) > 0.9999, min(cos.values())


def test_with_every_scale_one_the_model_with_a_class_token_is_the_original():
    """The token's own factor is a scale like any other: with every scale 1 (``scale_erased_copy``) the rewritten
    model computes the original's loss and gradients on the same weights."""
    torch.manual_seed(0)
    model = TinyViT(masked=True)
    us = unit_scale(copy.deepcopy(model), _batch(0), unsupported="error")
    ones = scale_erased_copy(us)
    ref = copy.deepcopy(model)
    ref.load_state_dict(us.state_dict())
    a, b = ones(*_batch(1)), ref(*_batch(1))
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    a.backward(), b.backward()
    grads = dict(ref.named_parameters())
    for k, p in ones.named_parameters():
        torch.testing.assert_close(p.grad, grads[k].grad, rtol=1e-5, atol=1e-7, msg=k)


class GatheredRows(nn.Module):
    """gpt-oss's experts: a table of per-expert biases, each token's row gathered by its expert index and added to a
    projection; and a learned offset expanded over the batch before it is added."""

    def __init__(self, d: int = 32, experts: int = 4) -> None:
        super().__init__()
        self.proj, self.out = nn.Linear(d, d), nn.Linear(d, d)
        self.table = nn.Parameter(torch.randn(experts, d))
        self.offset = nn.Parameter(torch.randn(1, d))

    def forward(self, x: torch.Tensor, idx: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.proj(x) + self.table[idx] + self.offset.expand(x.shape[0], -1)
        return F.mse_loss(self.out(F.gelu(h)), y)


def _rows(seed: int, n: int = 256) -> tuple:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 32, generator=g), torch.randint(0, 4, (n,), generator=g), torch.randn(n, 32, generator=g)


@pytest.mark.parametrize("measure", [False, True], ids=["analytic", "measured"])
def test_a_parameter_gathered_or_expanded_into_many_rows_gets_a_factor_of_its_own(measure):
    """The gradient of a gathered or expanded parameter sums its copies (64 tokens a row here), so its edge into
    the gather or expand gets its own backward-only factor: ``1 / sqrt(copies)`` from the rule, measured when
    planning runs on a batch. Measured (the default), the table's and the offset's gradients were 43.7 and 8.8;
    the rules alone cannot see the part the rows' gradients share (this loss's shared component: the biases
    too are 8-13 under analytic planning), so there only the factor is checked."""
    torch.manual_seed(0)
    us = unit_scale(GatheredRows(), _rows(0), measure=measure, unsupported="error")
    factors = {n.args[0].target: n.args[2] for n in us.us_module.graph.nodes
               if n.target is scale and n.args[0].op == "get_attr" and n.args[0].target in ("table", "offset")}
    assert set(factors) == {"table", "offset"}, factors
    if measure:
        us(*_rows(1)).backward()
        grads = {k: rms(us.get_parameter(k).grad) for k in ("table", "offset")}
        assert all(0.5 <= v <= 2.0 for v in grads.values()), grads
    else:  # 64 rows a table row, 256 rows of the offset
        assert factors == pytest.approx({"table": 1 / 8, "offset": 1 / 16}, rel=1e-6), factors
    cos = gradient_cosines(us, *_rows(2))
    assert min(cos.values()) > 0.9999, cos
