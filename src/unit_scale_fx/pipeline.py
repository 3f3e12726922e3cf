"""The passes in order, built from a config, and the driver that runs them.

    capture -> strip_asserts -> inline_functions -> normalize -> init_weights   (stage "prepare")
            -> shape_prop -> [boundary_outputs] -> constants -> fuse -> topology -> roles
            -> [mup] -> [calibrate] -> plan -> [mup_readout] -> balance -> calibrate_grads
            -> [round_scales] -> predict_grads                             (stage "plan")
            -> rewrite -> unit_operands -> fold_scales -> [simulate_format] -> recompile    (stage "transform")

Bracketed passes are in the list only when the config asks for them (u-muP, calibrate=True,
round_scales, simulate_format) or the caller does (``boundary=True``: the graph is one piece of a larger
program, as in the torch.compile backend). :func:`build_pipeline` is the one way to get a pass
list; :func:`~unit_scale_fx.passes.base.run_passes` checks that each pass finds the context
fields it needs.
"""

from __future__ import annotations

from typing import Literal, Optional, Sequence

import torch.fx as fx

from . import rules  # noqa: F401  (fills the registry)
from .config import UnitScaleConfig
from .passes.balance import balance
from .passes.base import Pass, PassContext, PassResult, declare, gc_paused, run_passes
from .passes.boundary import boundary_outputs
from .passes.calibrate import make_calibrate
from .passes.calibrate_grads import calibrate_grads
from .passes.constants import mark_constants
from .passes.fold_scales import fold_scales
from .passes.fuse import fuse
from .passes.init_weights import init_weights
from .passes.mup import mup, mup_readout
from .passes.inline_functions import inline_functions
from .passes.normalize import normalize
from .passes.plan import plan, predict_grads
from .passes.rewrite import rewrite
from .passes.unit_operands import unit_operands
from .passes.roles import roles
from .passes.round_scales import round_scales
from .passes.shape_prop import shape_prop
from .passes.simulate_format import simulate_formats
from .passes.strip_asserts import strip_asserts
from .passes.topology import topology

__all__ = ["Stage", "build_pipeline", "gc_paused", "run_passes", "PassContext", "recompile"]

Stage = Literal["prepare", "plan", "transform"]


@declare("recompile")
def recompile(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    gm.recompile()
    return PassResult(True, "recompiled")


def _prepare(cfg: UnitScaleConfig, init: Optional[Pass]) -> list[Pass]:
    return [strip_asserts, inline_functions, normalize, init if init is not None else init_weights]


def _plan(cfg: UnitScaleConfig, boundary: bool, after_calibrate: bool = False) -> list[Pass]:
    """The planning passes; ``after_calibrate``: only those a calibration trial re-runs."""
    mup_on = cfg.parametrization == "u-mup"
    head: list[Pass] = [shape_prop]
    if boundary:
        head.append(boundary_outputs)
    head += [mark_constants, fuse, topology, roles]
    if mup_on:
        head.append(mup)
    if cfg.calibrate:
        head.append(make_calibrate(_calibration_trial))
    tail: list[Pass] = [plan]
    if mup_on:
        tail.append(mup_readout)  # before balance, which derives backward scales from it
    tail += [balance, calibrate_grads]
    if cfg.round_scales is not None:
        tail.append(round_scales)
    tail.append(predict_grads)
    return tail if after_calibrate else head + tail


def _transform(cfg: UnitScaleConfig) -> list[Pass]:
    passes: list[Pass] = [rewrite, unit_operands, fold_scales]
    if cfg.simulate_format is not None:
        passes.append(simulate_formats)
    return passes + [recompile]


def _calibration_trial(cfg: UnitScaleConfig) -> list[Pass]:
    """What one calibration trial runs on its copy: topology again, then everything after calibrate."""
    return [topology] + _plan(cfg, boundary=False, after_calibrate=True) + _transform(cfg)


def build_pipeline(config: UnitScaleConfig, stages: Sequence[Stage], *, boundary: bool = False,
                   init: Optional[Pass] = None) -> list[Pass]:
    """The passes of ``stages`` (in the order given) for ``config``.

    Args:
        config: decides the optional passes (u-muP, calibration, format simulation).
        stages: any of ``"prepare"`` (at ``unit_scale`` time), ``"plan"`` and ``"transform"``
            (once example inputs are known).
        boundary: the graph is one piece of a larger program (its outputs may feed later graphs).
        init: a replacement for the ``init_weights`` pass (the backend initialises each parameter
            once across graphs).
    """
    out: list[Pass] = []
    for stage in stages:
        if stage == "prepare":
            out += _prepare(config, init)
        elif stage == "plan":
            out += _plan(config, boundary)
        elif stage == "transform":
            out += _transform(config)
        else:
            raise ValueError(f"unknown stage {stage!r}; use 'prepare', 'plan' or 'transform'")
    return out
