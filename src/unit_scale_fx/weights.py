"""``init_weights(model)``: unit-scaling initialisation of a model's own parameters, eagerly.

The same roles and rules as the ``init_weights`` pass (unit-RMS weights, zero
biases, unit norm gains), applied in place to ``model``'s parameters. Each
parameter it initialises is marked, so the ``torch.compile`` backend
(:mod:`unit_scale_fx.backend`) never initialises it again.
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn

from .capture import capture
from .errors import UnitScaleError
from .passes import PassContext, normalize
from .passes.init_weights import init_parameter, parameter_init_kinds

log = logging.getLogger(__name__)

#: Attribute set on a parameter once it has been initialised for unit scaling.
INIT_MARK = "_unit_scale_fx_initialised"


def is_initialised(p: torch.Tensor) -> bool:
    """True if ``p`` was initialised for unit scaling (by :func:`init_weights` or the backend)."""
    return bool(getattr(p, INIT_MARK, False))


def mark_initialised(p: torch.Tensor) -> None:
    """Mark ``p`` as initialised, so the backend leaves it alone (e.g. after loading a checkpoint)."""
    setattr(p, INIT_MARK, True)


def init_weights(model: nn.Module, example_inputs: Optional[Sequence[Any]] = None,
                 example_kwargs: Optional[dict] = None, leaf_modules: Sequence[type] = (),
                 force: bool = False) -> dict[str, str]:
    """Initialise ``model``'s parameters in place for unit scaling; return ``name -> init kind``.

    Init kinds ("unit", "zero", "one") come from the ops that consume each parameter (captured with torch.fx, or
    torch.export when example inputs are given and tracing fails). Parameters
    already initialised are skipped unless ``force``. Parameters no rule claims are
    left as they are (and marked, so the backend does not touch them either).
    """
    if not isinstance(model, nn.Module):
        raise UnitScaleError(f"init_weights expects a torch.nn.Module, got {type(model).__name__}",
                             where="unit_scale_fx.init_weights(model)", fix="pass the model")
    args = tuple(example_inputs) if example_inputs is not None else None
    gm = capture(model, args, example_kwargs, leaf_modules)
    normalize(gm, PassContext())
    roles = parameter_init_kinds(gm)
    by_id = {id(p): name for name, p in model.named_parameters(remove_duplicate=False)}
    done: dict[str, str] = {}
    n = 0
    for name, role in roles.items():
        try:
            p = gm.get_parameter(name)
        except AttributeError:
            continue  # a buffer
        if id(p) not in by_id:
            continue  # capture copied it: not the model's own tensor
        if force or not is_initialised(p):
            n += init_parameter(p, role, name)
            done[name] = role
    for p in model.parameters():
        mark_initialised(p)
    log.info("init_weights: initialised %d parameters of %s for unit scaling", n, type(model).__name__)
    return done
