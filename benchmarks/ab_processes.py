"""Eager step-time ratio (unit-scaled / original) of two checkouts, in fresh processes that alternate.

One process's ratio moves by several percent with its memory layout, and this machine's speed drifts
over minutes, so two versions measured one after the other can differ by more than what changed. This
script runs ``free_scaling.py --processes 1`` of checkout A, then of checkout B, then A again, and so on
(``--pairs`` times), and prints the median over processes of each checkout's per-process ratio, and the
range.

    cd benchmarks && python ab_processes.py --a <checkout A> --b <checkout B> --models resnet --pairs 20 --rounds 30
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from _common import median


def ratio(checkout: str, model: str, rounds: int) -> float:
    """One fresh process of ``checkout``'s ``free_scaling.py``: its median eager ratio."""
    bench = os.path.join(checkout, "benchmarks")
    env = dict(os.environ, PYTHONPATH=os.path.join(checkout, "src"))
    cmd = [sys.executable, "free_scaling.py", "--size", "issue", "--clock", "cpu", "--steps", "1", "--no-compile",
           "--models", model, "--processes", "1", "--rounds", str(rounds), "--warmup", "2", "--rows-only"]
    out = subprocess.run(cmd, cwd=bench, env=env, check=True, capture_output=True, text=True).stdout
    rows = [json.loads(line[4:]) for line in out.splitlines() if line.startswith("ROW ")]
    return float(rows[0][3])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", required=True, help="checkout A (a folder with src/ and benchmarks/)")
    ap.add_argument("--b", required=True, help="checkout B")
    ap.add_argument("--models", nargs="+", default=["resnet"], choices=["gpt", "mlp", "resnet"])
    ap.add_argument("--pairs", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=30)
    args = ap.parse_args()
    for model in args.models:
        got: dict[str, list[float]] = {"A": [], "B": []}
        for i in range(args.pairs):
            for label, checkout in (("A", args.a), ("B", args.b)):
                got[label].append(ratio(checkout, model, args.rounds))
            print(f"  {model}: pair {i + 1}/{args.pairs}: A {got['A'][-1]:.3f}, B {got['B'][-1]:.3f}", flush=True)
        for label, checkout in (("A", args.a), ("B", args.b)):
            v = sorted(got[label])
            print(f"{model} {label} ({checkout}): eager ratio {median(v):.3f} over {len(v)} processes "
                  f"(range {v[0]:.3f}-{v[-1]:.3f})")


if __name__ == "__main__":
    main()
