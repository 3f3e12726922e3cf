"""Plot log2 RMS per op, forward and backward, before vs after unit scaling (needs matplotlib)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Union

from ..errors import UnitScaleError
from ..rules.registry import Kind
from .track import NodeScale, ScaleReport, short_op


def _matplotlib():  # type: ignore[no-untyped-def]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise UnitScaleError("plotting needs matplotlib, which is not installed", where="unit_scale_fx.analysis.plot",
                             fix="pip install 'unit-scale-fx[plot]' (or pip install matplotlib)") from exc
    return plt


def _log2(v: Optional[float]) -> float:
    return math.log2(v) if v is not None and v > 0 and math.isfinite(v) else math.nan


def _aligned(before: ScaleReport, after: ScaleReport, skip_kinds: tuple[str, ...]
             ) -> list[tuple[str, Optional[NodeScale], NodeScale]]:
    """Ops of ``after`` in graph order, each with the ``before`` row of the same node name."""
    b = {r.name: r for r in before.ops().rows}
    return [(r.name, b.get(r.name), r) for r in after.ops().rows if r.kind not in skip_kinds]


def _label(row: NodeScale) -> str:
    op = short_op(row.op)
    return row.name if row.name.startswith(op) else f"{row.name} ({op})"


def plot_reports(before: ScaleReport, after: ScaleReport, path: Union[str, Path],
                 title: Optional[str] = None, band: float = 1.0,
                 skip_kinds: tuple[str, ...] = (Kind.PRESERVE,)) -> Path:
    """Save a two-panel plot (forward, backward) of log2 RMS per op, before vs after.

    Args:
        before / after: :func:`~.track.track_scales` reports of the original and the
            unit-scaled model; ops are matched by node name.
        path: where to write the image (format from the suffix, e.g. ``.png``).
        band: shade ``|log2 RMS| <= band``.
        skip_kinds: rule kinds left out (by default views, reshapes and getitems,
            which only repeat their input's RMS).
    """
    plt = _matplotlib()
    rows = _aligned(before, after, skip_kinds)
    if not rows:
        raise UnitScaleError("nothing to plot: the reports have no op rows", where="plot_reports",
                             fix="pass reports from track_scales on a traceable model")
    xs = list(range(len(rows)))
    names = [_label(a) for _, _, a in rows]
    fig, axes = plt.subplots(2, 1, figsize=(max(8.0, 0.22 * len(rows) + 2), 7.5), sharex=True)
    for ax, field, label in ((axes[0], "fwd_rms", "forward"), (axes[1], "grad_rms", "backward (gradient)")):
        yb = [_log2(getattr(b, field)) if b is not None else math.nan for _, b, _ in rows]
        ya = [_log2(getattr(a, field)) for _, _, a in rows]
        ax.axhspan(-band, band, color="#c8e6c9", alpha=0.6, lw=0, label=f"|log2 RMS| <= {band:g}")
        ax.axhline(0.0, color="#555555", lw=0.8)
        ax.plot(xs, yb, "o-", color="#d62728", ms=3, lw=1, label=f"before ({before.model})")
        ax.plot(xs, ya, "s-", color="#1f77b4", ms=3, lw=1, label="after unit_scale")
        ax.set_ylabel(f"log2 RMS, {label}")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    axes[1].set_xticks(xs)
    axes[1].set_xticklabels(names, rotation=90, fontsize=6)
    fig.suptitle(title or f"{after.model}: RMS of every op output, before vs after unit scaling")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
