"""A pretrained CNN unit-scaled with its weights kept (``init_weights=False``): do its batch norms' running
statistics fit the unit-scaled model? Evaluation-mode outputs (running statistics) against training-mode
outputs (batch statistics) on a batch the plan did not see: the relative difference of the logits and how often
their argmax agrees. "Pretrained": torchvision's ResNet-18 (random weights, 10 classes) whose running statistics
are the cumulative averages over 8 batches of 16 images 64 x 64.

Rows: the original; the unit-scaled model as ``unit_scale`` returns it (statistics carried into its units,
``running_stats.py``); the same model with the original's statistics loaded back (what it had before the carry);
and with statistics gathered again by the unit-scaled model itself on the same 8 batches (the ideal).

    cd benchmarks && PYTHONPATH=../src python running_stats.py
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import warnings
from pathlib import Path

import torch

from _common import table, write_result
from unit_scale_fx import unit_scale

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from fixtures.references import eval_vs_train, gather_statistics  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--name", default="running_stats", help="results file name")
    args = ap.parse_args()
    import torchvision

    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(16, 3, 64, 64, generator=g) for _ in range(8)]
    unseen = torch.randn(16, 3, 64, 64, generator=g)
    model = gather_statistics(torchvision.models.resnet18(num_classes=10), data)
    us = unit_scale(copy.deepcopy(model), (data[0],), init_weights=False)
    as_is = copy.deepcopy(us)
    as_is.load_state_dict({k: v for k, v in model.state_dict().items() if "running" in k}, strict=False)
    ideal = gather_statistics(copy.deepcopy(us), data)
    rows = []
    for name, m in (("original", model), ("unit-scaled, statistics carried (unit_scale now)", us),
                    ("unit-scaled, the original's statistics as they were", as_is),
                    ("unit-scaled, statistics gathered again on the 8 batches", ideal)):
        diff, agree = eval_vs_train(m, unseen)
        rows.append([name, f"{diff:.3f}", f"{agree:.0%}"])
        print(" | ".join(rows[-1]), flush=True)
    print(write_result(args.name, "Pretrained running statistics in a unit-scaled ResNet-18 (init_weights=False)",
                       table(["model", "eval vs train, relative difference", "argmax agrees"], rows)))


if __name__ == "__main__":
    main()
