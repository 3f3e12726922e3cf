"""Low precision without loss scaling, measured: a character-level GPT on Python's own sources.

Runs (same seed, same data order, same steps):

  fp32                 plain GPT (GPT-2 style init), float32                      -- the baseline
  fp32 unit-scaled     unit_scale(GPT), float32                                   -- reference
  fp8-sim unscaled     plain GPT, matmul operands e4m3 / gradients e5m2, no loss scaling
  fp8-sim unit-scaled  unit_scale(GPT), same FP8 simulation
  fp16 unit-scaled     unit_scale(GPT), parameters and activations float16, no GradScaler
  bf16 unit-scaled     unit_scale(GPT), parameters and activations bfloat16

Data: a fixed list of files from the Python standard library (present on every
machine with Python, offline), concatenated in list order, mapped to 96
printable-ASCII symbols; the first 90 % is train, the last 10 % validation.

Underflow / saturation: every run carries the same quantisers at the inputs of its
matmuls (and at the gradients arriving at their outputs): they round in the FP8
runs and only count in the others (``passthrough``). So every run reports which
share of *its own* matmul operands E4M3 would flush to zero or saturate in forward,
and E5M2 in backward, counted on the training steps at which validation is measured.

    python benchmarks/fp8_training.py --quick     # a few minutes on 2 cores
    python benchmarks/fp8_training.py             # the longer run; results in benchmarks/results/

Half precision: :func:`unit_scale_fx.lowp.precision.half_precision` keeps losses, norms and
softmax in float32; the optimizer holds float32 master weights (update precision,
not range). CPU training calls ``torch.set_flush_denormal(True)`` to avoid slow
float32 denormals in Adam's state.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn

from unit_scale_fx import unit_scale
from unit_scale_fx.lowp.formats import FormatCounter
from unit_scale_fx.examples import GPT
from unit_scale_fx.lowp.simulate import format_counts, simulate_format, track_formats
from unit_scale_fx.lowp.precision import MasterWeights, half_precision

#: The corpus: these files of the standard library, in this order (missing ones are skipped and listed).
STDLIB_FILES = (
    "argparse.py", "functools.py", "dataclasses.py", "inspect.py", "textwrap.py", "string.py", "typing.py",
    "logging/__init__.py", "json/encoder.py", "json/decoder.py", "collections/__init__.py", "contextlib.py",
    "enum.py", "fractions.py", "heapq.py", "bisect.py", "random.py", "statistics.py", "difflib.py", "shutil.py",
)
VOCAB = ["\n"] + [chr(c) for c in range(32, 127)]  # 96 symbols; anything else becomes "?"
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def load_corpus() -> tuple[torch.Tensor, torch.Tensor, dict]:
    root = sysconfig.get_paths()["stdlib"]
    parts, used, missing = [], [], []
    for rel in STDLIB_FILES:
        path = os.path.join(root, rel)
        if os.path.exists(path):
            with open(path, encoding="utf-8", errors="replace") as f:
                parts.append(f.read())
            used.append(rel)
        else:
            missing.append(rel)
    text = "\n".join(parts)
    index = {ch: i for i, ch in enumerate(VOCAB)}
    unk = index["?"]
    ids = torch.tensor([index.get(ch, unk) for ch in text], dtype=torch.long)
    cut = int(0.9 * len(ids))
    info = {"python": platform.python_version(), "root": root, "files": used, "missing": missing,
            "chars": len(ids), "train_chars": cut, "val_chars": len(ids) - cut}
    return ids[:cut], ids[cut:], info


@dataclass
class Config:
    d: int
    layers: int
    heads: int
    seq: int
    batch: int
    steps: int
    eval_every: int
    val_batches: int
    lr_plain: float
    lr_unit: float
    seed: int = 0


# learning rates: a 100-step sweep of the fp32 runs on the quick model (unit-scaled: 1e-2 / 3e-2 / 1e-1 ->
# val 2.90 / 2.74 / 2.76; plain: 3e-3 / 1e-2 -> 2.82 / 3.09)
QUICK = Config(d=64, layers=2, heads=4, seq=64, batch=16, steps=120, eval_every=40, val_batches=8,
               lr_plain=3e-3, lr_unit=3e-2)
FULL = Config(d=64, layers=2, heads=4, seq=64, batch=16, steps=700, eval_every=100, val_batches=16,
              lr_plain=3e-3, lr_unit=3e-2)


@dataclass
class Run:
    name: str
    unit_scaled: bool
    fp8: bool = False
    dtype: torch.dtype = torch.float32
    train: list[tuple[int, float]] = field(default_factory=list)
    val: list[tuple[int, float]] = field(default_factory=list)
    counts: dict[str, FormatCounter] = field(default_factory=dict)
    seconds: float = 0.0
    nonfinite_steps: int = 0


RUNS = (
    Run("fp32", unit_scaled=False),
    Run("fp32 unit-scaled", unit_scaled=True),
    Run("fp8-sim unscaled", unit_scaled=False, fp8=True),
    Run("fp8-sim unit-scaled", unit_scaled=True, fp8=True),
    Run("fp16 unit-scaled", unit_scaled=True, dtype=torch.float16),
    Run("bf16 unit-scaled", unit_scaled=True, dtype=torch.bfloat16),
)


def batch(data: torch.Tensor, cfg: Config, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    starts = torch.randint(0, len(data) - cfg.seq - 1, (cfg.batch,), generator=gen)
    chunk = torch.stack([data[s: s + cfg.seq + 1] for s in starts.tolist()])
    return chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()


def val_batches(data: torch.Tensor, cfg: Config) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1234)
    return [batch(data, cfg, gen) for _ in range(cfg.val_batches)]


def lr_at(step: int, cfg: Config, peak: float) -> float:
    warm = max(1, cfg.steps // 20)
    if step < warm:
        return peak * (step + 1) / warm
    t = (step - warm) / max(1, cfg.steps - warm)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def build(run: Run, cfg: Config, example: tuple[torch.Tensor, torch.Tensor]) -> tuple[nn.Module, object]:
    torch.manual_seed(cfg.seed)
    model = GPT(vocab=len(VOCAB), d=cfg.d, layers=cfg.layers, heads=cfg.heads, max_len=cfg.seq)
    if run.unit_scaled:
        model = unit_scale(model, example)
    # every run carries the same quantisers: rounding in FP8 runs, counting only in the others
    model = simulate_format(model, "e4m3", "e5m2", passthrough=not run.fp8)
    if run.dtype != torch.float32:
        half_precision(model, run.dtype)
    lr = cfg.lr_unit if run.unit_scaled else cfg.lr_plain
    if run.dtype != torch.float32:
        opt = MasterWeights(model.parameters(), torch.optim.AdamW, lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    return model, opt


@torch.no_grad()
def evaluate(model: nn.Module, vals: list) -> float:
    model.eval()
    loss = sum(float(model(x, y)) for x, y in vals) / len(vals)
    model.train()
    return loss


def train(run: Run, cfg: Config, train_data: torch.Tensor, vals: list) -> Run:
    gen = torch.Generator().manual_seed(cfg.seed)
    model, opt = build(run, cfg, vals[0])
    lr_peak = cfg.lr_unit if run.unit_scaled else cfg.lr_plain
    t0 = time.perf_counter()
    for step in range(cfg.steps + 1):
        tracked = step % cfg.eval_every == 0
        if tracked:
            run.val.append((step, evaluate(model, vals)))
            track_formats(model, True)
        if step == cfg.steps:
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg, lr_peak)
        x, y = batch(train_data, cfg, gen)
        loss = model(x, y)
        loss.backward()
        if not torch.isfinite(loss):
            run.nonfinite_steps += 1
        opt.step()
        opt.zero_grad()
        run.train.append((step, float(loss.detach())))
        if tracked:
            for k, c in format_counts(model, by_role=True).items():
                run.counts.setdefault(k, FormatCounter()).merge(c)
            track_formats(model, False)
    run.seconds = time.perf_counter() - t0
    return run


def final_train(run: Run, cfg: Config) -> float:
    tail = [l for _, l in run.train[-max(1, cfg.steps // 10):]]
    return sum(tail) / len(tail)


def pct(x: float) -> str:
    if x == 0:
        return "0"
    return f"{100 * x:.3g}%"


def total(run: Run, prefix: str) -> FormatCounter:
    out = FormatCounter()
    for k, c in run.counts.items():
        if k.startswith(prefix + ":"):
            out.merge(c)
    return out


def role_table(runs: list[Run]) -> str:
    """Underflow per site role (matmul operands, attention's q/k/v/p, gradients) for each run."""
    keys = sorted({k for r in runs for k in r.counts})
    rows = ["| site | " + " | ".join(r.name for r in runs) + " |", "|---" * (len(runs) + 1) + "|"]
    for k in keys:
        cells = []
        for r in runs:
            c = r.counts.get(k)
            cells.append("-" if c is None else f"{pct(c.underflow_fraction)} / {pct(c.overflow_fraction)}")
        rows.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def table(runs: list[Run], cfg: Config) -> str:
    base = runs[0].val[-1][1]
    rows = ["| run | final train loss | final val loss | val vs fp32 | e4m3 fwd underflow | e4m3 fwd saturated "
            "| e5m2 bwd underflow | e5m2 bwd saturated | non-finite steps | s/step |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        f, b = total(r, "fwd:e4m3"), total(r, "bwd:e5m2")
        val = r.val[-1][1]
        rows.append(f"| {r.name} | {final_train(r, cfg):.4f} | {val:.4f} | {100 * (val / base - 1):+.2f}% "
                    f"| {pct(f.underflow_fraction)} | {pct(f.overflow_fraction)} | {pct(b.underflow_fraction)} "
                    f"| {pct(b.overflow_fraction)} | {r.nonfinite_steps} | {r.seconds / cfg.steps:.3f} |")
    return "\n".join(rows)


def plot(runs: list[Run], cfg: Config, path: str) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    win = max(1, cfg.steps // 30)
    for r in runs:
        ys = [l for _, l in r.train]
        smooth = [sum(ys[max(0, i - win + 1): i + 1]) / len(ys[max(0, i - win + 1): i + 1]) for i in range(len(ys))]
        axes[0].plot([s for s, _ in r.train], smooth, label=r.name)
        axes[1].plot([s for s, _ in r.val], [v for _, v in r.val], marker="o", label=r.name)
    axes[0].set_title(f"train loss (moving mean over {win} steps)")
    axes[1].set_title("validation loss")
    for ax in axes:
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats/char)")
        ax.grid(alpha=0.3)
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small model, few steps (a few minutes on 2 cores)")
    ap.add_argument("--steps", type=int, default=None, help="override the number of steps")
    ap.add_argument("--runs", default=None, help="comma-separated subset of run names")
    ap.add_argument("--out", default=None, help="results file stem (default benchmarks/results/fp8_training[_quick])")
    args = ap.parse_args(argv)
    torch.set_flush_denormal(True)
    cfg = QUICK if args.quick else FULL
    if args.steps is not None:
        cfg = Config(**{**cfg.__dict__, "steps": args.steps, "eval_every": max(1, args.steps // 3)})
    train_data, val_data, info = load_corpus()
    vals = val_batches(val_data, cfg)
    wanted = None if args.runs is None else {s.strip() for s in args.runs.split(",")}
    runs = [Run(r.name, r.unit_scaled, r.fp8, r.dtype) for r in RUNS if wanted is None or r.name in wanted]
    print(f"corpus: {info['chars']} chars from {len(info['files'])} stdlib files of Python {info['python']} "
          f"(train {info['train_chars']}, val {info['val_chars']}); missing: {info['missing'] or 'none'}")
    print(f"config: {cfg}")
    done = []
    for r in runs:
        train(r, cfg, train_data, vals)
        done.append(r)
        print(f"  {r.name:22s} val {r.val[-1][1]:.4f}  ({r.seconds:.0f} s)", flush=True)
    md = table(done, cfg)
    roles = role_table(done)
    print()
    print(md)
    print()
    print(roles)
    stem = args.out or os.path.join(RESULTS, "fp8_training_quick" if args.quick else "fp8_training")
    os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
    png = plot(done, cfg, stem + ".png")
    cmd = "python benchmarks/fp8_training.py " + " ".join(argv if argv is not None else sys.argv[1:])
    with open(stem + ".md", "w") as f:
        f.write(f"# FP8 / FP16 / BF16 training without loss scaling\n\n`{cmd.strip()}` — torch {torch.__version__}, "
                f"{torch.get_num_threads()} CPU threads\n\n")
        f.write(f"Corpus: {info['chars']} characters from {len(info['files'])} files of the Python "
                f"{info['python']} standard library (train {info['train_chars']}, val {info['val_chars']}).\n\n")
        f.write(f"Config: `{cfg}`\n\n{md}\n\n")
        f.write("Final train loss: mean over the last 10 % of steps. Underflow: share of nonzero matmul operands "
                "(forward, E4M3) / gradients at matmul outputs (backward, E5M2) that the format flushes to zero; "
                "saturated: share beyond the format's max. Counted on the steps where validation is measured; "
                "rounding is applied only in the fp8-sim runs, the other runs are measured as they are.\n\n")
        f.write("Per site role (underflow / saturated): `matmul operand` = inputs of linear layers, `q`/`k`/`v`/`p` = "
                "the operands of attention's two matmuls (`p`: softmax weights), `matmul grad` / `grad(q@k)` / "
                "`grad(p@v)` = gradients arriving at those matmuls' outputs.\n\n" + roles + "\n")
        if png:
            f.write(f"\n![loss curves]({os.path.basename(png)})\n")
    with open(stem + ".json", "w") as f:
        json.dump({"config": cfg.__dict__, "corpus": info, "runs": [
            {"name": r.name, "train": r.train, "val": r.val, "seconds": r.seconds, "nonfinite_steps": r.nonfinite_steps,
             "counts": {k: c.__dict__ for k, c in r.counts.items()}} for r in done]}, f)
    print(f"\nwrote {stem}.md" + (f", {png}" if png else "") + f", {stem}.json")


if __name__ == "__main__":
    main()
