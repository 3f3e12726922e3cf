"""How much a plan moves with the example batch and the thread count.

    python benchmarks/plan_spread.py [--batches 4] [--round-scales pow2] [--out benchmarks/results/plan_spread.md]

Plans the same small GPT (d 64, 2 layers, 4 heads, vocabulary 128, sequences of 32) on several
example batches of 32 sequences from the same distribution, and reports, for every scale factor
of the plan (forward, backward per input, residual weights), the spread ``max / min`` across the
batches: the largest, and the largest among backward scales of 1-D parameters (biases, norm
gains) and of everything else. Then plans once with 1 and with 2 threads and says whether the two
plan fingerprints agree. Run it on the commit to measure (PYTHONPATH=<tree>/src) for before/after.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CFG = dict(vocab=128, d=64, layers=2, heads=4, max_len=32)


def plan_factors(seed: int, round_scales: str | None = None, grads: list | None = None) -> dict[tuple, float]:
    """Every scale factor of the plan made on batch ``seed``; ``grads``: append the parameters'
    gradient RMS after one backward on a batch no plan saw (seed 99)."""
    from unit_scale_fx import unit_scale
    from unit_scale_fx.examples import GPT, gpt_batch

    torch.manual_seed(0)
    us = unit_scale(GPT(**CFG), gpt_batch(CFG["vocab"], 32, 32, seed=seed),
                    **({"round_scales": round_scales} if round_scales else {}))
    vectors = {n.replace(".", "_") for n, p in us.named_parameters() if p.dim() <= 1}
    if grads is not None:
        us(*gpt_batch(CFG["vocab"], 32, 32, seed=99)).backward()
        grads.append({n: (p.dim(), float(p.grad.pow(2).mean().sqrt())) for n, p in us.named_parameters()})
        us.zero_grad(set_to_none=True)
    out = {}
    for node, r in us.scale_plan(all_nodes=True).items():
        out[(node, "fwd", "")] = r.fwd
        for k, v in r.bwd.items():
            out[(node, "bwd-vector" if k in vectors else "bwd", k)] = v
        for k, v in r.weights.items():
            out[(node, "weight", k)] = v
    return out


def fingerprint_with_threads(n: int) -> str:
    code = ("import torch; torch.set_num_threads(%d); import sys; sys.path.insert(0, %r); "
            "from plan_spread import CFG; from unit_scale_fx import unit_scale; "
            "from unit_scale_fx.examples import GPT, gpt_batch; "
            "from unit_scale_fx.training.distributed import plan_fingerprint; torch.manual_seed(0); "
            "print(plan_fingerprint(unit_scale(GPT(**CFG), gpt_batch(CFG['vocab'], 32, 32))))"
            % (n, os.path.join(ROOT, "benchmarks")))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": str(n)})
    return out.stdout.strip().splitlines()[-1] if out.returncode == 0 else f"error: {out.stderr[-200:]}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--round-scales", default=None, help="UnitScaleConfig.round_scales (e.g. pow2)")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "plan_spread.md"))
    args = p.parse_args(argv)
    grads: list = []
    plans = [plan_factors(s, args.round_scales, grads if s == 0 else None) for s in range(args.batches)]
    keys = set.intersection(*(set(pl) for pl in plans))
    spread: dict[str, list[tuple[float, tuple]]] = {}
    for k in keys:
        vals = [abs(pl[k]) for pl in plans]
        if min(vals) <= 0:
            continue
        spread.setdefault(k[1], []).append((max(vals) / min(vals), k))
    rows = ["| scales | count | largest max/min across batches | where | median max/min | differ |",
            "|---|---|---|---|---|---|"]
    for kind in ("fwd", "weight", "bwd", "bwd-vector"):
        s = sorted(spread.get(kind, []))
        if not s:
            continue
        worst, where = s[-1]
        differ = sum(r > 1.0 for r, _ in s)
        rows.append(f"| {kind} | {len(s)} | {worst:.4f} | {where[0]} {where[2]} | {s[len(s) // 2][0]:.4f} | {differ} |")
    g = grads[0]
    vec = sorted(r for d, r in g.values() if d <= 1)
    rows += ["", f"Parameter gradient RMS on a fresh batch (plan of batch 0): {sum(0.5 <= r <= 2 for _, r in g.values())}"
             f"/{len(g)} in [1/2, 2], {sum(0.125 <= r <= 8 for _, r in g.values())}/{len(g)} in [1/8, 8]; "
             f"1-D parameters: median {vec[len(vec) // 2]:.3f}, range {vec[0]:.3f}-{vec[-1]:.3f}."]
    f1, f2 = fingerprint_with_threads(1), fingerprint_with_threads(2)
    rows += ["", f"Plan fingerprint with 1 thread: {f1}; with 2 threads: {f2}; equal: {f1 == f2}."]
    text = "\n".join(rows)
    print(text)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        flag = f" --round-scales {args.round_scales}" if args.round_scales else ""
        f.write(f"# Plan spread across example batches\n\n`python benchmarks/plan_spread.py --batches "
                f"{args.batches}{flag}`\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
