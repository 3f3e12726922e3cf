"""Torch layers as functions of their parameters: what the tracer writes for a layer whose parameters
planning must see as nodes of the graph (a layer kept as one module call hides them).

``batch_norm_layer(bn, x, bn.weight, bn.bias)`` is ``bn(x)`` for a batch-norm layer whose ``forward`` is
PyTorch's: the same checks, the same updates of its buffers, the same train / eval behaviour. Rules key on
these functions as they key on ``torch.nn.functional``'s; the fused ops (:mod:`unit_scale_fx.scale`)
compute them with their scales.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

import torch
from torch import Tensor

#: PyTorch's ``_BatchNorm.forward`` (what :func:`batch_norm_layer` and ``scale.scaled_batch_norm`` compute)
_BN_FORWARD = torch.nn.modules.batchnorm._BatchNorm.forward


def _bn_momentum(bn: torch.nn.Module, count: bool) -> float:
    """The momentum of the batch-norm layer ``bn``'s running statistics for this call, as its ``forward``
    gives it; with ``count`` (training, statistics tracked) ``num_batches_tracked`` goes up by one first."""
    momentum = 0.0 if bn.momentum is None else bn.momentum
    nbt = bn._buffers.get("num_batches_tracked")
    if count and nbt is not None:
        nbt.add_(1)
        if bn.momentum is None:  # a cumulative moving average
            momentum = 1.0 / float(nbt)
    return momentum


def batch_norm_layer(bn: torch.nn.Module, x: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """What the batch-norm layer ``bn`` (PyTorch's ``_BatchNorm.forward``) computes on ``x``, with ``weight``
    and ``bias`` read as arguments (``bn.weight`` and ``bn.bias`` in the captured graph): the same checks,
    the same update of ``num_batches_tracked`` and the running statistics, the same train / eval behaviour.

    The tracer writes a batch-norm layer as this call (:class:`~unit_scale_fx.capture.UnitScaleTracer`),
    so that its gain and bias are nodes of the graph that planning gives backward factors of their own,
    as it does a linear's weight. ``batch_norm_layer(bn, x, bn.weight, bn.bias)`` is ``bn(x)``.
    """
    bn._check_input_dim(x)
    buffers, training, track = bn._buffers, bn.training, bn.track_running_stats
    momentum = _bn_momentum(bn, training and track)
    rm, rv = buffers.get("running_mean"), buffers.get("running_var")
    use_batch = training or (rm is None and rv is None)
    keep = not training or track
    return torch.nn.functional.batch_norm(x, rm if keep else None, rv if keep else None, weight, bias, use_batch,
                                          momentum, bn.eps)


def detach_values(value: Any) -> Any:
    """``value`` with every tensor in it (a tensor, or a tuple, list or dict of them) detached; other values as
    they are. What the tracer reads a value computed under the model's ``torch.no_grad()`` through, where it is
    read outside the block (:func:`~unit_scale_fx.capture.detach_no_grad_values`)."""
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, (tuple, list, dict)):
        from torch.utils._pytree import tree_map_only

        return tree_map_only(Tensor, Tensor.detach, value)
    return value


class FunctionCall:
    """``fn.apply(*args)`` for a custom ``torch.autograd.Function`` ``fn``, as one call of a captured graph.

    torch.fx would trace through ``fn.apply`` into ``fn.forward`` and torch.export does the same: the graph
    would hold the forward's ops, and autograd would differentiate them instead of running ``fn.backward``
    (a straight-through estimator, a gradient reversal, ...: other gradients, silently). The tracer writes
    the call as this object instead (:func:`functions_as_calls`), so the graph runs
    ``fn`` itself, forward and backward. One per class (:func:`function_call`); it pickles where ``fn`` does
    (a class defined at module level)."""

    def __init__(self, fn: type) -> None:
        self.fn = fn
        # named as the Function's ``apply`` in reports and generated code (``StraightThrough.apply``)
        self.__name__ = f"{fn.__name__}_apply"
        self.__qualname__ = f"{fn.__qualname__}.apply"
        self.__module__ = fn.__module__

    def __call__(self, *args: object, **kwargs: object) -> object:
        return self.fn.apply(*args, **kwargs)

    def __reduce__(self) -> tuple:
        return function_call, (self.fn,)

    def __repr__(self) -> str:
        return f"{self.fn.__module__}.{self.fn.__qualname__}.apply"


_FUNCTION_CALLS: dict[type, FunctionCall] = {}


def function_call(fn: type) -> FunctionCall:
    """The one :class:`FunctionCall` of the ``autograd.Function`` subclass ``fn``."""
    c = _FUNCTION_CALLS.get(fn)
    if c is None:
        c = _FUNCTION_CALLS[fn] = FunctionCall(fn)
    return c


_FUNCTION_APPLY = torch.autograd.function.Function.__dict__["apply"]  # the classmethod


@contextlib.contextmanager
def functions_as_calls(tracer: Optional["torch.fx.Tracer"]) -> Iterator[None]:
    """While capturing, a custom ``torch.autograd.Function``'s ``apply`` keeps its backward.

    Both torch.fx and torch.export trace through ``apply`` into ``forward``, and the graph's gradient would
    then be autograd's of the forward's ops, not the Function's ``backward`` (a straight-through estimator,
    a gradient reversal: other gradients, silently). For a Function defined outside torch: with a ``tracer``
    (torch.fx), a call on traced values becomes one node, :func:`function_call`, which runs the Function
    forward and backward. Without one (torch.export), the call raises: export cannot keep it, and the model
    is then captured through dynamo, which keeps the Function's backward."""
    import torch.fx as fx
    from torch.utils._pytree import tree_leaves

    from .errors import UnitScaleError

    def apply(cls: type, *args: Any, **kwargs: Any) -> Any:
        # torch's own Functions (reentrant checkpointing, ...) compute their forward's gradient: traced as before
        if (cls.__module__ or "").startswith("torch.") or (
                tracer is not None and not any(isinstance(a, fx.Proxy) for a in tree_leaves((args, kwargs)))):
            return _FUNCTION_APPLY.__get__(None, cls)(*args, **kwargs)
        if tracer is None:
            raise UnitScaleError(
                f"the custom autograd.Function {cls.__module__}.{cls.__qualname__} is called in the forward: "
                "torch.export would trace its forward and drop its backward",
                where=f"{cls.__qualname__}.apply",
                fix="capture with torch.fx (make the model traceable) or through dynamo (the default fallback)")
        return tracer.create_proxy("call_function", function_call(cls), args, kwargs)

    torch.autograd.function.Function.apply = classmethod(apply)  # type: ignore[method-assign, assignment]
    try:
        yield
    finally:
        torch.autograd.function.Function.apply = _FUNCTION_APPLY  # type: ignore[method-assign]
