"""A spot check on torchvision classifiers that no test names, in their default configurations (10 classes,
64 x 64 images, batch 4, cross-entropy; auxiliary heads weighted 0.3 as torchvision's reference training does): ops left unscaled, the share of weight gradients (2-D or more) with
RMS in [1/2, 2] on a batch the plan did not see, and the smallest cosine between each parameter's gradient and
the true gradient of the rewritten forward (``analysis.validity.gradient_cosines``).

    cd benchmarks && PYTHONPATH=../src python unseen_torchvision.py
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from _common import table, write_result
from unit_scale_fx import unit_scale
from unit_scale_fx.analysis.validity import gradient_cosines

MODELS = ("shufflenet_v2_x0_5", "squeezenet1_1", "mnasnet0_5", "efficientnet_b0", "regnet_x_400mf", "mobilenet_v2",
          "googlenet", "densenet121", "swin_t", "resnext50_32x4d")


class WithLoss(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        if isinstance(out, tuple):  # GoogLeNet / Inception in training: the logits, then auxiliary heads' logits
            return F.cross_entropy(out[0], y) + 0.3 * sum(F.cross_entropy(o, y) for o in out[1:] if o is not None)
        return F.cross_entropy(out, y)


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 3, 64, 64, generator=g), torch.randint(0, 10, (4,), generator=g)


def main() -> None:
    import argparse

    import torchvision

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), help="torchvision.models builders")
    ap.add_argument("--name", default="unseen_torchvision", help="results file name")
    args = ap.parse_args()
    rows = []
    for name in args.models:
        torch.manual_seed(0)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                us = unit_scale(WithLoss(getattr(torchvision.models, name)(num_classes=10)), batch(0))
            us(*batch(1)).backward()
        except Exception as exc:  # noqa: BLE001 - a model that fails is a row of the report
            rows.append([name, f"fails: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}", "-", "-", "-"])
            continue
        g = [float(p.grad.pow(2).mean().sqrt()) for p in us.parameters() if p.grad is not None and p.dim() >= 2]
        inside = sum(0.5 <= v <= 2.0 for v in g) / len(g)
        cos = gradient_cosines(us, *batch(2))
        rows.append([name, ", ".join(sorted({u.op for u in us.us_unsupported})) or "-", f"{inside:.0%}",
                     f"{min(g):.3g} - {max(g):.3g}", f"{min(cos.values()):.5f}"])
    head = ["model", "left unscaled", "weight grads in [1/2, 2]", "range", "min gradient cosine"]
    print(write_result(args.name, "torchvision classifiers no test names", table(head, rows)))


if __name__ == "__main__":
    main()
