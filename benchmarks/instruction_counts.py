"""Instructions and simulated cache misses of one eager training step, original vs unit-scaled, counted by
Valgrind's cachegrind: numbers that do not move with the machine's load or a process's memory layout.

Step times on this shared 2-core VM move by 8-14% between processes (page faults at about 4.5 us each,
other tenants, cache contention), which hides a one-percent change. Cachegrind runs the same Python
process on a simulated CPU and counts every instruction executed (``I refs``) and first-level data cache
misses (``D1``). (Its last-level misses are left out: they depend on where the allocator puts each
activation, which moves with any change to the allocations before it, so that even the difference
of two runs of the same model is not one step's count; in one such run the original's came out negative.) Each variant runs twice, with ``1`` and ``1 + steps`` training steps after the same two warm-up
steps; the difference divided by ``steps`` is one step's count, with everything before the steps
(importing torch, building and planning the model) cancelled out.

    cd benchmarks && PYTHONPATH=../src python instruction_counts.py --models resnet --steps 3

Needs ``valgrind`` on the PATH. Slow: about 50 times the run time, four processes per model, two at a
time (a ResNet at the issue's size: about 25 minutes on 2 cores). Counts are exact for a given build of
torch; the simulated caches are a model of the machine's, not its hardware counters.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

from _common import table, write_result

#: the counters read from cachegrind's summary, by the label it prints
COUNTERS = {"instructions": r"I\s+refs:\s+([\d,]+)", "D1 misses": r"D1\s+misses:\s+([\d,]+)"}


def _child(variant: str, model_name: str, size: str, steps: int) -> None:
    """The measured process: build the model (unit-scaled for ``us``), two warm-up steps, ``steps`` steps."""
    import torch

    from free_scaling import make, step_fn

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    model, batch = make(model_name, size)
    if variant == "unit-scaled":
        from unit_scale_fx import unit_scale

        model = unit_scale(model, batch)
    step = step_fn(model, model, batch)
    for _ in range(2 + steps):
        step()


def _count(variant: str, model: str, size: str, steps: int, workdir: str) -> dict[str, int]:
    out = os.path.join(workdir, f"cg.{model}.{variant}.{steps}")
    cmd = ["valgrind", "--tool=cachegrind", "--cache-sim=yes", f"--cachegrind-out-file={out}", sys.executable,
           os.path.abspath(__file__), "--child", variant, "--models", model, "--size", size, "--steps", str(steps)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    log = subprocess.run(cmd, cwd=os.path.dirname(os.path.abspath(__file__)), env=env, capture_output=True,
                         text=True, check=True).stderr
    got = {}
    for name, pattern in COUNTERS.items():
        m = re.search(pattern, log)
        if m is None:
            raise RuntimeError(f"no {name!r} in cachegrind's output:\n{log[-2000:]}")
        got[name] = int(m.group(1).replace(",", ""))
    return got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet"], choices=["gpt", "mlp", "resnet"])
    ap.add_argument("--size", choices=["small", "issue"], default="issue")
    ap.add_argument("--steps", type=int, default=3, help="steps counted (the difference of two runs)")
    ap.add_argument("--jobs", type=int, default=2, help="valgrind processes at a time")
    ap.add_argument("--name", default="instruction_counts", help="results file name (benchmarks/results/NAME.md)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args.child, args.models[0], args.size, args.steps)
        return
    if shutil.which("valgrind") is None:
        sys.exit("instruction_counts.py needs valgrind on the PATH")
    rows = []
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(args.jobs) as pool:
        for model in args.models:
            runs = {(v, n): pool.submit(_count, v, model, args.size, n, tmp)
                    for v in ("original", "unit-scaled") for n in (1, 1 + args.steps)}
            per_step = {v: {k: (runs[(v, 1 + args.steps)].result()[k] - runs[(v, 1)].result()[k]) / args.steps
                            for k in COUNTERS} for v in ("original", "unit-scaled")}
            for k in COUNTERS:
                a, b = per_step["original"][k], per_step["unit-scaled"][k]
                rows.append([model, f"{k} per step", f"{a:,.0f}", f"{b:,.0f}", f"{b / a:.4f}" if a else "n/a"])
            print(f"  {model}: done", flush=True)
    text = table(["model", "count", "original", "unit-scaled", "ratio"], rows)
    print(text)
    note = (f"Sizes: {args.size}. One eager training step (forward, backward, Adam), one thread, counted by "
            f"cachegrind as the difference of runs with 1 and {1 + args.steps} steps, divided by {args.steps}. "
            "D1: a simulated first-level data cache of this machine's size.")
    print(f"wrote {write_result(args.name, 'Instructions and simulated cache misses of one training step', text + chr(10) * 2 + note)}")


if __name__ == "__main__":
    main()
