"""Gradients of recurrent layers (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``) under unit scaling, with and without their
rule (``rules/recurrent.py``).

    cd benchmarks && PYTHONPATH=../src python recurrent.py
    cd benchmarks && PYTHONPATH=../src python recurrent.py --without recurrent --name recurrent_without

Each model: an embedding, a two-layer recurrent layer (PyTorch's defaults but ``batch_first``; d 128), a linear
readout and cross-entropy, on random tokens (vocabulary 256, batch 16 x 32); and a classifier that averages a
one-layer recurrent layer's outputs over time. Unit-scaled with the default
(measured) planning on batch 0; on batch 1, the RMS of every recurrent weight's and bias's gradient (1 is the
aim): the smallest, the median and the largest, and which ops were left unscaled. ``--without NAME ...`` drops
those rules from the registry first (the op is then left unscaled, as before the rule existed).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from _common import median, table, write_result
from loss_bands import drop_rules
from unit_scale_fx import unit_scale

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from fixtures.families import RecurrentLM  # noqa: E402  (test-only model builders)

CELLS = RecurrentLM.CELLS


class PooledClassifier(nn.Module):
    """One recurrent layer, a mean over time, a linear readout of 4 classes (every time step of a sequence
    gets the same gradient)."""

    def __init__(self, cell: str, vocab: int = 256, d: int = 128) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.rnn = CELLS[cell](d, d, batch_first=True)
        self.head = nn.Linear(d, 4)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h, _ = self.rnn(self.emb(x))
        return F.cross_entropy(self.head(h.mean(1)), y[:, 0] % 4)


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (16, 32), generator=g), torch.randint(0, 256, (16, 32), generator=g)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--without", nargs="*", default=[], help="rule names to drop from the registry first")
    ap.add_argument("--name", default="recurrent")
    args = ap.parse_args()
    drop_rules(args.without)
    rows = []
    variants = [(cell + (" bidirectional" if bidi else ""), lambda c=cell, b=bidi: RecurrentLM(c, 256, 128, b))
                for cell, bidi in (("lstm", False), ("gru", False), ("rnn", False), ("lstm", True))]
    variants += [(cell + ", mean over time", lambda c=cell: PooledClassifier(c)) for cell in ("lstm", "gru")]
    for name, make in variants:
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            us = unit_scale(make(), batch(0))
        us(*batch(1)).backward()
        g = sorted(float(p.grad.pow(2).mean().sqrt()) for k, p in us.named_parameters() if k.startswith("rnn."))
        inside = sum(0.5 <= v <= 2.0 for v in g)
        rows.append([name, f"{g[0]:.3g}", f"{median(g):.3g}", f"{g[-1]:.3g}",
                     f"{inside}/{len(g)}", ", ".join(sorted({u.op for u in us.us_unsupported})) or "-"])
    head = ["model", "min grad RMS", "median", "max", "in [1/2, 2]", "left unscaled"]
    note = ("Default (measured) planning on batch 0, gradients on batch 1; rules dropped: "
            + (", ".join(args.without) or "none") + ".")
    print(write_result(args.name, "Recurrent layers: gradient RMS of their weights and biases",
                       table(head, rows) + "\n\n" + note))


if __name__ == "__main__":
    main()
