"""RMS of every matmul operand of the built-in GPT, before and after unit_scale.

    python benchmarks/matmul_rms.py [--width 128] [--layers 4] [--out benchmarks/results/matmul_rms.md]

Operands are recorded at the aten level (mm/bmm/addmm and attention kernels) by a
TorchDispatchMode that knows nothing of our plan: forward inputs and weights, and in
backward the incoming gradients. Three rows: the original model, unit-scaled with
analytic planning only (``measure=False``, as on the meta device), and unit-scaled
with the default planning on a sample batch. All are measured on a *different* batch.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

from unit_scale_fx import unit_scale
from unit_scale_fx.analysis.recorder import record_matmul_operands
from unit_scale_fx.examples import GPT, gpt_batch


def summarise(label: str, records) -> list[str]:
    rows = []
    for phase in ("fwd", "bwd"):
        rs = sorted(r.rms for r in records if r.phase == phase)
        inband = sum(0.5 <= r <= 2 for r in rs) / len(rs)
        wide = sum(1 / 8 <= r <= 8 for r in rs) / len(rs)
        rows.append(f"| {label} | {phase} | {len(rs)} | {rs[0]:.3g} | {statistics.median(rs):.3g} | {rs[-1]:.3g} "
                    f"| {inband:.0%} | {wide:.0%} |")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "matmul_rms.md"))
    args = p.parse_args(argv)
    torch.manual_seed(0)
    results = []
    for gated, tied in ((False, False), (True, True)):
        model = GPT(vocab=256, d=args.width, layers=args.layers, heads=4, gated=gated, tied=tied)
        plan_batch = gpt_batch(256, args.batch, args.seq, seed=0)
        test_batch = gpt_batch(256, args.batch, args.seq, seed=1)
        name = f"GPT d={args.width} L={args.layers} {'gated MLP, tied' if gated else 'GELU MLP, untied'}"
        rows = summarise("original", record_matmul_operands(model, *test_batch))
        rows += summarise("unit-scaled, analytic", record_matmul_operands(
            unit_scale(model, plan_batch, measure=False), *test_batch))
        rows += summarise("unit-scaled, local cut-edge rule", record_matmul_operands(
            unit_scale(model, plan_batch, constraint="gmean"), *test_batch))
        rows += summarise("unit-scaled (default)", record_matmul_operands(
            unit_scale(model, plan_batch), *test_batch))
        results.append((name, rows))
    lines = [f"# Matmul operand RMS, before and after unit_scale\n",
             f"`python benchmarks/matmul_rms.py --width {args.width} --layers {args.layers} --seq {args.seq} "
             f"--batch {args.batch}` (torch {torch.__version__}, CPU)\n"]
    for name, rows in results:
        lines += [f"\n## {name}\n", "| model | phase | operands | min | median | max | in [1/2, 2] | in [1/8, 8] |",
                  "|---|---|---|---|---|---|---|---|", *rows]
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
