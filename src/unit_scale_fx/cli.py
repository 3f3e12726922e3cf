"""The ``unit-scale-fx`` command line (also ``python -m unit_scale_fx``)."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

import torch

from .errors import UnitScaleError


def _demo(args: argparse.Namespace) -> int:
    from .analysis.recorder import fraction_in_band, record_matmul_operands
    from .api import unit_scale
    from .models import GPT, gpt_batch

    torch.manual_seed(args.seed)
    model = GPT(vocab=256, d=args.width, layers=args.layers, heads=4)
    idx, tgt = gpt_batch(vocab=256, batch=4, seq=64, seed=args.seed)
    us = unit_scale(model, (idx, tgt))
    print(f"built-in GPT: vocab 256, width {args.width}, {args.layers} layers, batch 4 x 64 tokens\n")
    before = record_matmul_operands(model, idx, tgt)
    after = record_matmul_operands(us, idx, tgt)
    print("RMS of every matmul operand (forward inputs and weights, backward gradients)")
    print(f"{'':12s}{'phase':>6s}{'count':>7s}{'min':>10s}{'median':>10s}{'max':>10s}{'in [1/2,2]':>12s}")
    for label, recs in (("original", before), ("unit-scaled", after)):
        for phase in ("fwd", "bwd"):
            rs = sorted(r.rms for r in recs if r.phase == phase)
            print(f"{label:12s}{phase:>6s}{len(rs):7d}{rs[0]:10.3g}{rs[len(rs) // 2]:10.3g}{rs[-1]:10.3g}"
                  f"{fraction_in_band(recs, phase=phase):12.0%}")
    print("\nscale plan (first rows):")
    print("\n".join(us.summary().splitlines()[:12]))
    print(f"\ntraining the unit-scaled model for {args.steps} Adam steps (lr {args.lr}):")
    opt = torch.optim.Adam(us.parameters(), lr=args.lr)
    for step in range(args.steps):
        loss = us(idx, tgt)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % max(1, args.steps // 5) == 0 or step == args.steps - 1:
            print(f"  step {step:3d}  loss {loss.item():.4f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unit-scale-fx", description="Automatic unit scaling of PyTorch models.")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="unit-scale the built-in GPT, compare tensor RMS, train a few steps")
    d.add_argument("--width", type=int, default=128)
    d.add_argument("--layers", type=int, default=4)
    d.add_argument("--steps", type=int, default=20)
    d.add_argument("--lr", type=float, default=1e-3)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=_demo)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except UnitScaleError as exc:
        if args.debug:
            raise
        print(f"unit-scale-fx: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
