"""Two idioms every layer uses: the RMS of a tensor, and which outputs of a model are its loss."""

from __future__ import annotations

from typing import Any, Optional

import torch

from .errors import UnitScaleError


def mean_square(t: torch.Tensor) -> float:
    """``mean(t**2)`` in float32, as a Python float (0.0 for an empty tensor); no autograd."""
    if t.numel() == 0:
        return 0.0
    with torch.no_grad():
        return float(t.detach().float().pow(2).mean())


def rms(t: torch.Tensor) -> float:
    """``sqrt(mean(t**2))`` in float32, as a Python float (0.0 for an empty tensor); no autograd.

    Non-finite values give ``inf`` or ``nan``, as the arithmetic does; callers decide.
    """
    if t.numel() == 0:
        return 0.0
    with torch.no_grad():
        return float(t.detach().float().pow(2).mean().sqrt())


def loss_outputs(out: Any, seed: int = 0, where: str = "unit_scale_fx", scalars_first: bool = True
                 ) -> tuple[list[torch.Tensor], list[Optional[torch.Tensor]]]:
    """What to differentiate for a model output ``out`` (any nesting of tuples, lists, dicts).

    The one definition of "the loss of an output", used by calibration, ``track_scales``,
    the validity check and the matmul recorder:

    * the outputs considered are the floating-point tensors that require grad;
    * if some of them are single numbers (0-dim), those are the loss (their sum): other
      outputs (logits returned beside the loss) get no gradient, as in training;
    * otherwise every output receives a seeded unit-Gaussian gradient (unit RMS, what
      unit scaling assumes arrives at a model's output).

    ``scalars_first=False``: every output gets a gradient (scalars 1, others unit Gaussian), for a
    graph whose outputs all feed later code (a piece of a model dynamo split).

    Returns ``(tensors, grad_outputs)`` for :func:`torch.autograd.grad` / ``backward``
    (``None`` for the scalars). Raises :class:`UnitScaleError` if no output carries a gradient.
    """
    leaves = [t for t in torch.utils._pytree.tree_leaves(out)
              if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad]
    if not leaves:
        raise UnitScaleError("the model's output has no floating-point tensor that requires grad", where=where,
                             fix="pass loss_fn=... mapping the output to a scalar loss, and check that the "
                             "parameters require grad")
    scalars = [t for t in leaves if t.dim() == 0]
    if scalars and scalars_first:
        return scalars, [None] * len(scalars)
    gen = torch.Generator().manual_seed(seed)
    grads: list[Optional[torch.Tensor]] = [
        None if t.dim() == 0 else
        torch.randn(t.shape, generator=gen, dtype=torch.float32).to(device=t.device, dtype=t.dtype) for t in leaves]
    return leaves, grads


def output_loss(out: Any, seed: int = 0, where: str = "unit_scale_fx", scalars_first: bool = True) -> torch.Tensor:
    """The scalar (float32) whose gradient :func:`loss_outputs` describes: the sum of the scalar
    outputs, or ``sum(output * unit Gaussian)`` over every output when none is a scalar."""
    tensors, grads = loss_outputs(out, seed, where, scalars_first)
    total: Optional[torch.Tensor] = None
    for t, g in zip(tensors, grads):
        term = (t if g is None else (t * g).sum()).float()
        total = term if total is None else total + term
    assert total is not None
    return total
