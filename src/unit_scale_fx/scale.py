"""The scale ops the rewrite inserts.

``scale(x, fwd, bwd)`` multiplies ``x`` by ``fwd`` in the forward pass and the
incoming gradient by ``bwd`` in the backward pass. Factors are plain Python
floats, so torch.compile folds them into the surrounding kernels.
"""

from __future__ import annotations

import torch
from torch import Tensor


class _ScaleFn(torch.autograd.Function):
    @staticmethod
    def forward(x: Tensor, fwd: float, bwd: float) -> Tensor:  # type: ignore[override]
        return x * fwd if fwd != 1.0 else x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        ctx.bwd = inputs[2]

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return (grad * ctx.bwd if ctx.bwd != 1.0 else grad), None, None


def scale(x: Tensor, fwd: float, bwd: float) -> Tensor:
    """``x * fwd`` forward, ``grad * bwd`` backward.

    With ``fwd == bwd`` this is an ordinary multiplication (its gradient is the
    true gradient); otherwise the gradient is deliberately rescaled, which the
    planner allows only on cut edges of the graph.
    """
    if fwd == bwd:
        return x * fwd if fwd != 1.0 else x
    return _ScaleFn.apply(x, float(fwd), float(bwd))


def weighted_add(a: Tensor, b: Tensor, wa: float, wb: float) -> Tensor:
    """``wa * a + wb * b`` (a residual add with its two weights)."""
    return torch.add(a * wa, b, alpha=wb)
