"""Where the unit-scaled ResNet's extra step time goes, op by op (PyTorch's profiler, self CPU time).

    cd benchmarks && PYTHONPATH=../src python op_split.py
    cd benchmarks && PYTHONPATH=../src python op_split.py --no-faults --name op_split_no_faults

One process, one thread, issue 16's ResNet (``free_scaling.py --size issue``) and its unit-scaled copy,
each taking ``free_scaling.step_fn``'s training step (``zero_grad``, forward, backward, Adam). After
warm-up, ``--rounds`` rounds alternate which model goes first; in each round each model runs ``--steps``
steps under ``torch.profiler``. The table gives each op's (or autograd node's) calls and self CPU time
per step, averaged over all profiled steps, for both models, sorted by the difference. Self times add
up to the time inside ops; Python between them (the generated code, the fused ops' own Python) is not
in any row.

``--no-faults`` runs the same in a child process with glibc's heap trimming and mmap thresholds raised
(``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TOP_PAD_``), so that freed memory is
kept and the next step touches no new pages (``time_split.py --no-faults`` does the same). A large
kernel that runs slower only with glibc's defaults pays for page faults on fresh output memory.

The profiler adds its own cost to every op; read the differences, not the totals, and only those that
keep their sign from run to run.
"""

from __future__ import annotations

import argparse
import collections
import copy
import os
import subprocess
import sys

import torch

from _common import table, write_result
from free_scaling import make, step_fn

#: glibc's allocator keeps what is freed (no trimming, no mmap for large blocks): no page faults per step
NO_FAULTS = {"MALLOC_TRIM_THRESHOLD_": "4000000000", "MALLOC_MMAP_THRESHOLD_": "4000000000",
             "MALLOC_TOP_PAD_": "268435456"}


def profile_steps(steps: dict, rounds: int, per_round: int) -> dict[str, dict[str, tuple[float, float]]]:
    """``{model: {op: (calls a step, self CPU microseconds a step)}}`` over ``rounds`` alternating rounds."""
    from torch.profiler import ProfilerActivity, profile

    total = rounds * per_round
    us: dict[str, collections.Counter] = {k: collections.Counter() for k in steps}
    calls: dict[str, collections.Counter] = {k: collections.Counter() for k in steps}
    order = list(steps.items())
    for r in range(rounds):
        for name, fn in (order if r % 2 else order[::-1]):
            with profile(activities=[ProfilerActivity.CPU]) as p:
                for _ in range(per_round):
                    fn()
            for e in p.key_averages():
                us[name][e.key] += e.self_cpu_time_total / total
                calls[name][e.key] += e.count / total
    return {k: {op: (calls[k][op], us[k][op]) for op in us[k]} for k in steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="issue", choices=["small", "issue"])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=3, help="profiled steps per model per round")
    ap.add_argument("--top", type=int, default=25, help="rows with the largest differences (and the 8 smallest)")
    ap.add_argument("--no-faults", action="store_true", help="glibc keeps freed memory (see the module docstring)")
    ap.add_argument("--name", default="op_split", help="results file name (benchmarks/results/NAME.md)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.no_faults and not args.child:  # glibc reads these at start-up: a fresh process
        env = dict(os.environ, **NO_FAULTS)
        sys.exit(subprocess.call([sys.executable, __file__, *sys.argv[1:], "--child"], env=env))
    sys.argv = [a for a in sys.argv if a != "--child"]  # the command the results file names
    from unit_scale_fx import unit_scale

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    model, batch = make("resnet", args.size)
    original = copy.deepcopy(model)
    us = unit_scale(model, batch)
    steps = {"original": step_fn(original, original, batch), "unit-scaled": step_fn(us, us, batch)}
    for _ in range(3):
        for fn in steps.values():
            fn()
    got = profile_steps(steps, args.rounds, args.steps)
    a, b = got["original"], got["unit-scaled"]
    rows = sorted(((b.get(k, (0, 0))[1] - a.get(k, (0, 0))[1], k) for k in set(a) | set(b)), reverse=True)
    shown = rows[:args.top] + [("...", "...")] + rows[-8:]
    body = []
    for d, k in shown:
        if k == "...":
            body.append(["...", "", "", "", "", ""])
            continue
        (ca, ta), (cb, tb) = a.get(k, (0, 0)), b.get(k, (0, 0))
        body.append([k[:60], f"{ca:.0f}", f"{cb:.0f}", f"{ta:.1f}", f"{tb:.1f}", f"{d:+.1f}"])
    ta, tb = sum(t for _, t in a.values()), sum(t for _, t in b.values())
    body.append(["**all ops**", "", "", f"{ta:.1f}", f"{tb:.1f}", f"{tb - ta:+.1f} ({tb / ta - 1:+.1%})"])
    text = table(["op or autograd node", "calls (orig.)", "calls (unit-sc.)", "self us (orig.)",
                  "self us (unit-sc.)", "difference"], body)
    mode = "glibc keeps freed memory (--no-faults)" if args.no_faults else "glibc's defaults"
    print(f"{mode}; per step, averaged over {args.rounds * args.steps} profiled steps of each model\n{text}")
    path = write_result(args.name, f"Self CPU time per op, original vs unit-scaled ResNet ({mode})", text)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
