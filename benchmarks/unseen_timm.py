"""A spot check on timm models (a library no test uses), each built by ``timm.create_model(name, num_classes=10)``
in its default configuration (random init), with a cross-entropy loss: ops left unscaled, how the model was
captured, the share of weight gradients (2-D or more) with RMS in [1/2, 2] on a batch the plan did not see,
their range, and the smallest cosine between each parameter's gradient and the true gradient of the rewritten
forward (``analysis.validity.gradient_cosines``). Parameters whose gradient is exactly zero (behind a
zero-initialised gain: timm's ``zero_init_last``; zero in the original model too) are counted apart, not in
the share. 64 x 64 images (the model's own size where it needs one), batch 4. Needs ``pip install timm``.

    cd benchmarks && PYTHONPATH=../src python unseen_timm.py [--models NAME ...]
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

from _unseen import WithLoss, gradient_report, image_batch, report_models
from unit_scale_fx import unit_scale

MODELS = ("resnet18", "efficientnet_b0", "mobilenetv3_small_050", "convnext_atto", "vit_tiny_patch16_224",
          "deit_tiny_patch16_224", "regnety_002", "mixer_s16_224", "poolformer_s12", "levit_128s",
          "mobilevit_xxs", "efficientformer_l1", "ghostnet_050", "nf_resnet26", "edgenext_xx_small",
          "fastvit_t8", "coatnet_nano_rw_224", "swin_tiny_patch4_window7_224")


def row(name: str) -> list[str]:
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10)
    size = 64
    if model.pretrained_cfg.get("fixed_input_size", False) or "224" in name or "levit" in name:
        size = model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        us = unit_scale(WithLoss(model), image_batch(0, size))
    plan_s = time.perf_counter() - t0
    r = gradient_report(us, image_batch(1, size), image_batch(2, size))
    return [name, f"{size}", getattr(us, "us_capture", "?"), r["unscaled"], r["inside"], r["range"], r["zero"],
            r["cosine"], f"{plan_s:.0f}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), help="timm model names")
    ap.add_argument("--name", default="unseen_timm", help="results file name")
    args = ap.parse_args()
    head = ["model", "image", "capture", "left unscaled", "weight grads in [1/2, 2]", "range", "zero gradients",
            "min gradient cosine", "unit_scale s"]
    report_models(args.models, row, head, args.name, "timm models no test names")


if __name__ == "__main__":
    main()
