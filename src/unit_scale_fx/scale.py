"""The scale ops the rewrite inserts.

``scale(x, fwd, bwd)`` multiplies ``x`` by ``fwd`` in the forward pass and the
incoming gradient by ``bwd`` in the backward pass. Factors are plain Python
floats, so torch.compile folds them into the surrounding kernels.

The fused ops (``scaled_*``) are first-order only: in eager mode some set their backward
factors through what autograd saved, after the op has run (:func:`_set_saved`), so a
second derivative through them would read other values. A unit-scaled model and the
compile backend's eagerly run graphs guard their outputs (:func:`first_order_only`:
``create_graph=True`` raises); a direct caller of these functions is not guarded.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor
from torch.utils._pytree import tree_leaves

from .errors import UnitScaleError
from .layers import _BN_FORWARD, _bn_momentum, batch_norm_layer


_PLAIN = (torch.Tensor, torch.nn.Parameter)
_FACTORS: dict = {}
_EXACT = (torch.float32, torch.float64)


def _factor(t: Tensor, f: float) -> Any:
    """``f`` as what ``t`` is multiplied by: for a plain float32 or float64 CPU or CUDA tensor, a cached 0-dim
    CPU tensor of its dtype (the kernels read a 0-dim CPU operand as the scalar they read a Python number
    as, so the product is the same; the multiply skips wrapping the number in a new tensor, a few
    microseconds an op); otherwise ``f``."""
    dt = t.dtype
    if dt not in _EXACT or type(t) not in _PLAIN:
        return f
    key = (f, dt)
    c = _FACTORS.get(key)
    if c is None:
        if len(_FACTORS) > 4096:
            _FACTORS.clear()
        c = _FACTORS[key] = torch.tensor(f, dtype=dt)
    return c


def _mul(t: Tensor, f: float) -> Tensor:
    """``t * f`` (``t`` itself for ``f == 1``)."""
    return t if f == 1.0 else t * _factor(t, f)


def _mul_(t: Tensor, f: float) -> Tensor:
    """``t.mul_(f)`` (nothing for ``f == 1``)."""
    return t if f == 1.0 else t.mul_(_factor(t, f))


def _eager() -> bool:
    """Neither compiling nor under a ``functorch`` transform (``vmap``, ``grad``): the fused ops may take
    their eager shortcuts."""
    return not (torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active())


def _native_ok(*ts: Tensor | None) -> bool:
    """The fused ops may run as native autograd ops with backward factors set through what they save
    (:func:`_set_saved`): plain float32 / float64 tensors, eager (no compiling, no ``functorch`` transform),
    and no saved-tensor hooks. (A hook may stand between a saved tensor and backward: non-reentrant
    checkpointing recomputes the forward in backward and stops right after the last tensor is saved, which
    may be before the saved values are set. Under hooks the fused ops are ``autograd.Function`` s, which
    save the same activations.)"""
    if not _eager() or torch._C._autograd._top_saved_tensors_default_hooks(False) is not None:
        return False
    return all(t is None or (type(t) in _PLAIN and t.dtype in _EXACT) for t in ts)


def _fresh(t: Tensor, f: float) -> Tensor:
    """A new 0-dim CPU tensor holding ``f``, of ``t``'s dtype: a factor an op multiplies by, which autograd
    saves for backward and :func:`_set_saved` may change afterwards."""
    return _factor(t, f).clone()


def _set_saved(t: Tensor, f: float) -> None:
    """Set a factor of backward, after forward has read ``t``: ``t`` (a tensor this op made, which autograd
    saved for backward) becomes ``t * f`` in place through ``t.data``, which shares its storage but not
    its version counter, so that backward reads the new value without autograd flagging the change.
    The standard trick of optimizers and initialisers; here it makes a native op's backward factor
    differ from its forward one without a Python ``autograd.Function`` (tens of microseconds a call)."""
    if f != 1.0:
        t.data.mul_(_factor(t, f))


def _gain(x: Tensor, w: Tensor | None, shape: Sequence[int], f: float) -> Tensor | None:
    """A norm's gain times ``f``: ``w * f``, or for a norm without a gain the constant ``f`` (none if 1)."""
    if w is not None:
        return _mul(w, f)
    return None if f == 1.0 else x.new_full(tuple(shape), f)


def _native_affine(x: Tensor, w: Tensor | None, b: Tensor | None, shape: Sequence[int], fw: float, fb: float,
                   kx: float, gw: float, gb: float) -> tuple[Tensor | None, Tensor | None, Any]:
    """The weight and bias a native op reads, and what to call once it has run (:func:`_set_saved`): for an
    op whose input gradient is linear in its weight and reads neither the bias nor, for the weight's own
    gradient, the weight (a norm's gain, a convolution's weight).

    The weight and bias are multiplied by fresh 0-dim factors ``fw`` and ``fb`` (a missing weight: the
    constant ``fw``, or none where ``fw`` and ``kx`` are 1). Afterwards the weight the op saved becomes
    the weight times ``kx`` (the input gradient's factor, times the weight's own forward factor), and the
    saved factors of the weight's and bias's multiplies become ``gw`` and ``gb`` (their gradients'
    factors)."""
    # of the weight's (bias's) dtype: a 0-dim factor is read as a number of that dtype
    sw = _fresh(w if w is not None else x, fw)
    sb = sw if (fb, gb) == (fw, gw) or b is None else _fresh(b, fb)
    if w is not None:
        wf: Tensor | None = w * sw
    else:
        wf = None if fw == 1.0 and kx == 1.0 else x.new_full(tuple(shape), fw)
    bf = b * sb if b is not None else None

    def after() -> None:
        if wf is not None:
            _set_saved(wf, kx / fw)
        sw.data.fill_(gw)
        if sb is not sw:
            sb.data.fill_(gb)

    return wf, bf, after


def _stats_copies(rm: Tensor | None, rv: Tensor | None, fx: float) -> tuple[Tensor | None, Tensor | None]:
    """The running statistics a batch norm of ``x`` updates for a batch norm of ``fx * x``: copies divided
    by ``fx`` and ``fx**2`` (the buffers themselves for ``fx == 1`` or none); :func:`_stats_back` after."""
    if fx == 1.0 or rm is None or rv is None:
        return rm, rv
    return _mul(rm, 1.0 / fx), _mul(rv, 1.0 / (fx * fx))


def _stats_back(rm: Tensor | None, rv: Tensor | None, rmt: Tensor | None, rvt: Tensor | None, fx: float) -> None:
    """Write the updated copies of :func:`_stats_copies` back into the running statistics."""
    if rm is not None and rv is not None and rmt is not rm:
        torch.mul(rmt, _factor(rmt, fx), out=rm)
        torch.mul(rvt, _factor(rvt, fx * fx), out=rv)


class _GradFactor:
    """A gradient hook: the gradient times a factor, in place. Only for a view that one op alone reads
    (:func:`_grad_scaled`): the gradient the hook gets is that op's own new output, shared with nothing."""

    __slots__ = ("f",)

    def __init__(self, f: float) -> None:
        self.f = f

    def __call__(self, g: Tensor) -> Tensor:
        return _mul_(g, self.f)


def _grad_scaled(t: Tensor, g: float) -> Tensor:
    """``t``, or a new view of it whose gradient is multiplied by ``g`` (a hook on the view; ``t`` itself,
    a parameter, gets no hook). The caller passes the view to one op only."""
    if g == 1.0 or not t.requires_grad:
        return t
    v = t.view_as(t)
    v.register_hook(_GradFactor(g))
    return v


class _FirstOrderOnly:
    """A pre-hook on the autograd nodes of a unit-scaled model's outputs: backward that builds a graph
    (``create_graph=True``: double backward, gradient penalties, Hessian-vector products) raises.

    The backward of a unit-scaled model is rescaled on purpose (it is not the derivative of its
    forward), and the fused ops set backward factors through what autograd saved (:func:`_set_saved`),
    which a second differentiation would read as other values: its result would be wrong and silent."""

    __slots__ = ("where",)

    def __init__(self, where: str) -> None:
        self.where = where

    def __call__(self, grad_outputs: Any) -> None:
        if torch.is_grad_enabled():
            raise UnitScaleError(
                "backward with create_graph=True (a second derivative) through a unit-scaled model: its "
                "gradients are rescaled on purpose and are not differentiable as the forward's derivative",
                where=self.where,
                fix="take first-order gradients only (no create_graph=True), or compute higher-order terms "
                    "(gradient penalty, Hessian-vector product) on the original model")
        return None


def first_order_only(out: Any, inputs: Any, where: str) -> None:
    """Make backward through ``out`` (what a unit-scaled model or compiled graph returned for ``inputs``)
    first-order only: :class:`_FirstOrderOnly` on the autograd node of each tensor output made inside
    (an input returned as it is keeps its node untouched). ``where`` names the model in the error."""
    if type(out) in _PLAIN:  # one tensor (a loss): no tree to walk
        outs = [out] if out.grad_fn is not None else []
    else:
        outs = [t for t in tree_leaves(out) if isinstance(t, Tensor) and t.grad_fn is not None]
    if not outs:
        return
    theirs = {id(a.grad_fn) for a in tree_leaves(inputs) if isinstance(a, Tensor) and a.grad_fn is not None}
    hook = _FirstOrderOnly(where)
    for node in {id(t.grad_fn): t.grad_fn for t in outs}.values():
        if id(node) not in theirs:
            node.register_prehook(hook)


def _fast_apply(cls: type) -> Any:
    """``cls.apply`` without the per-call Python of ``Function.apply``, which binds the arguments where
    a ``setup_context`` is defined (the fused ops define none) and builds the argument tuple through a
    generator: the C ``apply`` directly, with the same unwrapping of tensors a ``functorch`` transform
    left behind. Under an active transform (``vmap``, ``grad``) or while compiling it is ``cls.apply``
    (what dynamo and functorch recognise)."""
    base = super(torch.autograd.Function, cls).apply  # type: ignore[misc]
    unwrap = torch._C._functorch.unwrap_if_dead
    active = torch._C._are_functorch_transforms_active
    compiling = torch.compiler.is_compiling

    def apply(*args: Any) -> Any:
        if active() or compiling():
            return cls.apply(*args)
        return base(*[unwrap(a) if isinstance(a, Tensor) else a for a in args])

    return apply


class _ScaleFn(torch.autograd.Function):
    # the ``forward(ctx, ...)`` form: with a separate ``setup_context``, every ``apply`` binds its
    # arguments with ``inspect.signature``, which costs more than the multiply on small tensors
    @staticmethod
    def forward(ctx, x: Tensor, fwd: float, bwd: float) -> Tensor:  # type: ignore[override]
        ctx.bwd = bwd
        if fwd != 1.0:
            return _mul(x, fwd)
        # a backward-only scale: a view, no copy. A 0-dim value (a returned loss) is copied instead, so
        # that callers may scale it in place (``loss *= k``: transformers.Trainer, accelerate), which
        # autograd forbids on the view a custom Function returns
        return x.view_as(x) if x.dim() > 0 else x.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return _mul(grad, ctx.bwd), None, None


_apply_scale = _fast_apply(_ScaleFn)


class _TransformScaleFn(torch.autograd.Function):
    """:class:`_ScaleFn` in the form ``functorch`` transforms take (``setup_context``, a generated vmap rule): a
    graph may run a scale inside ``torch.vmap`` (Mamba's associative scan), where the ``forward(ctx, ...)`` form
    raises. The fused ops run there as their chains of these scales."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, fwd: float, bwd: float) -> Tensor:  # type: ignore[override]
        return x * fwd

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        ctx.bwd = inputs[2]

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return grad * ctx.bwd, None, None


_transforms = torch._C._are_functorch_transforms_active


class _ScaleCopyFn(torch.autograd.Function):
    """A backward-only scale that returns a copy (:func:`scale_returned`)."""

    @staticmethod
    def forward(ctx, x: Tensor, bwd: float) -> Tensor:  # type: ignore[override]
        ctx.bwd = bwd
        return x.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return _mul(grad, ctx.bwd), None


_apply_scale_copy = _fast_apply(_ScaleCopyFn)


def scale_returned(x: Tensor, fwd: float, bwd: float) -> Tensor:
    """:func:`scale` of a value a graph returns (or a view of which it returns): a backward-only scale gives a
    copy instead of a view. Autograd forbids writing in place into a view a custom ``autograd.Function``
    returned, and the caller may write into what it gets back: ``hidden_states[mask] = embedding`` in
    Wav2Vec2, on a tensor that ``torch.compile`` returns from the graph before a graph break.

    In eager training (:func:`_native_ok`) the copy is a native multiply by a fresh 0-dim factor holding 1,
    set to ``bwd`` once it has run (:func:`_set_saved`'s trick): the same copy, the gradient times ``bwd``,
    and no Python ``autograd.Function`` (a returned loss: one call a step)."""
    if fwd != 1.0 or fwd == bwd or not isinstance(x, Tensor) or _transforms():
        return scale(x, fwd, bwd)
    if x.requires_grad and torch.is_grad_enabled() and _native_ok(x):
        s = _fresh(x, 1.0)
        out = x * s
        s.data.fill_(bwd)
        return out
    return _apply_scale_copy(x, float(bwd))


def scale(x: Tensor, fwd: float, bwd: float) -> Tensor:
    """``x * fwd`` forward, ``grad * bwd`` backward.

    With ``fwd == bwd`` this is an ordinary multiplication (its gradient is the
    true gradient); otherwise the gradient is deliberately rescaled, which the
    planner allows only on cut edges of the graph.
    """
    if fwd == bwd or not isinstance(x, Tensor):  # (a Python number has no gradient to scale)
        return x * fwd if fwd != 1.0 else x
    if _transforms():
        return _TransformScaleFn.apply(x, float(fwd), float(bwd))
    return _apply_scale(x, float(fwd), float(bwd))


def weighted_add(a: Tensor, b: Tensor, wa: float, wb: float) -> Tensor:
    """``wa * a + wb * b`` (a residual add with its two weights)."""
    return torch.add(a * wa, b, alpha=wb)


#: within this factor of 1, the backward factor of a linear's output is the backward GEMMs' ``alpha`` (they read a
#: gradient within 4.4% of unit instead of the unit one, which no number format's range tells apart) instead of
#: a multiply of the gradient
NEAR_ONE = 2.0 ** (1 / 16)


def _mm(a: Tensor, b: Tensor, alpha: float) -> Tensor:
    """``alpha * (a @ b)`` for 2-D ``a`` and ``b`` in one GEMM (BLAS applies ``alpha``)."""
    if alpha == 1.0:
        return torch.mm(a, b)
    return torch.addmm(a.new_zeros(()), a, b, beta=0, alpha=alpha)


class _ScaledLinearFn(torch.autograd.Function):
    """``kx * (xs @ ws.T) + kb * b`` forward, with ``xs = fx * x`` and ``ws = fw * w``; with
    ``d = go * g``: gradients ``cx * d @ ws``, ``cw * d.T @ xs``, ``cb * sum(d)``.

    The output's forward factors act inside the GEMM (``alpha`` / ``beta`` of ``addmm``):
    no scaled copy of the output is made. An operand's forward factor other than 1 makes
    the scaled copy the GEMMs read (and backward keeps), as the chain of scales does; its
    backward factor is the backward GEMM's ``alpha``. The output's backward factor ``go`` is
    applied first, so the gradient both backward GEMMs read is the unit gradient the plan
    made it.
    """

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Tensor | None, k: tuple, c: tuple) -> Tensor:  # type: ignore[override]
        kx, kb, fx, fw = k
        # forward factors of the operands make scaled copies (what the GEMMs read and backward keeps)
        x, w = _mul(x, fx), _mul(w, fw)
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
        # not ``out.view``: autograd forbids writing in place into a view a custom Function returns, and callers
        # write into what a linear returns (``hidden_states[mask] = embedding``); ``_unsafe_view`` (as matmul
        # returns its folded GEMM) shares the storage without being a view
        return torch.ops.aten._unsafe_view(out, (*x.shape[:-1], w.shape[0]))

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        x, w = ctx.saved_tensors
        go, cx, cw, cb = ctx.c
        g2 = g.reshape(-1, g.shape[-1])
        if 1.0 / NEAR_ONE <= go <= NEAR_ONE:  # one pass over the gradient fewer; the GEMMs read it within 4.4% of unit
            go, cx, cw, cb = 1.0, cx * go, cw * go, cb * go
        elif go != 1.0:  # the gradient the backward GEMMs consume is the unit one, as in the unfused chain
            g2 = _mul(g2, go)
        gx = gw = gb = None
        if ctx.has_bias and ctx.needs_input_grad[2]:  # first: a compiler fuses it with g2's producer
            gb = g2.sum(0)
            gb = _mul_(gb, cb)
        if ctx.needs_input_grad[0]:
            gx = _mm(g2, w, cx).view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            gw = _mm(g2.t(), x.reshape(-1, x.shape[-1]), cw)
        return gx, gw, gb, None, None


_apply_linear = _fast_apply(_ScaledLinearFn)
_ONE = (1.0, 1.0)


def _pair(s: tuple) -> tuple:
    """A fused op's ``(fwd, bwd)`` factors of one input or output. The generated code may give a tuple
    of such pairs instead (``((fo, go), (1.0, g2))``: a backward factor moved here from a neighbouring
    op, so that one multiply does the work of two): their product."""
    if s and isinstance(s[0], tuple):
        f = b = 1.0
        for u, v in s:
            f, b = f * u, b * v
        return f, b
    return s


def _owned(x: Tensor) -> bool:
    """``x`` may be scaled in place by the op that reads it, in eager mode: a plain tensor that is no view
    and no leaf that needs a gradient (the caller vouches that nothing else reads it and that no backward
    reads it: :data:`~unit_scale_fx.passes.fold_scales.FRESH_OUTPUT`). While compiling or under a
    ``functorch`` transform the op makes a scaled copy instead."""
    return _eager() and type(x) in _PLAIN and x._base is None and (x.grad_fn is not None or not x.requires_grad)


def _scale_owned(x: Tensor, fx: float) -> tuple[Tensor, float]:
    """An input's forward factor ``fx`` applied in place where the op owns the input (:func:`_owned`): ``x``
    times ``fx`` (the value a scaled copy would hold) and the factor left to apply, 1; else ``x`` and ``fx``.
    The multiply runs without autograd: the gradient's factor stays the op's own backward factor."""
    if fx == 1.0 or not _owned(x):
        return x, fx
    with torch.no_grad():
        _mul_(x, fx)
    return x, 1.0


def scaled_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, x_scale: tuple = _ONE,
                  weight_scale: tuple = _ONE, bias_scale: tuple = _ONE, out_scale: tuple = _ONE,
                  x_in_place: bool = False) -> Tensor:
    """``linear`` with ``scale`` on its inputs and output, computed as one op.

    The same as ``scale(linear(scale(x, *x_scale), scale(weight, *weight_scale),
    scale(bias, *bias_scale)), *out_scale)`` in forward and backward (each pair is
    ``(fwd, bwd)``), without the intermediate scaled tensors. With every factor 1 it is
    ``F.linear``.

    ``x_in_place``: ``x`` is a new tensor that only this op reads and that no backward reads (the
    generated code says so where the graph shows it): in eager mode its forward factor multiplies it in
    place, so no scaled copy is allocated. The values are the same.
    """
    (fx, gx), (fw, gw), (fb, gb), (fo, go) = map(_pair, (x_scale, weight_scale, bias_scale, out_scale))
    if (fx, gx, fw, gw, fb, gb, fo, go) == (1.0,) * 8:
        return torch.nn.functional.linear(x, weight, bias)
    if x.dim() == 0 or weight.dim() != 2 or (bias is not None and bias.dim() != 1) or _transforms():
        return scale(torch.nn.functional.linear(scale(x, fx, gx), scale(weight, fw, gw),
                                                None if bias is None else scale(bias, fb, gb)), fo, go)
    # forward factors of the GEMM's operands multiply the operands (the GEMMs read what the plan
    # made unit, and backward keeps the scaled copy, as the chain does); their backward factors and
    # the output's forward factor are the GEMMs' ``alpha``
    if x_in_place:
        x, fx = _scale_owned(x, fx)
    k = (float(fo), float(fo * fb), float(fx), float(fw))
    c = (float(go), float(gx), float(gw), float(gb))
    return _apply_linear(x, weight, bias, k, c)


def _ntuple(v: Any, n: int) -> list:
    return [int(i) for i in v] if isinstance(v, (tuple, list)) else [int(v)] * n


def _conv_forward(ctx: Any, conv: Any, x: Tensor, w: Tensor, b: Tensor | None, geometry: tuple, f: tuple,
                  c: tuple) -> tuple[Tensor, Tensor, Tensor]:
    """The forward of :class:`_ScaledConvFn`: the output, and the operands backward keeps."""
    fx, fw, fb, fo = f
    stride, padding, dilation, groups = geometry
    x, w = _mul(x, fx), _mul(w, fw)
    if b is not None:
        b = _mul(b, fb)
    out = _mul_(conv(x, w, b, stride, padding, dilation, groups), fo)
    n = w.dim() - 2
    ctx.geometry = (_ntuple(stride, n), _ntuple(padding, n), _ntuple(dilation, n), int(groups))
    ctx.bias_sizes = None if b is None else [b.shape[0]]
    ctx.c = c
    return out, x, w


def _conv_backward(ctx: Any, g: Tensor, x: Tensor, w: Tensor, need: Sequence[bool]) -> tuple:
    """The backward of :class:`_ScaledConvFn`: the gradients of input, weight and bias (``need``: which)."""
    go, gx, gw, gb = ctx.c
    g = _mul(g, go)
    if g.dtype != x.dtype:  # under autocast the forward convolution read copies of the dtype it returned
        x, w = x.to(g.dtype), w.to(g.dtype)
    stride, padding, dilation, groups = ctx.geometry
    mask = [need[0], need[1], ctx.bias_sizes is not None and need[2]]
    wd = w
    if mask[0] and gx != 1.0 and w.numel() < x.numel():
        # the input gradient is linear in the weight, which the other gradients do not read: its factor
        # multiplies the (smaller) weight instead of the gradient
        wd, gx = _mul(w, gx), 1.0
    grads = torch.ops.aten.convolution_backward(g, x, wd, ctx.bias_sizes, stride, padding, dilation, False,
                                                [0] * len(stride), groups, mask)
    dx, dw, db = (t if m else None for t, m in zip(grads, mask))
    for t, f in ((dx, gx), (dw, gw), (db, gb)):
        if t is not None:
            _mul_(t, f)
    return dx, dw, db


class _ScaledConvFn(torch.autograd.Function):
    """``fo * conv(fx * x, fw * w, fb * b)``; backward: with ``d = go * g``, each input's gradient
    times its backward factor (``convolution_backward``, then in-place multiplies; the input gradient's
    factor multiplies a copy of the weight that backward reads instead, where the weight is the smaller).

    Operands with a forward factor other than 1 are scaled copies (what the convolution reads
    and backward keeps, as the chain of scales does); the output is multiplied in place (the
    convolution's backward does not read it).
    """

    @staticmethod
    def forward(ctx, conv, x: Tensor, w: Tensor, b: Tensor | None, geometry: tuple,  # type: ignore[override]
                f: tuple, c: tuple) -> Tensor:
        out, x, w = _conv_forward(ctx, conv, x, w, b, geometry, f, c)
        ctx.save_for_backward(x, w)  # as the convolution saves
        return out

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        x, w = ctx.saved_tensors
        return (None,) + _conv_backward(ctx, g, x, w, ctx.needs_input_grad[1:4]) + (None, None, None)


_apply_conv = _fast_apply(_ScaledConvFn)
#: the convolutions :func:`scaled_conv` computes, by the number of spatial dimensions
CONVS = {1: torch.conv1d, 2: torch.conv2d, 3: torch.conv3d}


def scaled_conv(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride: Any = 1, padding: Any = 0,
                dilation: Any = 1, groups: int = 1, *, x_scale: tuple = _ONE, weight_scale: tuple = _ONE,
                bias_scale: tuple = _ONE, out_scale: tuple = _ONE, x_in_place: bool = False) -> Tensor:
    """``conv1d`` / ``conv2d`` / ``conv3d`` (by ``weight``'s dimensions) with ``scale`` on its inputs and
    output, computed as one op.

    The same as ``scale(conv(scale(x, *x_scale), scale(weight, *weight_scale), scale(bias, *bias_scale),
    stride, padding, dilation, groups), *out_scale)`` forward and backward. With every factor 1 it is
    the convolution. ``x_in_place``: as in :func:`scaled_linear`.

    In eager training, for an input gradient with a factor, a weight with no more elements than the
    input and forward factors 1 on the input and output, every factor acts through a copy of the weight
    (:func:`_native_conv`): no pass over an activation or its gradient. Without an input-gradient factor,
    hooks scale the gradients of the weight and bias (a copy of the weight would save nothing). A forward
    factor on the input or output stays off the weight: the convolution reads the unit operands the
    chain gives it.
    """
    conv = CONVS[weight.dim() - 2]
    (fx, gx), (fw, gw), (fb, gb), (fo, go) = map(_pair, (x_scale, weight_scale, bias_scale, out_scale))
    if (fx, gx, fw, gw, fb, gb, fo, go) == (1.0,) * 8:
        return conv(x, weight, bias, stride, padding, dilation, groups)
    if (fx, fo) == (1.0, 1.0) and gx * go != 1.0 and x.requires_grad and torch.is_grad_enabled() \
            and x.dim() == weight.dim() and weight.numel() <= x.numel() and _native_ok(x, weight, bias) \
            and not torch.is_autocast_enabled(x.device.type):
        # the gradients' factors in the (smaller) weight, where the input gradient has one; not under
        # autocast, whose cast copy of the weight is what the convolution saves
        return _native_conv(conv, x, weight, bias, (stride, padding, dilation, groups), float(fw), float(fb),
                            (float(go), float(gx), float(gw), float(gb)))
    if x_in_place and not _transforms():
        x, fx = _scale_owned(x, float(fx))
    if isinstance(padding, str) or x.dim() != weight.dim() or not torch.is_grad_enabled() or _transforms():
        return scale(conv(scale(x, fx, gx), scale(weight, fw, gw), None if bias is None else scale(bias, fb, gb),
                          stride, padding, dilation, groups), fo, go)
    if (fx, fw, fb, fo, go) == (1.0,) * 5 and _native_ok(x, weight, bias):
        # backward factors only: the native convolution (it saves the weight itself, as the original does:
        # no scaled copy alive until backward) of views whose gradients a hook multiplies in place
        return conv(_grad_scaled(x, float(gx)), _grad_scaled(weight, float(gw)),
                    None if bias is None else _grad_scaled(bias, float(gb)), stride, padding, dilation, groups)
    return _apply_conv(conv, x, weight, bias, (stride, padding, dilation, groups),
                               (float(fx), float(fw), float(fb), float(fo)),
                               (float(go), float(gx), float(gw), float(gb)))


def _native_conv(conv: Any, x: Tensor, w: Tensor, b: Tensor | None, geometry: tuple, fw: float, fb: float,
                 c: tuple) -> Tensor:
    """What :class:`_ScaledConvFn` computes for input and output forward factors 1, as native autograd ops
    with every other factor in the weight (:func:`scaled_conv`: for an input gradient with a factor and a
    weight no larger than the input): no pass over an activation or its gradient, and no gradient hook.

    ``conv(x, fw * w, fb * b)`` with the weight and bias of :func:`_native_affine`: the convolution reads
    the operands the chain of scales gives it. Once it has run, the weight copy it saved for the input
    gradient is ``gx go fw * w`` (the chain's input gradient is ``gx * J_x^T (go * g)``, linear in the
    weight; the weight gradient does not read it), and the saved factors are the gradients' factors:
    ``gw go`` for the weight, ``gb go`` for the bias. Autograd saves ``x`` and the weight's copy, as the
    original convolution saves ``x`` and the weight, and the 0-dim factors (one, shared, where the
    weight's and bias's factors agree)."""
    go, gx, gw, gb = c
    wf, bf, after = _native_affine(x, w, b, (), fw, fb, gx * go * fw, gw * go, gb * go)
    out = conv(x, wf, bf, *geometry)
    after()
    return out


class _ScaledAddFn(torch.autograd.Function):
    """``ka * a + kb * b`` forward (one ``add`` with ``alpha`` where a factor is 1); backward
    ``ca * g`` and ``cb * g``."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, k: tuple, c: tuple) -> Tensor:  # type: ignore[override]
        ctx.c, ctx.shapes = c, (a.shape, b.shape)
        return _weighted_sum(a, b, *k)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        grads = []
        for f, need, shape in zip(ctx.c, ctx.needs_input_grad[:2], ctx.shapes):
            t = None
            if need:
                t = g.sum_to_size(shape) if g.shape != shape else g  # an input broadcast in forward
                t = _mul(t, f)
            grads.append(t)
        return grads[0], grads[1], None, None


_apply_add = _fast_apply(_ScaledAddFn)


def _weighted_sum(a: Tensor, b: Tensor, ka: float, kb: float) -> Tensor:
    if ka == 1.0:
        return torch.add(a, b, alpha=kb) if kb != 1.0 else a + b
    if kb == 1.0:
        return torch.add(b, a, alpha=ka)
    return torch.add(a * ka, b, alpha=kb)


def scaled_add(a: Tensor, b: Tensor, *, a_scale: tuple = _ONE, b_scale: tuple = _ONE,
               out_scale: tuple = _ONE) -> Tensor:
    """``a + b`` with ``scale`` on both inputs and the output, computed as one op.

    The same function as ``scale(scale(a, *a_scale) + scale(b, *b_scale), *out_scale)``: forward
    ``(fa fo) a + (fb fo) b``, one ``add`` with ``alpha`` where one of the factors is 1; backward
    ``(go ga) g`` to ``a`` and ``(go gb) g`` to ``b``. Where every forward factor equals its
    backward factor it is plain autograd. With every factor 1 it is ``a + b``. Inputs may broadcast;
    inputs of different dtypes (type promotion) take the chain of scales.
    """
    (fa, ga), (fb, gb), (fo, go) = map(_pair, (a_scale, b_scale, out_scale))
    ka, kb, ca, cb = float(fa * fo), float(fb * fo), float(ga * go), float(gb * go)
    if (ka, kb) == (ca, cb) and isinstance(a, Tensor) and isinstance(b, Tensor):
        return _weighted_sum(a, b, ka, kb)
    if (not isinstance(a, Tensor) or not isinstance(b, Tensor) or a.dtype != b.dtype
            or not torch.is_grad_enabled() or _transforms()):
        return scale(scale(a, fa, ga) + scale(b, fb, gb), fo, go)
    # (a backward factor of 1 on the scaled input: the Function, whose backward passes the gradient on as it
    # is, where the native op would multiply it by 1)
    if (ka, ca) == (1.0, 1.0) and cb != 1.0 and _native_ok(a, b):
        return _native_add(a, b, kb, cb)
    if (kb, cb) == (1.0, 1.0) and ca != 1.0 and _native_ok(a, b):
        return _native_add(b, a, ka, ca)
    return _apply_add(a, b, (ka, kb), (ca, cb))


def _native_add(a: Tensor, b: Tensor, kb: float, cb: float) -> Tensor:
    """``a + kb * b`` forward, gradients ``g`` to ``a`` and ``cb * g`` to ``b``, as one native op (no Python
    ``autograd.Function``, no hook; a residual add whose skip alone has factors, ``cb`` other than 1):
    ``addcmul(a, b, s)``, with ``s`` a fresh 0-dim factor holding ``kb``, which its backward reads for
    ``b``'s gradient and which is set to ``cb`` once the op has run (the trick of :func:`_set_saved`). One
    pass forward and one for ``b``'s gradient, as :class:`_ScaledAddFn`; nothing saved but the factor."""
    s = _fresh(b, kb)
    out = torch.addcmul(a, b, s)
    s.data.fill_(cb)
    return out


class _ScaledLayerNormFn(torch.autograd.Function):
    """``fo * layer_norm(x, w, b)``; backward: with ``d = go * g``, each input's gradient times its factor.

    No pass over an activation besides the layer norm's own: ``fo`` multiplies the gain and bias (a
    missing gain: a constant one); the input gradient is linear in the gain, so backward computes it
    with the gain times ``go * gx``; the gain and bias gradients (``sum(g * x_hat)``, ``sum(g)``, which
    do not read the gain) are multiplied by ``go * gw`` and ``go * gb``.
    """

    @staticmethod
    def forward(ctx, x: Tensor, shape: list, w: Tensor | None, b: Tensor | None, eps: float,  # type: ignore[override]
                fo: float, c: tuple) -> Tensor:
        wf, bf = _gain(x, w, shape, fo), (None if b is None else _mul(b, fo))
        out, mean, rstd = torch.ops.aten.native_layer_norm(x, shape, wf, bf, eps)
        ctx.save_for_backward(x, w, b, mean, rstd)
        ctx.shape, ctx.c = shape, c
        return out

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        x, w, b, mean, rstd = ctx.saved_tensors
        go, gx, gw, gb = ctx.c
        need = ctx.needs_input_grad
        mask = [need[0], w is not None and need[2], b is not None and need[3]]
        wb = _gain(x, w, ctx.shape, go * gx)  # the input gradient is linear in the gain
        dx, dw, db = torch.ops.aten.native_layer_norm_backward(g, x, ctx.shape, mean, rstd, wb, b, mask)
        for t, f in ((dw, go * gw), (db, go * gb)):
            if t is not None:
                _mul_(t, f)
        return dx, None, dw, db, None, None, None


_apply_layer_norm = _fast_apply(_ScaledLayerNormFn)


def scaled_layer_norm(x: Tensor, normalized_shape: Any, weight: Tensor | None = None, bias: Tensor | None = None,
                      eps: float = 1e-5, *, x_scale: tuple = _ONE, weight_scale: tuple = _ONE,
                      bias_scale: tuple = _ONE, out_scale: tuple = _ONE) -> Tensor:
    """``layer_norm`` with ``scale`` on its inputs and output, computed as one op.

    The same as ``scale(layer_norm(scale(x, *x_scale), shape, scale(weight, *weight_scale),
    scale(bias, *bias_scale), eps), *out_scale)`` forward and backward. Inputs' forward
    factors other than 1 (which change what is normalised) run as separate scales.
    """
    (fx, gx), (fw, gw), (fb, gb), (fo, go) = map(_pair, (x_scale, weight_scale, bias_scale, out_scale))
    if (fx, fw, fb) != (1.0, 1.0, 1.0) or _transforms():  # the chain (under vmap / grad: the functorch-form scale)
        return scale(torch.nn.functional.layer_norm(
            scale(x, fx, gx), normalized_shape, None if weight is None else scale(weight, fw, gw),
            None if bias is None else scale(bias, fb, gb), eps), fo, go)
    if (gx, gw, gb, fo, go) == (1.0,) * 5:
        return torch.nn.functional.layer_norm(x, normalized_shape, weight, bias, eps)
    shape = [int(normalized_shape)] if isinstance(normalized_shape, int) else [int(s) for s in normalized_shape]
    if torch.is_grad_enabled() and _native_ok(x, weight, bias):
        return _native_layer_norm(x, shape, weight, bias, float(eps), float(fo), float(go), float(gx), float(gw),
                                  float(gb))
    return _apply_layer_norm(x, shape, weight, bias, float(eps), float(fo),
                             (float(go), float(gx), float(gw), float(gb)))


def _native_layer_norm(x: Tensor, shape: list, w: Tensor | None, b: Tensor | None, eps: float, fo: float, go: float,
                       gx: float, gw: float, gb: float) -> Tensor:
    """What :class:`_ScaledLayerNormFn` computes, as native autograd ops (:func:`_native_affine`): the input
    gradient's factor is ``go * gx``, the gain's and bias's ``go * gw`` and ``go * gb``."""
    wf, bf, after = _native_affine(x, w, b, shape, fo, fo, go * gx, go * gw, go * gb)
    out = torch.nn.functional.layer_norm(x, shape, wf, bf, eps)
    after()
    return out


class _ScaledBatchNormFn(torch.autograd.Function):
    """``fo * batch_norm(fx * x)`` in training mode; backward ``gx * J^T (go * g)``, gain and bias
    gradients times ``go * gw`` and ``go * gb``.

    No pass over an activation besides the batch norm's own. Normalising ``fx * x`` with ``eps`` is
    normalising ``x`` with ``eps / fx**2`` (its running statistics are ``fx`` and ``fx**2`` times
    those of ``x``: the update runs on copies divided by these factors, :func:`_stats_copies`); ``fo`` multiplies the gain and bias. The input gradient is linear in the gain:
    backward computes it with the gain times ``go * gx / fx``.
    """

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor | None, b: Tensor | None, rm: Tensor | None,  # type: ignore[override]
                rv: Tensor | None, momentum: float, eps: float, f: tuple, c: tuple) -> Tensor:
        fx, fo = f
        wf, bf = _gain(x, w, (x.shape[1],), fo), (None if b is None else _mul(b, fo))
        eps_x = eps / (fx * fx)
        rmt, rvt = _stats_copies(rm, rv, fx)
        out, mean, invstd = torch.ops.aten.native_batch_norm(x, wf, bf, rmt, rvt, True, momentum, eps_x)
        _stats_back(rm, rv, rmt, rvt, fx)
        ctx.save_for_backward(x, w, mean, invstd)
        ctx.bn = (eps_x, c[0], c[0] * c[1] / fx, c[2], c[3])
        return out

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        x, w, mean, invstd = ctx.saved_tensors
        eps_x, go, kx, gw, gb = ctx.bn
        need = ctx.needs_input_grad
        mask = [need[0], w is not None and need[1], need[2]]
        wb = _gain(x, w, (x.shape[1],), kx)
        dx, dw, db = torch.ops.aten.native_batch_norm_backward(g, x, wb, None, None, mean, invstd, True, eps_x, mask)
        dw, db = (dw if mask[1] else None), (db if mask[2] else None)
        for t, k in ((dw, gw), (db, gb)):
            if t is not None:
                _mul_(t, go * k)
        return dx if mask[0] else None, dw, db, None, None, None, None, None, None


_apply_batch_norm = _fast_apply(_ScaledBatchNormFn)


def scaled_batch_norm(bn: torch.nn.Module, x: Tensor, *, x_scale: tuple = _ONE, out_scale: tuple = _ONE,
                      weight_scale: tuple = _ONE, bias_scale: tuple = _ONE) -> Tensor:
    """A batch-norm layer ``bn`` (``BatchNorm1d/2d/3d``) with ``scale`` on its input and output, and
    backward-only scales on its gain and bias, as one op.

    The same function as ``scale(batch_norm_layer(bn, scale(x, *x_scale), scale(bn.weight, *weight_scale),
    scale(bn.bias, *bias_scale)), *out_scale)``, and the same updates of the running statistics, without a
    pass over the activation for any scale (:class:`_ScaledBatchNormFn`). In training mode with gradients,
    for a layer whose ``forward`` is PyTorch's; otherwise (evaluation, ``no_grad``, compiling, another
    ``forward``) it is that chain. With every factor 1 it is ``bn(x)``. The gain's and bias's forward
    factors must be 1 (:func:`~unit_scale_fx.passes.fold_scales.fuse_batch_norms` fuses no other).
    """
    (fx, gx), (fo, go) = _pair(x_scale), _pair(out_scale)
    (fw, gw), (fb, gb) = _pair(weight_scale), _pair(bias_scale)
    if fw != 1.0 or fb != 1.0:
        raise UnitScaleError(f"scaled_batch_norm: the gain and bias take backward factors only, got forward "
                             f"factors {fw} and {fb}",
                             where=type(bn).__name__, fix="leave these scales unfused (a separate `scale` op)")
    if (fx, gx, fo, go, gw, gb) == (1.0,) * 6:
        return bn(x)
    # the checks ``bn.forward`` makes, read from the module's dicts (``Module.__getattr__`` is slow)
    buffers, params = bn._buffers, bn._parameters
    rm, rv = buffers.get("running_mean"), buffers.get("running_var")
    if (not bn.training or not torch.is_grad_enabled() or type(bn).forward is not _BN_FORWARD
            or torch.compiler.is_compiling() or _transforms() or not fx > 0 or type(x) not in _PLAIN
            or (rm is None) != (rv is None)):
        w, b = params.get("weight"), params.get("bias")
        if (gw, gb) == (1.0, 1.0) or w is None and b is None:
            return scale(bn(scale(x, fx, gx)), fo, go)
        w = None if w is None else scale(w, 1.0, gw)
        b = None if b is None else scale(b, 1.0, gb)
        return scale(batch_norm_layer(bn, scale(x, fx, gx), w, b), fo, go)
    bn._check_input_dim(x)
    track = bn.track_running_stats
    momentum = _bn_momentum(bn, track)
    if not (track and rm is not None):
        rm = rv = None
    torch.nn.functional._verify_batch_size(x.size())  # as ``F.batch_norm`` does in training
    w, b = params.get("weight"), params.get("bias")
    if _native_ok(x, w, b):
        return _native_batch_norm(x, w, b, rm, rv, float(momentum), float(bn.eps), float(fx), float(fo), float(go),
                                  float(gx), float(gw), float(gb))
    return _apply_batch_norm(x, w, b, rm, rv, float(momentum), float(bn.eps), (float(fx), float(fo)),
                             (float(go), float(gx), float(gw), float(gb)))


def _native_batch_norm(x: Tensor, w: Tensor | None, b: Tensor | None, rm: Tensor | None, rv: Tensor | None,
                       momentum: float, eps: float, fx: float, fo: float, go: float, gx: float, gw: float = 1.0,
                       gb: float = 1.0) -> Tensor:
    """What :class:`_ScaledBatchNormFn` computes, as native autograd ops: ``torch.batch_norm`` of ``x`` with
    ``eps / fx**2`` on copies of the running statistics (:func:`_stats_copies`; autograd saves the
    statistics it reads), the gain and bias of :func:`_native_affine` (the input gradient's factor
    ``go * gx / fx``, the gain's ``go * gw`` and the bias's ``go * gb``)."""
    wf, bf, after = _native_affine(x, w, b, (x.shape[1],), fo, fo, go * gx / fx, go * gw, go * gb)
    rmt, rvt = _stats_copies(rm, rv, fx)
    out = torch.batch_norm(x, wf, bf, rmt, rvt, True, momentum, eps / (fx * fx), torch.backends.cudnn.enabled)
    _stats_back(rm, rv, rmt, rvt, fx)
    after()
    return out


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
        # the inner backward's new gradients are scaled in place, unless one is shared (with another or with g)
        ptrs = [t.untyped_storage().data_ptr() for t in got if t is not None]
        own = len(set(ptrs)) == len(ptrs) and g.untyped_storage().data_ptr() not in ptrs
        grads: list = [None] * len(det)
        for i, t in zip(want, got):
            f = ctx.gin[i]
            grads[i] = t if t is None else (_mul_(t, f) if own and t._base is None else _mul(t, f))
        ctx.inner = None
        return (None,) * 6 + tuple(grads)


def _plain_tensors(*ts: Tensor) -> bool:
    """Real tensors (not fake, functional or other subclasses seen while tracing)."""
    return all(type(t) in _PLAIN for t in ts)


class _DynScaleFn(torch.autograd.Function):
    """``x * f`` forward, ``grad * b`` backward, for 0-dim tensor factors (``None``: 1)."""

    @staticmethod
    def forward(ctx, x: Tensor, f: Any, b: Any) -> Tensor:  # type: ignore[override]
        ctx.b = b
        return x * f if f is not None else x.view_as(x)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        return (g * ctx.b if ctx.b is not None else g), None, None


class _GradNormFn(torch.autograd.Function):
    """Identity forward; backward divides the gradient by its RMS and keeps that RMS in ``box``."""

    @staticmethod
    def forward(ctx, x: Tensor, box: list) -> Tensor:  # type: ignore[override]
        ctx.box = box
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        r = _rms_of(g)
        ctx.box.append(r)
        return g / r, None


class _GradUnnormFn(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by the RMS :class:`_GradNormFn` kept in ``box``."""

    @staticmethod
    def forward(ctx, x: Tensor, box: list) -> Tensor:  # type: ignore[override]
        ctx.box = box
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        return (g * ctx.box[-1] if ctx.box else g), None


def _rms_of(t: Tensor) -> Tensor:
    return t.detach().float().pow(2).mean().sqrt().clamp_min(1e-30).to(t.dtype)


def _attention_math(q: Tensor, k: Tensor, v: Tensor, attn_mask: Any = None, dropout_p: float = 0.0,
                    is_causal: bool = False, scale: Any = None, enable_gqa: bool = False) -> Tensor:
    """Attention as PyTorch's math path computes it (``scaled_dot_product_attention`` with dropout on the
    CPU), with every matmul inside it reading unit-RMS operands, forward and backward.

    The probabilities are multiplied by ``a = 1 / RMS`` before they meet the values and the product
    by ``1 / a`` after it (the values' gradient takes ``1 / a``, the probabilities' gradient nothing):
    forward and every gradient are exactly PyTorch's. The gradient of the logits is divided by its
    RMS before the query-key matmul's backward and multiplied back after it. These factors cancel
    inside the op, so they are not scales of the plan: only the numbers the matmuls see change.
    The dropout mask is drawn as PyTorch draws it (same RNG use).
    """
    lq, lk = q.size(-2), k.size(-2)
    s = 1.0 / math.sqrt(q.size(-1)) if scale is None else float(scale)
    if enable_gqa and k.dim() >= 3 and q.size(-3) != k.size(-3):
        k = k.repeat_interleave(q.size(-3) // k.size(-3), -3)
        v = v.repeat_interleave(q.size(-3) // v.size(-3), -3)
    box: list = []
    qn, kn = _GradUnnormFn.apply(q, box), _GradUnnormFn.apply(k, box)
    logits = _GradNormFn.apply(torch.matmul(qn, kn.transpose(-2, -1)), box) * s
    if is_causal:
        keep = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(diagonal=0)
        logits = logits.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        logits = logits.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool \
            else logits + attn_mask
    p = torch.ops.aten._safe_softmax(logits, -1)
    if dropout_p > 0.0:
        keep_mask = torch.empty_like(p).bernoulli_(1.0 - dropout_p)
        keep_mask.div_(1.0 - dropout_p)
        p = p * keep_mask
    a = 1.0 / _rms_of(p)
    out = torch.matmul(_DynScaleFn.apply(p, a, None), _DynScaleFn.apply(v, None, 1.0 / a))
    return _DynScaleFn.apply(out, 1.0 / a, None)


def _attention(q: Tensor, k: Tensor, v: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    """``scaled_dot_product_attention``, computed so that the matmuls inside read unit operands.

    Where PyTorch would take its math path in eager autograd (dropout on the CPU), that path is
    :func:`_attention_math`; key and value heads shared by all query heads (multi-query attention
    written as broadcasting) are expanded to the query heads (a view), so a fused kernel takes them.
    Both compute the same function as ``scaled_dot_product_attention``.
    """
    sdpa = torch.nn.functional.scaled_dot_product_attention
    names = ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    bound = {**dict(zip(names, args)), **kwargs}
    if torch.compiler.is_compiling() or not _plain_tensors(q, k, v) or set(bound) - set(names):
        return sdpa(q, k, v, *args, **kwargs)
    if (bound.get("dropout_p") or 0.0) > 0.0 and q.device.type == "cpu" and torch.is_grad_enabled():
        return _attention_math(q, k, v, **bound)
    if (not bound.get("enable_gqa") and q.dim() == 4 and k.dim() == 4 and v.dim() == 4 and k.size(1) == 1
            and v.size(1) == 1 and q.size(1) > 1):
        k = k.expand(k.size(0), q.size(1), *k.shape[2:])
        v = v.expand(v.size(0), q.size(1), *v.shape[2:])
    return sdpa(q, k, v, *args, **kwargs)


def scaled_attention(q: Tensor, k: Tensor, v: Tensor, *args: Any, q_scale: tuple = _ONE, k_scale: tuple = _ONE,
                     v_scale: tuple = _ONE, out_scale: tuple = _ONE, q_unit: float = 1.0, **kwargs: Any) -> Tensor:
    """``scaled_dot_product_attention`` with ``scale`` on query, key, value and output, as one op.

    ``q_unit``: the kernel reads ``q * q_unit`` with the softmax scale divided by ``q_unit`` (the same
    logits, so the same function): a query the model scaled down itself reaches the kernel unit.

    The same as ``scale(sdpa(scale(q, *q_scale), scale(k, *k_scale), scale(v, *v_scale), ...),
    *out_scale)`` forward and backward. In eager autograd, backward keeps the scaled output
    instead of a second, unscaled copy (:class:`_ScaledOutputFn`); while compiling or
    tracing, and for forward input factors other than 1, it is that chain of scales.
    """
    (fq, gq), (fk, gk), (fv, gv), (fo, go) = map(_pair, (q_scale, k_scale, v_scale, out_scale))
    sdpa = _attention
    if q_unit != 1.0:  # the kernel reads q * q_unit with the softmax scale divided by q_unit: the same logits
        s = kwargs.get("scale")
        kwargs = {**kwargs, "scale": (1.0 / math.sqrt(q.size(-1)) if s is None else float(s)) / q_unit}
        q = q * q_unit
    if ((fq, fk, fv) != (1.0, 1.0, 1.0) or not fo > 0 or torch.compiler.is_compiling() or _transforms()
            or not torch.is_grad_enabled() or not any(t.requires_grad for t in (q, k, v))
            or not _plain_tensors(q, k, v)
            # another tensor that needs a gradient (a learned bias as attn_mask) takes the plain path
            or any(isinstance(t, Tensor) and t.requires_grad
                   for t in torch.utils._pytree.tree_leaves((args, kwargs)))):
        return scale(sdpa(scale(q, fq, gq), scale(k, fk, gk), scale(v, fv, gv), *args, **kwargs), fo, go)
    return _ScaledOutputFn.apply(sdpa, args, kwargs, (float(gq), float(gk), float(gv)), float(fo), float(go),
                                 q, k, v)
