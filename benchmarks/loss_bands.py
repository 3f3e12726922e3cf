"""The gradient a loss sends into its prediction, and a classifier's matmul operands, with and without the
loss rules.

    cd benchmarks && PYTHONPATH=../src python loss_bands.py
    cd benchmarks && PYTHONPATH=../src python loss_bands.py --without log_softmax nll_loss   # as before those rules

For each loss (a prediction of 64 x 10 unit Gaussians or logits, its usual target), unit-scaled with analytic
and with measured planning: the RMS of the gradient that reaches the prediction on a fresh batch (1 is the
aim), and which ops were left without a rule. Then a small MNIST-style classifier (convolutions, linears,
``log_softmax``, ``nll_loss``): the share of its matmul operands, forward and backward, in [1/2, 2] and the
range of the backward ones (``MatmulRecorder``). ``--without NAME ...`` drops those rules from the registry
first (the op is then unsupported: left unscaled, as before the rule existed).
"""

from __future__ import annotations

import argparse
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from _common import table, write_result
from unit_scale_fx import unit_scale
from unit_scale_fx.analysis.recorder import fraction_in_band, record_matmul_operands
from unit_scale_fx.examples import LogSoftmaxClassifier
from unit_scale_fx.rules import registry

def _pair(g: torch.Generator) -> tuple:
    return torch.randn(64, 10, generator=g), torch.randn(64, 10, generator=g)


def _classes(g: torch.Generator) -> tuple:
    return torch.randn(64, 50, generator=g), torch.randint(0, 50, (64,), generator=g)


LOSSES = {
    "cross_entropy": (F.cross_entropy, _classes),
    "nll_loss(log_softmax)": (lambda x, t: F.nll_loss(F.log_softmax(x, dim=1), t), _classes),
    "mse_loss": (F.mse_loss, _pair),
    "mse_loss sum / 64": (lambda x, t: F.mse_loss(x, t, reduction="sum") / 64, _pair),
    "l1_loss": (F.l1_loss, _pair),
    "smooth_l1_loss": (F.smooth_l1_loss, _pair),
    "huber_loss(delta=2)": (lambda x, t: F.huber_loss(x, t, delta=2.0), _pair),
    "bce_with_logits": (F.binary_cross_entropy_with_logits,
                        lambda g: (torch.randn(64, 10, generator=g),
                                   torch.randint(0, 2, (64, 10), generator=g).float())),
    "binary_cross_entropy": (F.binary_cross_entropy,
                             lambda g: (torch.rand(64, 10, generator=g) * 0.8 + 0.1,
                                        torch.randint(0, 2, (64, 10), generator=g).float())),
    "binary_cross_entropy(sigmoid)": (lambda x, t: F.binary_cross_entropy(torch.sigmoid(x), t),
                                      lambda g: (torch.randn(64, 10, generator=g),
                                                 torch.randint(0, 2, (64, 10), generator=g).float())),
    "kl_div(batchmean)": (lambda x, t: F.kl_div(x, t, reduction="batchmean"),
                          lambda g: (torch.randn(64, 10, generator=g).log_softmax(1),
                                     torch.randn(64, 10, generator=g).softmax(1))),
}


class Loss(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.fn(x, t)


def drop_rules(names: list[str]) -> None:
    """Remove the rules named ``names`` from the registry (their ops become unsupported)."""
    for key, rule in list(registry._RULES.items()):
        if rule.name in names:
            del registry._RULES[key]


def plan(model: nn.Module, batch: tuple, measure: bool) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return unit_scale(model, batch, measure=measure)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--without", nargs="*", default=[], help="rule names to drop from the registry first")
    ap.add_argument("--name", default=None,
                    help="results file name (benchmarks/results/NAME.md); default: printed only")
    args = ap.parse_args()
    drop_rules(args.without)
    rows = []
    for name, (fn, make) in LOSSES.items():
        row = [name]
        for measure in (False, True):
            g = torch.Generator().manual_seed(0)
            us = plan(Loss(fn), make(g), measure)
            x, t = make(g)
            x.requires_grad_()
            us(x, t).backward()
            row.append(f"{float(x.grad.pow(2).mean().sqrt()):.3g}")
        row.append(", ".join(sorted({u.op.split(".")[-1] for u in us.us_unsupported})) or "-")
        rows.append(row)
    first = table(["loss", "gradient RMS, analytic", "gradient RMS, measured", "unsupported"], rows)
    print(first + "\n")
    rows = []
    for measure in (False, True):
        g = torch.Generator().manual_seed(0)
        make = lambda: (torch.randn(8, 1, 12, 12, generator=g), torch.randint(0, 10, (8,), generator=g))  # noqa: E731
        torch.manual_seed(0)
        us = plan(LogSoftmaxClassifier(), make(), measure)
        records = record_matmul_operands(us, *make())  # the returned loss is what backward starts from
        bwd = [r.rms for r in records if r.phase == "bwd"]
        rows.append(["measured" if measure else "analytic", f"{fraction_in_band(records, phase='fwd'):.0%}",
                     f"{fraction_in_band(records, phase='bwd'):.0%}", f"{min(bwd):.3g}-{max(bwd):.3g}"])
    second = table(["planning", "fwd operands in [1/2, 2]", "bwd operands in [1/2, 2]", "bwd operand RMS"], rows)
    print(second)
    if args.name:
        title = "Loss gradients and a log-softmax classifier's operands"
        path = write_result(args.name, title, first + "\n\n" + second)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
