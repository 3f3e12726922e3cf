"""constants: mark floating-point values that no parameter and no float input reaches.

Rotary tables (``cos``/``sin`` of ``inv_freq * positions``), attention masks built
from integer ids, ``torch.full(...)`` temperatures: these are *data*. Scaling them
would change what the model computes (rotary angles), and reading them as part of
the dataflow graph joins unrelated layers (one rotary table feeds every layer) into
fake cycles that hide real cut edges. They are marked with
:data:`~unit_scale_fx.rules.registry.CONSTANT`, which takes them out of the
floating-point dataflow; rules read their size as a constant factor
(:func:`~unit_scale_fx.rules.registry.constant_value`).

A value is *live* when a float placeholder or a parameter reaches it through
floating-point ops; a float value that is not live is a constant. Buffers are not
parameters: a float buffer (``inv_freq``) is a constant. Constants' RMS is measured
by running the graph once on the example inputs (``no_grad``, state preserved)
when those are real tensors; in the same run, each attention mask given to
``scaled_dot_product_attention`` is summarised as the number of keys each query
row sees (:data:`~unit_scale_fx.rules.registry.MASK_KEYS`), so the attention
rule knows a causal mask passed as a tensor; and each embedding index that no input's values reach
(a buffer, an expand or slice of one: BERT's token types; a selection from one, whatever selects:
RoBERTa's token types, gathered at its position ids) is summarised as the share of position
pairs that look up the same row (:data:`~unit_scale_fx.record.INDEX_RHO`): the embedding's output
is that correlated across positions.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.fx as fx

from ..record import CONSTANT, CONSTANT_RMS, INDEX_RHO, MASK_KEYS
from ..rules.registry import has_float_value, resolve_target
from ..rules.shape import SHAPE_ONLY_FILLS
from ..tensor_stats import rms
from .base import PassContext, PassResult, declare, preserved_state
from .shape_prop import placeholder_values

log = logging.getLogger(__name__)




def _is_parameter(gm: fx.GraphModule, node: fx.Node) -> bool:
    try:
        gm.get_parameter(str(node.target))
        return True
    except AttributeError:
        return False


def _shape_only(node: fx.Node, gm: fx.GraphModule) -> bool:
    """A deterministic fill shaped like its input (``x.new_zeros(...)``, ``torch.ones_like(x)``, ``full_like``;
    :data:`~unit_scale_fx.rules.shape.SHAPE_ONLY_FILLS`). Swin's shifted-window mask starts from one:
    ``x.new_zeros((H, W))``, then slices filled with window ids, then ``masked_fill(-100)``."""
    try:
        return resolve_target(node, gm) in SHAPE_ONLY_FILLS
    except TypeError:  # an unhashable target
        return False


def live_nodes(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes reached from a parameter or float placeholder through floating-point values (not through a fill
    that reads only its input's shape)."""
    live: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if not has_float_value(node):
            continue
        if node.op == "placeholder" or (node.op == "get_attr" and _is_parameter(gm, node)):
            live.add(node)
        elif node.op in ("call_function", "call_method", "call_module") and any(
            a in live for a in node.all_input_nodes
        ) and not _shape_only(node, gm):
            live.add(node)
    return live


#: attention ops whose ``attn_mask`` (argument 3) is summarised as keys per query row.
_SDPA = (torch.nn.functional.scaled_dot_product_attention, torch.ops.aten.scaled_dot_product_attention.default)
_MAX_ROWS = 4096


def _mask_nodes(gm: fx.GraphModule, live: set[fx.Node]) -> set[fx.Node]:
    out = set()
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in _SDPA:
            m = n.kwargs.get("attn_mask", n.args[3] if len(n.args) > 3 else None)
            if isinstance(m, fx.Node) and m not in live:
                out.add(m)
    return out


_EMBEDDINGS = (torch.nn.functional.embedding, torch.ops.aten.embedding.default)


#: selections: ``op -> position of the tensor the values come from``; the other arguments (indices) only
#: choose positions, so an input that reaches only an index does not reach the values
_SELECTIONS = {torch.ops.aten.gather.default: 0, torch.ops.aten.index_select.default: 0,
               torch.ops.aten.index.Tensor: 0, torch.gather: 0, torch.index_select: 0}


def _data_live(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes whose tensor value an input reaches through tensors (not only through its shape, nor only
    through the index of a selection: ``gather(buffer, 1, position_ids)`` holds the buffer's values)."""
    live: set[fx.Node] = set()
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            live.add(n)
        elif n.op in ("call_function", "call_method", "call_module"):
            src = _SELECTIONS.get(n.target) if n.op == "call_function" else None
            reads = n.all_input_nodes if src is None else \
                [a for a in n.args[src:src + 1] if isinstance(a, fx.Node)]
            if any(a in live and isinstance(a.meta.get("val"), torch.Tensor) for a in reads):
                live.add(n)
    return live


def _constant_indices(gm: fx.GraphModule) -> set[fx.Node]:
    """Embedding indices that no input's values reach: a buffer, an expand or slice of one."""
    live, out = _data_live(gm), set()
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in _EMBEDDINGS:
            idx = n.args[1] if n.target is torch.ops.aten.embedding.default else n.args[0]
            if isinstance(idx, fx.Node) and idx not in live:
                out.add(idx)
    return out


def same_row_share(index: torch.Tensor) -> float:
    """The share of distinct position pairs (over the last dim, per leading row) with the same index."""
    rows = index.reshape(-1, index.shape[-1]) if index.dim() else index.reshape(1, 1)
    t = rows.shape[-1]
    if t < 2:
        return 0.0
    same = (rows.unsqueeze(-1) == rows.unsqueeze(-2)).float().sum((-1, -2)) - t
    return float(same.mean()) / (t * (t - 1))


def keys_per_row(mask: torch.Tensor) -> list[int]:
    """Visible keys of each query row of an attention mask (bool, or additive float)."""
    visible = mask if mask.dtype == torch.bool else mask.float() > -1e4
    counts = visible.reshape(-1, visible.shape[-1]).sum(-1)
    if counts.numel() > _MAX_ROWS:
        counts = counts[:: counts.numel() // _MAX_ROWS + 1]
    return [int(c) for c in counts]


def _measure(gm: fx.GraphModule, ctx: PassContext, wanted: set[fx.Node],
             masks: set[fx.Node] = frozenset(), indices: set[fx.Node] = frozenset()) -> dict[fx.Node, float]:
    values = placeholder_values(gm, ctx.example_args or (), ctx.example_kwargs or {})
    tensors = [v for v in torch.utils._pytree.tree_leaves(values) if isinstance(v, torch.Tensor)]
    if any(t.device.type == "meta" or isinstance(t, torch._subclasses.FakeTensor) for t in tensors):
        return {}
    out: dict[fx.Node, float] = {}

    class _Probe(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            result = super().run_node(n)
            if n in wanted and isinstance(result, torch.Tensor) and result.numel():
                r = rms(result)
                out[n] = r if math.isfinite(r) else float("inf")
            if n in masks and isinstance(result, torch.Tensor) and result.dim() >= 2:
                n.meta[MASK_KEYS] = keys_per_row(result.detach())
            if n in indices and isinstance(result, torch.Tensor) and result.dim() >= 1:
                n.meta[INDEX_RHO] = same_row_share(result.detach()[..., :_MAX_ROWS])
            return result

    try:
        with preserved_state(gm), torch.no_grad():
            _Probe(gm).run(*values)
    except Exception as exc:  # a constant's size is then unknown: rules fall back to their defaults
        log.info("constants: measuring constant tensors failed (%s: %s)", type(exc).__name__, exc)
    return out


def _attr(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj


@declare('constants')
def mark_constants(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    live = live_nodes(gm)
    consts = {
        n for n in gm.graph.nodes
        if n.op in ("call_function", "call_method", "call_module", "get_attr") and has_float_value(n) and n not in live
    }
    for n in gm.graph.nodes:
        for key in (CONSTANT, CONSTANT_RMS, MASK_KEYS, INDEX_RHO):
            n.meta.pop(key, None)
    masks = _mask_nodes(gm, live)
    indices = _constant_indices(gm)
    if not consts and not masks and not indices:
        return PassResult(False, "no constant float values")
    measured = _measure(gm, ctx, {n for n in consts if n.op != "get_attr"}, masks, indices)
    for n in consts:
        n.meta[CONSTANT] = True
        if n.op == "get_attr":
            t = _attr(gm, str(n.target))
            if isinstance(t, torch.Tensor) and t.numel() and t.device.type != "meta":
                n.meta[CONSTANT_RMS] = rms(t)
        elif n in measured:
            n.meta[CONSTANT_RMS] = measured[n]
    log.debug("constants: %d constant float values (%d measured)", len(consts), len(measured))
    return PassResult(False, f"{len(consts)} constant float values")
