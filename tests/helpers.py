"""Shared test helpers: measurement that does not rely on the plan's own bookkeeping."""

from __future__ import annotations

import torch

from unit_scale_fx.analysis.recorder import MatmulOperand, record_matmul_operands  # noqa: F401
from unit_scale_fx.analysis.validity import gradient_cosines, true_gradient_copy  # noqa: F401


def rms(t: torch.Tensor) -> float:
    return float(t.detach().float().pow(2).mean().sqrt())


def band_fractions(records: list[MatmulOperand], lo: float = 0.5, hi: float = 2.0) -> dict[str, float]:
    out = {}
    for phase in ("fwd", "bwd"):
        rs = [r.rms for r in records if r.phase == phase]
        out[phase] = sum(lo <= r <= hi for r in rs) / max(1, len(rs))
    return out
