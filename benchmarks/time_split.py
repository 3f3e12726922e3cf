"""Where an eager step's time goes: user time, kernel time and page faults per step, original vs unit-scaled.

The step-time ratio of ``free_scaling.py`` is CPU time, user and kernel together. This script splits it: for
each model, in fresh processes one after another, the original and the unit-scaled model train interleaved
round by round (order alternating, as in ``free_scaling.py``), and ``resource.getrusage`` gives each step's
user time, kernel (system) time and minor page faults. Kernel time here is almost all page faults: glibc
returns freed memory at the top of its heap to the kernel (trimming) and the next step touches it again,
faulting each 4 KiB page in. ``--no-faults`` runs the processes with glibc's trimming and mmap thresholds
raised (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``), which removes almost all of them, so the
user-time ratio is then what the scales cost without the allocator's part. (Those settings are a user's
choice for a process, not a library's: ``free_scaling.py`` never sets them.) ``--erased`` adds a third
variant: the unit-scaled model's own graph and weights with every scale erased
(``analysis.equivalence.scale_erased_copy``), which runs the same plain ops as the original, so its ratio
separates what the scales cost from what the rewritten graph (a flat ``GraphModule``) costs. Also counted,
exactly, after the timed rounds: the aten ops and the Python ``autograd.Function`` calls of one step of each
variant (``step_time_ab.counts``). And per step, on the CPU clock: the forward (with ``zero_grad``), the
backward and the optimizer step apart.

    cd benchmarks && PYTHONPATH=../src python time_split.py --processes 8
    cd benchmarks && PYTHONPATH=../src python time_split.py --processes 8 --no-faults
    cd benchmarks && PYTHONPATH=../src python time_split.py --processes 8 --no-faults --erased
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import resource
import subprocess
import sys

import torch

from _common import median, table, write_result
from free_scaling import make, step_fn
from step_time_ab import counts
from unit_scale_fx import unit_scale
from unit_scale_fx.analysis.equivalence import scale_erased_copy

NO_FAULTS = {"MALLOC_MMAP_THRESHOLD_": str(2 ** 30), "MALLOC_TRIM_THRESHOLD_": str(2 ** 32)}


def child(model_name: str, size: str, rounds: int, warmup: int, erased: bool) -> dict[str, dict[str, float]]:
    """One process: per variant, the mean user ms, system ms and minor faults of a step, and the CPU ms of
    its forward, backward and optimizer step."""
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    model, batch = make(model_name, size)
    models = {"original": copy.deepcopy(model)}
    models["unit-scaled"] = unit_scale(copy.deepcopy(model), batch)
    if erased:
        models["scales erased"] = scale_erased_copy(models["unit-scaled"])
    phases = {k: [0.0, 0.0, 0.0] for k in models}
    steps = {k: step_fn(m, m, batch, phases[k]) for k, m in models.items()}
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    acc = {k: [0.0, 0.0, 0.0] for k in steps}
    for p in phases.values():
        p[:] = [0.0, 0.0, 0.0]
    for r in range(rounds):
        for k in (list(steps) if r % 2 == 0 else list(reversed(steps))):
            r0 = resource.getrusage(resource.RUSAGE_SELF)
            steps[k]()
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            a = acc[k]
            a[0] += r1.ru_utime - r0.ru_utime
            a[1] += r1.ru_stime - r0.ru_stime
            a[2] += r1.ru_minflt - r0.ru_minflt
    res = {k: {"user_ms": u / rounds * 1e3, "sys_ms": s / rounds * 1e3, "faults": f / rounds,
               "forward_ms": phases[k][0] / rounds * 1e3, "backward_ms": phases[k][1] / rounds * 1e3,
               "optimizer_ms": phases[k][2] / rounds * 1e3}
           for k, (u, s, f) in acc.items()}
    for k, fn in steps.items():  # exact: aten ops dispatched and Python autograd.Function calls in one step
        ops, _, _, functions = counts(fn)
        res[k].update(aten_ops=ops, functions=functions)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet"], choices=["gpt", "mlp", "resnet"])
    ap.add_argument("--size", choices=["small", "issue"], default="issue")
    ap.add_argument("--processes", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-faults", action="store_true",
                    help="run the processes with glibc's trimming and mmap thresholds raised (no page faults)")
    ap.add_argument("--erased", action="store_true",
                    help="also time the unit-scaled graph with its scales erased (what the graph alone costs)")
    ap.add_argument("--name", default=None, help="results file name (default time_split[_no_faults])")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    if args.child:
        print("RESULT " + json.dumps(child(args.models[0], args.size, args.rounds, args.warmup, args.erased)))
        return
    env = dict(os.environ, **(NO_FAULTS if args.no_faults else {}))
    rows = []
    for name in args.models:
        per = []
        for i in range(args.processes):
            cmd = [sys.executable, os.path.abspath(__file__), "--child", "--models", name, "--size", args.size,
                   "--rounds", str(args.rounds), "--warmup", str(args.warmup)] + (["--erased"] if args.erased else [])
            out = subprocess.run(cmd, cwd=os.path.dirname(os.path.abspath(__file__)), env=env, check=True,
                                 capture_output=True, text=True).stdout
            res = json.loads(next(ln for ln in out.splitlines() if ln.startswith("RESULT "))[7:])
            per.append(res)
            o, u = res["original"], res["unit-scaled"]
            print(f"  {name}: process {i + 1}/{args.processes}: user {o['user_ms']:.1f} / {u['user_ms']:.1f} ms, "
                  f"system {o['sys_ms']:.1f} / {u['sys_ms']:.1f} ms, faults {o['faults']:.0f} / {u['faults']:.0f}"
                  + (f"; scales erased: user {res['scales erased']['user_ms']:.1f} ms" if args.erased else ""),
                  flush=True)

        def col(variant: str, key: str) -> float:
            return median([p[variant][key] for p in per])

        def ratio(key: str | None, variant: str = "unit-scaled") -> str:
            def val(p: dict, v: str) -> float:
                return p[v]["user_ms"] + p[v]["sys_ms"] if key is None else p[v][key]
            rs = sorted(val(p, variant) / val(p, "original") for p in per)
            return f"{median(rs):.3f} ({rs[0]:.3f}-{rs[-1]:.3f})"

        for label, key in (("user ms", "user_ms"), ("system ms", "sys_ms"), ("minor page faults", "faults"),
                           ("forward ms (CPU clock, with zero_grad)", "forward_ms"),
                           ("backward ms (CPU clock)", "backward_ms"), ("optimizer step ms (CPU clock)", "optimizer_ms"),
                           ("aten ops (exact)", "aten_ops"), ("Python autograd.Function calls (exact)", "functions")):
            rows.append([name, label, f"{col('original', key):.1f}", f"{col('unit-scaled', key):.1f}",
                         ratio(key) if key.endswith("_ms") and key != "sys_ms" else "-"])
        rows.append([name, "user + system ms", f"{col('original', 'user_ms') + col('original', 'sys_ms'):.1f}",
                     f"{col('unit-scaled', 'user_ms') + col('unit-scaled', 'sys_ms'):.1f}", ratio(None)])
        if args.erased:  # the "unit-scaled" column holds the scale-erased graph
            rows.append([name, "user ms, scales erased (the rewritten graph with every scale removed)",
                         f"{col('original', 'user_ms'):.1f}", f"{col('scales erased', 'user_ms'):.1f}",
                         ratio("user_ms", "scales erased")])
    text = table(["model", "per step (median over processes of the per-process means)", "original", "unit-scaled",
                  "ratio: median over processes (range)"], rows)
    print(text)
    malloc = "glibc trimming and mmap thresholds raised (no page faults)" if args.no_faults else "glibc defaults"
    note = (f"{args.processes} processes, {args.rounds} rounds each after {args.warmup} warm-up steps, size "
            f"{args.size}, one thread; {malloc}. "
            "Per process: the mean per step of each variant's user time, system time and minor page faults "
            "(resource.getrusage around each step); the ratio column is the median over processes of the "
            "per-process ratio of means, with its range.")
    default = "time_split" + ("_no_faults" if args.no_faults else "") + ("_erased" if args.erased else "")
    path = write_result(args.name or default,
                        "Eager step time split: user, system, page faults", text + "\n\n" + note)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
