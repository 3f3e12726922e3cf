"""What ``unseen_torchvision.py`` and ``unseen_timm.py`` share: a classifier trained with cross entropy, the
weight-gradient report of a unit-scaled model, and the loop that turns a model that fails into a row."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from _common import table, write_result
from unit_scale_fx.analysis.validity import gradient_cosines


class WithLoss(torch.nn.Module):
    """``forward(images, labels) -> loss``. A model that also returns auxiliary heads' logits in training
    (GoogLeNet, Inception) gets them weighted 0.3, as torchvision's reference training does."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        if isinstance(out, tuple):
            return F.cross_entropy(out[0], y) + 0.3 * sum(F.cross_entropy(o, y) for o in out[1:] if o is not None)
        return F.cross_entropy(out, y)


def image_batch(seed: int, size: int = 64, batch: int = 4, classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=g), torch.randint(0, classes, (batch,), generator=g)


def gradient_report(us: torch.nn.Module, fresh: tuple, check: tuple) -> dict[str, str]:
    """One training step of ``us`` on ``fresh`` (a batch the plan did not see): the share of weight gradients
    (2-D or more) with RMS in [1/2, 2] and their range, leaving out parameters whose gradient is exactly zero
    (behind a zero-initialised gain, as in the original model; counted apart), and the smallest cosine of a
    parameter's gradient to the true gradient of the rewritten forward on ``check``."""
    us(*fresh).backward()
    zero = {k for k, p in us.named_parameters() if p.grad is not None and not p.grad.any()}
    g = [float(p.grad.pow(2).mean().sqrt()) for k, p in us.named_parameters()
         if p.grad is not None and p.dim() >= 2 and k not in zero]
    # vectors (biases, gains), as param_grads.py counts them: those whose gradient is not zero up to rounding
    vec = [v for v in (float(p.grad.double().pow(2).mean().sqrt()) for p in us.parameters()
                       if p.grad is not None and p.dim() < 2) if v > 1e-6]
    cos = gradient_cosines(us, *check)
    return {"unscaled": ", ".join(sorted({u.op for u in us.us_unsupported})) or "-",
            "inside": f"{sum(0.5 <= v <= 2.0 for v in g) / len(g):.0%}", "range": f"{min(g):.3g} - {max(g):.3g}",
            "vectors": f"{sum(0.5 <= v <= 2.0 for v in vec) / len(vec):.0%}" if vec else "-",
            "vector_range": f"{min(vec):.3g} - {max(vec):.3g}" if vec else "-",
            # outside the band for having a true gradient of about zero (a gain the next batch norm divides out)
            "vectors_tiny": str(sum(v < 1e-3 for v in vec)),
            "zero": str(len(zero)), "cosine": f"{min(cos.values()):.5f}"}


def report_models(models: list[str], row: Callable[[str], list[str]], head: list[str], name: str,
                  title: str) -> None:
    """``row(model)`` for each model (a model that raises is a row saying how), printed as it goes, then the
    table written to ``results/<name>.md``."""
    rows = []
    for model in models:
        try:
            rows.append(row(model))
        except Exception as exc:  # noqa: BLE001 - a model that fails is a row of the report
            rows.append([model, f"fails: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"]
                        + ["-"] * (len(head) - 2))
        print(" | ".join(rows[-1]), flush=True)
    print(write_result(name, title, table(head, rows)))
