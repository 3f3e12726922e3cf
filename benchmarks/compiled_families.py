"""Every model family of the tests through ``torch.compile(model, backend=unit_scale_fx.backend(...))``: does it
compile and train, which ops the backend left unscaled, how many graphs dynamo made, the share of weight
gradients (2-D or more) with RMS in [1/2, 2] on a batch the plan did not see, their range, and the smallest
cosine between a parameter's gradient and the true gradient of the rewritten forward.

The bands come from the backend with its default inner compiler for eager runs (``inner="eager"``: the fused
ops). The cosines compare two backends that both hand dynamo the graph with its ``scale`` nodes (so both draw
the same dropout masks): one as planned, one with every backward scale set to its forward scale (autograd's
gradient of the same function). A parameter whose two gradients both vanish (below ``VANISHING`` of the
largest of its own run, as a key bias's does: a softmax does not see it) counts as 1, as ``gradient_cosines``
counts it.

    cd benchmarks && PYTHONPATH=../src python compiled_families.py [--families NAME ...]
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.fx as fx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from _common import table, write_result  # noqa: E402
from fixtures.families import EXTRA_FAMILIES, FAMILIES, missing  # noqa: E402
from fixtures.references import true_gradient_inner  # noqa: E402
from unit_scale_fx import backend  # noqa: E402
from unit_scale_fx.analysis.validity import VANISHING  # noqa: E402


def _as_planned(gm: fx.GraphModule, example_inputs: list) -> Any:
    return gm.forward


def _step(fam: Any, be: Any, model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    args, kwargs = fam.batch(seed)
    torch.manual_seed(100 + seed)  # the same dropout masks in every variant
    np.random.seed(100 + seed)  # and the same numpy masks (Wav2Vec2's SpecAugment draws its spans with numpy)
    fam.loss(torch.compile(model, backend=be)(*args, **kwargs)).backward()
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def _trained(fam: Any, ref: torch.nn.Module, be: Any) -> dict[str, torch.Tensor]:
    """Plan on batch 0, then the gradients of batch 1."""
    torch._dynamo.reset()
    model = copy.deepcopy(ref)
    _step(fam, be, model, 0)
    model.zero_grad()
    return _step(fam, be, model, 1)


def row(name: str) -> list[str]:
    fam = {**FAMILIES, **EXTRA_FAMILIES}[name]
    why = missing(fam.needs)
    if why:
        return [name, f"skipped: {why}"] + ["-"] * 5
    t0 = time.perf_counter()
    torch.manual_seed(0)
    ref = fam.make()
    be = backend(inner="eager")
    grads = _trained(fam, ref, be)
    planned = _trained(fam, ref, backend(inner=_as_planned))
    true = _trained(fam, ref, backend(inner=true_gradient_inner))
    # each run's own largest gradient: the planned gradients are the true ones times a factor per parameter
    top_a = max(float(g.norm()) for g in planned.values())
    top_b = max(float(g.norm()) for g in true.values())
    cos = []
    for k, b in true.items():
        a, b = planned[k].flatten().double(), b.flatten().double()
        if float(a.norm()) < VANISHING * top_a and float(b.norm()) < VANISHING * top_b:
            cos.append(1.0)
        elif a.norm() > 0 and b.norm() > 0:
            cos.append(float(a @ b / (a.norm() * b.norm())))
        else:
            cos.append(0.0)
    w = [float(g.pow(2).mean().sqrt()) for g in grads.values() if g.dim() >= 2 and g.any()]
    unscaled = sorted({u.op for g in be.graphs for u in g.unsupported})
    return [name, str(len(be.graphs)), ", ".join(unscaled) or "-",
            f"{sum(0.5 <= v <= 2.0 for v in w) / len(w):.0%}", f"{min(w):.3g} - {max(w):.3g}", f"{min(cos):.5f}",
            f"{time.perf_counter() - t0:.0f}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    names = list(FAMILIES) + list(EXTRA_FAMILIES)
    ap.add_argument("--families", nargs="+", default=names, choices=names)
    ap.add_argument("--name", default="compiled_families", help="results file name")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    head = ["family", "graphs", "left unscaled", "weight grads in [1/2, 2]", "range", "min gradient cosine", "s"]
    rows = []
    for name in args.families:
        try:
            rows.append(row(name))
        except Exception as exc:  # noqa: BLE001 - a family that fails is a row of the report
            rows.append([name, f"fails: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"] + ["-"] * 5)
        print(" | ".join(rows[-1]), flush=True)
    print(write_result(args.name, "The test families through torch.compile with the unit_scale backend",
                       table(head, rows)))


if __name__ == "__main__":
    main()
