"""What a Python ``autograd.Function`` costs at a model's size: the ResNet of ``free_scaling.py`` (issue
size) with its convolutions run through a trivial Function (forward ``conv2d``, backward
``convolution_backward``, no scale factors), against the same model with PyTorch's own convolutions.

    cd benchmarks && PYTHONPATH=../src python function_overhead.py --rounds 150

Interleaved rounds, one training step each (CPU clock, one thread); prints the median per-round ratio.
Why the fused ops of a unit-scaled model run as native autograd ops where they can
(``unit_scale_fx.scale``): the Functions alone cost this much.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn as nn

from free_scaling import make, step_fn


class _ConvFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, stride, padding):  # type: ignore[override]
        ctx.save_for_backward(x, w)
        ctx.geometry = (list(stride), list(padding))
        return torch.conv2d(x, w, None, stride, padding)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        x, w = ctx.saved_tensors
        stride, padding = ctx.geometry
        dx, dw, _ = torch.ops.aten.convolution_backward(g, x, w, None, stride, padding, [1, 1], False, [0, 0], 1,
                                                        [ctx.needs_input_grad[0], True, False])
        return dx, dw, None, None


class _FunctionConv(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return _ConvFn.apply(x, self.weight, self.stride, self.padding)


def _swap(m: nn.Module) -> nn.Module:
    for name, c in m.named_children():
        if type(c) is nn.Conv2d and c.bias is None and c.groups == 1 and c.dilation == (1, 1):
            new = _FunctionConv(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding, bias=False)
            new.weight = c.weight
            setattr(m, name, new)
        else:
            _swap(c)
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=150)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    model, batch = make("resnet", "issue")
    plain = copy.deepcopy(model)
    wrapped = _swap(copy.deepcopy(model))
    n = sum(isinstance(m, _FunctionConv) for m in wrapped.modules())
    steps = {"plain": step_fn(plain, plain, batch), "function": step_fn(wrapped, wrapped, batch)}
    for fn in steps.values():
        for _ in range(3):
            fn()
    ratios = []
    for r in range(args.rounds):
        t = {}
        for k in (("plain", "function") if r % 2 == 0 else ("function", "plain")):
            t0 = time.process_time()
            steps[k]()
            t[k] = time.process_time() - t0
        ratios.append(t["function"] / t["plain"])
    print(f"ResNet (issue size), {n} convolutions through a Python autograd.Function: step time "
          f"{statistics.median(ratios):.4f}x PyTorch's convolutions (median of {args.rounds} rounds)")


if __name__ == "__main__":
    main()
