"""Step time (forward + backward + Adam step): original vs unit-scaled, eager and under torch.compile.

    python benchmarks/step_time.py                 # built-in GPT and residual MLP, 4 variants each
    python benchmarks/step_time.py --rounds 9 --steps 10

All variants of a model run in one process, interleaved round by round (so
machine noise hits them alike); the table reports each variant's median step
time over rounds and the median of the per-round ratios unit-scaled / original.
If Graphcore's ``unit-scaling`` package is installed, its ``unit_scale``
transform is added as a comparison row. ``torch.set_flush_denormal(True)`` is
set (Adam state decaying into denormals slows CPU steps).
"""

from __future__ import annotations

import argparse
import copy
import logging
import time
from typing import Callable

import torch

from _common import median, table, write_result
from unit_scale_fx import backend, unit_scale
from unit_scale_fx.examples import GPT, ResidualMLP, gpt_batch, mlp_batch


def make_models(name: str):
    torch.manual_seed(0)
    if name == "gpt":
        return GPT(vocab=256, d=128, layers=4, heads=4, max_len=128), gpt_batch(256, batch=8, seq=64)
    return ResidualMLP(d_in=64, d=256, layers=4, d_out=16), mlp_batch(64, 16, batch=256)


def graphcore_transform() -> Callable | None:
    try:
        import unit_scaling.transforms as ust  # optional: benchmark comparison only
    except Exception:
        return None
    return ust.unit_scale


def variants(name: str) -> dict[str, tuple[torch.nn.Module, torch.nn.Module]]:
    """label -> (module to call, module whose parameters Adam updates)."""
    model, batch = make_models(name)
    out: dict[str, tuple[torch.nn.Module, torch.nn.Module]] = {}
    m = copy.deepcopy(model)
    out["original eager"] = (m, m)
    us = unit_scale(copy.deepcopy(model), batch)
    out["unit-scaled eager"] = (us, us)
    m = copy.deepcopy(model)
    out["original compiled"] = (torch.compile(m), m)
    m = copy.deepcopy(model)
    out["unit-scaled compiled"] = (torch.compile(m, backend=backend(inner="inductor")), m)
    gc_us = graphcore_transform()
    if gc_us is not None:
        try:
            g = gc_us(copy.deepcopy(model))
            out["graphcore unit_scale eager"] = (g, g)
        except Exception as exc:  # pragma: no cover - depends on their package and torch version
            logging.warning("graphcore unit_scale failed on %s: %s", name, exc)
    return out


def step_fn(call: torch.nn.Module, owner: torch.nn.Module, batch) -> Callable[[], None]:
    opt = torch.optim.Adam(owner.parameters(), lr=1e-3)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = call(*batch)
        loss.backward()
        opt.step()

    return step


def run(name: str, rounds: int, steps: int, warmup: int) -> list[list[str]]:
    _, batch = make_models(name)
    steps_by = {}
    for label, (call, owner) in variants(name).items():
        fn = step_fn(call, owner, batch)
        t0 = time.perf_counter()
        for _ in range(warmup):  # includes compilation
            fn()
        print(f"  {name}: {label}: warm-up (incl. compile) {time.perf_counter() - t0:.1f} s", flush=True)
        steps_by[label] = fn
    times: dict[str, list[float]] = {k: [] for k in steps_by}
    for r in range(rounds):
        order = list(steps_by) if r % 2 == 0 else list(reversed(steps_by))
        for label in order:
            fn = steps_by[label]
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            times[label].append((time.perf_counter() - t0) / steps)
    rows = []
    for label, ts in times.items():
        base = "original compiled" if "compiled" in label else "original eager"
        ratios = [a / b for a, b in zip(ts, times[base])]
        rows.append([name, label, f"{median(ts) * 1e3:.2f}", f"{min(ts) * 1e3:.2f}", f"{median(ratios):.3f}"])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["gpt", "mlp"], choices=["gpt", "mlp"])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 by default: on a shared machine OpenMP threads spin against other jobs)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.ERROR)
    torch.set_flush_denormal(True)
    rows = []
    for name in args.models:
        rows += run(name, args.rounds, args.steps, args.warmup)
    header = ["model", "variant", "median ms/step", "min ms/step", "ratio vs original (median of rounds)"]
    text = table(header, rows)
    print(text)
    note = (f"{args.rounds} rounds x {args.steps} steps per variant after {args.warmup} warm-up steps, variants "
            "interleaved per round (order alternating). Ratios: median over rounds of unit-scaled / original "
            "in the same mode (eager vs eager, compiled vs compiled). Goals: <= 1.10 eager, <= 1.03 compiled. "
            "The machine is shared, so single rounds are noisy; medians are reported.")
    path = write_result("step_time", "Step time: original vs unit-scaled", text + "\n\n" + note)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
