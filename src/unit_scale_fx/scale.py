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


def _mm(a: Tensor, b: Tensor, alpha: float) -> Tensor:
    """``alpha * (a @ b)`` for 2-D ``a`` and ``b`` in one GEMM (BLAS applies ``alpha``)."""
    if alpha == 1.0:
        return torch.mm(a, b)
    return torch.addmm(a.new_zeros(()), a, b, beta=0, alpha=alpha)


class _ScaledLinearFn(torch.autograd.Function):
    """``kx * (x @ w.T) + kb * b`` forward; with ``d = go * g``: gradients ``cx * d @ w``,
    ``cw * d.T @ x``, ``cb * sum(d)``.

    The forward factors act inside the GEMM (``alpha`` / ``beta`` of ``addmm``): no scaled
    copy of an input or of the output is made, and backward keeps ``x`` and ``w`` as they
    are. The output's backward factor ``go`` is applied first, so the gradient both
    backward GEMMs read is the unit gradient the plan made it.
    """

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Tensor | None, k: tuple, c: tuple) -> Tensor:  # type: ignore[override]
        kx, kb = k
        x2 = x.reshape(-1, x.shape[-1])
        if b is None:
            out = _mm(x2, w.t(), kx)
        else:
            out = torch.addmm(b, x2, w.t(), beta=kb, alpha=kx)
        # what each gradient needs, and nothing more (as addmm saves)
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, w if ctx.needs_input_grad[0] else None)
        ctx.x_shape = x.shape
        ctx.c = c
        ctx.has_bias = b is not None
        return out.view(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        x, w = ctx.saved_tensors
        go, cx, cw, cb = ctx.c
        g2 = g.reshape(-1, g.shape[-1])
        if go != 1.0:  # the gradient the backward GEMMs consume is the unit one, as in the unfused chain
            g2 = g2 * go
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = _mm(g2, w, cx).view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            gw = _mm(g2.t(), x.reshape(-1, x.shape[-1]), cw)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g2.sum(0)
            if cb != 1.0:
                gb = gb * cb
        return gx, gw, gb, None, None


_ONE = (1.0, 1.0)


def scaled_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, x_scale: tuple = _ONE,
                  weight_scale: tuple = _ONE, bias_scale: tuple = _ONE, out_scale: tuple = _ONE) -> Tensor:
    """``linear`` with ``scale`` on its inputs and output, computed as one op.

    The same as ``scale(linear(scale(x, *x_scale), scale(weight, *weight_scale),
    scale(bias, *bias_scale)), *out_scale)`` in forward and backward (each pair is
    ``(fwd, bwd)``), without the intermediate scaled tensors. With every factor 1 it is
    ``F.linear``.
    """
    (fx, gx), (fw, gw), (fb, gb), (fo, go) = x_scale, weight_scale, bias_scale, out_scale
    if (fx, gx, fw, gw, fb, gb, fo, go) == (1.0,) * 8:
        return torch.nn.functional.linear(x, weight, bias)
    if x.dim() == 0 or weight.dim() != 2 or (bias is not None and bias.dim() != 1):
        return scale(torch.nn.functional.linear(scale(x, fx, gx), scale(weight, fw, gw),
                                                None if bias is None else scale(bias, fb, gb)), fo, go)
    k = (float(fo * fx * fw), float(fo * fb))
    c = (float(go), float(gx * fw), float(gw * fx), float(gb))
    return _ScaledLinearFn.apply(x, weight, bias, k, c)
