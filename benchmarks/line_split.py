"""Where the unit-scaled ResNet's extra forward time goes, line by line of the code that runs.

    cd benchmarks && PYTHONPATH=../src python line_split.py --processes 5 --rounds 40

The profiler (``op_split.py``) sees aten ops, each with its own overhead added; this script sees Python
lines. The original ResNet (``free_scaling.py --size issue``) is traced with ``torch.fx`` (its code then
reads like the unit-scaled model's: one line a layer, in the same order); the unit-scaled model's generated
``forward`` is the code ``unit_scale`` made. Both are recompiled with a clock read after every line
(``time.perf_counter``, about 0.1 us), and train as ``free_scaling.py``'s step does (``zero_grad``,
forward, backward, Adam; only the forward is split), interleaved round by round (order alternating), one
thread. Each line's time is the clock's step from the line before: the layer's Python,
its aten ops and autograd's recording, in the context of a training step (caches as the step leaves
them), which a benchmark of one op alone does not give. Per row: the median over rounds, then the
median over ``--processes`` fresh processes. A module call in the original (``self.conv1(x)``) includes
reading the module's attributes; the unit-scaled code reads them on lines of their own ("attribute
reads").
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess
import sys
import time
import types
from typing import Any, Callable

import torch
import torch.fx as fx

from _common import median, table, write_result
from free_scaling import make, step_fn

_CALL = re.compile(r"=\s*([\w\.]+)\(")
#: rows by how a called function's name ends (longest endings first)
_ROWS = (("scaled_batch_norm", "batch norm"), ("scaled_linear", "linear"), ("scaled_conv", "conv"),
         ("scaled_add", "add"), ("scale_returned", "loss"), ("cross_entropy", "loss"), ("max_pool2d", "max pool"),
         ("relu", "relu"))
#: rows of the original's module calls, by the module's class
_MODULES = {"Conv2d": "conv", "BatchNorm2d": "batch norm", "ReLU": "relu", "Linear": "linear"}


def _label(gm: fx.GraphModule, line: str) -> str:
    """What one line of generated code computes, as a row of the split."""
    lhs, rhs = (s.strip() for s in line.split("=", 1))
    lhs = lhs.split(" ")[0]
    if rhs.startswith(("getattr", "self.")):
        if lhs.endswith(("_weight", "_bias", "_layer")):
            return "attribute reads"
        try:
            return _MODULES.get(type(gm.get_submodule(lhs.replace("_", "."))).__name__, "other")
        except AttributeError:
            return "other"
    m = _CALL.search(line)
    if not m:
        return "add" if " + " in rhs else "other"
    name = m.group(1).rsplit(".", 1)[-1]  # generated names end with the function's: ..._scale_scaled_conv
    for end, row in _ROWS:
        if name.endswith(end):
            return row
    return "other"


def timed_forward(gm: fx.GraphModule) -> tuple[Callable[..., Any], list]:
    """``gm``'s forward recompiled with a clock read after each line, and the list the reads go to:
    ``(row, layer, seconds since start)``; ``layer`` names a convolution or batch norm by its position."""
    body, seen = [], collections.Counter()
    lines = gm.code.split("\n")
    for line in lines:
        body.append(line)
        s = line.strip()
        if line.startswith("    ") and "=" in s and not s.startswith(("return", "#")):
            row = _label(gm, s)
            layer = ""
            if row in ("conv", "batch norm"):
                seen[row] += 1
                layer = f"{row} {seen[row]}"
            body.append(f"    _R.append(({row!r}, {layer!r}, _C()))")
    src = "\n".join(body)
    src = re.sub(r"(def forward\(self[^\n]*:\n)", r"\1    _R.append(('start', '', _C()))\n", src, count=1)
    glb = dict(gm.forward.__globals__)
    rec: list = []
    glb["_R"], glb["_C"] = rec, time.perf_counter
    exec(compile(src, f"<timed {type(gm).__name__}>", "exec"), glb)
    return types.MethodType(glb["forward"], gm), rec


def child(rounds: int, warmup: int) -> dict[str, dict[str, float]]:
    """One process: per variant, the median seconds of each row and layer over the rounds."""
    from unit_scale_fx import unit_scale

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    model, batch = make("resnet", "issue")
    variants = {"original": fx.symbolic_trace(model), "unit-scaled": unit_scale(model, batch)}
    steps, recs = {}, {}
    for k, gm in variants.items():
        forward, recs[k] = timed_forward(gm)
        steps[k] = step_fn(forward, gm, batch)
    got: dict[str, dict[str, list]] = {k: collections.defaultdict(list) for k in steps}
    order = list(steps)
    for r in range(warmup + rounds):
        for k in (order if r % 2 == 0 else order[::-1]):
            rec = recs[k]
            rec.clear()
            steps[k]()
            if r < warmup:
                continue
            per: dict[str, float] = collections.defaultdict(float)
            for (_, _, t0), (row, layer, t1) in zip(rec, rec[1:]):
                per["row:" + row] += t1 - t0
                if layer:
                    per["layer:" + layer] += t1 - t0
            per["forward"] = rec[-1][2] - rec[0][2]
            for key, v in per.items():
                got[k][key].append(v)
    return {k: {key: median(v) for key, v in d.items()} for k, d in got.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--processes", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--name", default="line_split", help="results file name (benchmarks/results/NAME.md)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(1)  # as the children run (the results file names the parent's setting)
    if args.child:
        print(json.dumps(child(args.rounds, args.warmup)))
        return
    runs = []
    for p in range(args.processes):
        out = subprocess.run([sys.executable, __file__, "--child", "--rounds", str(args.rounds), "--warmup",
                              str(args.warmup)], check=True, capture_output=True, text=True).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))
        print(f"process {p + 1}/{args.processes}: forward {runs[-1]['original']['forward'] * 1e3:.2f} vs "
              f"{runs[-1]['unit-scaled']['forward'] * 1e3:.2f} ms", flush=True)
    keys = sorted(set(runs[0]["original"]) | set(runs[0]["unit-scaled"]),
                  key=lambda k: (k != "forward", not k.startswith("layer:"), k))

    def med(variant: str, key: str) -> float:
        return median([r[variant].get(key, 0.0) for r in runs]) * 1e6

    body = []
    for key in keys:
        a, b = med("original", key), med("unit-scaled", key)
        name = key.split(":", 1)[-1]
        body.append([f"**{name}**" if key == "forward" else name, f"{a:.0f}", f"{b:.0f}", f"{b - a:+.0f}"])
    text = table(["line (row: every line of that kind; layer: one call)", "original, us", "unit-scaled, us",
                  "difference, us"], body)
    print(text)
    path = write_result(args.name, "The ResNet's forward line by line, original vs unit-scaled (issue 16)",
                        f"Medians over {args.rounds} rounds in each of {args.processes} processes "
                        f"(median of the processes' medians), one thread. Convolutions and batch norms in "
                        f"the order the forward runs them.\n\n{text}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
