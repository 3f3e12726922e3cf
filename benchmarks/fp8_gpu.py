"""Real FP8 (torch._scaled_mm, unit scales) vs BF16 for a unit-scaled GPT, on one GPU.

One self-contained run (< 4 minutes on an H200) that writes a markdown report to ``--out``:

1. linear-layer micro-benchmark: ``F.linear`` in bf16 vs :func:`unit_scale_fx.lowp.fp8_linear.fp8_linear`,
   forward + backward, a few square shapes: ms per call and speed-up;
2. training: the character-level GPT of ``fp8_training.py`` (Python stdlib sources), unit-scaled,
   parameters and activations in bf16 (fp32 master weights), once with bf16 linears and once with
   real-FP8 linears; same seed, data and steps: tokens/s and final train / val loss.

    python benchmarks/fp8_gpu.py --out fp8_gpu.md
    python benchmarks/fp8_gpu.py --device cpu --tiny --out /tmp/fp8_gpu.md   # smoke test without a GPU

A wall-clock budget (``--budget``, seconds) stops training early (the report says how many steps ran).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fp8_training import VOCAB, load_corpus  # noqa: E402  (same corpus as the CPU benchmark)

from unit_scale_fx import unit_scale  # noqa: E402
from unit_scale_fx.lowp.fp8_linear import fp8_linear, fp8_supported, use_fp8_linear  # noqa: E402
from unit_scale_fx.examples import GPT  # noqa: E402
from unit_scale_fx.lowp.precision import MasterWeights, half_precision  # noqa: E402


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def bench_linear(dev: torch.device, sizes: list[int], reps: int) -> list[str]:
    rows = ["| M=K=N | bf16 F.linear fwd+bwd (ms) | fp8_linear fwd+bwd (ms) | speed-up |", "|---|---|---|---|"]
    for s in sizes:
        x = torch.randn(s, s, device=dev, dtype=torch.bfloat16, requires_grad=True)
        w = torch.randn(s, s, device=dev, dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn(s, s, device=dev, dtype=torch.bfloat16)
        times = []
        for fn in (F.linear, fp8_linear):
            for _ in range(3):
                fn(x, w).backward(g)
            sync(dev)
            t0 = time.perf_counter()
            for _ in range(reps):
                fn(x, w).backward(g)
            sync(dev)
            times.append((time.perf_counter() - t0) / reps * 1e3)
        rows.append(f"| {s} | {times[0]:.3f} | {times[1]:.3f} | {times[0] / times[1]:.2f}x |")
    return rows


def batches(data: torch.Tensor, n: int, b: int, t: int, seed: int, dev: torch.device):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        s = torch.randint(0, len(data) - t - 1, (b,), generator=g)
        chunk = torch.stack([data[i: i + t + 1] for i in s.tolist()]).to(dev)
        yield chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()


def train(name: str, fp8: bool, a, dev, train_data, val_data, deadline: float) -> dict:
    torch.manual_seed(0)
    model = GPT(vocab=len(VOCAB), d=a.d, layers=a.layers, heads=a.heads, max_len=a.seq).to(dev)
    example = next(batches(train_data, 1, a.batch, a.seq, 0, dev))
    us = unit_scale(model, example)
    half_precision(us, torch.bfloat16)
    if fp8:
        use_fp8_linear(us)
    opt = MasterWeights(us.parameters(), torch.optim.AdamW, lr=a.lr, weight_decay=0.0, betas=(0.9, 0.95))
    losses, steps, t_run = [], 0, 0.0
    warm = max(1, a.steps // 20)
    for step, (x, y) in enumerate(batches(train_data, a.steps, a.batch, a.seq, 1, dev)):
        if time.perf_counter() > deadline:
            break
        lr = a.lr * min(1.0, (step + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / a.steps)))
        for grp in opt.param_groups:
            grp["lr"] = lr
        sync(dev)
        t0 = time.perf_counter()
        loss = us(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        sync(dev)
        if step >= 5:  # skip warm-up steps in the throughput
            t_run += time.perf_counter() - t0
        losses.append(float(loss.detach()))
        steps += 1
    with torch.no_grad():
        vl = [float(us(x, y)) for x, y in batches(val_data, a.val_batches, a.batch, a.seq, 99, dev)]
    timed = max(1, steps - 5)
    return {"name": name, "steps": steps, "tok_s": timed * a.batch * a.seq / max(t_run, 1e-9),
            "train": sum(losses[-max(1, steps // 10):]) / max(1, len(losses[-max(1, steps // 10):])),
            "val": sum(vl) / len(vl), "finite": all(math.isfinite(v) for v in losses)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="markdown report path")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a small model and few steps (smoke test)")
    ap.add_argument("--budget", type=float, default=170.0, help="seconds for the whole run (training stops early)")
    a = ap.parse_args()
    if a.tiny:
        a.d, a.layers, a.heads, a.seq, a.batch, a.steps, a.val_batches, a.lr = 64, 2, 4, 64, 16, 20, 2, 3e-2
        sizes, reps = [256], 3
    else:
        a.d, a.layers, a.heads, a.seq, a.batch, a.steps, a.val_batches, a.lr = 768, 8, 12, 512, 32, 400, 8, 1e-2
        sizes, reps = [2048, 4096, 8192], 20
    start = time.perf_counter()
    dev = torch.device(a.device)
    lines = ["# Real FP8 (torch._scaled_mm, unit scales) vs BF16, unit-scaled GPT", ""]
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    lines.append(f"`python benchmarks/fp8_gpu.py {' '.join(sys.argv[1:])}` on {name}, torch {torch.__version__}")
    lines.append("")
    ok = fp8_supported(dev)
    lines.append(f"FP8 `_scaled_mm` supported: {ok}")
    if not ok:
        lines.append("\nNothing to measure without FP8 support.")
    else:
        try:
            lines += ["", "## Linear layer, forward + backward", ""] + bench_linear(dev, sizes, reps)
        except Exception:  # report, then go on to training
            lines += ["", "linear benchmark failed:", "```", traceback.format_exc(), "```"]
        train_data, val_data, info = load_corpus()
        lines += ["", "## Training", "",
                  f"Corpus: {info['chars']} chars of the Python {info['python']} stdlib; model d={a.d} "
                  f"layers={a.layers} heads={a.heads} seq={a.seq} batch={a.batch}, up to {a.steps} steps, "
                  f"AdamW lr={a.lr} (fp32 master weights), bf16 parameters and activations, no loss scaling.", "",
                  "| run | steps | tokens/s | final train loss | val loss | finite |", "|---|---|---|---|---|---|"]
        deadline_total = start + a.budget
        results = []
        for i, (rname, fp8) in enumerate((("bf16 unit-scaled", False), ("fp8 unit-scaled (_scaled_mm)", True))):
            remaining = deadline_total - time.perf_counter()
            deadline = time.perf_counter() + remaining / (2 - i)
            try:
                r = train(rname, fp8, a, dev, train_data, val_data, deadline)
                results.append(r)
                lines.append(f"| {r['name']} | {r['steps']} | {r['tok_s']:.0f} | {r['train']:.4f} | {r['val']:.4f} "
                             f"| {r['finite']} |")
            except Exception:
                lines += ["", f"{rname} failed:", "```", traceback.format_exc(), "```"]
            with open(a.out, "w") as f:  # write as we go: a timeout still leaves a report
                f.write("\n".join(lines) + "\n")
        if len(results) == 2:
            b, e = results
            lines += ["", f"FP8 / BF16 throughput: {e['tok_s'] / b['tok_s']:.2f}x; "
                          f"val loss FP8 vs BF16: {100 * (e['val'] / b['val'] - 1):+.2f}%"]
    lines += ["", f"total wall time {time.perf_counter() - start:.0f} s"]
    with open(a.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
