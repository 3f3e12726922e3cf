"""Pointwise nonlinearities, all through one numeric routine.

For ``f`` applied to ``x ~ N(0, r^2)``: forward scale ``1 / RMS(f(x))``, backward
scale ``1 / RMS(f'(x))``, both computed by Gauss-Hermite quadrature of the op
itself. No table of constants: any elementwise op with one tensor input works.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F

from .registry import Kind, OpView, Rule, Scales, aten, register, tensor_method

_NODES, _WEIGHTS = np.polynomial.hermite_e.hermegauss(160)
_WEIGHTS = _WEIGHTS / _WEIGHTS.sum()


def gaussian_moments(fn: Callable[[torch.Tensor], torch.Tensor], std: float = 1.0,
                     mean: float = 0.0) -> tuple[float, float]:
    """``(RMS(f(x)), RMS(f'(x)))`` for ``x ~ N(mean, std^2)`` by quadrature."""
    return _moments(fn, std, mean)[:2]


def _moments(fn: Callable[[torch.Tensor], torch.Tensor], std: float,
             mean: float) -> tuple[float, float, float, float]:
    """``(RMS(f(x)), RMS(f'(x)), E[f(x)], E[f'(x) z])`` for ``x = mean + std z``, ``z ~ N(0, 1)``."""
    with torch.enable_grad():  # planning may run under no_grad
        z = torch.tensor(_NODES * std + mean, dtype=torch.float64, requires_grad=True)
        y = fn(z)
        (dy,) = torch.autograd.grad(y.sum(), z, allow_unused=True) if y.requires_grad else (None,)
    w = torch.tensor(_WEIGHTS, dtype=torch.float64)
    f_rms = float((w * y.detach().double() ** 2).sum().sqrt())
    d_rms = float((w * dy.double() ** 2).sum().sqrt()) if dy is not None else 0.0
    d_z = float((w * dy.double() * torch.tensor(_NODES, dtype=torch.float64)).sum()) if dy is not None else 0.0
    return f_rms, d_rms, float((w * y.detach().double()).sum()), d_z


@functools.lru_cache(maxsize=4096)
def _cached_moments(key: Any, consts: tuple, std: float, mean: float = 0.0) -> tuple[float, float, float, float]:
    fn, args, kwargs = consts[0], consts[1], dict(consts[2])

    def f(t: torch.Tensor) -> torch.Tensor:
        return fn(*[t if a is _SLOT else a for a in args], **kwargs)

    return _moments(f, std, mean)


def split_moments(rms: float, mean_ratio: float, rho: float) -> tuple[float, float, float]:
    """``(mean, std, centred rho)`` of a value with RMS ``rms``, first moment ``mean_ratio * rms`` and
    uncentred cross-position correlation ``rho`` (which counts the shared mean: ``rho >= mean_ratio^2``)."""
    m2 = min(mean_ratio * mean_ratio, 0.99)
    centred = max(0.0, min(0.99, (rho - m2) / (1.0 - m2)))
    return mean_ratio * rms, rms * math.sqrt(1.0 - m2), centred


@functools.lru_cache(maxsize=4096)
def _cached_rho(key: Any, consts: tuple, std: float, rho: float, mean: float = 0.0, derivative: bool = False) -> float:
    """Cross-position correlation of ``f(x)``: ``E[f(x_i) f(x_j)] / E[f(x)^2]`` for jointly Gaussian
    ``x_i, x_j`` with mean ``mean`` and centred correlation ``rho`` (``x = mean + std (sqrt(rho) c +
    sqrt(1 - rho) a)``), by quadrature. At ``rho = 0`` it is ``E[f]^2 / E[f^2]``: a nonlinearity with a
    mean gives every position a shared part. With ``derivative``, that of ``f'(x)``: the part of a gradient
    shared by every position that the op's backward (``f'(x) g``) keeps, as a share of the correlation."""
    fn, args, kwargs = consts[0], consts[1], dict(consts[2])
    nodes, weights = np.polynomial.hermite_e.hermegauss(48)
    weights = weights / weights.sum()
    c = torch.tensor(nodes, dtype=torch.float64)
    z = (math.sqrt(rho) * c[:, None] + math.sqrt(1.0 - rho) * c[None, :]) * std + mean
    if derivative:
        with torch.enable_grad():
            z.requires_grad_(True)
            out = fn(*[z if a is _SLOT else a for a in args], **kwargs)
            (y,) = torch.autograd.grad(out.sum(), z, allow_unused=True) if out.requires_grad else (None,)
        if y is None:
            return 0.0
        y = y.double()
    else:
        with torch.no_grad():
            y = fn(*[z if a is _SLOT else a for a in args], **kwargs).double()
    w = torch.tensor(weights, dtype=torch.float64)
    inner = (y * w[None, :]).sum(1)  # E_a f(x | c)
    second = float((w[:, None] * w[None, :] * y * y).sum())
    return float((w * inner * inner).sum()) / second if second > 0 else 0.0


class _Slot:
    def __repr__(self) -> str:
        return "<x>"


_SLOT = _Slot()


class PointwiseRule(Rule):
    name = "pointwise"
    kind = Kind.POINTWISE

    def scales(self, op: OpView) -> Scales:
        if len(op.inputs) != 1:
            return Scales(note="pointwise op with several tensor inputs; left unscaled")
        (x,) = op.inputs
        fn = _callable(op)
        args = tuple(_SLOT if a is x else a for a in op.node.args)
        if any(isinstance(a, fx.Node) for a in args) or any(isinstance(v, fx.Node) for v in op.node.kwargs.values()):
            return Scales(note="non-constant extra arguments; left unscaled")
        # the input as a Gaussian with its predicted first moment (a ReLU output after a residual add
        # is not centred: the ReLU after it passes more than half of it)
        mu, sd, rho_c = split_moments(op.rms(x), round(op.mean(x), 2), op.rho(x))
        r, mu = round(sd, 4), round(mu, 4)
        consts = (fn, args, tuple(sorted(op.node.kwargs.items())))
        try:
            f_rms, d_rms, f_mean, d_z = _cached_moments(fn, consts, r, mu)
        except Exception as exc:  # an op that cannot run on float64 CPU points
            return Scales(note=f"quadrature failed ({type(exc).__name__}); left unscaled")
        if not (f_rms > 0 and math.isfinite(f_rms)):
            return Scales(note="zero or non-finite output moment")
        at = f"at std {r}" + (f" mean {mu}" if mu else "")
        s = Scales(fwd=1.0 / f_rms, note=f"E[f^2]^0.5={f_rms:.4g} E[f'^2]^0.5={d_rms:.4g} {at}",
                   out_mean=f_mean / f_rms if math.isfinite(f_mean) else None)
        try:
            s.out_rho = _cached_rho(fn, consts, r, round(rho_c, 2), mu)
        except Exception:  # noqa: BLE001 - the correlation is a refinement; without it the input's carries over
            s.out_rho = None
        if d_rms > 0 and math.isfinite(d_rms):
            s.bwd[x], s.grad_gain[x] = 1.0 / d_rms, d_rms
            # backward multiplies the gradient by f'(x): a part of it shared by every position keeps the part
            # of f'(x) shared by every position (a ReLU's mask on independent positions: a quarter of its square
            # against half of the whole, so half the correlation)
            try:
                s.grad_rho_factor[x] = min(1.0, max(0.0, _cached_rho(fn, consts, r, round(rho_c, 2), mu, True)))
            except Exception:  # noqa: BLE001 - a refinement, as out_rho's
                pass
            # and f'(x) follows x (a ReLU passes the positive values): the shared part of the gradient, times
            # f'(x), then sums coherently against x's own fluctuation, as a norm's gain before the op reads it
            if math.isfinite(d_z):
                s.grad_value_from_rho[x] = min(1.0, (d_z / d_rms) ** 2)
        return s


def _callable(op: OpView) -> Callable[..., torch.Tensor]:
    if op.node.op == "call_method":
        return getattr(torch.Tensor, str(op.node.target))
    if op.node.op == "call_module" and op.module is not None:
        return op.module
    return op.node.target  # type: ignore[return-value]


POINTWISE_TARGETS = [
    F.gelu, F.relu, F.silu, F.mish, F.elu, F.selu, F.celu, F.leaky_relu, F.softplus,
    F.hardswish, F.hardsigmoid, F.hardtanh, F.relu6, F.tanh, F.sigmoid, F.logsigmoid,
    F.softsign, F.tanhshrink,
    torch.relu, torch.tanh, torch.sigmoid, torch.sin, torch.cos, torch.erf, torch.exp,
    tensor_method("relu"), tensor_method("tanh"), tensor_method("sigmoid"), tensor_method("sin"),
    tensor_method("cos"), tensor_method("exp"), tensor_method("erf"),
    aten("gelu"), aten("relu"), aten("silu"), aten("tanh"), aten("sigmoid"), aten("mish"),
    aten("elu"), aten("leaky_relu"), aten("softplus"), aten("hardswish"), aten("sin"), aten("cos"),
    torch.nn.GELU, torch.nn.ReLU, torch.nn.SiLU, torch.nn.Tanh, torch.nn.Sigmoid, torch.nn.Mish,
    torch.nn.ELU, torch.nn.LeakyReLU, torch.nn.Softplus, torch.nn.Hardswish,
]
register(*POINTWISE_TARGETS)(PointwiseRule())


class PReLURule(Rule):
    """``prelu(x, a)``: ``x`` where positive, ``a x`` elsewhere, with a learned slope ``a`` (one, or one per
    channel, dimension 1). For a zero-mean Gaussian input of RMS ``rx`` and slopes of RMS ``ra``: output RMS
    ``rx sqrt((1 + ra^2) / 2)``, and the input gradient's gain ``sqrt((1 + ra^2) / 2)``; the slope's gradient
    sums ``x g`` over the negative half of the ``rows`` values each slope multiplies: gain
    ``rx sqrt(rows / 2)``. The slope keeps its value (it shapes the function, it is not a scale); the op is
    positively homogeneous in ``x``."""

    name = "prelu"
    kind = Kind.POINTWISE

    def scales(self, op: OpView) -> Scales:
        x = op.arg(0, "input")
        a = op.arg(1, "weight")
        if not isinstance(x, fx.Node) or x not in op.inputs:
            return Scales(out_rms=None, note="input is not a float tensor")
        rx = op.rms(x)
        ra = op.rms(a, default=0.25)
        gain = math.sqrt((1.0 + ra * ra) / 2.0)
        s = Scales(fwd=1.0 / (rx * gain), bwd={x: 1.0 / gain}, grad_gain={x: gain}, note=f"slope RMS {ra:.3g}")
        if isinstance(a, fx.Node) and a in op.inputs:
            xs, as_ = op.shape(x), op.shape(a)
            rows = max(1, math.prod(xs) // max(1, math.prod(as_))) if xs and as_ is not None else 1
            g = rx * math.sqrt(rows / 2.0)
            s.bwd[a], s.grad_gain[a] = 1.0 / g, g
        return s


register(*dict.fromkeys(t for t in (F.prelu, torch.prelu, aten("prelu"), aten("_prelu_kernel"))
                        if t is not None))(PReLURule())
