"""Configuration of the unit-scaling transform."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Literal, Optional

from .errors import UnitScaleError

if TYPE_CHECKING:  # pragma: no cover
    import torch.fx

    from .lowp.formats import FormatSimulation

@dataclass(frozen=True)
class MupConfig:
    """The u-μP hyperparameters (Blake et al. 2024, arXiv 2407.17465; all multipliers, 1.0 is the
    u-μP default). The depth rule that uses them is :func:`unit_scale_fx.passes.mup.depth_taus`.

    Attributes:
        attn_softmax: attention logits are ``attn_softmax * q.k / d_head``.
        ffn_act: pointwise nonlinearities see ``ffn_act * x``.
        residual_mult: size of residual branches relative to the embedding
            stream (see the module docstring for the exact rule).
        residual_attn_ratio: size of attention branches relative to MLP ones.
        loss_softmax: the loss sees ``loss_softmax * logits``.
    """

    attn_softmax: float = 1.0
    ffn_act: float = 1.0
    residual_mult: float = 1.0
    residual_attn_ratio: float = 1.0
    loss_softmax: float = 1.0

    def __post_init__(self) -> None:
        for name in ("attn_softmax", "ffn_act", "residual_mult", "residual_attn_ratio", "loss_softmax"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise UnitScaleError(
                    f"MupConfig.{name}={v!r} must be a finite positive number",
                    where="MupConfig",
                    fix=f"pass {name}=1.0 (the u-μP default) or another positive multiplier",
                )

    def branch_weights(self) -> tuple[float, float]:
        """``(a_attn, a_mlp)``: the branch weights of the depth rule."""
        a_mlp = self.residual_mult * math.sqrt(2.0 / (1.0 + self.residual_attn_ratio ** 2))
        return self.residual_attn_ratio * a_mlp, a_mlp


#: The residual depth rule of the ``"unit"`` parametrization when ``attn_tau`` / ``mlp_tau`` are
#: ``None``: u-μP's rule with branch weight 1/2, so branch ``i`` (from 0) of a stream of ``n``
#: residual adds gets ``tau_i = 1 / (2n + i + 1)`` and the stream's input keeps 2/3 of the variance
#: at the end, at any depth. Measured (benchmarks/depth.py): u-μP's own weight 1 (input share 1/3)
#: leaves a 2-layer GPT more collapsed across positions than the unscaled model; 1/2 does not, at
#: 2 to 48 layers.
UNIT_DEPTH_RULE = MupConfig(residual_mult=0.5)

#: ``(qualified_name, node) -> bool``; return False to leave that node unscaled.
NodeFilter = Callable[[str, "torch.fx.Node"], bool]

Constraint = Literal["potential", "gmean", "fwd", "bwd"]
UnsupportedPolicy = Literal["warn", "error", "ignore"]
Parametrization = Literal["unit", "u-mup"]
Rounding = Literal["pow2"]


@dataclass(frozen=True)
class UnitScaleConfig:
    """Options of :func:`unit_scale_fx.unit_scale`.

    Attributes:
        attn_tau: share of the residual stream given to branches that contain
            attention (softmax / SDPA): ``sqrt(1 - tau) * skip + sqrt(tau) * branch``.
            ``None`` (default): a depth rule (:data:`UNIT_DEPTH_RULE`, u-μP's
            :func:`unit_scale_fx.passes.mup.depth_taus` with branch weight 1/2): a stream of ``n``
            residual adds weighs its input ``n / 2`` and each branch 1/4, so branch ``i`` (from 0)
            gets ``tau = 1 / (2n + i + 1)`` and the stream's input keeps 2/3 of the variance at
            the end, at any depth. A fixed
            tau (0.5 was the old default) lets the input's share decay as ``(1 - tau)^n``: deep
            models then collapse towards identical positions.
        mlp_tau: the same for every other residual branch.
        constraint: how backward scales are kept valid. ``"potential"`` (default):
            forward scales stay ideal and backward scales are fitted, by least
            squares over the whole graph, to the form that provably gives every
            parameter a positive multiple of its true gradient (see
            :mod:`unit_scale_fx.passes.balance`). The local rules tie forward and
            backward scales of an op on every edge that is not a cut edge, to
            ``"gmean"`` the geometric mean of the ideal scales, ``"fwd"`` the
            forward scale, or ``"bwd"`` the geometric mean of the backward ones.
        node_filter: ``(qualified_name, node) -> bool``; nodes for which it
            returns False are left as they are.
        unsupported: what to do with floating-point ops that have no rule:
            ``"warn"`` leaves them unscaled and lists them in one warning,
            ``"error"`` raises :class:`UnitScaleError`, ``"ignore"`` only logs.
        measure: when planning has real example inputs (not meta or fake), run the
            graph once on them: rules see measured input RMS, and ops whose scale
            depends on the data (attention, softmax, products of activations) are
            calibrated on it. With False, or on the meta device, planning is analytic.
        plan_across_ranks: planning inside an initialised ``torch.distributed`` process group
            sums the measured statistics over its ranks, so every rank plans for the global
            batch (every rank must then plan, in step: DDP and FSDP2 do). False: each process
            plans on its own batch (plan on one rank and share it with
            :func:`unit_scale_fx.training.distributed.sync_plan`).
        dynamo_fallback: when neither torch.fx nor torch.export captures the model and
            example inputs are given, unit-scale it through dynamo (see
            :func:`unit_scale_fx.unit_scale`); False raises :class:`UnitScaleError` instead.
        init_weights: re-initialise parameters for unit scaling (unit-RMS
            weights, zero biases, unit norm gains).
        inplace: transform the given model's own parameters instead of a copy.
        leaf_modules: module types that are kept as opaque calls while tracing.
        calibrate: measure forward and gradient RMS on the example batch at every
            floating-point op that no rule covers and give it static scales
            (:mod:`unit_scale_fx.passes.calibrate`); needs real example inputs.
        calibrate_rounds: trial runs for calibration (more rounds refine gradient
            gains that depend on the scales planned upstream).
        simulate_format: a :class:`~unit_scale_fx.lowp.simulate.FormatSimulation`;
            after scaling, round the operands of matmul-class ops (and the gradients
            at their outputs) to low-precision formats. ``None``: no simulation.
        parametrization: ``"unit"`` (unit scaling) or ``"u-mup"`` (unit scaling
            plus μP: readout ``1 / fan_in``, attention logits ``1 / d_head``,
            residual shares tied to depth; see :mod:`unit_scale_fx.passes.mup`).
            ``unit_scale(model, mup=True)`` is a shorthand for ``"u-mup"``.
        mup: the u-μP hyperparameters (:class:`unit_scale_fx.config.MupConfig`);
            read only under ``parametrization="u-mup"``. Under u-μP, the
            residual shares come from ``mup`` and ``attn_tau`` / ``mlp_tau``
            are not used.
        round_scales: ``"pow2"`` rounds every scale of the plan (forward, backward, residual
            weights) to the nearest power of two, which is exact in FP8, FP16 and BF16
            arithmetic; gradients stay valid (potentials are rounded too, see
            :mod:`unit_scale_fx.passes.round_scales`). ``None`` (default): scales as planned.
    """

    attn_tau: Optional[float] = None
    mlp_tau: Optional[float] = None
    constraint: Constraint = "potential"
    node_filter: Optional[NodeFilter] = None
    unsupported: UnsupportedPolicy = "warn"
    measure: bool = True
    dynamo_fallback: bool = True
    plan_across_ranks: bool = True
    init_weights: bool = True
    inplace: bool = False
    leaf_modules: tuple[type, ...] = field(default_factory=tuple)
    calibrate: bool = False
    calibrate_rounds: int = 1
    simulate_format: Optional["FormatSimulation"] = None
    parametrization: Parametrization = "unit"
    mup: MupConfig = field(default_factory=MupConfig)
    round_scales: Optional[Rounding] = None

    def with_overrides(self, where: str, **overrides: object) -> "UnitScaleConfig":
        """A copy with the given fields replaced; an unknown field is a :class:`UnitScaleError`."""
        if not overrides:
            return self
        from dataclasses import replace

        from .errors import UnitScaleError

        try:
            return replace(self, **overrides)
        except TypeError as exc:
            raise UnitScaleError(f"unknown option: {exc}", where=where,
                                 fix="see UnitScaleConfig for the options") from exc

    def __post_init__(self) -> None:
        from .errors import UnitScaleError

        for name in ("attn_tau", "mlp_tau"):
            tau = getattr(self, name)
            if tau is not None and not (isinstance(tau, (int, float)) and 0.0 < tau < 1.0):
                raise UnitScaleError(
                    f"UnitScaleConfig.{name}={tau!r} is outside (0, 1)",
                    where="UnitScaleConfig",
                    fix=f"pass a {name} strictly between 0 and 1 (0.5 weighs skip and branch equally), "
                    "or None for the depth rule",
                )
        if self.constraint not in ("potential", "gmean", "fwd", "bwd"):
            raise UnitScaleError(
                f"unknown constraint {self.constraint!r}",
                where="UnitScaleConfig.constraint",
                fix="use 'potential', 'gmean', 'fwd' or 'bwd'",
            )
        if self.parametrization not in ("unit", "u-mup"):
            raise UnitScaleError(
                f"unknown parametrization {self.parametrization!r}",
                where="UnitScaleConfig.parametrization",
                fix="use 'unit' or 'u-mup'",
            )
        if not isinstance(self.mup, MupConfig):
            raise UnitScaleError(
                f"UnitScaleConfig.mup must be a MupConfig, got {type(self.mup).__name__}",
                where="UnitScaleConfig.mup",
                fix="pass mup=MupConfig(attn_softmax=..., ...)",
            )
        if self.round_scales not in (None, "pow2"):
            raise UnitScaleError(
                f"unknown round_scales {self.round_scales!r}",
                where="UnitScaleConfig.round_scales",
                fix="use 'pow2' (every scale a power of two) or None",
            )
        if self.unsupported not in ("warn", "error", "ignore"):
            raise UnitScaleError(
                f"unknown unsupported-op policy {self.unsupported!r}",
                where="UnitScaleConfig.unsupported",
                fix="use 'warn', 'error' or 'ignore'",
            )
