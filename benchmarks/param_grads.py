"""Parameter gradients of the model families (``tests/fixtures/families.py``), unit-scaled with example inputs, on a
batch the plan did not see: the share of weight gradients (2-D or more) and of vector gradients (biases, gains)
with RMS in [1/2, 2], and the vectors furthest from 1. Parameters whose true gradient is zero up to rounding (a
key projection's bias: softmax ignores what every key adds alike) are left out. The family tests check matmul
operands; this checks what the optimizer reads.

    cd benchmarks && PYTHONPATH=../src python param_grads.py [--families bert,whisper,...] [--name NAME]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import warnings

import torch

from _common import table, write_result
from unit_scale_fx import unit_scale

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from fixtures.families import EXTRA_FAMILIES, FAMILIES  # noqa: E402  (test-only model builders)

DEFAULT = ("bert", "bart", "gpt2", "llama", "vit", "albert", "electra", "mobilebert", "deberta_v2", "whisper",
           "siglip", "clip", "swin", "hf_convnext", "t5", "modernbert")


def row(name: str) -> list[str]:
    fam = {**FAMILIES, **EXTRA_FAMILIES}[name]
    torch.manual_seed(0)
    model = fam.make()
    args, kwargs = fam.batch(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        us = unit_scale(model, tuple(args), example_kwargs=kwargs or None)
    args, kwargs = fam.batch(1)
    fam.loss(us(*args, **kwargs)).backward()
    grads = {k: (p.dim(), float(p.grad.double().pow(2).mean().sqrt())) for k, p in us.named_parameters()
             if p.grad is not None}
    grads = {k: v for k, v in grads.items() if v[1] > 1e-6}
    mats = [g for d, g in grads.values() if d >= 2]
    vecs = {k: g for k, (d, g) in grads.items() if d < 2}
    worst = sorted(vecs.items(), key=lambda kv: -abs(math.log(kv[1])))[:3]
    share = lambda gs: f"{sum(0.5 <= g <= 2 for g in gs) / len(gs):.0%}" if gs else "-"  # noqa: E731
    return [name, share(mats), share(list(vecs.values())), ", ".join(f"{k} {g:.3g}" for k, g in worst)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", default=",".join(DEFAULT))
    ap.add_argument("--name", default="param_grads")
    args = ap.parse_args()
    rows = []
    for name in args.families.split(","):
        try:
            rows.append(row(name))
        except Exception as exc:  # noqa: BLE001 - a family that fails is a row of the report
            rows.append([name, f"fails: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}", "-", "-"])
        print(" | ".join(rows[-1]), flush=True)
    head = ["family", "weights in [1/2, 2]", "vectors in [1/2, 2]", "vectors furthest from 1"]
    print(write_result(args.name, "Parameter gradients of the model families", table(head, rows)))


if __name__ == "__main__":
    main()
