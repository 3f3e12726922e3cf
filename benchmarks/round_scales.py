"""What rounding every scale to a power of two (``round_scales="pow2"``) costs in the bands and in training.

    python benchmarks/round_scales.py [--steps 30] [--out benchmarks/results/round_scales.md]

For each model, planned on one example batch with and without ``round_scales="pow2"``: the fraction
of matmul operands (forward, backward) with RMS in [1/2, 2], the number outside [1/8, 8] and the mean
``|log2 RMS|`` over all of them (0: every operand exactly unit), recorded
at the aten level (analysis.recorder) on a batch the plan never saw; then the loss after ``--steps``
Adam steps (lr 3e-3, same seed and batches) from the same initial weights. The plan spread across
example batches with rounding is ``python benchmarks/plan_spread.py --round-scales pow2``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))

from _common import table, write_result  # noqa: E402
from unit_scale_fx import unit_scale  # noqa: E402
from unit_scale_fx.analysis.recorder import MatmulRecorder  # noqa: E402
from unit_scale_fx.examples import GPT, ResidualMLP, gpt_batch, mlp_batch  # noqa: E402

VOCAB, SEQ, BATCH = 128, 32, 16


def _gpt(layers: int, gated: bool = False):
    return lambda: GPT(vocab=VOCAB, d=64, layers=layers, heads=4, max_len=SEQ, gated=gated)


def _tokens(s: int):
    return gpt_batch(VOCAB, BATCH, SEQ, seed=s)


#: name -> (model builder, batch of a seed, unit_scale options)
MODELS = {
    "GPT d64 2 layers": (_gpt(2), _tokens, {}),
    "GPT d64 8 layers": (_gpt(8), _tokens, {}),
    "GPT d64 8 layers, analytic (measure=False)": (_gpt(8), _tokens, {"measure": False}),
    "GPT d64 4 layers, gated MLP": (_gpt(4, gated=True), _tokens, {}),
    "GPT d64 4 layers, u-muP": (_gpt(4), _tokens, {"mup": True}),
    "ResidualMLP": (lambda: ResidualMLP(), lambda s: mlp_batch(seed=s), {}),
}


def bands(us, batch) -> tuple[float, float, int, float]:
    rec = MatmulRecorder()
    with rec:
        loss = us(*batch)
        rec.backward()
        loss.backward()
    us.zero_grad(set_to_none=True)
    frac = {ph: [r.rms for r in rec.records if r.phase == ph] for ph in ("fwd", "bwd")}
    inb = {ph: sum(0.5 <= r <= 2 for r in rs) / max(1, len(rs)) for ph, rs in frac.items()}
    spread = sum(abs(math.log2(r.rms)) for r in rec.records if r.rms > 0) / max(1, len(rec.records))
    return inb["fwd"], inb["bwd"], sum(not 0.125 <= r.rms <= 8 for r in rec.records), spread


def train(us, make_batch, steps: int) -> float:
    opt = torch.optim.Adam(us.parameters(), lr=3e-3)
    losses = []
    for i in range(steps):
        loss = us(*make_batch(100 + i))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return sum(losses[-5:]) / 5  # the mean of the last 5


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_flush_denormal(True)
    rows = []
    for name, (make, make_batch, options) in MODELS.items():
        for rounding in (None, "pow2"):
            torch.manual_seed(0)
            model = make()
            us = unit_scale(model, make_batch(0), **options, **({"round_scales": rounding} if rounding else {}))
            fwd, bwd, outside, spread = bands(us, make_batch(1))
            loss = train(us, make_batch, args.steps)
            rows.append([name, rounding or "off", f"{fwd:.2f}", f"{bwd:.2f}", str(outside), f"{spread:.3f}",
                         f"{loss:.4f}"])
            print(" | ".join(rows[-1]), flush=True)
    text = table(["model", "round_scales", "fwd in [1/2, 2]", "bwd in [1/2, 2]", "outside [1/8, 8]",
                  "mean |log2 RMS|", f"loss, mean of steps {args.steps - 4}-{args.steps}"], rows)
    print(text)
    write_result("round_scales", "Cost of round_scales='pow2'", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
