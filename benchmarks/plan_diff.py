"""Analytic against measured planning on one model family: where the plans differ, and what backward sees.

    cd benchmarks && PYTHONPATH=../src python plan_diff.py --family gpt_neo
    cd benchmarks && PYTHONPATH=../src python plan_diff.py --family hf_convnext --min-ratio 1.2 --grads 12

The family is built as ``model_families.py`` builds it (``tests/fixtures/families.py``, tiny, random init,
library defaults) and unit-scaled twice on the same batch: with analytic planning only (``measure=False``)
and with the default (measured) planning. Printed:

1. every planned node whose forward scale or one of whose backward scales differs between the two plans by
   more than ``--min-ratio`` (in graph order): rule, forward scales, backward scales per input, and a
   residual add's input weights;
2. for the first ``--grads`` backward matmul operands (aten level, as ``model_families.py`` records them, on
   another batch), the RMS under each plan. The first operand that leaves [1/2, 2] under analytic planning,
   and the nodes of (1) just above it, are where to look.

A diagnostic for the analytic rules; it writes no results file.
"""

from __future__ import annotations

import argparse
import math
import warnings

import torch

from model_families import EXTRA_FAMILIES, FAMILIES, record  # the families and the recorder of that table
from unit_scale_fx import unit_scale


def _ratio(a: float, b: float) -> float:
    """``max(a / b, b / a)`` for two positive factors (1 where either is not)."""
    if not (a and b and a > 0 and b > 0):
        return 1.0
    return math.exp(abs(math.log(a / b)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", required=True, help="a family of tests/fixtures/families.py (main or extra)")
    ap.add_argument("--min-ratio", type=float, default=1.3, help="show scales that differ by more than this")
    ap.add_argument("--grads", type=int, default=16, help="backward operands to show")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    families = {**FAMILIES, **EXTRA_FAMILIES}
    if args.family not in families:
        ap.error(f"unknown family {args.family!r}; one of: {', '.join(sorted(families))}")
    fam = families[args.family]
    torch.manual_seed(0)
    model = fam.make()
    plan_args, plan_kwargs = fam.batch(0)
    analytic = unit_scale(model, plan_args, example_kwargs=plan_kwargs, measure=False)
    measured = unit_scale(model, plan_args, example_kwargs=plan_kwargs)
    pa, pm = analytic.scale_plan(True), measured.scale_plan(True)
    print(f"{args.family}: planned nodes whose scales differ by more than x{args.min_ratio:g} "
          "(analytic / measured)")
    for name, r in pa.items():
        q = pm.get(name)
        if q is None:
            continue
        worst = max([_ratio(r.fwd, q.fwd)] + [_ratio(v, q.bwd.get(k, 0.0)) for k, v in r.bwd.items()])
        if worst <= args.min_ratio:
            continue
        bwd = ", ".join(f"{k}: {v:.3g} / {q.bwd.get(k, float('nan')):.3g}" for k, v in r.bwd.items())
        weights = ", ".join(f"{k}: {v:.3g} / {(q.weights or {}).get(k, float('nan')):.3g}"
                            for k, v in (r.weights or {}).items())
        print(f"  {name:24s} {r.rule:12s} fwd {r.fwd:.3g} / {q.fwd:.3g}   bwd {bwd}"
              + (f"   input weights {weights}" if weights else ""))
    test_args, test_kwargs = fam.batch(1)
    grads = []
    for m in (analytic, measured):
        grads.append([r for r in record(m, fam, test_args, test_kwargs) if r.phase == "bwd"])
        m.zero_grad(set_to_none=True)
    print(f"\nthe first {args.grads} backward matmul operands (gradients), RMS: analytic / measured")
    for a, b in list(zip(*grads))[:args.grads]:
        flag = "" if 0.5 <= a.rms <= 2.0 else "   <- outside [1/2, 2]"
        print(f"  {a.op:24s} {str(a.shape):20s} {a.rms:7.3f} / {b.rms:7.3f}{flag}")


if __name__ == "__main__":
    main()
