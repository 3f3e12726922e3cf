"""Optimizer parameter groups for unit-scaled and u-μP models.

The groups come from the role analysis of the planned graph
(:func:`unit_scale_fx.passes.roles.analyse_roles`): which op consumes each parameter and
where that op sits, never parameter names.

Learning-rate multipliers under ``parametrization="u-mup"`` (Adam, AdamW and SGD
alike: unit scaling makes every weight gradient RMS ~ 1 at init, so an SGD step
and an Adam step have the same size up to a constant)::

    hidden, input weight   fan_in ** -0.5      (fan_in: the dimension the matmul sums over)
    embedding              fan_out ** -0.5     (fan_out: the embedding width)
    readout                1
    bias, norm gain, other 1
    times depth ** -0.5    for parameters used inside a residual branch
                           (depth: the number of residual branches on that stream)

Under ``parametrization="unit"`` every multiplier is 1 (plain unit scaling has
no width rule). Weight-decay multipliers: 0 for biases and norm gains, 1 for the
rest. With ``independent_weight_decay=True`` each group's weight decay is divided
by its learning rate, so AdamW's per-step decay ``lr * wd`` equals ``wd * wd_mult``
whatever the learning rate (tuning lr then leaves the decay alone).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Iterable, Union

import torch
import torch.nn as nn

from ..errors import UnitScaleError
from ..passes.roles import PARAM_ROLES, ParamRole, roles_of
from ..table import format_table

log = logging.getLogger(__name__)

#: Weight-decay multiplier per role.
WD_MULT = {"hidden": 1.0, "input": 1.0, "embedding": 1.0, "readout": 1.0, "bias": 0.0, "norm_gain": 0.0,
           "other": 0.0}


def lr_multiplier(role: ParamRole, parametrization: str = "u-mup") -> float:
    """The learning-rate multiplier of one parameter (see the module docstring)."""
    if parametrization != "u-mup":
        return 1.0
    mult = 1.0
    if role.role in ("hidden", "input") and role.fan_in:
        mult = role.fan_in ** -0.5
    elif role.role == "embedding" and role.fan_out:
        mult = role.fan_out ** -0.5
    if role.depth:
        mult *= role.depth ** -0.5
    return mult


def wd_multiplier(role: ParamRole) -> float:
    """The weight-decay multiplier of one parameter: 0 for biases and gains, else 1."""
    return WD_MULT.get(role.role, 0.0)


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.0,
    independent_weight_decay: bool = False,
) -> list[dict[str, Any]]:
    """Parameter groups for any ``torch.optim`` optimizer.

    Args:
        model: a planned module returned by :func:`unit_scale_fx.unit_scale`.
        lr: the base learning rate (the one to sweep, and to transfer under u-μP).
        weight_decay: the base weight decay.
        independent_weight_decay: divide each group's weight decay by its
            learning rate (see the module docstring).

    Returns:
        one group per (role, lr multiplier, wd multiplier), each a dict with
        ``params``, ``lr``, ``weight_decay`` and, for inspection, ``role``,
        ``lr_mult``, ``wd_mult`` and ``names``. Parameters that do not require
        gradients are left out.
    """
    if not (math.isfinite(lr) and lr >= 0) or not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise UnitScaleError(f"lr={lr!r}, weight_decay={weight_decay!r}: both must be finite and >= 0",
                             where="unit_scale_fx.training.optim.param_groups", fix="pass finite non-negative numbers")
    analysis = roles_of(model)
    parametrization = getattr(getattr(model, "us_config", None), "parametrization", "unit")
    by_id: dict[int, tuple[str, nn.Parameter]] = {}
    for name, p in model.named_parameters():
        by_id.setdefault(id(p), (name, p))
    all_named = dict(model.named_parameters(remove_duplicate=False))
    groups: dict[tuple[str, float, float], dict[str, Any]] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        role = analysis.params.get(name)
        if role is None:  # a tied parameter known to the graph under another name
            role = next((analysis.params[n] for n, q in all_named.items() if q is p and n in analysis.params), None)
        if role is None:
            role = ParamRole(name, "other", tuple(p.shape))
            log.info("optim: parameter %s is not used by the traced graph; role 'other'", name)
        lm, wm = lr_multiplier(role, parametrization), wd_multiplier(role)
        key = (role.role, round(lm, 12), wm)
        if key not in groups:
            group_lr = lr * lm
            wd = weight_decay * wm
            if independent_weight_decay and wd and group_lr:
                wd = wd / group_lr
            groups[key] = {"params": [], "lr": group_lr, "weight_decay": wd, "role": role.role,
                           "lr_mult": lm, "wd_mult": wm, "names": []}
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    order = {r: i for i, r in enumerate(PARAM_ROLES)}
    return sorted(groups.values(), key=lambda g: (order.get(g["role"], 99), -g["lr_mult"]))


def describe_groups(groups: Iterable[dict[str, Any]]) -> str:
    """A table of the groups: role, lr multiplier, lr, weight decay, parameter count."""
    rows = [("role", "lr mult", "lr", "wd", "params", "first")]
    for g in groups:
        rows.append((g["role"], f"{g['lr_mult']:.4g}", f"{g['lr']:.4g}", f"{g['weight_decay']:.4g}",
                     str(len(g["params"])), g["names"][0] if g["names"] else "-"))
    return format_table(rows, rule=False)


_Params = Union[nn.Module, list]


def _groups(params: _Params, lr: float, weight_decay: float, independent_weight_decay: bool) -> list:
    if isinstance(params, nn.Module):
        return param_groups(params, lr, weight_decay, independent_weight_decay)
    if isinstance(params, list) and params and all(isinstance(g, dict) for g in params):
        return params
    raise UnitScaleError(
        f"expected a unit-scaled model or a list of parameter groups, got {type(params).__name__}",
        where="unit_scale_fx.training.optim",
        fix="pass the model returned by unit_scale(...) (planned), or param_groups(model, lr)",
    )


class Adam(torch.optim.Adam):
    """:class:`torch.optim.Adam` over :func:`param_groups` of a unit-scaled model."""

    def __init__(self, params: _Params, lr: float = 1e-3, *, weight_decay: float = 0.0,
                 independent_weight_decay: bool = False, **kwargs: Any) -> None:
        super().__init__(_groups(params, lr, weight_decay, independent_weight_decay), lr=lr, **kwargs)


class AdamW(torch.optim.AdamW):
    """:class:`torch.optim.AdamW` over :func:`param_groups` of a unit-scaled model."""

    def __init__(self, params: _Params, lr: float = 1e-3, *, weight_decay: float = 0.0,
                 independent_weight_decay: bool = False, **kwargs: Any) -> None:
        super().__init__(_groups(params, lr, weight_decay, independent_weight_decay), lr=lr, **kwargs)


class SGD(torch.optim.SGD):
    """:class:`torch.optim.SGD` over :func:`param_groups` of a unit-scaled model."""

    def __init__(self, params: _Params, lr: float = 1e-2, *, weight_decay: float = 0.0,
                 independent_weight_decay: bool = False, **kwargs: Any) -> None:
        super().__init__(_groups(params, lr, weight_decay, independent_weight_decay), lr=lr, **kwargs)
