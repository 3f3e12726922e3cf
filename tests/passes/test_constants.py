"""constants: float values no parameter and no float input reaches are marked as data, with their RMS."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import graph_code, pipeline_until, rms, run_pass
from unit_scale_fx.passes.constants import keys_per_row, live_nodes
from unit_scale_fx.record import CONSTANT, CONSTANT_RMS, MASK_KEYS

T, D = 4, 8


class Rotary(nn.Module):
    """A rotary-like table from a float buffer and positions, and a causal mask given as a tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(D, D)
        self.register_buffer("inv_freq", torch.full((D,), 0.5))

    def forward(self, x):
        pos = torch.arange(x.shape[0], dtype=torch.float32)
        angles = pos[:, None] * self.inv_freq[None, :]
        q = (self.lin(x) * torch.cos(angles))[None, None]
        mask = torch.ones(x.shape[0], x.shape[0]).tril().bool()
        return F.scaled_dot_product_attention(q, q, q, attn_mask=mask)


def test_tables_and_masks_are_constants_with_measured_rms():
    x = torch.randn(T, D)
    gm, ctx, p = pipeline_until(Rotary(), (x,), "constants")
    before = graph_code(gm)
    result = p(gm, ctx)
    assert not result.modified and graph_code(gm) == before  # marks only; the graph is unchanged
    nodes = {n.name: n for n in gm.graph.nodes}
    marked = {n.name for n in gm.graph.nodes if n.meta.get(CONSTANT)}
    # everything computed from positions and the buffer is data; what the input reaches is not
    assert {"inv_freq", "arange", "mul", "cos", "ones", "tril"} <= marked
    assert not marked & {n.name for n in live_nodes(gm)}
    assert {"x", "lin_weight", "linear", "mul_1", "scaled_dot_product_attention"} <= {
        n.name for n in live_nodes(gm)}
    # the RMS of each constant, computed here independently
    positions = torch.arange(T, dtype=torch.float32)
    angles = positions[:, None] * torch.full((D,), 0.5)[None, :]
    assert nodes["inv_freq"].meta[CONSTANT_RMS] == 0.5
    assert math.isclose(nodes["arange"].meta[CONSTANT_RMS], rms(positions), rel_tol=1e-6)
    assert math.isclose(nodes["cos"].meta[CONSTANT_RMS], rms(torch.cos(angles)), rel_tol=1e-6)
    assert math.isclose(nodes["tril"].meta[CONSTANT_RMS], rms(torch.ones(T, T).tril()), rel_tol=1e-6)
    # the causal mask given to attention is summarised as the keys each query row sees
    (mask,) = [n for n in gm.graph.nodes if MASK_KEYS in n.meta]
    assert mask.meta[MASK_KEYS] == [1, 2, 3, 4]


def test_a_plain_model_has_no_constants():
    gm, ctx, p = pipeline_until(nn.Sequential(nn.Linear(4, 4), nn.GELU()), (torch.randn(2, 4),), "constants")
    result = run_pass(gm, ctx, p)
    assert result.info == "no constant float values"
    assert not any(n.meta.get(CONSTANT) for n in gm.graph.nodes)


def test_keys_per_row_reads_bool_and_additive_masks():
    causal = torch.ones(3, 3).tril().bool()
    assert keys_per_row(causal) == [1, 2, 3]
    additive = torch.zeros(3, 3).masked_fill(~causal, float("-inf"))
    assert keys_per_row(additive) == [1, 2, 3]


class _TokenTypes(nn.Module):
    """BERT's token types: a buffer of zeros, sliced and expanded to the batch, looked up in a table."""

    def __init__(self) -> None:
        super().__init__()
        self.words, self.types = nn.Embedding(32, 16), nn.Embedding(2, 16)
        self.register_buffer("type_ids", torch.zeros(1, 64, dtype=torch.long))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        types = self.type_ids[:, : ids.shape[1]].expand(ids.shape[0], ids.shape[1])
        return self.words(ids) + self.types(types)


def test_an_embedding_index_no_input_reaches_is_summarised_as_shared_rows():
    from unit_scale_fx.record import INDEX_RHO

    ids = torch.randint(0, 32, (4, 16), generator=torch.Generator().manual_seed(0))
    gm, ctx, p = pipeline_until(_TokenTypes(), (ids,), "constants")
    run_pass(gm, ctx, p)
    rhos = {n.name: n.meta[INDEX_RHO] for n in gm.graph.nodes if INDEX_RHO in n.meta}
    assert list(rhos.values()) == [1.0], rhos  # the token types: one row at every position; the ids: not marked
    from unit_scale_fx import unit_scale

    us = unit_scale(_TokenTypes(), (ids,), measure=False)
    (rec,) = [r for r in us.scale_plan().values() if "index rho=1.00" in r.note]
    assert rec.rule == "embedding"


class _GatheredTokenTypes(nn.Module):
    """RoBERTa's token types: a buffer of zeros gathered at position ids computed from the input ids."""

    def __init__(self) -> None:
        super().__init__()
        self.words, self.types, self.pos = nn.Embedding(32, 16), nn.Embedding(2, 16), nn.Embedding(64, 16)
        self.register_buffer("type_ids", torch.zeros(1, 64, dtype=torch.long))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.cumsum(ids.ne(0).int(), dim=1).long()  # depends on the ids' values (padding)
        types = torch.gather(self.type_ids.expand(ids.shape[0], -1), 1, positions)
        return self.words(ids) + self.types(types) + self.pos(positions)


def test_a_selection_from_a_buffer_holds_the_buffers_values_whatever_selects():
    """The input reaches the token types only through the gather's index: every position still looks up
    row 0 (rho 1), while the position ids, which the input's values reach, are not marked."""
    from unit_scale_fx.record import INDEX_RHO

    ids = torch.randint(1, 32, (4, 16), generator=torch.Generator().manual_seed(0))
    gm, ctx, p = pipeline_until(_GatheredTokenTypes(), (ids,), "constants")
    run_pass(gm, ctx, p)
    rhos = [n.meta[INDEX_RHO] for n in gm.graph.nodes if INDEX_RHO in n.meta]
    assert rhos == [1.0], rhos


class WindowMaskAttention(nn.Module):
    """Attention with an additive mask built as torchvision's shifted-window attention builds it: a fill shaped
    by the input (``x.new_zeros``), regions numbered, ``masked_fill(-100)`` where two tokens' regions differ."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(D, 3 * D)

    def forward(self, x):
        region = x.new_zeros(x.shape[0])
        region[x.shape[0] // 2:] = 1.0
        mask = region[None, :] - region[:, None]
        mask = mask.masked_fill(mask != 0, -100.0)
        q, k, v = self.qkv(x).chunk(3, -1)
        return (torch.softmax(q @ k.T / math.sqrt(D) + mask, -1) @ v).sum(-1)


def test_a_mask_built_from_a_fill_shaped_by_the_input_is_a_constant_and_keeps_masking():
    """``x.new_zeros(...)`` reads ``x``'s shape, never its values: what is built from it is data. Before, the
    input made the mask live, the add of the mask was planned as an add of two activations, and measured
    planning scaled its output down (the -100s dominate its RMS; by 0.015 in torchvision's Swin, where -100
    became -1.5): the attention no longer kept the two regions apart (here the first region's outputs moved
    by up to 0.90)."""
    from unit_scale_fx import unit_scale

    torch.manual_seed(0)
    x = torch.randn(2 * T, D)
    gm, ctx, p = pipeline_until(WindowMaskAttention(), (x,), "constants")
    run_pass(gm, ctx, p)
    marked = {n.name for n in gm.graph.nodes if n.meta.get(CONSTANT)}
    assert "new_zeros" in marked and "masked_fill" in marked
    for measure in (False, True):
        us = unit_scale(WindowMaskAttention(), (x,), measure=measure)
        y = x.clone()
        y[T:] = torch.randn(T, D)  # the second region's tokens: the first region's outputs must not move
        torch.testing.assert_close(us(y)[:T], us(x)[:T], rtol=1e-5, atol=1e-5)
