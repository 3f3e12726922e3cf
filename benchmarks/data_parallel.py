"""Data-parallel checks in numbers: 2 gloo ranks on CPU against one process on the combined batch.

    python benchmarks/data_parallel.py [--out benchmarks/results/data_parallel.md]

Runs the worker of tests/distributed (a small GPT, 3 steps, 2 ranks x 2 sequences)
and prints, per set-up, the largest relative difference of the first-step
gradients and of the parameters after 3 steps against the matching one-process
reference (planned and trained on the combined batch; learning rate x sqrt(2) for the
unit-scaled reduction, which returns sqrt(world) x the mean).
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "distributed"))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from test_data_parallel import WORLD, _single  # noqa: E402


def rel_diff(a: dict, b: dict, factor: float = 1.0, mask: dict | None = None) -> float:
    def pick(t, k):
        return t[mask[k]] if mask is not None else t
    return max(float((pick(a[k], k) * factor - pick(b[k], k)).norm() / pick(b[k], k).norm().clamp_min(1e-30))
               for k in a)


def signal_mask(grads: dict) -> dict:
    """Elements whose gradient is not rounding noise (Adam turns noise into full-size steps)."""
    return {k: g.abs() > 1e-6 * max(float(g.abs().max()), 1e-30) for k, g in grads.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "data_parallel.md"))
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as out:
        subprocess.run([sys.executable, os.path.join(ROOT, "tests", "distributed", "dp_worker.py"), out], check=True,
                       timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
        res = {f[:-3]: torch.load(os.path.join(out, f), weights_only=False) for f in os.listdir(out) if f.endswith(".pt")}
    s = math.sqrt(WORLD)
    refs = {"lazy_ddp": (_single("sgd"), 1.0), "lazy_fsdp2": (_single("sgd"), 1.0),
            "ddp_mean_sgd": (_single("sgd"), 1.0), "ddp_hook_sgd": (_single("sgd", s), 1 / s),
            "fsdp2_hook_sgd": (_single("sgd", s), 1 / s), "ddp_hook_adam": (_single("adam"), None)}
    rows = ["| set-up | reference (one process planned and trained on the combined batch) | max rel. diff grads (step 1) "
            "| max rel. diff params (step 3) |", "|---|---|---|---|"]
    for name, (ref, gf) in refs.items():
        r = res[name]
        if "error" in r:
            rows.append(f"| {name} | - | error: {r['error']} | |")
            continue
        g = "-" if gf is None else f"{rel_diff(r['grads'], ref['grads'], gf):.2e}"
        what = {"lazy_ddp": "SGD lr (plain DDP, planned at the first call)",
                "lazy_fsdp2": "SGD lr (plain fully_shard, planned at the first call)", "ddp_mean_sgd": "SGD lr", "ddp_hook_sgd": "SGD lr x sqrt(2)", "fsdp2_hook_sgd": "SGD lr x sqrt(2)",
                "ddp_hook_adam": "Adam (same lr)"}[name]
        mask = signal_mask(ref["grads"]) if gf is None else None
        rows.append(f"| {name} | {what} | {g} | {rel_diff(r['params'], ref['params'], mask=mask):.2e} |")
    un = res["unsynced"]
    rows.append("")
    rows.append("Adam row: over elements whose gradient is not rounding noise (the attention key bias has a true "
                "gradient of 0; Adam turns its noise into steps of size lr).")
    rows.append(f"Ranks planning on their own local batches: fingerprints {un['fingerprints']}; "
                f"check_plan_consistent raised: {bool(un['raised'])}.")
    text = "\n".join(rows)
    print(text)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("# Data parallel vs one process\n\n`python benchmarks/data_parallel.py`\n\n" + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
