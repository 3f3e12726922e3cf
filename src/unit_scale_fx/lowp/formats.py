"""Number formats and the rounding op that simulates them.

A :class:`FormatSpec` describes one format (its torch dtype, largest finite
value, smallest normal and subnormal values). :func:`round_to_format` rounds a
tensor to a format and back to its own dtype, with torch's own casts (round to
nearest, ties to even), so what is simulated is exactly what a real cast gives.

Overflow: with ``saturate=True`` every value beyond the largest finite one
(infinities included) becomes ``±max``; with ``saturate=False`` it becomes
``±inf`` in formats that have infinities (E5M2, FP16, BF16) and NaN in E4M3FN,
which has none (a value overflows when it rounds above ``max``, i.e. from
``max + ulp(max) / 2`` on). NaN stays NaN either way. torch's CPU cast to
``float8_e4m3fn`` saturates while the hardware conversion without the
saturation flag gives NaN, so the E4M3 overflow is applied here explicitly
rather than left to the cast.

:class:`Quantise` is the module the :func:`~unit_scale_fx.lowp.simulate.simulate_format`
pass inserts: it rounds its input to a forward format and the gradient passing back
through it to a backward format, and can count the values that underflow to zero
or overflow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch import Tensor, nn

from ..errors import UnitScaleError


@dataclass(frozen=True)
class FormatSpec:
    """One floating-point format.

    Attributes:
        name: short name (``"e4m3"``, ``"e5m2"``, ``"fp16"``, ``"bf16"``).
        dtype: the torch dtype a value is cast to.
        max: largest finite value.
        min_normal: smallest positive normal value.
        min_subnormal: smallest positive subnormal value.
        has_inf: whether the format has infinities (E4M3FN has none: its overflow is NaN).
        mantissa_bits: explicit mantissa bits.
    """

    name: str
    dtype: torch.dtype
    max: float
    min_normal: float
    min_subnormal: float
    has_inf: bool
    mantissa_bits: int

    @property
    def overflow_threshold(self) -> float:
        """Magnitudes from here on round above ``max`` (round to nearest, ties to even)."""
        ulp_max = 2.0 ** (math.floor(math.log2(self.max)) - self.mantissa_bits)
        return self.max + ulp_max / 2


def _spec(name: str, dtype: torch.dtype, has_inf: bool) -> FormatSpec:
    fi = torch.finfo(dtype)
    mant = int(round(-math.log2(fi.eps)))
    return FormatSpec(name, dtype, float(fi.max), float(fi.smallest_normal), float(fi.smallest_normal) * float(fi.eps),
                      has_inf, mant)


#: The formats that can be simulated, by name (aliases included).
FORMATS: dict[str, FormatSpec] = {}
for _names, _dtype, _inf in (
    (("e4m3", "float8_e4m3fn", "fp8_e4m3"), getattr(torch, "float8_e4m3fn", None), False),
    (("e5m2", "float8_e5m2", "fp8_e5m2"), getattr(torch, "float8_e5m2", None), True),
    (("fp16", "float16", "half"), torch.float16, True),
    (("bf16", "bfloat16"), torch.bfloat16, True),
):
    if _dtype is None:  # pragma: no cover - torch without float8 dtypes
        continue
    _s = _spec(_names[0], _dtype, _inf)
    for _n in _names:
        FORMATS[_n] = _s

FormatLike = Union[str, torch.dtype, FormatSpec, None]


def get_format(fmt: FormatLike) -> Optional[FormatSpec]:
    """A :class:`FormatSpec` from a name, a torch dtype or a spec; ``None`` means "no rounding"."""
    if fmt is None or isinstance(fmt, FormatSpec):
        return fmt
    if isinstance(fmt, torch.dtype):
        for s in FORMATS.values():
            if s.dtype == fmt:
                return s
        if fmt in (torch.float32, torch.float64):
            return None
    elif isinstance(fmt, str):
        key = fmt.lower()
        if key in ("fp32", "float32", "none"):
            return None
        if key in FORMATS:
            return FORMATS[key]
    raise UnitScaleError(
        f"unknown number format {fmt!r}",
        where="unit_scale_fx.lowp.formats.get_format",
        fix=f"use one of {sorted({s.name for s in FORMATS.values()})}, a matching torch dtype, or None (no rounding)",
    )


def round_to_format(x: Tensor, spec: Optional[FormatSpec], saturate: bool = True) -> Tensor:
    """``x`` rounded to ``spec`` and cast back to ``x.dtype`` (see the module docstring for overflow)."""
    if spec is None or not x.is_floating_point():
        return x
    if saturate:
        return x.clamp(-spec.max, spec.max).to(spec.dtype).to(x.dtype)
    y = x.to(spec.dtype).to(x.dtype)
    if not spec.has_inf:  # E4M3FN: overflow is NaN (torch's CPU cast would saturate)
        y = torch.where(x.abs() >= spec.overflow_threshold, torch.full_like(y, float("nan")), y)
    return y


@dataclass
class FormatCounter:
    """Counts of values rounded by one direction of one or more :class:`Quantise` sites."""

    total: int = 0
    nonzero: int = 0
    underflow: int = 0  # nonzero values that became zero
    overflow: int = 0  # finite values beyond max (saturated or overflowed)
    sumsq: float = 0.0  # sum of squares of the finite values seen (before rounding)
    finite: int = 0  # number of finite values seen

    def add(self, x: Tensor, y: Tensor, spec: FormatSpec) -> None:
        with torch.no_grad():
            nz = x != 0
            fin = torch.isfinite(x)
            self.total += x.numel()
            self.nonzero += int(nz.sum())
            self.underflow += int((nz & (y == 0)).sum())
            self.overflow += int((fin & (x.abs() > spec.max)).sum())
            self.finite += int(fin.sum())
            self.sumsq += float(torch.where(fin, x, torch.zeros_like(x)).double().square().sum())

    def merge(self, other: "FormatCounter") -> None:
        self.total += other.total
        self.nonzero += other.nonzero
        self.underflow += other.underflow
        self.overflow += other.overflow
        self.sumsq += other.sumsq
        self.finite += other.finite

    @property
    def rms(self) -> float:
        """Root mean square of the finite values seen (before rounding); 0 if none."""
        return math.sqrt(self.sumsq / self.finite) if self.finite else 0.0

    @property
    def underflow_fraction(self) -> float:
        """Share of nonzero values that were flushed to zero."""
        return self.underflow / self.nonzero if self.nonzero else 0.0

    @property
    def overflow_fraction(self) -> float:
        """Share of all values that saturated (or overflowed)."""
        return self.overflow / self.total if self.total else 0.0


@dataclass
class QuantiseStats:
    """Forward and backward counters of one :class:`Quantise` site."""

    fwd: FormatCounter = field(default_factory=FormatCounter)
    bwd: FormatCounter = field(default_factory=FormatCounter)


class _QuantiseFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, site: "Quantise") -> Tensor:  # type: ignore[override]
        ctx.site = site
        y = round_to_format(x, site.fwd, site.saturate)
        if site.stats is not None and site.fwd is not None:
            site.stats.fwd.add(x, y, site.fwd)
        return x.view_as(x) if y is x or site.passthrough else y

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        site: Quantise = ctx.site
        g = round_to_format(grad, site.bwd, site.saturate)
        if site.stats is not None and site.bwd is not None:
            site.stats.bwd.add(grad, g, site.bwd)
        return (grad if site.passthrough else g), None


class Quantise(nn.Module):
    """Round the input to ``fwd`` in forward and the gradient to ``bwd`` in backward.

    Either format may be ``None`` (that direction passes unchanged). The gradient
    is otherwise passed straight through: the backward of rounding is taken to be
    the identity, as in real low-precision training.

    Set :attr:`stats` to a :class:`QuantiseStats` (or call :meth:`track`) to count
    underflow and overflow. With ``passthrough=True`` nothing is rounded: the site
    only counts what rounding would do (while tracking) and costs nothing otherwise.
    """

    def __init__(self, fwd: FormatLike = None, bwd: FormatLike = None, saturate: bool = True, role: str = "",
                 passthrough: bool = False) -> None:
        super().__init__()
        self.passthrough = bool(passthrough)
        self.fwd = get_format(fwd)
        self.bwd = get_format(bwd)
        self.saturate = bool(saturate)
        self.role = role
        self.stats: Optional[QuantiseStats] = None

    def track(self, on: bool = True) -> None:
        self.stats = QuantiseStats() if on else None

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or not x.is_floating_point():
            return x
        if (self.fwd is None and self.bwd is None) or (self.passthrough and self.stats is None):
            return x
        return _QuantiseFn.apply(x, self)

    def extra_repr(self) -> str:
        f = self.fwd.name if self.fwd else "-"
        b = self.bwd.name if self.bwd else "-"
        return (f"fwd={f}, bwd={b}, saturate={self.saturate}" + (", passthrough" if self.passthrough else "")
                + (f", role={self.role}" if self.role else ""))


def quantise(x: Tensor, fwd: FormatLike = None, bwd: FormatLike = None, saturate: bool = True) -> Tensor:
    """Functional form of :class:`Quantise` (no statistics)."""
    return Quantise(fwd, bwd, saturate)(x)


@dataclass(frozen=True)
class FormatSimulation:
    """What :func:`unit_scale_fx.lowp.simulate.simulate_format` rounds, and to which format.

    Attributes:
        fwd: format of matmul operands in forward (``"e4m3"``, ``"e5m2"``,
            ``"fp16"``, ``"bf16"``, a torch dtype, or ``None`` for no rounding).
        bwd: format of the gradients arriving at matmul outputs in backward.
        saturate: clamp values beyond the format's largest finite value to it
            (``True``), or let them overflow to ``inf`` (NaN in E4M3, which has no
            infinity) as a cast without saturation does (``False``).
        attention: also round the matmuls inside scaled-dot-product attention.
        passthrough: round nothing; only count (with :func:`unit_scale_fx.lowp.simulate.track_formats`) what
            rounding would flush to zero or saturate.
        high_precision: op kinds kept in ``high_format`` instead of ``fwd`` / ``bwd``
            (a per-op-kind format policy): ``"attention"`` (the two matmuls inside
            attention: ``Q Kᵀ`` and ``P V``) and ``"readout"`` (a matmul-class op with
            no other matmul-class op downstream of it: the LM head, a classifier).
            :data:`FP8_POLICY` keeps both, as FP8 recipes do; ``()`` rounds every
            matmul-class op to ``fwd`` / ``bwd``.
        high_format: the format of the ops in ``high_precision`` (both directions;
            ``None``: no rounding).
    """

    fwd: FormatLike = "e4m3"
    bwd: FormatLike = "e5m2"
    saturate: bool = True
    attention: bool = True
    passthrough: bool = False
    high_precision: tuple[str, ...] = ()
    high_format: FormatLike = "bf16"

    def __post_init__(self) -> None:
        get_format(self.fwd)  # raises UnitScaleError on unknown names
        get_format(self.bwd)
        get_format(self.high_format)
        if isinstance(self.high_precision, str):
            object.__setattr__(self, "high_precision", (self.high_precision,))
        object.__setattr__(self, "high_precision", tuple(self.high_precision))
        bad = [k for k in self.high_precision if k not in OP_KINDS]
        if bad:
            raise UnitScaleError(
                f"unknown op kind(s) {bad} in high_precision",
                where="FormatSimulation.high_precision",
                fix=f"use a subset of {OP_KINDS}, e.g. FP8_POLICY = {FP8_POLICY}",
            )

    def formats_for(self, kind: str) -> tuple[FormatLike, FormatLike]:
        """``(fwd, bwd)`` formats of an op of ``kind`` (``"matmul"``, ``"conv"``, ``"attention"``, ``"readout"``)."""
        if kind in self.high_precision:
            return self.high_format, self.high_format
        return self.fwd, self.bwd

    def describe(self) -> str:
        f, b = get_format(self.fwd), get_format(self.bwd)
        out = (f"fwd={f.name if f else 'fp32'} bwd={b.name if b else 'fp32'} saturate={self.saturate}"
               + (" passthrough" if self.passthrough else ""))
        if self.high_precision:
            h = get_format(self.high_format)
            out += f" {'+'.join(self.high_precision)}={h.name if h else 'fp32'}"
        return out


#: Op kinds a :class:`FormatSimulation` can keep in higher precision.
OP_KINDS = ("attention", "readout")

#: The recommended FP8 format policy: every matmul-class op in FP8 except the two matmuls inside
#: attention and the readout (the last matmul before the loss), which stay in ``high_format`` (BF16).
#: See docs/low-precision.md ("Which ops stay in higher precision") for why.
FP8_POLICY = ("attention", "readout")
