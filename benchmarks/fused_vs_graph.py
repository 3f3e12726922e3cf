"""On torchvision models in their default configuration: the unit-scaled model with every scale at 1 against
the original (``assert_equivalent``), its gradients' validity (``assert_valid_gradients``), how many inputs its
generated code scales in place (``x_in_place``), and, in float64, the fused code against the graph run op by
op (every scale a separate multiply): the largest difference of a parameter's gradient, over the model's
largest gradient.

    cd benchmarks && PYTHONPATH=../src python fused_vs_graph.py --models efficientnet_b0 mobilenet_v3_small convnext_tiny

Needs torchvision.
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch.fx.graph import CodeGen

from unit_scale_fx import unit_scale
from unit_scale_fx.analysis.equivalence import assert_equivalent
from unit_scale_fx.analysis.validity import assert_valid_gradients


def fused_vs_graph(us: torch.fx.GraphModule, x: torch.Tensor) -> float:
    """The largest gradient difference between ``us`` and its graph run op by op, float64, same RNG state,
    over the largest gradient."""
    us = copy.deepcopy(us).double()
    plain = copy.deepcopy(us)
    plain.graph.set_codegen(CodeGen())
    plain.recompile()
    x = x.double()
    for m in (us, plain):
        torch.manual_seed(1)
        m(x).pow(2).mean().backward()
    ref = dict(plain.named_parameters())
    largest = max(float(p.grad.abs().max()) for p in plain.parameters() if p.grad is not None)
    return max(float((p.grad - ref[k].grad).abs().max()) for k, p in us.named_parameters()
               if p.grad is not None) / largest


def main() -> None:
    import torchvision

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["efficientnet_b0", "mobilenet_v3_small", "convnext_tiny"])
    ap.add_argument("--size", type=int, default=64)
    args = ap.parse_args()
    torch.manual_seed(0)
    for name in args.models:
        model = getattr(torchvision.models, name)(num_classes=10)
        x = torch.randn(4, 3, args.size, args.size)
        us = unit_scale(model, (x,))
        report = assert_equivalent(model, us, x)
        assert_valid_gradients(us, x)
        print(f"{name}: x_in_place {us.code.count('x_in_place = True')}; scales at 1: {report}; valid gradients; "
              f"fused code vs graph (float64): {fused_vs_graph(us, x):.1e} of the largest gradient", flush=True)


if __name__ == "__main__":
    main()
