"""Eager step-time ratio (unit-scaled / original) of two checkouts, in fresh processes that alternate.

One process's ratio moves by several percent with its memory layout, and this machine's speed drifts
over minutes, so two versions measured one after the other can differ by more than what changed. This
script runs ``free_scaling.py --processes 1`` of checkout A, then of checkout B, then A again, and so on
(``--pairs`` times), and prints the median over processes of each checkout's per-process ratio, and the
range.

    cd benchmarks && PYTHONPATH=../src python ab_processes.py --a <checkout A> --b <checkout B> --models resnet --pairs 20 --rounds 30
"""

from __future__ import annotations

import argparse
import os

from _common import median
from free_scaling import one_process


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", required=True, help="checkout A (a folder with src/ and benchmarks/)")
    ap.add_argument("--b", required=True, help="checkout B")
    ap.add_argument("--models", nargs="+", default=["resnet"], choices=["gpt", "mlp", "resnet"])
    ap.add_argument("--pairs", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=30)
    args = ap.parse_args()
    # the options of the eager command (``free_scaling.py --size issue --clock cpu --steps 1 --no-compile``)
    run = argparse.Namespace(rounds=args.rounds, steps=1, warmup=2, threads=1, size="issue", clock="cpu",
                             no_compile=True, control=False)

    def ratio(checkout: str, model: str) -> float:
        env = dict(os.environ, PYTHONPATH=os.path.join(checkout, "src"))
        return one_process(os.path.join(checkout, "benchmarks", "free_scaling.py"), env, run, model)["eager"][2]

    for model in args.models:
        got: dict[str, list[float]] = {"A": [], "B": []}
        for i in range(args.pairs):
            for label, checkout in (("A", args.a), ("B", args.b)):
                got[label].append(ratio(checkout, model))
            print(f"  {model}: pair {i + 1}/{args.pairs}: A {got['A'][-1]:.3f}, B {got['B'][-1]:.3f}", flush=True)
        for label, checkout in (("A", args.a), ("B", args.b)):
            v = sorted(got[label])
            print(f"{model} {label} ({checkout}): eager ratio {median(v):.3f} over {len(v)} processes "
                  f"(range {v[0]:.3f}-{v[-1]:.3f})")


if __name__ == "__main__":
    main()
