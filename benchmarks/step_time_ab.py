"""Step-time A/B of two versions of unit_scale_fx on the same model, and what each costs per step, exactly.

    python benchmarks/step_time_ab.py --ref ../main/src --models gpt mlp resnet --size issue --rounds 15

``--ref`` is the ``src`` folder of another checkout (``main``, say); its package is imported under
another name next to this checkout's, so that the original model, the reference version's
unit-scaled model and this version's run in one process, interleaved round by round (order
alternating), on the CPU clock (``time.process_time``; one thread). On a shared machine that is the
least noisy comparison there is; the table gives medians over rounds and the median of the per-round
ratios.

Exact, and independent of load: the counts of one training step (after a warm-up step) of each
variant, read by a dispatch mode: aten ops dispatched, elements written by pointwise ops
(``torch.Tag.pointwise``: the scales' multiplies among them; GEMMs, convolutions, norms and the like
are not counted), of those the elements of new tensors (written out of place: an allocation each, which
on this machine can cost more than the multiply), and Python ``autograd.Function`` calls (each costs tens of microseconds).
Models and batches: ``free_scaling.make``.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import logging
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from _common import median, table, write_result
from free_scaling import make, step_fn

import unit_scale_fx

_VIEWS = {"view", "t", "detach", "transpose", "_unsafe_view", "expand", "as_strided", "permute", "reshape", "alias",
          "slice", "select", "split", "unsqueeze", "squeeze", "view_as", "split_with_sizes", "unbind"}


HEADER = ["model", "variant", "median ms (CPU)", "/ original", "aten ops", "pointwise M elements",
          "of those, M elements of new tensors", "autograd.Function calls"]


def load_ref(src: str) -> Any:
    """The ``unit_scale_fx`` package under ``src``, imported as ``unit_scale_fx_ref`` (a copy in a temp folder)."""
    tmp = tempfile.mkdtemp(prefix="usfx_ref_")
    shutil.copytree(os.path.join(src, "unit_scale_fx"), os.path.join(tmp, "unit_scale_fx_ref"))
    sys.path.insert(0, tmp)
    return importlib.import_module("unit_scale_fx_ref")


class _Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.pointwise = 0
        self.fresh = 0  # of those, elements of new tensors (out of place: an allocation each)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        if torch.Tag.pointwise in func.tags and func.__name__.split(".")[0] not in _VIEWS:
            inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                      if isinstance(a, torch.Tensor)}
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    self.pointwise += t.numel()
                    if t.untyped_storage().data_ptr() not in inputs:
                        self.fresh += t.numel()
        return out


def _function_classes() -> list[type]:
    out, todo = [], list(torch.autograd.Function.__subclasses__())
    while todo:
        cls = todo.pop()
        out.append(cls)
        todo.extend(cls.__subclasses__())
    return out


def counts(step: Callable[[], None]) -> tuple[int, int, int, int]:
    """(aten ops, pointwise elements written, of those the elements of new tensors (not written in place),
    autograd.Function calls) of one call of ``step``. A Function
    call is counted at its ``forward``, however it was applied (``Function.apply`` or the C ``apply``)."""
    calls = [0]
    patched = []
    for cls in _function_classes():
        fwd = cls.__dict__.get("forward")
        if not isinstance(fwd, staticmethod):
            continue

        def counted(*args, _f=fwd.__func__, **kwargs):
            calls[0] += 1
            return _f(*args, **kwargs)

        patched.append((cls, fwd))
        cls.forward = staticmethod(counted)  # type: ignore[method-assign]
    c = _Count()
    try:
        with c:
            step()
    finally:
        for cls, fwd in patched:
            cls.forward = fwd  # type: ignore[method-assign]
    return c.ops, c.pointwise, c.fresh, calls[0]


def run(name: str, ref: Any, size: str, rounds: int, steps: int) -> list[list[str]]:
    model, batch = make(name, size)
    variants: dict[str, Callable[[], None]] = {}
    m = copy.deepcopy(model)
    variants["original"] = step_fn(m, m, batch)
    r = ref.unit_scale(copy.deepcopy(model), batch)
    variants["reference"] = step_fn(r, r, batch)
    u = unit_scale_fx.unit_scale(copy.deepcopy(model), batch)
    variants["this"] = step_fn(u, u, batch)
    exact = {}
    for label, fn in variants.items():
        fn()
        exact[label] = counts(fn)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for i in range(rounds):
        for label in list(variants) if i % 2 == 0 else list(reversed(variants)):
            t0 = time.process_time()
            for _ in range(steps):
                variants[label]()
            times[label].append((time.process_time() - t0) / steps)
    base = times["original"]
    rows = []
    for label in variants:
        ops, pw, fresh, fns = exact[label]
        ratio = median([t / b for t, b in zip(times[label], base)])
        rows.append([name, label, f"{median(times[label]) * 1e3:.1f}", f"{ratio:.3f}", str(ops),
                     f"{pw / 1e6:.2f}", f"{fresh / 1e6:.2f}", str(fns)])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ref", required=True, help="the src folder of the reference checkout (e.g. ../main/src)")
    ap.add_argument("--models", nargs="+", default=["gpt", "mlp", "resnet"], choices=["gpt", "mlp", "resnet"])
    ap.add_argument("--size", choices=["small", "issue"], default="issue")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--name", default="step_time_ab")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    logging.basicConfig(level=logging.ERROR)
    ref = load_ref(args.ref)
    rows = []
    for name in args.models:
        rows += run(name, ref, args.size, args.rounds, args.steps)
        print(table(HEADER, rows), flush=True)
    text = table(HEADER, rows)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    note = (f"reference: {args.ref}. Sizes: {args.size}. Times: CPU clock, {args.rounds} rounds x {args.steps} "
            f"steps per variant, interleaved; '/ original' = median over rounds of the per-round ratio. Load "
            f"average at the end: {load} (the machine is shared: times are noisy; the count columns are "
            "exact, one training step after a warm-up step).")
    path = write_result(args.name, "Step time A/B: original, reference unit_scale_fx, this one", text + "\n\n" + note)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
