"""Real half-precision training of a unit-scaled model, without loss scaling.

:func:`half_precision` casts a captured model's parameters and buffers to
``float16`` or ``bfloat16`` and inserts casts so that a few ops run in float32:

* **losses** (rule kind ``"loss"``): the loss value is a sum over every token,
  and in a unit-scaled graph the gradient that enters the loss is multiplied by
  about ``N·sqrt(V)`` (tokens times vocabulary) so that the logits' gradient is unit.
  That scalar overflows float16 (max 65504) from about 8k tokens of a 64-symbol
  vocabulary on; in float32 it cannot. The loss's output stays float32.
* **norms** (``"norm"``): mean and variance are sums over the normalised dims;
  the output is cast back to the low-precision dtype.
* **softmax** (``"softmax"``): ``exp`` and the row sum; the output is cast back.

Everything else, including every matmul and every activation between ops, runs in
the low-precision dtype. :class:`MasterWeights` keeps float32 copies of the
parameters for the optimizer: with unit-RMS weights a bf16 parameter has a
spacing of 2^-7 near 1, so Adam updates of ~1e-3 would round away. That is about
update precision, not range: no loss scale is involved.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Optional

import torch
import torch.fx as fx
from torch import Tensor

from ..errors import UnitScaleError
from ..rules.registry import Kind, float_tensor_inputs, lookup

log = logging.getLogger(__name__)

#: Rule kinds computed in float32 by :func:`half_precision` (see the module docstring).
FP32_KINDS = frozenset({Kind.LOSS, Kind.NORM, Kind.SOFTMAX})
#: Rule kinds whose float32 output is cast back to the low-precision dtype.
_CAST_BACK = frozenset({Kind.NORM, Kind.SOFTMAX})
_CAST_META = "unit_scale_fp32_cast"


def to_float32(x: Tensor) -> Tensor:
    """``x`` in float32 (a graph op inserted by :func:`half_precision`)."""
    return x.float() if isinstance(x, Tensor) and x.is_floating_point() else x


def cast_like(y: Tensor, ref: Tensor) -> Tensor:
    """``y`` in ``ref``'s dtype (a graph op inserted by :func:`half_precision`)."""
    return y.to(ref.dtype) if isinstance(y, Tensor) and y.is_floating_point() and y.dtype != ref.dtype else y


def _call(gm: fx.GraphModule, fn: Callable, args: tuple, like: fx.Node) -> fx.Node:
    new = gm.graph.call_function(fn, args)
    new.meta[_CAST_META] = True
    if "val" in like.meta:
        new.meta["val"] = like.meta["val"]
    return new


def keep_float32(gm: fx.GraphModule, kinds: Iterable[str] = FP32_KINDS) -> int:
    """Insert float32 casts around the ops whose rule kind is in ``kinds``; returns how many ops."""
    kinds = frozenset(kinds)
    count = 0
    for node in list(gm.graph.nodes):
        if node.op not in ("call_function", "call_method") or node.meta.get(_CAST_META):
            continue
        rule = lookup(node, gm)
        if rule is None or rule.kind not in kinds:
            continue
        ins = float_tensor_inputs(node)
        if not ins:
            continue
        if any(u.meta.get(_CAST_META) for u in node.all_input_nodes):
            continue  # already done
        for inp in ins:
            with gm.graph.inserting_before(node):
                c = _call(gm, to_float32, (inp,), inp)
            node.replace_input_with(inp, c)
        if rule.kind in _CAST_BACK:
            with gm.graph.inserting_after(node):
                back = _call(gm, cast_like, (node, ins[0]), node)
            node.replace_all_uses_with(back, delete_user_cb=lambda u: u is not back)
        count += 1
        log.debug("half_precision: %s (%s) runs in float32", node.name, rule.kind)
    return count


def half_precision(model: fx.GraphModule, dtype: torch.dtype = torch.float16,
                   kinds: Iterable[str] = FP32_KINDS) -> fx.GraphModule:
    """Cast ``model`` to ``dtype`` in place, keeping losses, norms and softmax in float32.

    Args:
        model: a planned :class:`~unit_scale_fx.UnitScaledModule` (or any captured
            ``GraphModule``, such as one made by ``simulate_format``).
        dtype: ``torch.float16`` or ``torch.bfloat16``.
        kinds: rule kinds to run in float32 (default :data:`FP32_KINDS`).

    Returns:
        ``model``. Inputs that are floating-point must be given in ``dtype``.
    """
    from ..api import UnitScaledModule

    if dtype not in (torch.float16, torch.bfloat16):
        raise UnitScaleError(f"half_precision expects float16 or bfloat16, got {dtype}",
                             where="half_precision(dtype=...)", fix="pass torch.float16 or torch.bfloat16")
    if not isinstance(model, fx.GraphModule):
        raise UnitScaleError(f"half_precision expects a captured model, got {type(model).__name__}",
                             where="half_precision(model)", fix="call unit_scale(model, example_inputs) first")
    if isinstance(model, UnitScaledModule) and not model.us_planned:
        raise UnitScaleError("the unit-scaled model has no plan yet", where="half_precision(model)",
                             fix="pass example_inputs=(...) to unit_scale, or call the model once in float32 first")
    n = keep_float32(model, kinds)
    model.graph.lint()
    model.recompile()
    model.to(dtype)
    log.info("half_precision: %s, %d ops kept in float32", dtype, n)
    return model


class MasterWeights:
    """An optimizer over float32 copies of low-precision parameters.

    ``zero_grad`` / ``step`` / ``param_groups`` behave like the wrapped optimizer's;
    ``step`` copies each gradient to float32, steps, and writes the rounded weights
    back into the model's parameters.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], optimizer: Callable[..., torch.optim.Optimizer],
                 **kwargs: Any) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.master = [p.detach().float().clone().requires_grad_(True) for p in self.params]
        self.optimizer = optimizer(self.master, **kwargs)

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None
        self.optimizer.zero_grad(set_to_none)

    @torch.no_grad()
    def step(self, closure: Optional[Callable] = None) -> None:
        for p, m in zip(self.params, self.master):
            m.grad = None if p.grad is None else p.grad.float()
        self.optimizer.step()
        for p, m in zip(self.params, self.master):
            p.copy_(m)
