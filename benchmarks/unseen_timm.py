"""A spot check on timm models (a library no test uses), each built by ``timm.create_model(name, num_classes=10)``
in its default configuration (random init), with a cross-entropy loss: ops left unscaled, how the model was
captured, the share of weight gradients (2-D or more) with RMS in [1/2, 2] on a batch the plan did not see,
their range, and the smallest cosine between each parameter's gradient and the true gradient of the rewritten
forward (``analysis.validity.gradient_cosines``). Parameters whose gradient is exactly zero (behind a
zero-initialised gain: timm's ``zero_init_last``; zero in the original model too) are counted apart, not in
the share.
64 x 64 images (the model's own size where it needs one),
batch 4. Needs ``pip install timm``.

    cd benchmarks && PYTHONPATH=../src python unseen_timm.py [--models NAME ...]
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
import torch.nn.functional as F

from _common import table, write_result
from unit_scale_fx import unit_scale
from unit_scale_fx.analysis.validity import gradient_cosines

MODELS = ("resnet18", "efficientnet_b0", "mobilenetv3_small_050", "convnext_atto", "vit_tiny_patch16_224",
          "deit_tiny_patch16_224", "regnety_002", "mixer_s16_224", "poolformer_s12", "levit_128s",
          "mobilevit_xxs", "efficientformer_l1", "ghostnet_050", "nf_resnet26", "edgenext_xx_small",
          "fastvit_t8", "coatnet_nano_rw_224", "swin_tiny_patch4_window7_224")


class WithLoss(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.model(x), y)


def batch(seed: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 3, size, size, generator=g), torch.randint(0, 10, (4,), generator=g)


def one(name: str) -> list[str]:
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10)
    size = 64
    fixed = model.pretrained_cfg.get("fixed_input_size", False) or "224" in name or "levit" in name
    if fixed:
        size = model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        us = unit_scale(WithLoss(model), batch(0, size))
    plan_s = time.perf_counter() - t0
    us(*batch(1, size)).backward()
    # exactly zero: behind a zero-initialised gain (timm's zero_init_last), which no scale makes unit
    zero = {k for k, p in us.named_parameters() if p.grad is not None and not p.grad.any()}
    g = [float(p.grad.pow(2).mean().sqrt()) for k, p in us.named_parameters()
         if p.grad is not None and p.dim() >= 2 and k not in zero]
    inside = sum(0.5 <= v <= 2.0 for v in g) / len(g)
    cos = gradient_cosines(us, *batch(2, size))
    return [name, f"{size}", getattr(us, "us_capture", "?"), ", ".join(sorted({u.op for u in us.us_unsupported})) or "-",
            f"{inside:.0%}", f"{min(g):.3g} - {max(g):.3g}", str(len(zero)), f"{min(cos.values()):.5f}",
            f"{plan_s:.0f}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), help="timm model names")
    ap.add_argument("--name", default="unseen_timm", help="results file name")
    args = ap.parse_args()
    rows = []
    for name in args.models:
        try:
            rows.append(one(name))
        except Exception as exc:  # noqa: BLE001 - a model that fails is a row of the report
            rows.append([name, "-", "-", f"fails: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}",
                         "-", "-", "-", "-", "-"])
        print(" | ".join(rows[-1]), flush=True)
    head = ["model", "image", "capture", "left unscaled", "weight grads in [1/2, 2]", "range",
            "zero gradients", "min gradient cosine", "unit_scale s"]
    print(write_result(args.name, "timm models no test names", table(head, rows)))


if __name__ == "__main__":
    main()
