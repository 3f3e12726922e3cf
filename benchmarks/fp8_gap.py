"""Train in FP8 as well as in FP32: learning-rate grids, 2 seeds, 2 tasks, and where the gap comes from.

For each task (``char``: character-level GPT; ``image``: ViT on generated images; see ``fp8_tasks.py``)
and each recipe (``sp-fp32``, ``sp-fp8-dynamic``, ``us-fp32``, ``us-fp8``, optionally ``unit-fp32`` /
``unit-fp8``), every learning rate of the recipe's grid (4 points, factor 2: ``GRIDS``) is trained with
every seed (default 0 and 1; the seed sets the weight init and the data order) for 500 (char) / 400
(image) Adam steps at width 64. A recipe's result is its best learning rate by the mean over seeds of
the final validation loss.

Diagnostics: every run carries quantisers at every matmul operand and output gradient (rounding in the
FP8 recipes, counting only in the FP32 ones). At ``--evals`` points during training the script records,
per op kind (the matmul's weight name with layer indices removed, e.g. ``blocks.attn.proj``; attention's
inner matmuls as ``attention``), the RMS of the operands (forward, as cast) and of the output gradients
(backward, as cast), the share of nonzero values the format flushes to zero (E4M3 forward, E5M2
backward; BF16 for the ops the policy keeps in higher precision) and the share that saturates; and the
RMS of every weight kind relative to its initial RMS (the drift under Adam).

Outputs: ``benchmarks/results/fp8_gap.{md,json,png}`` (``--out`` changes the stem). The PNG shows, per
task, the validation curves at each recipe's best learning rate, the forward/backward operand RMS per op
kind, the underflow share over training, and the weight-RMS drift.

    python benchmarks/fp8_gap.py --jobs 2                  # the full grid (see --help for sizes)
    python benchmarks/fp8_gap.py --quick --jobs 2          # tens of steps: a smoke run of the whole pipeline
    python benchmarks/fp8_gap.py --report-only             # re-render from the JSON

CPU: each worker process calls ``torch.set_num_threads(1)`` and ``torch.set_flush_denormal(True)``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import time
import warnings
from multiprocessing import get_context
from typing import Any, Optional

import torch
import torch.fx as fx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fp8_tasks  # noqa: E402
from fp8_tasks import TASKS, build, evaluate, schedule  # noqa: E402

from unit_scale_fx.lowp.formats import Quantise  # noqa: E402
from unit_scale_fx.lowp.simulate import track_formats  # noqa: E402
from unit_scale_fx.lowp.simulated_attention import SimulatedAttention  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

#: log2 learning-rate grids per parametrization (Adam), factor 2 apart, centred on single-seed pilots of
#: both tasks (SP: 2^-8 on both; u-μP: 2^-2 char, 2^-1 image); plain unit scaling around the README's 1e-1.
GRIDS = {"sp": (-10, -9, -8, -7), "us": (-3, -2, -1, 0), "unit": (-5, -4, -3, -2)}


def _strip(name: str) -> str:
    return re.sub(r"\.\d+(?=\.|$)", "", name).removesuffix(".weight")


def _weight_name(node: fx.Node, matrices: set[str], depth: int = 6) -> Optional[str]:
    """The name of the matrix parameter (``dim >= 2``) feeding ``node`` through scale / quantise nodes, if any."""
    frontier = [node]
    for _ in range(depth):
        nxt = []
        for n in frontier:
            if n.op == "get_attr" and str(n.target) in matrices:
                return str(n.target)
            if n.op != "placeholder":
                nxt.extend(n.all_input_nodes)
        frontier = nxt
    return None


def site_kinds(model: torch.nn.Module) -> dict[int, str]:
    """``id(Quantise) -> op-kind key``: ``"<weight kind>:x"`` / ``":w"`` / ``":grad"``, ``"attention:<role>"``."""
    out: dict[int, str] = {}
    mods = dict(model.named_modules())
    matrices = {n for n, p in model.named_parameters() if p.dim() >= 2}
    for node in model.graph.nodes:
        if node.op != "call_module" or not str(node.target).startswith("us_formats."):
            continue
        site = mods[str(node.target)]
        if isinstance(site, SimulatedAttention):
            for sub in site.modules():
                if isinstance(sub, Quantise):
                    out[id(sub)] = f"attention:{sub.role}"
            continue
        name = str(node.target).rsplit(".", 1)[1]
        if name.endswith("_grad"):
            op = node.args[0]
            w = _weight_name(op, matrices)
            out[id(site)] = f"{_strip(w) if w else op.name}:grad"
        else:
            op = next(iter(node.users))
            w = _weight_name(op, matrices)
            operand_is_weight = w is not None and _weight_name(node, matrices, depth=4) == w
            out[id(site)] = f"{_strip(w) if w else op.name}:{'w' if operand_is_weight else 'x'}"
    return out


def weight_rms(model: torch.nn.Module) -> dict[str, float]:
    acc: dict[str, list[float]] = {}
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            acc.setdefault(_strip(name), []).append(float(p.detach().float().square().mean()))
    return {k: math.sqrt(sum(v) / len(v)) for k, v in acc.items()}


def snapshot(model: torch.nn.Module, kinds: dict[int, str]) -> dict[str, dict[str, float]]:
    """Per op kind: RMS, underflow share, saturated share and format of what the quantisers saw."""
    agg: dict[str, list] = {}
    for m in model.modules():
        if not isinstance(m, Quantise) or m.stats is None:
            continue
        key = kinds.get(id(m), m.role)
        for direction, spec, c in (("fwd", m.fwd, m.stats.fwd), ("bwd", m.bwd, m.stats.bwd)):
            if spec is None or not c.total:
                continue
            a = agg.setdefault(key, [direction, spec.name, 0.0, 0, 0, 0, 0, 0])
            a[2] += c.sumsq
            a[3] += c.finite
            a[4] += c.nonzero
            a[5] += c.underflow
            a[6] += c.overflow
            a[7] += c.total
    return {k: {"dir": a[0], "fmt": a[1], "rms": math.sqrt(a[2] / a[3]) if a[3] else 0.0,
                "underflow": a[5] / a[4] if a[4] else 0.0, "saturated": a[6] / a[7] if a[7] else 0.0}
            for k, a in agg.items()}


def run_one(job: dict) -> dict:
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    warnings.filterwarnings("ignore")
    task = TASKS[job["task"]](**job.get("task_kw", {}))
    lr = 2.0 ** job["log2lr"]
    t0 = time.perf_counter()
    model, opt = build(task, job["recipe"], lr, job["seed"], policy=job["policy"], count=True)
    sched = schedule(opt, job["steps"])
    kinds = site_kinds(model)
    w0 = weight_rms(model)
    g = torch.Generator().manual_seed(1000 + job["seed"])
    every = max(1, job["steps"] // job["evals"])
    curve, diag, train, nonfinite = [], [], [], 0
    for step in range(job["steps"] + 1):
        tracked = step % every == 0 or step == job["steps"]
        if tracked:
            curve.append((step, evaluate(model, task)))
            w = weight_rms(model)
            diag.append({"step": step, "weight_drift": {k: w[k] / w0[k] for k in w if w0.get(k)}})
        if step == job["steps"]:
            break
        if tracked:
            track_formats(model, True)
        x, y = task.train_batch(g)
        loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if tracked:
            diag[-1]["sites"] = snapshot(model, kinds)
            track_formats(model, False)
        if not torch.isfinite(loss):
            nonfinite += 1
            if nonfinite > 5:
                curve.append((step, float("nan")))
                break
        opt.step()
        sched.step()
        train.append(float(loss.detach()))
    tail = [l for l in train[-max(1, len(train) // 10):] if math.isfinite(l)]
    return {**job, "val": curve[-1][1], "curve": curve, "diag": diag, "nonfinite": nonfinite,
            "train_tail": sum(tail) / len(tail) if tail else float("nan"), "seconds": time.perf_counter() - t0}


# ------------------------------------------------------------------------------------------------ report


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if math.isfinite(x)]
    return statistics.fmean(xs) if len(xs) else float("nan")


def summarise(runs: list[dict]) -> dict:
    """``{task: {recipe: {"grid": {log2lr: mean val}, "best": log2lr, "val": mean, "seeds": [...]}}}``."""
    out: dict = {}
    for r in runs:
        cell = out.setdefault(r["task"], {}).setdefault(r["recipe"], {"grid": {}, "runs": {}})
        cell["runs"].setdefault(r["log2lr"], []).append(r)
    for task, recipes in out.items():
        for recipe, cell in recipes.items():
            for lr, rs in cell["runs"].items():
                vals = [x["val"] for x in rs]
                cell["grid"][lr] = float("nan") if any(not math.isfinite(v) for v in vals) else _mean(vals)
            finite = {lr: v for lr, v in cell["grid"].items() if math.isfinite(v)}
            best = min(finite, key=finite.get) if finite else None
            cell["best"] = best
            cell["val"] = finite[best] if best is not None else float("nan")
            cell["seeds"] = [x["val"] for x in cell["runs"][best]] if best is not None else []
    return out


LABELS = {"sp-fp32": "standard, FP32", "sp-fp8-dynamic": "standard, FP8 per-tensor dynamic scaling",
          "us-fp32": "unit-scaled (u-μP), FP32", "us-fp8": "unit-scaled (u-μP), FP8 static",
          "unit-fp32": "unit-scaled (plain unit scaling), FP32", "unit-fp8": "unit-scaled (plain unit scaling), FP8 static"}


def render(runs: list[dict], meta: dict) -> str:
    summ = summarise(runs)
    lines = [f"# FP8 as well as FP32: standard vs unit-scaled, best learning rate of a grid, mean of seeds", "",
             f"Command: `{meta['command']}`  ", f"Machine: {meta['machine']}  ",
             f"Wall time: {meta['wall_min']:.1f} min with {meta['jobs']} worker process(es), 1 thread each.  ",
             f"Format policy of the FP8 rows: `{meta['policy']}` "
             + ("(attention's inner matmuls and the readout in BF16, every other matmul operand E4M3, "
                "every other output gradient E5M2)" if meta["policy"] == "fp8" else "(every matmul-class op in FP8)")
             + ".", ""]
    for task, recipes in summ.items():
        lines += [f"## {task}: {meta['tasks'][task]['describe']}, {meta['tasks'][task]['steps']} steps", ""]
        base = recipes.get("sp-fp32", {}).get("val", float("nan"))
        dyn = recipes.get("sp-fp8-dynamic", {}).get("val", float("nan"))
        lines += ["| model | precision | best lr | val loss (mean of seeds) | seeds | vs standard FP32 |",
                  "|---|---|---|---|---|---|"]
        for recipe in [r for r in fp8_tasks.RECIPES if r in recipes]:
            c = recipes[recipe]
            name, prec = LABELS[recipe].split(", ", 1)
            lr = f"2^{c['best']}" if c["best"] is not None else "-"
            seeds = " / ".join(f"{v:.4f}" for v in c["seeds"])
            lines.append(f"| {name} | {prec} | {lr} | {c['val']:.4f} | {seeds} | {c['val'] / base:.4f}× |")
        lines += ["", "Validation loss per learning rate (mean of seeds; `nan`: diverged):", ""]
        lrs = sorted({lr for c in recipes.values() for lr in c["grid"]})
        lines += ["| recipe | " + " | ".join(f"2^{lr}" for lr in lrs) + " |", "|---" * (len(lrs) + 1) + "|"]
        for recipe in [r for r in fp8_tasks.RECIPES if r in recipes]:
            c = recipes[recipe]
            cells = []
            for lr in lrs:
                v = c["grid"].get(lr)
                cells.append("" if v is None else (f"**{v:.4f}**" if lr == c["best"] else f"{v:.4f}"))
            lines.append(f"| {recipe} | " + " | ".join(cells) + " |")
        us8 = recipes.get("us-fp8", {}).get("val", float("nan"))
        lines += ["", f"Targets: unit-scaled FP8 ≤ 1.01 × standard FP32: {us8:.4f} ≤ {1.01 * base:.4f} → "
                  f"**{'met' if us8 <= 1.01 * base else 'not met'}**; ≤ standard dynamic FP8: {us8:.4f} ≤ {dyn:.4f} → "
                  f"**{'met' if us8 <= dyn else 'not met'}**.", ""]
        lines += diag_table(runs, task, recipes)
    return "\n".join(lines)


def _best_run(runs: list[dict], task: str, recipe: str, best) -> Optional[dict]:
    for r in runs:
        if r["task"] == task and r["recipe"] == recipe and r["log2lr"] == best:
            return r
    return None


def diag_table(runs: list[dict], task: str, recipes: dict) -> list[str]:
    """Per op kind at the end of training (best-lr run, first seed): RMS and underflow, fwd and bwd."""
    out = ["Per op kind at the last tracked step (best learning rate, first seed): RMS of what is cast "
           "/ share of nonzero values flushed to zero / weight RMS relative to init.", ""]
    recs = [r for r in fp8_tasks.RECIPES if r in recipes]
    chosen = {r: _best_run(runs, task, r, recipes[r]["best"]) for r in recs}
    keys = sorted({k for run in chosen.values() if run for d in run["diag"][-2:-1] for k in d.get("sites", {})})
    out += ["| op kind | " + " | ".join(recs) + " |", "|---" * (len(recs) + 1) + "|"]
    for k in keys:
        cells = []
        for r in recs:
            run = chosen[r]
            d = run["diag"][-2].get("sites", {}).get(k) if run and len(run["diag"]) >= 2 else None
            cells.append("-" if d is None else f"{d['rms']:.3g} / {100 * d['underflow']:.2g}% ({d['fmt']})")
        out.append(f"| {k} | " + " | ".join(cells) + " |")
    wkeys = sorted({k for run in chosen.values() if run for k in run["diag"][-1]["weight_drift"]})
    for k in wkeys:
        cells = [f"{chosen[r]['diag'][-1]['weight_drift'].get(k, float('nan')):.2f}×" if chosen[r] else "-" for r in recs]
        out.append(f"| weight RMS / init: {k} | " + " | ".join(cells) + " |")
    return out + [""]


def plot(runs: list[dict], path: str) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    summ = summarise(runs)
    tasks = list(summ)
    fig, axes = plt.subplots(len(tasks), 4, figsize=(22, 5 * len(tasks)), squeeze=False)
    for row, task in zip(axes, tasks):
        recipes = summ[task]
        recs = [r for r in fp8_tasks.RECIPES if r in recipes]
        chosen = {r: _best_run(runs, task, r, recipes[r]["best"]) for r in recs}
        ax = row[0]
        for r in recs:
            if chosen[r]:
                ax.plot(*zip(*chosen[r]["curve"]), marker="o", ms=3, label=f"{r} (lr 2^{recipes[r]['best']})")
        ax.set_title(f"{task}: validation loss at each recipe's best lr")
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
        lo = min(min(v for _, v in chosen[r]["curve"] if math.isfinite(v)) for r in recs if chosen[r])
        ax.set_ylim(lo * 0.97, lo * 1.5)
        # operand RMS per op kind: unit-scaled FP8 (solid) vs standard dynamic FP8 (dashed: pre-scaling values)
        ax = row[1]
        ref = chosen.get("us-fp8") or chosen.get("us-fp32")
        base = chosen.get("sp-fp32")
        for run, style, tag in ((ref, "-", "u-μP"), (base, "--", "standard")):
            if not run:
                continue
            keys = sorted({k for d in run["diag"] for k in d.get("sites", {}) if not k.endswith(":w")})
            for i, k in enumerate(keys):
                pts = [(d["step"], d["sites"][k]["rms"]) for d in run["diag"] if k in d.get("sites", {})]
                if pts and pts[0][1] > 0:
                    ax.plot(*zip(*pts), style, color=f"C{i % 10}", lw=1, label=f"{k}" if tag == "u-μP" else None)
        ax.set_yscale("log", base=2)
        ax.axhspan(0.5, 2, color="green", alpha=0.08)
        ax.set_title(f"{task}: RMS of matmul operands / output grads\n(solid: unit-scaled u-μP, dashed: standard FP32)")
        ax.set_xlabel("step")
        ax.legend(fontsize=6, ncol=2)
        # underflow share of the FP8-cast values over training, per recipe and direction
        ax = row[2]
        for j, r in enumerate(recs):
            run = chosen[r]
            if not run:
                continue
            for direction, style in (("fwd", "-"), ("bwd", "--")):
                pts = []
                for d in run["diag"]:
                    s = [v for v in d.get("sites", {}).values() if v["dir"] == direction and v["fmt"] in ("e4m3", "e5m2")]
                    if s:
                        pts.append((d["step"], 100 * statistics.fmean(v["underflow"] for v in s)))
                if pts:
                    ax.plot(*zip(*pts), style, color=f"C{j}", label=f"{r} {direction}")
        ax.set_yscale("symlog", linthresh=0.01)
        ax.set_title(f"{task}: % of nonzero values flushed to zero\n(mean over FP8 op kinds; fwd E4M3 solid, bwd E5M2 dashed)")
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
        # weight drift
        ax = row[3]
        for j, r in enumerate(recs):
            run = chosen[r]
            if not run or not r.endswith("fp32"):
                continue
            keys = sorted(run["diag"][0]["weight_drift"])
            for i, k in enumerate(keys):
                pts = [(d["step"], d["weight_drift"][k]) for d in run["diag"]]
                ax.plot(*zip(*pts), {"us": "-", "sp": "--"}.get(r.split("-")[0], ":"), color=f"C{i % 10}", lw=1,
                        label=f"{k}" if r.startswith("us") else None)
        ax.set_yscale("log", base=2)
        ax.set_title(f"{task}: weight RMS / initial RMS\n(solid: u-μP FP32, dashed: standard FP32, dotted: plain unit scaling)")
        ax.set_xlabel("step")
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="char,image")
    ap.add_argument("--recipes", default="sp-fp32,sp-fp8-dynamic,us-fp32,us-fp8")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--steps-char", type=int, default=500)
    ap.add_argument("--steps-image", type=int, default=400)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--evals", type=int, default=6, help="tracked points per run")
    ap.add_argument("--policy", default="fp8", choices=sorted(fp8_tasks.POLICIES))
    ap.add_argument("--grid", action="append", default=[],
                    help="override a grid: sp=-9,-8,-7,-6 (log2 learning rates); repeatable")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="tens of steps, one seed, two learning rates: a smoke run")
    ap.add_argument("--out", default=None)
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--combine", nargs="+", default=None, metavar="STEM",
                    help="merge the runs of these result stems (e.g. one per task) into --out and render")
    args = ap.parse_args(argv)
    stem = args.out or os.path.join(RESULTS, "fp8_gap_quick" if args.quick else "fp8_gap")
    if args.report_only or args.combine:
        runs, meta = [], None
        for s in args.combine or [stem]:
            with open(s + ".json") as f:
                blob = json.load(f)
            runs += blob["runs"]
            if meta is None:
                meta = blob["meta"]
            else:
                meta["tasks"].update(blob["meta"]["tasks"])
                meta["command"] += " ; " + blob["meta"]["command"]
                meta["wall_min"] += blob["meta"]["wall_min"]
        write(runs, meta, stem)
        return
    grids = dict(GRIDS)
    for g in args.grid:
        k, v = g.split("=")
        grids[k] = tuple(int(x) for x in v.split(","))
    seeds = [int(s) for s in args.seeds.split(",")]
    steps = {"char": args.steps_char, "image": args.steps_image}
    if args.quick:
        seeds, steps = seeds[:1], {"char": 30, "image": 30}
        grids = {k: v[1:3] for k, v in grids.items()}
    task_kw = {"d": args.width}
    jobs = []
    for task in args.tasks.split(","):
        for recipe in args.recipes.split(","):
            for lr in grids[recipe.split("-")[0]]:
                for seed in seeds:
                    jobs.append({"task": task, "recipe": recipe, "log2lr": lr, "seed": seed, "steps": steps[task],
                                 "evals": args.evals, "policy": args.policy, "task_kw": task_kw})
    # longest first (FP8 simulation is slower) so the two workers finish together
    jobs.sort(key=lambda j: -(j["steps"] * (2 if "fp8" in j["recipe"] else 1)))
    print(f"{len(jobs)} runs on {args.jobs} worker(s)", flush=True)
    t0 = time.time()
    runs = []
    with get_context("fork").Pool(args.jobs, maxtasksperchild=4) as pool:
        for r in pool.imap_unordered(run_one, jobs):
            runs.append(r)
            print(f"[{len(runs)}/{len(jobs)} {time.time() - t0:5.0f}s] {r['task']:5s} {r['recipe']:15s} "
                  f"lr 2^{r['log2lr']:+d} seed {r['seed']}: val {r['val']:.4f} ({r['seconds']:.0f}s)", flush=True)
    cmd = "python benchmarks/fp8_gap.py " + " ".join(argv if argv is not None else sys.argv[1:])
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _common import machine

    descr = {t: {"describe": TASKS[t](**task_kw).describe, "steps": steps[t]} for t in args.tasks.split(",")}
    meta = {"command": cmd.strip(), "machine": machine(), "wall_min": (time.time() - t0) / 60, "jobs": args.jobs,
            "policy": args.policy, "tasks": descr, "grids": grids}
    write(runs, meta, stem)


def write(runs: list[dict], meta: dict, stem: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
    png = plot(runs, stem + ".png")
    md = render(runs, meta)
    if png:
        md += f"\n![diagnostics]({os.path.basename(png)})\n"
    with open(stem + ".md", "w") as f:
        f.write(md)
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "runs": runs}, f)
    print(md)
    print(f"\nwrote {stem}.md, {stem}.json" + (f", {png}" if png else ""))


if __name__ == "__main__":
    main()
