"""Transform time vs model size: ``unit_scale`` of GPT shapes built on the meta device.

    python benchmarks/transform_time.py            # 2..96 layers, widths up to 1600, 3 repeats each

Models are built under ``torch.device("meta")``: no weight memory is touched (the
GPT-2-XL shape would be 6.2 GB of float32 weights; the peak RSS column shows the
process never holds them). Reports the median of the repeats, the time per pass,
and a least-squares fit ``time = a + b * nodes``.
"""

from __future__ import annotations

import argparse
import logging
import resource
import time

import numpy as np
import torch

from _common import median, table, write_result
from unit_scale_fx import unit_scale
from unit_scale_fx.examples import GPT

SHAPES = [(2, 768), (4, 768), (8, 768), (12, 768), (24, 1024), (36, 1280), (48, 1600), (72, 1600), (96, 1600)]


def transform_once(layers: int, d: int, seq: int) -> tuple[float, int, dict[str, float], int]:
    with torch.device("meta"):
        model = GPT(vocab=50257, d=d, layers=layers, heads=d // 64, max_len=1024)
    n_params = sum(p.numel() for p in model.parameters())
    idx = torch.zeros(1, seq, dtype=torch.long, device="meta")
    t0 = time.perf_counter()
    us = unit_scale(model, (idx, idx))
    dt = time.perf_counter() - t0
    return dt, len(us.graph.nodes), dict(us.us_timings), n_params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 by default: on a shared machine OpenMP threads spin against other jobs)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.ERROR)
    transform_once(2, 64, 16)  # imports and caches warm
    rows, xs, ys = [], [], []
    for layers, d in SHAPES:
        runs = [transform_once(layers, d, args.seq) for _ in range(args.repeats)]
        t = median([r[0] for r in runs])
        nodes, n_params = runs[0][1], runs[0][3]
        passes = {k: median([r[2][k] for r in runs]) for k in runs[0][2]}
        top = ", ".join(f"{k} {v * 1e3:.0f}" for k, v in passes.items())
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        rows.append([str(layers), str(d), f"{n_params / 1e6:.0f}M", str(nodes), f"{t:.3f}", top, f"{rss:.0f}"])
        xs.append(nodes)
        ys.append(t)
        print(" | ".join(rows[-1]), flush=True)
    b, a = np.polyfit(np.array(xs, float), np.array(ys, float), 1)
    pred = a + b * np.array(xs, float)
    r2 = 1 - float(((np.array(ys) - pred) ** 2).sum() / ((np.array(ys) - np.mean(ys)) ** 2).sum())
    slope = np.polyfit(np.log(xs), np.log(ys), 1)[0]
    fit = (f"fit: time = {a * 1e3:.1f} ms + {b * 1e6:.1f} us x nodes  (R^2 = {r2:.4f}); "
           f"log-log slope {slope:.2f} (1.00 = linear)")
    header = ["layers", "d", "params", "nodes", "median s", "passes (ms)", "peak RSS MB"]
    text = table(header, rows)
    print(text)
    print(fit)
    note = (f"Median of {args.repeats} runs per shape, sequence length {args.seq}, vocab 50257, heads d/64. "
            "The whole `unit_scale(model, (idx, idx))` call is timed (capture, normalize, init (skipped on meta), "
            "shape_prop, topology, plan, rewrite, recompile). The passes column excludes capture and the copy of "
            "the model. Peak RSS is the process maximum so far (it includes torch itself). The machine is shared: "
            "timings are noisy.")
    path = write_result("transform_time", "Transform time vs size (meta device)", text + "\n\n" + fit + "\n\n" + note)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
