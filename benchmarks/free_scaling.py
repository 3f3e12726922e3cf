"""What unit scaling costs: step time, bytes saved for backward, and the memory of planning.

    python benchmarks/free_scaling.py                       # GPT, ReLU MLP, ResNet; eager and compiled
    python benchmarks/free_scaling.py --models mlp --no-compile --rounds 9
    python benchmarks/free_scaling.py --no-compile --size issue --clock cpu --processes 5 --rounds 40 --steps 1

For each model, against the original model:

1. eager step time (forward + backward + Adam step);
2. compiled step time (``torch.compile``: inductor for the original, the ``unit_scale``
   backend with inner compiler inductor for the unit-scaled model);
3. bytes saved for backward in one forward: the distinct storages that
   ``torch.autograd.graph.saved_tensors_hooks`` reaches (exact);
4. peak tensor memory of the first call of a lazily planned model (planning + forward +
   backward) and of a training step (forward + backward), counted by a dispatch mode over
   every storage allocated and freed (exact; see ``unit_scale_fx.analysis.memory``).

Times: all variants of a model run in one process, interleaved round by round (order
alternating); the table gives each variant's median and the median of the per-round ratios.
``torch.set_flush_denormal(True)`` is set. On a shared machine the times are noisy; the
memory rows are exact and do not depend on load.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import subprocess
import sys
import time
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from _common import median, table, write_result
from unit_scale_fx import backend, unit_scale
from unit_scale_fx.analysis.memory import peak_tensor_bytes, saved_tensor_bytes
from unit_scale_fx.examples import GPT, ResidualMLP, gpt_batch, mlp_batch


class Block(nn.Module):
    def __init__(self, c_in: int, c: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.down = None if stride == 1 and c_in == c else nn.Sequential(
            nn.Conv2d(c_in, c, 1, stride, bias=False), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return F.relu(h + (x if self.down is None else self.down(x)))


class ResNet(nn.Module):
    """A small ResNet: conv-bn-relu stem, max-pool, basic blocks, average pool, linear, cross-entropy."""

    def __init__(self, width: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.blocks = nn.Sequential(Block(width, width, 1), Block(width, 2 * width, 2), Block(2 * width, 2 * width, 1))
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(self.stem(x), 2)
        h = F.adaptive_avg_pool2d(self.blocks(h), 1).flatten(1)
        return F.cross_entropy(self.fc(h), y)


def make(name: str, size: str = "small") -> tuple[nn.Module, tuple]:
    """The model and batch. ``size``: ``small`` (fast) or ``issue``, issue 16's sizes (GPT d=512, 4 layers,
    seq 256; ReLU MLP d=512, 4 blocks, batch 512; ResNet width 64 on 32 x 32 images)."""
    torch.manual_seed(0)
    big = size == "issue"
    if name == "gpt":
        d, seq, batch = (512, 256, 4) if big else (128, 64, 8)
        return GPT(vocab=256, d=d, layers=4, heads=d // 32, max_len=seq), gpt_batch(256, batch=batch, seq=seq)
    if name == "mlp":
        d, batch = (512, 512) if big else (256, 256)
        return ResidualMLP(d_in=64, d=d, layers=4, d_out=16), mlp_batch(64, 16, batch=batch)
    g = torch.Generator().manual_seed(0)
    return ResNet(64 if big else 32), (torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g))


def step_fn(call: nn.Module, owner: nn.Module, batch: tuple,
            phases: list[float] | None = None) -> Callable[[], None]:
    """One training step of ``call`` on ``batch``: ``zero_grad``, forward, backward, Adam on ``owner``'s
    parameters. ``phases``: three numbers the step adds the CPU time of its forward (with ``zero_grad``),
    backward and optimizer step to."""
    opt = torch.optim.Adam(owner.parameters(), lr=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        call(*batch).backward()
        opt.step()

    if phases is None:
        return step
    clock = time.process_time

    def timed() -> None:
        t0 = clock()
        opt.zero_grad(set_to_none=True)
        loss = call(*batch)
        t1 = clock()
        loss.backward()
        t2 = clock()
        opt.step()
        t3 = clock()
        phases[0] += t1 - t0
        phases[1] += t2 - t1
        phases[2] += t3 - t2

    return timed


def memory_rows(name: str, size: str = "small") -> list[list[str]]:
    model, batch = make(name, size)
    rows = []
    orig = copy.deepcopy(model)
    lazy = unit_scale(copy.deepcopy(model))  # planned at its first call
    first, _ = peak_tensor_bytes(lambda: lazy(*batch).backward())
    lazy.zero_grad(set_to_none=True)
    us = unit_scale(copy.deepcopy(model), batch)
    stats = {}
    for label, m in (("original", orig), ("unit-scaled", us)):
        m.zero_grad(set_to_none=True)
        saved, loss = saved_tensor_bytes(lambda: m(*batch))
        loss.backward()
        del loss
        m.zero_grad(set_to_none=True)
        peak, _ = peak_tensor_bytes(lambda: m(*batch).backward())
        m.zero_grad(set_to_none=True)
        stats[label] = (saved, peak)
    (s0, p0), (s1, p1) = stats["original"], stats["unit-scaled"]
    mib = lambda b: f"{b / 2**20:.3f} MiB"  # noqa: E731
    rows.append([name, "bytes saved for backward (one forward)", mib(s0), mib(s1), f"{s1 / s0:.3f}"])
    rows.append([name, "peak tensor memory of a training step (fwd + bwd)", mib(p0), mib(p1), f"{p1 / p0:.3f}"])
    rows.append([name, "first call: planning + fwd + bwd, vs a unit-scaled step", mib(p1), mib(first),
                 f"{first / p1:.3f}"])
    return rows


def time_rows(name: str, rounds: int, steps: int, warmup: int, compiled: bool,
              clock: Callable[[], float] = time.perf_counter, size: str = "small",
              control: bool = False) -> list[list[str]]:
    """The step-time rows of ``name``. ``control``: also time a second copy of the original model, built
    after the unit-scaled one (after planning), as a variant of its own: its ratio to the original is
    what this process's memory layout alone gives (an A/A comparison; 1 on a machine without noise)."""
    model, batch = make(name, size)
    variants: dict[str, Callable[[], None]] = {}
    m = copy.deepcopy(model)
    variants["original eager"] = step_fn(m, m, batch)
    us = unit_scale(copy.deepcopy(model), batch)
    variants["unit-scaled eager"] = step_fn(us, us, batch)
    if control:
        m = copy.deepcopy(model)
        variants["control eager"] = step_fn(m, m, batch)
    if compiled:
        m = copy.deepcopy(model)
        variants["original compiled"] = step_fn(torch.compile(m), m, batch)
        m = copy.deepcopy(model)
        variants["unit-scaled compiled"] = step_fn(torch.compile(m, backend=backend(inner="inductor")), m, batch)
    for label, fn in variants.items():
        t0 = time.perf_counter()
        for _ in range(warmup):
            fn()
        print(f"  {name}: {label}: warm-up (incl. compile) {time.perf_counter() - t0:.1f} s", flush=True)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(rounds):
        for label in (list(variants) if r % 2 == 0 else list(reversed(variants))):
            t0 = clock()
            for _ in range(steps):
                variants[label]()
            times[label].append((clock() - t0) / steps)
    rows = []
    for mode in ("eager", "compiled"):
        if f"original {mode}" not in times:
            continue
        a, b = times[f"original {mode}"], times[f"unit-scaled {mode}"]
        ratios = [y / x for x, y in zip(a, b)]
        rows.append([name, f"{mode} step time (median ms)", f"{median(a) * 1e3:.2f}", f"{median(b) * 1e3:.2f}",
                     f"{median(ratios):.3f}"])
    if "control eager" in times:  # the "unit-scaled" column holds the second copy of the original
        a, b = times["original eager"], times["control eager"]
        rows.append([name, "control step time (median ms; a second original vs the original)",
                     f"{median(a) * 1e3:.2f}", f"{median(b) * 1e3:.2f}", f"{median([y / x for x, y in zip(a, b)]):.3f}"])
    return rows


def one_process(script: str, env: dict, args: argparse.Namespace, name: str) -> dict[str, tuple[float, float, float]]:
    """Run ``script`` (this script, or another checkout's) with ``--processes 1 --rows-only`` and this run's
    options, in a fresh process with environment ``env``: ``{mode: (original ms, unit-scaled ms, ratio)}``."""
    cmd = [sys.executable, script, "--models", name, "--rounds", str(args.rounds), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--threads", str(args.threads), "--size", args.size, "--clock",
           args.clock, "--processes", "1", "--rows-only"] + (["--no-compile"] if args.no_compile else []) \
        + (["--control"] if args.control else [])
    out = subprocess.run(cmd, cwd=os.path.dirname(os.path.abspath(script)), env=env, check=True,
                         capture_output=True, text=True).stdout
    rows = {}
    for line in out.splitlines():
        if line.startswith("ROW "):
            mode, a, b, r = json.loads(line[4:])
            rows[mode] = (a, b, r)
    return rows


def process_rows(args: argparse.Namespace, name: str) -> list[list[str]]:
    """The time rows of ``name`` measured in ``args.processes`` fresh processes one after another (each:
    this script with ``--processes 1``): a process's memory layout moves its times by a few percent
    however many rounds it runs, so the table gives the median over processes of each process's
    median ratio, and their range."""
    per: dict[str, list[tuple[float, float, float]]] = {}
    for i in range(args.processes):
        for mode, row in one_process(__file__, os.environ, args, name).items():
            per.setdefault(mode, []).append(row)
        print(f"  {name}: process {i + 1}/{args.processes}: "
              + ", ".join(f"{m} {v[-1][2]:.3f}" for m, v in per.items()), flush=True)
    rows = []
    for mode, v in per.items():
        ratios = sorted(r for _, _, r in v)
        what = "control step time (a second original vs the original; " if mode == "control" else \
            f"{mode} step time ("
        rows.append([name, f"{what}median ms; {len(v)} processes, ratio range "
                     f"{ratios[0]:.3f}-{ratios[-1]:.3f})", f"{median([a for a, _, _ in v]):.2f}",
                     f"{median([b for _, b, _ in v]):.2f}", f"{median(ratios):.3f}"])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["gpt", "mlp", "resnet"], choices=["gpt", "mlp", "resnet"])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled rows (compiling takes minutes)")
    ap.add_argument("--no-time", action="store_true", help="memory rows only (exact, independent of load)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--size", choices=["small", "issue"], default="small",
                    help="model sizes: small (fast) or issue 16's (GPT d=512 seq 256, MLP d=512 batch 512)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="wall: perf_counter; cpu: process_time (less sensitive to other processes on a shared "
                         "machine; one thread only)")
    ap.add_argument("--name", default="free_scaling", help="results file name (benchmarks/results/NAME.md)")
    ap.add_argument("--processes", type=int, default=1,
                    help="measure the times in this many fresh processes, one after another (median of their "
                         "medians; a process's memory layout moves its times by a few percent)")
    ap.add_argument("--control", action="store_true",
                    help="also time a second copy of the original model (built after planning) against the "
                         "original: an A/A row giving the noise of the time ratios")
    ap.add_argument("--rows-only", action="store_true", help=argparse.SUPPRESS)  # one process of --processes
    args = ap.parse_args()
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    logging.basicConfig(level=logging.ERROR)
    if args.rows_only:
        for name in args.models:
            for row in time_rows(name, args.rounds, args.steps, args.warmup, not args.no_compile, clock, args.size,
                                 args.control):
                print("ROW " + json.dumps([row[1].split()[0], float(row[2]), float(row[3]), float(row[4])]))
        return
    rows = []
    for name in args.models:
        rows += memory_rows(name, args.size)
        if args.no_time:
            continue
        if args.processes > 1:
            rows += process_rows(args, name)
        else:
            rows += time_rows(name, args.rounds, args.steps, args.warmup, not args.no_compile, clock, args.size,
                              args.control)
    text = table(["model", "measure", "original", "unit-scaled", "ratio"], rows)
    print(text)
    note = (f"Sizes: {args.size}; clock: {args.clock}. Times: {args.rounds} rounds x {args.steps} steps per variant after {args.warmup} warm-up steps, "
            "variants interleaved per round; ratio = median over rounds of unit-scaled / original. The machine "
            f"is shared (load average {', '.join(f'{x:.1f}' for x in os.getloadavg())} at the end): times are "
            "noisy, memory counts are exact. Memory: bytes of tensor storages (see the script's docstring); the "
            "last row compares the first call of a lazily planned model with a training step of the same model.")
    path = write_result(args.name, "Unit scaling for free: time, saved tensors, planning memory", text + "\n\n" + note)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
