"""The gradient's correlation across a sample's positions, predicted by planning's reverse sweep against sampled on
the original model: at the output of every module whose name ends with one of ``--suffixes``, of a torchvision
classifier (10 classes, 64 x 64 images, batch 4, as ``unseen_torchvision.py``). Channels last: the positions are the
dimensions between the batch and the last (Swin); ``--channels-first`` for (N, C, H, W). A bias sums this
correlation (``Scales.shared_grad_gain``), so where the sweep is off, biases are.

    cd benchmarks && PYTHONPATH=../src python grad_correlation.py [--model swin_t] [--suffixes norm attn] [--name NAME]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import warnings

import torch

from _common import table, write_result
from _unseen import WithLoss, image_batch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from helpers import pipeline_until  # noqa: E402  (test helper: the pipeline up to one pass)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="swin_t")
    ap.add_argument("--suffixes", nargs="+", default=["attn", "norm"])
    ap.add_argument("--channels-first", action="store_true")
    ap.add_argument("--name", default=None)
    args = ap.parse_args()
    import torchvision

    torch.manual_seed(0)
    model = WithLoss(getattr(torchvision.models, args.model)(num_classes=10))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm, ctx, _ = pipeline_until(copy.deepcopy(model), image_batch(0), "calibrate_grads")
    # the last node of each module (its output)
    last = {}
    for n in gm.graph.nodes:
        stack = n.meta.get("nn_module_stack")
        if stack:
            last[list(stack.values())[-1][0]] = n
    sampled: dict[str, float] = {}

    def hook(name: str):
        def forward_hook(mod, inputs, out):
            if isinstance(out, torch.Tensor) and out.requires_grad and out.dim() >= 3:
                def grad_hook(g: torch.Tensor) -> None:
                    cells = g.flatten(2).mean(2) if args.channels_first else g.flatten(1, -2).mean(1)
                    sampled[name] = float(cells.pow(2).mean() / g.pow(2).mean())
                out.register_hook(grad_hook)
        return forward_hook

    names = [k for k, _ in model.named_modules() if k.endswith(tuple(args.suffixes)) and k in last]
    for k in names:
        model.get_submodule(k).register_forward_hook(hook(k))
    model(*image_batch(1)).backward()
    rows = [[k, f"{sampled[k]:.3f}", f"{ctx.potentials.grad_rho.get(last[k], float('nan')):.3f}"]
            for k in names if k in sampled]
    for r in rows:
        print(" | ".join(r), flush=True)
    print(write_result(args.name or f"grad_correlation_{args.model}",
                       f"Gradient correlation across positions, sampled vs predicted: {args.model}",
                       table(["module output", "sampled", "predicted (sweep)"], rows)))


if __name__ == "__main__":
    main()
