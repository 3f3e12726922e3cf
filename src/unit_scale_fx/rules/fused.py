"""The rule of a fused single-input subgraph (see :mod:`unit_scale_fx.passes.fuse`).

The subgraph is one function ``f`` of one tensor. Its scales come from ``f`` itself
on a Gaussian probe shaped like the real input: ``z`` with the predicted input RMS ``r`` and
first moment (``N(0, r^2)`` for a zero-mean input; the top weights of a softmax are near their
mean), a unit-Gaussian cotangent ``g``; forward scale
``1 / RMS(f(z))``, backward scale ``1 / RMS(J_f(z)^T g)``. For an elementwise chain
this is the pointwise rule's quadrature done by sampling; for a hand-written norm
(``x * rsqrt(mean(x^2) + eps)``) it finds that the output is already unit and the
input gradient is ``1 / r``, as for ``F.rms_norm``. Small inputs are sampled
several times so that at least ``MIN_SAMPLES`` values enter each estimate.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.fx as fx

from .registry import Kind, OpView, Rule, Scales

MIN_SAMPLES = 16384
POSITIVE_MEAN = 0.8
_SEED = 1234


class FusedRegion(fx.GraphModule):
    """A subgraph of one tensor input, moved into its own module by the fuse pass."""

    def __init__(self, root: torch.nn.Module, graph: fx.Graph, ops: Sequence[str]) -> None:
        super().__init__(root, graph, "FusedRegion")
        self.ops = list(ops)

    def extra_repr(self) -> str:
        return "ops=[" + ", ".join(self.ops) + "]"


def probe_moments(fn, shape: Sequence[int], std: float, dtype: torch.dtype = torch.float32,
                  mean: float = 0.0, reduced: Sequence[int] = ()) -> tuple[float, ...]:
    """``(RMS(f(z)), RMS(J^T g))`` for ``z ~ N(mean std, (1 - mean^2) std^2)`` of ``shape`` (RMS ``std``, first
    moment ``mean`` of it) and unit Gaussian ``g``. With ``reduced`` (dimensions of ``z`` that ``f`` reduces: a
    sample's positions), two more numbers: the correlation of ``J^T g`` across them, ``(mean over them)^2 / mean
    square``, and its coherence with ``z``'s own fluctuation, ``(mean over them of J^T g u)^2 / mean square``
    (``u`` the unit Gaussian ``z`` is drawn from)."""
    mean = max(-1.0, min(1.0, mean))
    sd = math.sqrt(max(0.0, 1.0 - mean * mean))
    # a first moment over POSITIVE_MEAN of the RMS: a positive variable (top-k softmax weights, a norm), probed
    # log-normal with that first moment (E[x] / RMS(x) = exp(-s^2 / 2)); a Gaussian would put mass near zero
    # that such a value does not have, and x / sum(x) on it has no finite variance
    log_sd = math.sqrt(-2.0 * math.log(abs(mean))) if abs(mean) >= POSITIVE_MEAN else None
    gen = torch.Generator().manual_seed(_SEED)
    numel = max(1, math.prod(shape))
    draws = max(1, math.ceil(MIN_SAMPLES / numel))
    fs, ds, nf, nd, shared, along = 0.0, 0.0, 0, 0, 0.0, 0.0
    for _ in range(draws):
        u = torch.randn(tuple(shape), generator=gen, dtype=dtype)
        if log_sd is not None:  # RMS std: exp(log_sd u - log_sd^2) has mean square 1
            z = (math.copysign(std, mean) * torch.exp(log_sd * u - log_sd * log_sd)).requires_grad_(True)
        else:
            z = ((u * sd + mean) * std).requires_grad_(True)
        y = fn(z)
        g = torch.randn(y.shape, generator=gen, dtype=y.dtype)
        (dz,) = torch.autograd.grad(y, z, g, allow_unused=True)
        fs += float(y.detach().double().pow(2).sum())
        nf += y.numel()
        if dz is not None:
            ds += float(dz.double().pow(2).sum())
            if reduced:
                # the square of the part shared by the positions (each cell's mean, once per position), and of
                # the part along the values
                p = math.prod(dz.shape[d] for d in reduced)
                shared += float(dz.double().mean(tuple(reduced)).pow(2).sum()) * p
                along += float((dz.double() * u.double()).mean(tuple(reduced)).pow(2).sum()) * p
        nd += z.numel()
    moments = (math.sqrt(fs / max(1, nf)), math.sqrt(ds / max(1, nd)))
    return (*moments, shared / ds if ds > 0 else 0.0, along / ds if ds > 0 else 0.0) if reduced else moments


class FusedRule(Rule):
    """Scales of a fused single-input function, measured on a Gaussian probe."""

    name = "fused"
    kind = Kind.POINTWISE

    def scales(self, op: OpView) -> Scales:
        if len(op.inputs) != 1 or op.module is None:
            return Scales(out_rms=None, note="fused region with unexpected inputs")
        (x,) = op.inputs
        shape = op.shape(x)
        val = x.meta.get("val")
        if shape is None or not isinstance(val, torch.Tensor):
            return Scales(out_rms=None, note="input shape unknown")
        r = op.rms(x)
        dtype = val.dtype if val.dtype in (torch.float32, torch.float64) else torch.float32
        reduced = _reduced_dims(shape, op.out_shape)
        try:
            with torch.enable_grad():
                f_rms, d_rms, *rho = probe_moments(op.module, shape, r, dtype, op.mean(x), reduced)
        except Exception as exc:  # the function cannot run on a CPU probe
            return Scales(out_rms=None, note=f"probe failed ({type(exc).__name__}: {exc})")
        ops = ", ".join(getattr(op.module, "ops", []))
        if not (f_rms > 0 and math.isfinite(f_rms)):
            return Scales(out_rms=None, note=f"zero or non-finite output on the probe; ops [{ops}]")
        # the probe has the input's predicted first moment (x / sum(x) of top-k routing weights); on real
        # inputs the function is measured instead, forward and backward
        s = Scales(fwd=1.0 / f_rms, note=f"[{ops}] RMS(f)={f_rms:.4g} RMS(J^T g)={d_rms:.4g} at std {r:.4g}",
                   calibrate=True, calibrate_grad_gain=True)
        if d_rms > 0 and math.isfinite(d_rms):
            s.bwd[x], s.grad_gain[x] = 1.0 / d_rms, d_rms
        if rho and all(math.isfinite(v) for v in rho):
            # a reduction over a sample's positions (a ReLU and a global mean): every position gets the same
            # gradient, times what the function's derivative keeps of it (Scales.grad_rho, as a pool gives it),
            # which follows the input's values as the derivative does (Scales.grad_value)
            s.grad_rho[x], s.grad_value[x] = min(1.0, rho[0]), min(1.0, rho[1])
        return s


def _reduced_dims(shape: Sequence[int], out_shape: Sequence[int] | None) -> tuple[int, ...]:
    """The dimensions past the batch and the channel that a fused function reduces, where its output is its
    input's leading dimensions (``x.mean((2, 3))`` on ``(N, C, H, W)``), with or without the reduced ones kept
    as 1; none otherwise."""
    if out_shape is None or len(shape) < 3:
        return ()
    out = tuple(out_shape)
    if len(out) < len(shape) and len(out) >= 2 and tuple(shape[:len(out)]) == out:
        dims = tuple(range(len(out), len(shape)))
    elif len(out) == len(shape) and tuple(shape[:2]) == out[:2]:
        dims = tuple(d for d in range(2, len(shape)) if out[d] == 1 and shape[d] > 1)
        if any(out[d] != shape[d] for d in range(2, len(shape)) if d not in dims):
            return ()
    else:
        return ()
    return dims if dims and math.prod(shape[d] for d in dims) > 1 else ()


#: the one rule instance the fuse pass pins on every fused node (``fx.GraphModule``
#: instances get a class of their own, so the registry cannot key on the class).
FUSED_RULE = FusedRule()
