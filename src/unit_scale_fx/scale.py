"""The scale ops the rewrite inserts.

``scale(x, fwd, bwd)`` multiplies ``x`` by ``fwd`` in the forward pass and the
incoming gradient by ``bwd`` in the backward pass. Factors are plain Python
floats, so torch.compile folds them into the surrounding kernels.
"""

from __future__ import annotations

from typing import Any

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


class _ScaledLayerNormFn(torch.autograd.Function):
    """``fo * layer_norm(x, w, b)``; backward: with ``d = go * g``, each input's gradient times its factor."""

    @staticmethod
    def forward(ctx, x: Tensor, shape: list, w: Tensor | None, b: Tensor | None, eps: float,  # type: ignore[override]
                fo: float, c: tuple) -> Tensor:
        out, mean, rstd = torch.ops.aten.native_layer_norm(x, shape, w, b, eps)
        if fo != 1.0:
            out.mul_(fo)
        ctx.save_for_backward(x, w, b, mean, rstd)
        ctx.shape, ctx.c = shape, c
        return out

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        x, w, b, mean, rstd = ctx.saved_tensors
        go, gx, gw, gb = ctx.c
        if go != 1.0:
            g = g * go
        need = ctx.needs_input_grad
        mask = [need[0], w is not None and need[2], b is not None and need[3]]
        dx, dw, db = torch.ops.aten.native_layer_norm_backward(g, x, ctx.shape, mean, rstd, w, b, mask)
        for t, f in ((dx, gx), (dw, gw), (db, gb)):
            if t is not None and f != 1.0:
                t.mul_(f)
        return dx, None, dw, db, None, None, None


def scaled_layer_norm(x: Tensor, normalized_shape: Any, weight: Tensor | None = None, bias: Tensor | None = None,
                      eps: float = 1e-5, *, x_scale: tuple = _ONE, weight_scale: tuple = _ONE,
                      bias_scale: tuple = _ONE, out_scale: tuple = _ONE) -> Tensor:
    """``layer_norm`` with ``scale`` on its inputs and output, computed as one op.

    The same as ``scale(layer_norm(scale(x, *x_scale), shape, scale(weight, *weight_scale),
    scale(bias, *bias_scale), eps), *out_scale)`` forward and backward. Inputs' forward
    factors other than 1 (which change what is normalised) run as separate scales.
    """
    (fx, gx), (fw, gw), (fb, gb), (fo, go) = x_scale, weight_scale, bias_scale, out_scale
    if (fx, fw, fb) != (1.0, 1.0, 1.0):
        return scale(torch.nn.functional.layer_norm(
            scale(x, fx, gx), normalized_shape, None if weight is None else scale(weight, fw, gw),
            None if bias is None else scale(bias, fb, gb), eps), fo, go)
    if (gx, gw, gb, fo, go) == (1.0,) * 5:
        return torch.nn.functional.layer_norm(x, normalized_shape, weight, bias, eps)
    shape = [int(normalized_shape)] if isinstance(normalized_shape, int) else [int(s) for s in normalized_shape]
    return _ScaledLayerNormFn.apply(x, shape, weight, bias, float(eps), float(fo),
                                    (float(go), float(gx), float(gw), float(gb)))


def _same_storage(a: Tensor, b: Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() and a.untyped_storage().nbytes() > 0


class _ScaledOutputFn(torch.autograd.Function):
    """``fo * fn(*inputs)``, where ``fn`` saves its output for backward: backward keeps the scaled output once.

    ``fn`` runs on detached inputs with its own autograd record; the output it saves is
    swapped for the scaled output this op returns (unscaled again when backward needs it),
    and the unscaled output's memory is released. Backward: ``go`` on the incoming
    gradient, then ``fn``'s own backward, then each input's factor ``gin[i]``.
    """

    @staticmethod
    def forward(ctx, fn, args: tuple, kwargs: dict, gin: tuple, fo: float, go: float,  # type: ignore[override]
                *inputs: Tensor) -> Tensor:
        det = [t.detach().requires_grad_(t.requires_grad) for t in inputs]
        # hooks the caller set (offloading, checkpointing, measurement) still see every saved tensor
        outer = torch._C._autograd._top_saved_tensors_default_hooks(False)
        boxes: list[list] = []

        def pack(t: Tensor) -> list:
            boxes.append([t])
            return boxes[-1]

        def unpack(box: list) -> Tensor:
            factor, packed = box[0]
            t = outer[1](packed) if outer is not None else packed
            return t * factor if factor != 1.0 else t

        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            out = fn(*det, *args, **kwargs)
        y = out.detach() * fo
        keeps_out = False
        for box in boxes:
            t, factor = box[0], 1.0
            if _same_storage(t, out) and t.shape == out.shape and t.stride() == out.stride():
                t, factor = y, 1.0 / fo
            elif _same_storage(t, out):
                keeps_out = True
            box[0] = (factor, outer[0](t) if outer is not None else t)
        ctx.inner, ctx.gin, ctx.go = (out, det), gin, go
        if not keeps_out:
            out.untyped_storage().resize_(0)  # only its metadata is needed (the root of the inner backward)
        return y

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        out, det = ctx.inner
        if ctx.go != 1.0:
            g = g * ctx.go
        want = [i for i, d in enumerate(det) if d.requires_grad]
        got = torch.autograd.grad(out, [det[i] for i in want], g, allow_unused=True)
        grads: list = [None] * len(det)
        for i, t in zip(want, got):
            f = ctx.gin[i]
            grads[i] = t * f if (t is not None and f != 1.0) else t
        ctx.inner = None
        return (None,) * 6 + tuple(grads)


def _plain_tensors(*ts: Tensor) -> bool:
    """Real tensors (not fake, functional or other subclasses seen while tracing)."""
    return all(type(t) in (torch.Tensor, torch.nn.Parameter) for t in ts)


def scaled_attention(q: Tensor, k: Tensor, v: Tensor, *args: Any, q_scale: tuple = _ONE, k_scale: tuple = _ONE,
                     v_scale: tuple = _ONE, out_scale: tuple = _ONE, **kwargs: Any) -> Tensor:
    """``scaled_dot_product_attention`` with ``scale`` on query, key, value and output, as one op.

    The same as ``scale(sdpa(scale(q, *q_scale), scale(k, *k_scale), scale(v, *v_scale), ...),
    *out_scale)`` forward and backward. In eager autograd, backward keeps the scaled output
    instead of a second, unscaled copy (:class:`_ScaledOutputFn`); while compiling or
    tracing, and for forward input factors other than 1, it is that chain of scales.
    """
    (fq, gq), (fk, gk), (fv, gv), (fo, go) = q_scale, k_scale, v_scale, out_scale
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if ((fq, fk, fv) != (1.0, 1.0, 1.0) or not fo > 0 or torch.compiler.is_compiling()
            or not torch.is_grad_enabled() or not any(t.requires_grad for t in (q, k, v))
            or not _plain_tensors(q, k, v)
            # another tensor that needs a gradient (a learned bias as attn_mask) takes the plain path
            or any(isinstance(t, Tensor) and t.requires_grad
                   for t in torch.utils._pytree.tree_leaves((args, kwargs)))):
        return scale(sdpa(scale(q, fq, gq), scale(k, fk, gk), scale(v, fv, gv), *args, **kwargs), fo, go)
    return _ScaledOutputFn.apply(sdpa, args, kwargs, (float(gq), float(gk), float(gv)), float(fo), float(go),
                                 q, k, v)
