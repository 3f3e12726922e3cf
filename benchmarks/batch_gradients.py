"""How much a model's weight gradients move from one small batch to the next, original against unit-scaled: the
median over weights (2-D or more, gradient not exactly zero) of the gradient RMS on each of a few batches, over
that on the planning batch (batch 0), and the range of the unit-scaled model's weight-gradient RMS on each batch.
A spot check of why a report on one fresh batch (``unseen_timm.py``) can put a whole model outside [1/2, 2].
timm models, as ``unseen_timm.py`` builds them (needs ``pip install timm``), or ``hf:<name>``, one of
``unseen_hf_vision.py``'s Hugging Face classifiers.

    cd benchmarks && PYTHONPATH=../src python batch_gradients.py --models levit_128s hf:swinv2 --batches 4
"""

from __future__ import annotations

import argparse
import copy
import statistics
import warnings
from typing import Callable

import torch

from _common import table, write_result
from _unseen import WithLoss, image_batch
from unit_scale_fx import unit_scale


def weight_rms(model: torch.nn.Module, batch: tuple) -> dict[str, float]:
    model.zero_grad(set_to_none=True)
    model(*batch).backward()
    return {k: float(p.grad.pow(2).mean().sqrt()) for k, p in model.named_parameters()
            if p.grad is not None and p.dim() >= 2 and p.grad.any()}


def _build(name: str) -> tuple[torch.nn.Module, Callable[[int], tuple]]:
    """A timm model as ``unseen_timm.py`` builds it, or (``hf:<name>``) one of ``unseen_hf_vision.py``'s."""
    if name.startswith("hf:"):
        import transformers
        import unseen_hf_vision as hf

        cls, cfg, sizes = hf.MODELS[name[3:]]
        torch.manual_seed(0)
        config = getattr(transformers, cfg)(**sizes)
        model = hf.WithLabels(getattr(transformers, cls)(config))
        size = int(getattr(config, "image_size", 64) or 64)
        return model, lambda seed: hf._batch(seed, size)
    import timm

    torch.manual_seed(0)
    model = WithLoss(timm.create_model(name, num_classes=10))
    size = 64
    if model.model.pretrained_cfg.get("fixed_input_size", False) or "224" in name or "levit" in name:
        size = model.model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
    return model, lambda seed: image_batch(seed, size)


def rows_for(name: str, batches: int) -> list[list[str]]:
    model, batch_of = _build(name)
    original = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        us = unit_scale(model, batch_of(0))
    base = {"original": weight_rms(original, batch_of(0)), "unit-scaled": weight_rms(us, batch_of(0))}
    rows = []
    for seed in range(batches):
        cells = [name, str(seed)]
        for label, m in (("original", original), ("unit-scaled", us)):
            g = weight_rms(m, batch_of(seed))
            cells.append(f"{statistics.median(g[k] / base[label][k] for k in g if k in base[label]):.3g}")
            if label == "unit-scaled":
                cells.append(f"{min(g.values()):.3g} - {max(g.values()):.3g}")
        rows.append(cells)
        print(" | ".join(cells), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["levit_128s"])
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--name", default="batch_gradients")
    args = ap.parse_args()
    rows = [r for name in args.models for r in rows_for(name, args.batches)]
    head = ["model", "batch", "original: median / batch 0", "unit-scaled: median / batch 0", "unit-scaled range"]
    print(write_result(args.name, "Weight gradients from batch to batch", table(head, rows)))


if __name__ == "__main__":
    main()
