"""A spot check on torchvision classifiers that no test names, in their default configurations (10 classes,
64 x 64 images, batch 4, cross-entropy; auxiliary heads weighted 0.3 as torchvision's reference training does):
ops left unscaled, the share of weight gradients (2-D or more) and of vector gradients (biases, gains; those not
zero up to rounding) with RMS in [1/2, 2] on a batch the plan did not see, and the smallest cosine between each
parameter's gradient and the true gradient of the rewritten forward (``analysis.validity.gradient_cosines``).

    cd benchmarks && PYTHONPATH=../src python unseen_torchvision.py [--models NAME ...] [--imagenet]

``--imagenet``: at ImageNet's sizes instead (224 x 224 images, batch 8, the builders' default 1000 classes).
"""

from __future__ import annotations

import argparse
import warnings

import torch

from _unseen import WithLoss, gradient_report, image_batch, report_models
from unit_scale_fx import unit_scale

MODELS = ("shufflenet_v2_x0_5", "squeezenet1_1", "mnasnet0_5", "efficientnet_b0", "regnet_x_400mf", "mobilenet_v2",
          "googlenet", "densenet121", "swin_t", "resnext50_32x4d")


#: ``image_batch`` arguments and builder arguments: this script's default sizes, and ImageNet's
SIZES = {False: ({}, {"num_classes": 10}), True: ({"size": 224, "batch": 8, "classes": 1000}, {})}


def row(name: str, imagenet: bool = False) -> list[str]:
    import torchvision

    sizes, kwargs = SIZES[imagenet]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        us = unit_scale(WithLoss(getattr(torchvision.models, name)(**kwargs)), image_batch(0, **sizes))
    r = gradient_report(us, image_batch(1, **sizes), image_batch(2, **sizes))
    return [name, r["unscaled"], r["inside"], r["range"], r["vectors"], r["vector_range"], r["vectors_tiny"],
            r["cosine"]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), help="torchvision.models builders")
    ap.add_argument("--name", default=None, help="results file name (default: unseen_torchvision[_imagenet])")
    ap.add_argument("--imagenet", action="store_true", help="224 x 224 images, batch 8, 1000 classes")
    args = ap.parse_args()
    name = args.name or ("unseen_torchvision_imagenet" if args.imagenet else "unseen_torchvision")
    head = ["model", "left unscaled", "weight grads in [1/2, 2]", "range", "vector grads in [1/2, 2]", "range",
            "vectors below 1e-3", "min gradient cosine"]
    title = "torchvision classifiers no test names" + (", at ImageNet's sizes" if args.imagenet else "")
    report_models(args.models, lambda model: row(model, args.imagenet), head, name, title)


if __name__ == "__main__":
    main()
