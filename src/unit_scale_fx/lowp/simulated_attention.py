"""Scaled-dot-product attention with its two matmuls in a simulated format.

:class:`SimulatedAttention` takes ``F.scaled_dot_product_attention``'s arguments
and computes the same function with explicit ops, so that every matmul inside
attention sees rounded operands: ``Q``, ``K``, ``V`` and the softmax weights ``P``
are rounded to the forward format, and the gradients arriving at ``Q Kᵀ`` and at
``P V`` to the backward format. Softmax runs in float32 and its result is cast
back to the input dtype.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .formats import FormatLike, Quantise


class SimulatedAttention(nn.Module):
    """``F.scaled_dot_product_attention`` with rounded matmul operands and gradients."""

    def __init__(self, fwd: FormatLike, bwd: FormatLike, saturate: bool = True, passthrough: bool = False) -> None:
        super().__init__()
        self.q = Quantise(fwd, None, saturate, "q", passthrough)
        self.k = Quantise(fwd, None, saturate, "k", passthrough)
        self.v = Quantise(fwd, None, saturate, "v", passthrough)
        self.p = Quantise(fwd, None, saturate, "p", passthrough)
        self.logits_grad = Quantise(None, bwd, saturate, "grad(q@k)", passthrough)
        self.out_grad = Quantise(None, bwd, saturate, "grad(p@v)", passthrough)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
                dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
                enable_gqa: bool = False) -> Tensor:
        n_q, n_k = query.size(-2), key.size(-2)
        s = 1.0 / math.sqrt(query.size(-1)) if scale is None else float(scale)
        if enable_gqa and key.dim() >= 3 and key.size(-3) != query.size(-3):
            rep = query.size(-3) // key.size(-3)
            key = key.repeat_interleave(rep, dim=-3)
            value = value.repeat_interleave(rep, dim=-3)
        q, k, v = self.q(query), self.k(key), self.v(value)
        acc = torch.promote_types(query.dtype, torch.float32)  # softmax in float32 at least
        logits = self.logits_grad(q @ k.transpose(-2, -1)).to(acc) * s
        if is_causal:
            keep = torch.ones(n_q, n_k, dtype=torch.bool, device=query.device).tril()
            logits = logits.masked_fill(~keep, float("-inf"))
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                logits = logits.masked_fill(~attn_mask, float("-inf"))
            else:
                logits = logits + attn_mask.to(acc)
        p = torch.softmax(logits, dim=-1).to(query.dtype)
        if dropout_p > 0.0:
            p = F.dropout(p, dropout_p, training=True)
        return self.out_grad(self.p(p) @ v)
