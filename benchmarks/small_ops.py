"""What the scales' small ops cost, warm: one call of each, in a tight loop on tiny tensors.

    cd benchmarks && PYTHONPATH=../src python small_ops.py

Two tables (microseconds a call, the best of 5 loops of ``--calls`` calls, one thread):

1. Primitives the fused ops are made of, on two 8-float tensors (a batch norm's running statistics): two
   ``.data`` aliases, two ``mul`` / ``mul_`` / ``mul(out=)`` by a cached 0-dim factor, one
   ``torch._foreach_mul_`` of both by a list of two numbers, a 0-dim clone, ``fill_`` through ``.data``.
2. The fused ops against the op they wrap (forward, and forward + backward), on tensors small enough that
   the kernels cost little: what the scales' Python and small ops add to each call. A convolution with an
   input-gradient factor (every factor in a copy of the weight, ``scale._native_conv``), one with a weight
   factor only (a hook on a view of the weight), a batch norm with input and output factors, and a returned
   loss's backward-only factor (``scale.scale_returned``: a native multiply, and the Function it replaced).

Warm costs only: inside a training step the first small op after a large kernel costs more (``cold_ops.py``).
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch
import torch.nn as nn

from _common import table, write_result
from unit_scale_fx.scale import _apply_scale_copy, scale_returned, scaled_batch_norm, scaled_conv


def best_us(fn: Callable[[], object], calls: int) -> float:
    """The best of 5 loops of ``calls`` calls of ``fn`` (after 200 warm-up calls), in microseconds a call."""
    for _ in range(200):
        fn()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter_ns()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter_ns() - t0) / calls / 1000)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=3000)
    ap.add_argument("--name", default="small_ops", help="results file name (benchmarks/results/NAME.md)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    n = args.calls
    rm, rv, f = torch.zeros(8), torch.ones(8), torch.tensor(0.5)
    o1, o2 = torch.empty(8), torch.empty(8)
    prims = [
        ("two `.data` aliases", lambda: (rm.data, rv.data)),
        ("two `mul` by a 0-dim factor", lambda: (rm * f, rv * f)),
        ("two `mul_` by a 0-dim factor", lambda: (rm.mul_(f), rv.mul_(f))),
        ("two `mul(out=)` by a 0-dim factor", lambda: (torch.mul(rm, f, out=o1), torch.mul(rv, f, out=o2))),
        ("one `_foreach_mul_` of both by two numbers", lambda: torch._foreach_mul_([rm, rv], [1.0, 1.0])),
        ("0-dim `clone`", lambda: f.clone()),
        ("0-dim `.data.fill_`", lambda: f.data.fill_(0.5)),
    ]
    first = table(["primitive", "us a call"], [[k, f"{best_us(fn, n):.2f}"] for k, fn in prims])
    print(first + "\n")

    w = torch.randn(8, 8, 1, 1, requires_grad=True)
    xc = torch.randn(2, 8, 4, 4, requires_grad=True)
    copy_f = dict(weight_scale=(1.0, 0.016), x_scale=((1.0, 0.035), (1.0, 1.8)))
    hook_f = dict(weight_scale=(1.0, 0.016))
    bn = nn.BatchNorm2d(8)
    xb = torch.randn(2, 8, 2, 2, requires_grad=True)
    bn_f = dict(x_scale=(0.043, 1.0), out_scale=((0.577, 0.83), (1.01, 1.10)))
    geo = ((1, 1), (0, 0), (1, 1), 1)
    ops = [
        ("convolution, factors in a weight copy", lambda: torch.conv2d(xc, w),
         lambda: scaled_conv(xc, w, None, *geo, **copy_f)),
        ("convolution, weight factor by a hook", lambda: torch.conv2d(xc, w),
         lambda: scaled_conv(xc, w, None, *geo, **hook_f)),
        ("batch norm, input and output factors", lambda: bn(xb), lambda: scaled_batch_norm(bn, xb, **bn_f)),
        ("returned loss with a backward factor (native multiply)", lambda: xb.square().mean(),
         lambda: scale_returned(xb.square().mean(), 1.0, 51.8)),
        ("the same as an `autograd.Function` (before the seventeenth session)", lambda: xb.square().mean(),
         lambda: _apply_scale_copy(xb.square().mean(), 51.8)),
    ]
    rows = []
    for name, plain, fused in ops:
        a, b = best_us(plain, n), best_us(fused, n)
        c = best_us(lambda: plain().sum().backward(), n // 3)
        d = best_us(lambda: fused().sum().backward(), n // 3)
        rows.append([name, f"{a:.1f}", f"{b:.1f}", f"{b - a:+.1f}", f"{c:.1f}", f"{d:.1f}", f"{d - c:+.1f}"])
    second = table(["op", "plain fwd", "fused fwd", "added", "plain fwd+bwd", "fused fwd+bwd", "added"], rows)
    print(second)
    path = write_result(args.name, "The scales' small ops, warm (microseconds a call)", first + "\n\n" + second)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
