"""Learning-rate transfer across width and depth: standard parametrization vs u-μP.

A character-level GPT (``unit_scale_fx.examples.GPT``, data: ``benchmarks/data.py``)
is trained for 150 steps (60 with --quick) at several widths (and depths) over a
learning-rate grid with factor-2 steps, in two parametrizations:

* ``sp``: the model as written (GPT-2 init, std 0.02), one Adam learning rate;
* ``u-mup``: ``unit_scale(model, mup=True)`` with ``unit_scale_fx.training.optim.Adam``
  (per-role learning-rate multipliers derived from the graph).

The script prints the table of final validation losses, the best learning rate
per model and how many grid steps it moves across widths / depths, writes
``benchmarks/results/lr_transfer[_quick].md`` and a PNG of loss vs learning
rate per width.

    python benchmarks/lr_transfer.py            # 150 steps, widths 64/128/256 at 2 layers, 2 vs 8 layers at d=64
    python benchmarks/lr_transfer.py --quick    # 60 steps, widths 64/128/256 at 2 layers, 6-point grids

CPU note: the script calls ``torch.set_flush_denormal(True)`` (Adam state decaying
into denormals slows CPU training many-fold) and uses one thread by default.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from data import VOCAB, char_data  # noqa: E402

from unit_scale_fx import unit_scale  # noqa: E402
from unit_scale_fx.training import optim  # noqa: E402
from unit_scale_fx.examples import GPT  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


@dataclass(frozen=True)
class Shape:
    width: int
    layers: int

    @property
    def label(self) -> str:
        return f"d={self.width} L={self.layers}"


def train_one(param: str, shape: Shape, lr: float, args, data) -> float:
    torch.manual_seed(args.seed)
    heads = max(1, shape.width // 32)
    model = GPT(vocab=VOCAB, d=shape.width, layers=shape.layers, heads=heads, max_len=args.seq)
    g = torch.Generator().manual_seed(args.seed)
    x0, y0 = data.batch("train", args.batch, args.seq, g)
    if param == "u-mup":
        model = unit_scale(model, (x0, y0), mup=True)
        opt = optim.Adam(model, lr=lr)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=lr)
    warm = max(1, args.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))))
    model.train()
    for step in range(args.steps):
        x, y = data.batch("train", args.batch, args.seq, g)
        loss = model(x, y)
        if not torch.isfinite(loss):
            return float("nan")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    gv = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        vals = [model(*data.batch("val", args.batch, args.seq, gv)).item() for _ in range(args.val_batches)]
    v = sum(vals) / len(vals)
    return v if math.isfinite(v) else float("nan")


def best_index(losses: list[float]) -> int | None:
    finite = [(l, i) for i, l in enumerate(losses) if math.isfinite(l)]
    return min(finite)[1] if finite else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a few minutes: fewer steps and a smaller grid")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--val-batches", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-depth", action="store_true", help="skip the 2 vs 8 layer comparison")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    if args.steps is None:
        args.steps = 60 if args.quick else 150
    # log2 learning-rate ranges, chosen from a pilot at width 64 so both optima fall inside the grid
    # (SP's optimum moves down with width, so its grid reaches further down in the full run)
    ranges = {"sp": (-10, -5), "u-mup": (-4, 1)} if args.quick else {"sp": (-11, -5), "u-mup": (-4, 2)}
    shapes = [Shape(64, 2), Shape(128, 2), Shape(256, 2)]
    depth_shapes = [] if (args.quick or args.no_depth) else [Shape(64, 8)]
    data = char_data()
    results: dict[tuple[str, Shape], list[float]] = {}
    grids = {p: [2.0 ** e for e in range(lo, hi + 1)] for p, (lo, hi) in ranges.items()}
    t0 = time.time()
    for param in ("sp", "u-mup"):
        for shape in shapes + depth_shapes:
            row = []
            for lr in grids[param]:
                t = time.time()
                row.append(train_one(param, shape, lr, args, data))
                print(f"{param:6s} {shape.label:12s} lr=2^{math.log2(lr):+.0f}  val loss {row[-1]:.4f}  "
                      f"({time.time() - t:.1f}s)", flush=True)
            results[(param, shape)] = row
    elapsed = time.time() - t0
    report = render(results, grids, shapes, depth_shapes, args, elapsed)
    print(report)
    os.makedirs(RESULTS, exist_ok=True)
    stem = "lr_transfer_quick" if args.quick else "lr_transfer"
    with open(os.path.join(RESULTS, stem + ".md"), "w") as f:
        f.write(report + "\n")
    plot(results, grids, shapes, depth_shapes, os.path.join(RESULTS, stem + ".png"))


def render(results, grids, shapes, depth_shapes, args, elapsed) -> str:
    cmd = "python benchmarks/lr_transfer.py" + (" --quick" if args.quick else "")
    lines = [f"# Learning-rate transfer: standard parametrization vs u-μP", "",
             f"Command: `{cmd}` ({args.steps} steps, batch {args.batch}, seq {args.seq}, "
             f"Adam, warmup + cosine, seed {args.seed}; {elapsed / 60:.1f} min on {args.threads} CPU thread(s)).",
             "Entries: validation loss (nats/char) after training; `*` = best on the row; `nan` = diverged.", ""]
    summary = []
    for param, grid in grids.items():
        head = "| model | " + " | ".join(f"2^{math.log2(lr):+.0f}" for lr in grid) + " | best lr |"
        lines += [f"## {param}", "", head, "|" + "---|" * (len(grid) + 2)]
        for shape in shapes + depth_shapes:
            row = results[(param, shape)]
            b = best_index(row)
            cells = [("nan" if not math.isfinite(v) else f"{v:.3f}") + ("*" if i == b else "") for i, v in enumerate(row)]
            lines.append(f"| {shape.label} | " + " | ".join(cells) + f" | {'-' if b is None else f'2^{math.log2(grid[b]):+.0f}'} |")
        lines.append("")
        for name, group in (("width", shapes), ("depth", [shapes[0]] + depth_shapes if depth_shapes else [])):
            idx = [best_index(results[(param, s)]) for s in group]
            if len(group) > 1 and None not in idx:
                summary.append(f"- {param}: best learning rate moves by {max(idx) - min(idx)} grid step(s) across "
                               f"{name} ({', '.join(s.label for s in group)}: "
                               f"{', '.join(f'2^{math.log2(grids[param][i]):+.0f}' for i in idx)})")
    lines += ["## Shift of the best learning rate", ""] + summary
    return "\n".join(lines)


def plot(results, grids, shapes, depth_shapes, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # optional
        print("matplotlib not installed: no PNG written")
        return
    cols = 2 if depth_shapes else 1
    fig, axes = plt.subplots(cols, 2, figsize=(10, 4 * cols), squeeze=False)
    for j, param in enumerate(grids):
        for i, group in enumerate([shapes] + ([[shapes[0]] + depth_shapes] if depth_shapes else [])):
            ax = axes[i][j]
            for shape in group:
                ys = results[(param, shape)]
                ax.plot([math.log2(lr) for lr in grids[param]], ys, marker="o", label=shape.label)
                b = best_index(ys)
                if b is not None:
                    ax.plot(math.log2(grids[param][b]), ys[b], marker="*", color="k", markersize=12)
            ax.set_title(f"{param}: {'width' if i == 0 else 'depth'}")
            ax.set_xlabel("log2 learning rate")
            ax.set_ylabel("validation loss")
            finite = [v for s in group for v in results[(param, s)] if math.isfinite(v)]
            if finite:
                ax.set_ylim(min(finite) - 0.05, min(max(finite), min(finite) + 1.5) + 0.05)
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
