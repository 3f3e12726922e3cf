"""A spot check on Hugging Face vision classifiers no test names, in their default configurations but for their
sizes (width, depth, heads, image size: small enough for this machine), asked for their own loss
(``labels=``): ops left unscaled, how the model was captured, the share of weight gradients (2-D or more) with RMS
in [1/2, 2] on a batch the plan did not see, their range, and the smallest cosine between each parameter's
gradient and the true gradient of the rewritten forward. Parameters whose gradient is exactly zero are counted
apart. Batch 4, 10 classes.

    cd benchmarks && PYTHONPATH=../src python unseen_hf_vision.py [--models NAME ...]
"""

from __future__ import annotations

import argparse
import inspect
import time
import warnings
from typing import Any

import torch
import torch.nn.functional as F

from _unseen import gradient_report, report_models
from unit_scale_fx import unit_scale

#: model class, config class, the config's sizes (everything else is the library's default)
_VIT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32,
            patch_size=8, num_labels=10)
MODELS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "deit_distilled": ("DeiTForImageClassificationWithTeacher", "DeiTConfig", _VIT),
    "beit": ("BeitForImageClassification", "BeitConfig", _VIT),
    "data2vec_vision": ("Data2VecVisionForImageClassification", "Data2VecVisionConfig", _VIT),
    "vit_msn": ("ViTMSNForImageClassification", "ViTMSNConfig", _VIT),
    "convnextv2": ("ConvNextV2ForImageClassification", "ConvNextV2Config",
                   dict(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 2, 1], num_labels=10)),
    "swinv2": ("Swinv2ForImageClassification", "Swinv2Config",
               dict(image_size=32, patch_size=2, embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=4,
                    num_labels=10)),
    "segformer": ("SegformerForImageClassification", "SegformerConfig",
                  dict(hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1], num_attention_heads=[1, 2, 2, 4],
                       decoder_hidden_size=32, num_labels=10)),
    "poolformer": ("PoolFormerForImageClassification", "PoolFormerConfig",
                   dict(hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 2, 1], num_labels=10)),
    "levit": ("LevitForImageClassification", "LevitConfig",
              dict(image_size=64, hidden_sizes=[32, 48, 64], num_attention_heads=[2, 3, 4], depths=[1, 1, 1],
                   key_dim=[8, 8, 8], num_labels=10)),
    "mobilevitv2": ("MobileViTV2ForImageClassification", "MobileViTV2Config",
                    dict(image_size=64, width_multiplier=0.5, num_labels=10)),
}


class WithLabels(torch.nn.Module):
    """``forward(pixel_values, labels) -> loss``: the model's own loss; for a model that takes no labels (DeiT with
    its distillation token, at inference), cross entropy of its logits."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.takes_labels = "labels" in inspect.signature(model.forward).parameters

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.takes_labels:
            return self.model(pixel_values=pixel_values, labels=labels).loss
        return F.cross_entropy(self.model(pixel_values=pixel_values).logits, labels)


def _batch(seed: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 3, size, size, generator=g), torch.randint(0, 10, (4,), generator=g)


def row(name: str) -> list[str]:
    import transformers

    cls, cfg, sizes = MODELS[name]
    torch.manual_seed(0)
    config = getattr(transformers, cfg)(**sizes)
    model = WithLabels(getattr(transformers, cls)(config))
    size = int(getattr(config, "image_size", 64) or 64)
    size = size[0] if isinstance(size, (list, tuple)) else size
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        us = unit_scale(model, _batch(0, size))
    plan_s = time.perf_counter() - t0
    r = gradient_report(us, _batch(1, size), _batch(2, size))
    return [name, cls, f"{size}", getattr(us, "us_capture", "?"), r["unscaled"], r["inside"], r["range"], r["zero"],
            r["cosine"], f"{plan_s:.0f}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--name", default="unseen_hf_vision", help="results file name")
    args = ap.parse_args()
    head = ["model", "class", "image", "capture", "left unscaled", "weight grads in [1/2, 2]", "range",
            "zero gradients", "min gradient cosine", "unit_scale s"]
    report_models(args.models, row, head, args.name, "Hugging Face vision classifiers no test names")


if __name__ == "__main__":
    main()
