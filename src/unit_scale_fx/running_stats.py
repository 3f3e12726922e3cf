"""Batch norms' running statistics carried into the units of the unit-scaled model.

A batch norm's running mean and variance describe the values it normalises. Unit scaling changes those
values by factors (the scale of the input the plan gives it, the scales upstream), so trained statistics
kept as they are (``init_weights=False``: a pretrained model) describe another tensor, and evaluation-mode
outputs are off until training has replaced them (by ``(1 - momentum)`` a step).

:func:`carry_running_stats` maps them instead: on the example batch, each batch norm's input in the
unit-scaled model is compared with its input in the model the statistics were gathered on (a copy taken before
planning), channel by channel, as ``u = a x + b`` (``a`` from the ratio of the two batch variances, ``b`` from the means); the
running statistics become ``a * mean + b`` and ``a**2 * var``. ``UnitScaledModule`` does this when it plans a
module whose weights it kept (``init_weights=False``) and when it plans again (``replan``: the statistics are
then in the last plan's units). Where the unit-scaled input is the original's
times a factor (a convolution and the norm after it), this is exact on any batch; elsewhere (after residual
adds whose weights the plan changed) it is an estimate that keeps the statistics' own information. With every
scale 1 the map is the identity. Layers whose statistics were never updated (a freshly built model: mean 0,
variance 1) are left alone.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn as nn

log = logging.getLogger(__name__)

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def trained_norms(model: nn.Module) -> dict[str, nn.Module]:
    """The batch norms of ``model`` (by qualified name) with running statistics that training updated: a count of
    batches, or statistics other than a new layer's (mean 0, variance 1; checkpoints saved before PyTorch counted
    batches, such as torchvision's older weights, load with a count of 0)."""
    out = {}
    for name, m in model.named_modules():
        if not (isinstance(m, _NORMS) and m.track_running_stats and m.running_mean is not None
                and m.running_var is not None) or m.running_mean.device.type == "meta":
            continue
        counted = m.num_batches_tracked is not None and int(m.num_batches_tracked) > 0
        if counted or bool((m.running_mean != 0).any()) or bool((m.running_var != 1).any()):
            out[name] = m
    return out


def batch_statistics(model: nn.Module, names: list[str], args: tuple, kwargs: dict) -> dict[str, tuple]:
    """Each named batch norm's batch mean and unbiased variance of its input, as its own update computes them
    (momentum 1 for one training-mode call without gradients), in the units its running statistics are kept
    in. Nothing of ``model`` changes: buffers, momenta, mode and the RNG are restored."""
    norms = {n: model.get_submodule(n) for n in names}
    saved = {n: (m.momentum, m.running_mean.clone(), m.running_var.clone(),
                 None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for n, m in norms.items()}
    training = {m: m.training for m in model.modules()}
    try:
        for m in norms.values():
            m.momentum = 1.0
        model.train()
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            model.forward(*args, **kwargs)  # the module's code as it is (an unplanned module is not planned here)
        return {n: (m.running_mean.clone(), m.running_var.clone()) for n, m in norms.items()}
    finally:
        for n, m in norms.items():
            m.momentum = saved[n][0]
            m.running_mean.copy_(saved[n][1])
            m.running_var.copy_(saved[n][2])
            if saved[n][3] is not None:
                m.num_batches_tracked.copy_(saved[n][3])
        for m, t in training.items():
            m.training = t


def carry_running_stats(us_model: nn.Module, original: nn.Module, args: tuple, kwargs: dict) -> int:
    """Map the trained running statistics of ``us_model``'s batch norms into its own units (module docstring);
    ``original``: a copy of the model computing the function the statistics were gathered on (before planning:
    the user's; before :meth:`~unit_scale_fx.api.UnitScaledModule.replan`: the last plan's), with the same
    submodule names. Returns how many batch norms were mapped."""
    norms = trained_norms(us_model)
    names = [n for n in norms if isinstance(_get(original, n), _NORMS)]
    if not names:
        return 0
    unit = batch_statistics(us_model, names, args, kwargs)
    orig = batch_statistics(original, names, args, kwargs)
    with torch.no_grad():
        for n in names:
            m = norms[n]
            (mu_u, var_u), (mu_o, var_o) = unit[n], orig[n]
            live = var_o > 1e-12 * float(var_o.max().clamp_min(1e-30))
            a = torch.where(live, (var_u / var_o.clamp_min(1e-30)).sqrt(), torch.ones_like(var_o))
            b = mu_u - a * mu_o
            mean = torch.where(live, a * m.running_mean + b, mu_u)
            var = torch.where(live, a * a * m.running_var, var_u)
            m.running_mean.copy_(mean.to(m.running_mean.dtype))
            m.running_var.copy_(var.to(m.running_var.dtype))
    log.info("unit_scale: running statistics of %d batch norms carried into the unit-scaled model's units",
             len(names))
    return len(names)


def _get(model: nn.Module, name: str) -> Any:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None
