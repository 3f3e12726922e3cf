"""Torch layers as functions of their parameters: what the tracer writes for a layer whose parameters
planning must see as nodes of the graph (a layer kept as one module call hides them).

``batch_norm_layer(bn, x, bn.weight, bn.bias)`` is ``bn(x)`` for a batch-norm layer whose ``forward`` is
PyTorch's: the same checks, the same updates of its buffers, the same train / eval behaviour. Rules key on
these functions as they key on ``torch.nn.functional``'s; the fused ops (:mod:`unit_scale_fx.scale`)
compute them with their scales.
"""

from __future__ import annotations

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
