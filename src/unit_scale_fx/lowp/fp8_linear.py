"""Real FP8 linear layers with unit scales (``torch._scaled_mm``).

In a unit-scaled model the operands of every linear layer, and the gradient
arriving at its output, have RMS near 1 by construction, so FP8 matmuls need no
per-tensor scaling (no amax history, no delayed scaling): every ``_scaled_mm``
call here gets ``scale_a = scale_b = 1``.

* forward: ``y = e4m3(x) @ e4m3(W)ᵀ`` accumulated in float32, written in ``x.dtype``;
* backward: ``dx = e5m2(g) @ e4m3(W)``, ``dW = e5m2(g)ᵀ @ e4m3(x)``; the bias gradient
  is the sum of ``g`` in high precision.

Values are saturated to the format's max before the cast. ``torch._scaled_mm``
needs both matmul dimensions of each operand to be multiples of 16; where they
are not, the layer computes the same rounded operands with an ordinary matmul
(logged once per shape).

:func:`use_fp8_linear` swaps ``F.linear`` nodes of a planned unit-scaled graph for
:func:`fp8_linear`. It runs wherever ``torch._scaled_mm`` supports FP8 (CUDA with
compute capability 8.9+; recent CPU builds too, for testing), see :func:`fp8_supported`.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor

from ..errors import UnitScaleError
from .formats import FORMATS

log = logging.getLogger(__name__)

E4M3, E5M2 = FORMATS["e4m3"], FORMATS["e5m2"]
_FP8_META = "unit_scale_fp8_linear"
_warned: set = set()


def fp8_supported(device: Optional[torch.device | str] = None) -> bool:
    """Whether ``torch._scaled_mm`` runs an E4M3 x E4M3 matmul on ``device`` (default: CUDA if present)."""
    if not hasattr(torch, "_scaled_mm") or not hasattr(torch, "float8_e4m3fn"):
        return False
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda" and (not torch.cuda.is_available() or torch.cuda.get_device_capability(dev) < (8, 9)):
        return False
    try:
        a = torch.zeros(16, 16, device=dev).to(torch.float8_e4m3fn)
        one = torch.ones((), device=dev)
        torch._scaled_mm(a, a.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
        return True
    except (RuntimeError, NotImplementedError):
        return False


def _cast(x: Tensor, spec) -> Tensor:
    return x.clamp(-spec.max, spec.max).to(spec.dtype)


def _mm(a: Tensor, b: Tensor, out_dtype: torch.dtype) -> Tensor:
    """``a @ b`` for FP8 ``a`` ([m, k]) and ``b`` ([k, n]) with unit scales."""
    m, k = a.shape
    n = b.shape[1]
    if m % 16 or k % 16 or n % 16:
        key = (m, k, n)
        if key not in _warned:
            _warned.add(key)
            log.info("fp8_linear: shape %s is not a multiple of 16; matmul of the FP8 values in float32", key)
        return (a.float() @ b.float()).to(out_dtype)
    one = torch.ones((), device=a.device, dtype=torch.float32)
    a = a.contiguous()  # row-major
    b = b.t().contiguous().t()  # column-major
    return torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=out_dtype)


class _FP8LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, bias: Optional[Tensor]) -> Tensor:  # type: ignore[override]
        lead, k = x.shape[:-1], x.shape[-1]
        out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.float32
        xq = _cast(x.reshape(-1, k), E4M3)
        wq = _cast(w, E4M3)
        y = _mm(xq, wq.t(), out_dtype)
        if bias is not None:
            y = y + bias.to(out_dtype)
        ctx.save_for_backward(xq, wq)
        ctx.meta = (lead, x.dtype, w.dtype, None if bias is None else bias.dtype)
        return y.reshape(*lead, w.shape[0])

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        xq, wq = ctx.saved_tensors
        lead, x_dtype, w_dtype, b_dtype = ctx.meta
        g = grad.reshape(-1, grad.shape[-1])
        gq = _cast(g, E5M2)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = _mm(gq, wq, x_dtype).reshape(*lead, wq.shape[1])
        if ctx.needs_input_grad[1]:
            gw = _mm(gq.t(), xq, torch.float32).to(w_dtype)
        if b_dtype is not None and ctx.needs_input_grad[2]:
            gb = g.float().sum(0).to(b_dtype)
        return gx, gw, gb


def fp8_linear(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear`` with FP8 operands (E4M3) and FP8 output gradients (E5M2), unit scales."""
    return _FP8LinearFn.apply(input, weight, bias)


def use_fp8_linear(model: fx.GraphModule) -> int:
    """Run every ``F.linear`` of a planned unit-scaled graph in real FP8; returns how many.

    The swap is for a unit-scaled model: its linear operands and output gradients
    are unit, which is what makes scale factors of one right. Re-planning the model
    (``replan``) rebuilds the graph without the swap.
    """
    from ..api import UnitScaledModule

    if isinstance(model, UnitScaledModule) and not model.us_planned:
        raise UnitScaleError("the unit-scaled model has no plan yet", where="use_fp8_linear(model)",
                             fix="pass example_inputs=(...) to unit_scale, or call the model once first")
    if not isinstance(model, UnitScaledModule):
        log.warning("use_fp8_linear: %s is not unit-scaled; FP8 with unit scales will under/overflow",
                    type(model).__name__)
    n = 0
    for node in model.graph.nodes:
        if node.op == "call_function" and node.target is F.linear:
            node.target = fp8_linear
            node.meta[_FP8_META] = True
            n += 1
    model.recompile()
    log.info("use_fp8_linear: %d linear layers in FP8", n)
    return n
