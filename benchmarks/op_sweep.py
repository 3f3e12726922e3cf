"""Common layers outside the transformer and ResNet families, one at a time: which are left unscaled, and the RMS
of the output, the input's gradient and every parameter's gradient on a fresh batch (1 is the aim), under
analytic and measured planning.

    cd benchmarks && PYTHONPATH=../src python op_sweep.py

Each case is a small module reading a unit Gaussian input; the loss is a unit Gaussian cotangent on its output.
A parameter that is a single number (a PReLU's one slope) has a gradient of one value: its RMS is that value's
size, noise by nature. The table is what the "left unscaled" column of a user's report would show for these
layers, and how close to unit they come where a rule exists.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from _common import table, write_result
from unit_scale_fx import unit_scale


class Fn(nn.Module):
    def __init__(self, fn, **mods: nn.Module) -> None:
        super().__init__()
        self.fn = fn
        self.mods = nn.ModuleDict(mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.mods, x)


def x4() -> torch.Tensor:
    return torch.randn(4, 8, 12, 12)


def x3() -> torch.Tensor:
    return torch.randn(4, 10, 32)


CASES = {
    "ConvTranspose2d(8, 8, 4, stride 2, padding 1)": (lambda: nn.ConvTranspose2d(8, 8, 4, stride=2, padding=1), x4),
    "ConvTranspose1d(10, 16, 3)": (lambda: nn.ConvTranspose1d(10, 16, 3), x3),
    "InstanceNorm2d(8, affine)": (lambda: nn.Sequential(nn.Conv2d(8, 8, 3, padding=1),
                                                        nn.InstanceNorm2d(8, affine=True)), x4),
    "GroupNorm(2, 8)": (lambda: nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.GroupNorm(2, 8)), x4),
    "PReLU(8)": (lambda: nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.PReLU(8)), x4),
    "interpolate(bilinear, x2)": (lambda: Fn(lambda m, x: F.interpolate(x, scale_factor=2, mode="bilinear")), x4),
    "pixel_shuffle(2)": (lambda: Fn(lambda m, x: F.pixel_shuffle(x, 2)), x4),
    "MultiheadAttention(32, 4)": (lambda: Fn(lambda m, x: m["a"](x, x, x)[0],
                                             a=nn.MultiheadAttention(32, 4, batch_first=True)), x3),
    "TransformerEncoderLayer(32, 4)": (lambda: nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), x3),
    "Bilinear(32, 32, 16)": (lambda: Fn(lambda m, x: m["b"](x, x), b=nn.Bilinear(32, 32, 16)), x3),
    "EmbeddingBag(10, 8)": (lambda: Fn(lambda m, x: m["e"](x.abs().long() % 10), e=nn.EmbeddingBag(10, 8)),
                            lambda: torch.randn(4, 5)),
    "grid_sample": (lambda: Fn(lambda m, x: F.grid_sample(x, torch.zeros(4, 5, 5, 2), align_corners=False)), x4),
}


def run(make, inputs, measure: bool) -> list[str]:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        us = unit_scale(make(), (inputs(),), measure=measure)
    x = inputs()
    if x.is_floating_point():
        x.requires_grad_()
    out = us(x)
    out.backward(torch.randn_like(out))
    r = lambda t: f"{float(t.double().pow(2).mean().sqrt()):.3g}" if t is not None else "-"  # noqa: E731
    grads = ", ".join(f"{k} {r(p.grad)}" for k, p in us.named_parameters())
    unscaled = ", ".join(sorted({u.op for u in us.us_unsupported})) or "-"
    return [r(out), r(x.grad) if x.is_floating_point() else "-", grads or "-", unscaled]


def main() -> None:
    rows = []
    for name, (make, inputs) in CASES.items():
        for measure in (False, True):
            try:
                rows.append([name, "measured" if measure else "analytic"] + run(make, inputs, measure))
            except Exception as exc:  # noqa: BLE001 - a report of what fails, not a test
                rows.append([name, "measured" if measure else "analytic", "error", "", "", type(exc).__name__])
    head = ["layer", "planning", "output RMS", "input grad RMS", "parameter grad RMS", "left unscaled"]
    print(write_result("op_sweep", "Common layers: left unscaled, and how close to unit", table(head, rows)))


if __name__ == "__main__":
    main()
