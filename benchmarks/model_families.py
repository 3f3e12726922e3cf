"""Model families we did not write: matmul operand RMS before and after unit_scale.

    python benchmarks/model_families.py [--families gpt2,llama,...] [--extra] [--out benchmarks/results/model_families.md]

Each family is built tiny with random init (``tests/fixtures/families.py``). Operands are
recorded at the aten level (mm/bmm/addmm and attention kernels) by a dispatch mode
that knows nothing of our plan, on a batch *other* than the one planning saw. Rows:
the original model; unit-scaled with analytic planning only (``measure=False``); with the
default planning on the sample batch; and lazily (``unit_scale(model)``, planned by the first
training step on the sample batch). Columns give the fraction of operands
with RMS in [1/2, 2] and in [1/8, 8], forward and backward. ``--extra`` also runs the
architectures of ``EXTRA_FAMILIES`` (not in the test suite), writing
``model_families_extra.md``; a family that fails to transform gets a row saying why.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import torch

from unit_scale_fx import unit_scale
from unit_scale_fx.analysis.recorder import MatmulRecorder
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from fixtures.families import EXTRA_FAMILIES, FAMILIES  # noqa: E402  (test-only model builders)


def record(model, fam, args, kwargs):
    rec = MatmulRecorder()
    with rec:
        loss = fam.loss(model(*args, **kwargs))
        rec.backward()
        loss.backward()
    return rec.records


def fractions(records, phase):
    rs = [r.rms for r in records if r.phase == phase]
    return (sum(0.5 <= r <= 2 for r in rs) / len(rs), sum(0.125 <= r <= 8 for r in rs) / len(rs), len(rs))


def row(name, label, capture, records, seconds):
    f, fw, n = fractions(records, "fwd")
    b, bw, m = fractions(records, "bwd")
    t = "-" if seconds is None else f"{seconds:.1f}"
    return f"| {name} | {label} | {capture} | {n} / {m} | {f:.0%} | {b:.0%} | {fw:.0%} | {bw:.0%} | {t} |"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", default=None)
    p.add_argument("--extra", action="store_true", help="the architectures not in the test suite")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    table = EXTRA_FAMILIES if args.extra else FAMILIES
    args.families = args.families or ",".join(table)
    args.out = args.out or os.path.join(os.path.dirname(__file__), "results",
                                        "model_families_extra.md" if args.extra else "model_families.md")
    warnings.filterwarnings("ignore")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        tf_version = transformers.__version__
    except ImportError:
        tf_version = "not installed"
    lines = [
        "# Model families: matmul operand RMS before and after unit_scale",
        "",
        f"`python benchmarks/model_families.py` (torch {torch.__version__}, transformers {tf_version}; CPU). "
        "Operands: aten-level matmul inputs in forward, incoming gradients in backward, on a batch other than "
        "the planning batch. *[1/2, 2]* and *[1/8, 8]*: share of operands with RMS in that band. "
        "*s*: seconds for `unit_scale` (capture and planning).",
        "",
        "| family | model | capture | operands fwd / bwd | fwd in [1/2, 2] | bwd in [1/2, 2] | fwd in [1/8, 8] "
        "| bwd in [1/8, 8] | s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in args.families.split(","):
        fam = {**FAMILIES, **EXTRA_FAMILIES}[name]
        torch.manual_seed(0)
        model = fam.make()
        plan_args, plan_kwargs = fam.batch(0)
        test_args, test_kwargs = fam.batch(1)
        lines.append(row(name, "original", "-", record(model, fam, test_args, test_kwargs), None))
        for label, opts in (("unit-scaled, analytic", {"measure": False}), ("unit-scaled", {})):
            t0 = time.perf_counter()
            try:
                us = unit_scale(model, plan_args, example_kwargs=plan_kwargs, **opts)
            except Exception as exc:  # a benchmark row, not a crash: say what failed
                lines.append(f"| {name} | {label} | failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]} "
                             "| | | | | | |")
                continue
            dt = time.perf_counter() - t0
            unscaled = sorted({u.op for u in us.us_unsupported})
            note = f" (unscaled: {', '.join(unscaled)})" if unscaled else ""
            lines.append(row(name, label + note, us.us_capture, record(us, fam, test_args, test_kwargs), dt))
        # lazily: unit_scale(model), then the first training step captures and plans
        t0 = time.perf_counter()
        try:
            us = unit_scale(model)
            fam.loss(us(*plan_args, **plan_kwargs)).backward()
            us.zero_grad(set_to_none=True)
            lines.append(row(name, "unit-scaled, lazy", us.us_capture, record(us, fam, test_args, test_kwargs),
                             time.perf_counter() - t0))
        except Exception as exc:
            lines.append(f"| {name} | unit-scaled, lazy | failed: {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:120]} | | | | | | |")
        print(*lines[-4:], sep="\n", flush=True)
    text = "\n".join(lines) + "\n"
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
