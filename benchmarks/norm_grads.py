"""Gradient RMS of every batch-norm gain and bias of issue 16's ResNets (``free_scaling.py``: the issue's width 64 and
the small width 32), unit-scaled from example inputs, on a batch the plan did not see, with the share in [1/2, 2].
The optimizer reads these; the matmul bands of ``tests/test_families.py`` do not.

    cd benchmarks && PYTHONPATH=../src python norm_grads.py [--name NAME]
"""

from __future__ import annotations

import argparse
import warnings

import torch
import torch.nn as nn

from _common import table, write_result
from free_scaling import make
from unit_scale_fx import unit_scale


def _batch(seed: int, like: tuple) -> tuple:
    g = torch.Generator().manual_seed(seed)
    x, y = like
    return torch.randn(x.shape, generator=g), torch.randint(0, 10, y.shape, generator=g)


def rows(size: str) -> list[list[str]]:
    model, batch = make("resnet", size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        us = unit_scale(model, batch)
    us(*_batch(1, batch)).backward()
    norms = {k for k, m in us.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    out = []
    for k, p in us.named_parameters():
        if k.rpartition(".")[0] in norms:
            v = float(p.grad.pow(2).mean().sqrt())
            out.append([size, k, f"{v:.3g}", "yes" if 0.5 <= v <= 2.0 else "no"])
    inside = sum(r[3] == "yes" for r in out)
    vals = [float(r[2]) for r in out]
    out.append([size, f"**all {len(out)}**", f"{min(vals):.3g} - {max(vals):.3g}", f"**{inside}/{len(out)}**"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--name", default="norm_grads")
    args = ap.parse_args()
    body = [r for size in ("issue", "small") for r in rows(size)]
    for r in body:
        print(" | ".join(r), flush=True)
    print(write_result(args.name, "Batch-norm gains and biases of issue 16's ResNets",
                       table(["size", "parameter", "gradient RMS", "in [1/2, 2]"], body)))


if __name__ == "__main__":
    main()
