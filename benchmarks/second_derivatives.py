"""Why a unit-scaled model refuses ``create_graph=True``: the fused ops' second derivatives against the chain of
scales they stand for (float64). The native convolution and batch norm set backward factors through what autograd
saved (``scale._set_saved``), so differentiating their backward again reads other values than the chain's.

    cd benchmarks && PYTHONPATH=../src python second_derivatives.py
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from unit_scale_fx.scale import scale, scaled_batch_norm, scaled_conv


def second(f: Callable[[], torch.Tensor], x: torch.Tensor, p: torch.Tensor, power: int) -> torch.Tensor:
    """d/dp of sum((d/dx sum(f()**power))**2)."""
    gx, = torch.autograd.grad(f().pow(power).sum(), x, create_graph=True)
    return torch.autograd.grad(gx.square().sum(), p)[0]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 4, 8, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    chain = second(lambda: scale(F.conv2d(scale(x, 1.0, 0.3), scale(w, 1.0, 0.7), None, 1, 1), 1.0, 1.0), x, w, 2)
    fused = second(lambda: scaled_conv(x, w, None, 1, 1, x_scale=(1.0, 0.3), weight_scale=(1.0, 0.7)), x, w, 2)
    print(f"convolution (factors in a weight copy): largest difference {rel(fused, chain):.3g} "
          "of the chain's largest")
    bn = nn.BatchNorm2d(4).double()
    chain = second(lambda: scale(bn(scale(x, 0.5, 1.0)), 1.5, 0.6), x, bn.weight, 3)
    fused = second(lambda: scaled_batch_norm(bn, x, x_scale=(0.5, 1.0), out_scale=(1.5, 0.6)), x, bn.weight, 3)
    print(f"batch norm (native, factors in the gain): largest difference {rel(fused, chain):.3g} "
          "of the chain's largest")


if __name__ == "__main__":
    main()
