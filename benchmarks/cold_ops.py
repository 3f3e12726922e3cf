"""What one small op costs inside a training step, against the same op in a warm loop.

Unit scaling's eager cost is mostly small ops (factor clones, gain and bias copies, running-statistics
copies, backward multiplies on a few hundred bytes) run between the convolutions. In a loop such an op
takes a couple of microseconds; inside a step it runs after a kernel that streamed megabytes through the
caches. This script times it there: a forward hook on every convolution and batch norm of the original
ResNet of ``free_scaling.py`` runs one small multiply (128 floats by a 0-dim factor, as the fused ops do),
then a second one, each timed with ``time.perf_counter_ns``; then the same multiply in a warm loop. One
thread; the model is built for this script alone.

    cd benchmarks && PYTHONPATH=../src python cold_ops.py --size issue
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from free_scaling import make, step_fn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=["small", "issue"], default="issue")
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    model, batch = make("resnet", args.size)
    factor, small = torch.tensor(0.5), torch.randn(128)
    clock = time.perf_counter_ns
    first: list[int] = []
    second: list[int] = []

    def hook(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        t0 = clock()
        small.mul(factor)
        t1 = clock()
        small.mul(factor)
        t2 = clock()
        first.append(t1 - t0)
        second.append(t2 - t1)

    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.BatchNorm2d)):
            m.register_forward_hook(hook)
    step = step_fn(model, model, batch)
    for _ in range(3):
        step()
    first.clear()
    second.clear()
    for _ in range(args.steps):
        step()
    warm = []
    for _ in range(2000):
        t0 = clock()
        small.mul(factor)
        warm.append(clock() - t0)
    med = statistics.median
    print(f"ResNet ({args.size}), {args.steps} steps, {len(first)} timed ops: the first small op after a convolution "
          f"or batch norm: median {med(first) / 1e3:.1f} us; the op right after it: {med(second) / 1e3:.1f} us; "
          f"the same op in a warm loop: {med(warm) / 1e3:.1f} us")


if __name__ == "__main__":
    main()
