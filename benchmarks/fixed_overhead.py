"""The fixed cost of unit scaling in eager mode: a training step of a ResNet so small that its arithmetic
is negligible (batch 1, 8 x 8 images, width 8), original and unit-scaled, interleaved round by round on
the CPU clock (one thread). The difference is what the scales cost per step whatever the size: Python
(fused ops, gradient hooks) and small ops. Also counted: the gradient hooks (``scale._GradFactor``) one
unit-scaled step calls.

    cd benchmarks && PYTHONPATH=../src python fixed_overhead.py --rounds 300
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch

from _common import median
from free_scaling import ResNet, step_fn
from unit_scale_fx import unit_scale


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--size", type=int, default=8, help="image height and width")
    ap.add_argument("--width", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = ResNet(args.width)
    batch = (torch.randn(args.batch, 3, args.size, args.size, generator=g),
             torch.randint(0, 10, (args.batch,), generator=g))
    orig = copy.deepcopy(model)
    us = unit_scale(model, batch)
    steps = {"original": step_fn(orig, orig, batch), "unit-scaled": step_fn(us, us, batch)}
    for fn in steps.values():
        for _ in range(5):
            fn()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(args.rounds):
        for k in (list(steps) if r % 2 == 0 else list(reversed(steps))):
            t0 = time.process_time()
            steps[k]()
            times[k].append(time.process_time() - t0)
    a, b = median(times["original"]), median(times["unit-scaled"])
    factor_cls = sys.modules["unit_scale_fx.scale"]._GradFactor
    call, calls = factor_cls.__call__, [0]

    def counted(self, g):  # type: ignore[no-untyped-def]
        calls[0] += 1
        return call(self, g)

    factor_cls.__call__ = counted
    try:
        steps["unit-scaled"]()
    finally:
        factor_cls.__call__ = call
    print(f"batch {args.batch}, {args.size}x{args.size}, width {args.width}, {args.rounds} rounds: original "
          f"{a * 1e3:.3f} ms, unit-scaled {b * 1e3:.3f} ms, difference {(b - a) * 1e3:.3f} ms a step; "
          f"{calls[0]} gradient hooks a unit-scaled step")


if __name__ == "__main__":
    main()
