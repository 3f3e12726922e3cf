"""What track_scales and `unit-scale-fx dump` cost, next to one plain forward + backward.

    python benchmarks/track_scales_cost.py

Prints a table and writes benchmarks/results/track_scales_cost.md. CPU time (process_time, one thread), float32, best of 5.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from unit_scale_fx import track_scales, unit_scale
from unit_scale_fx.analysis.draw import graph_dot, graph_text
from unit_scale_fx.analysis.track import measure_nodes
from unit_scale_fx.examples import GPT, gpt_batch

SIZES = [(64, 2), (128, 4), (256, 8)]


def best(fn, n: int = 5) -> float:
    """Best CPU time of n runs: on a shared machine, wall time measures the neighbours."""
    times = []
    for _ in range(n):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return min(times)


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rows = [("model", "nodes", "fwd+bwd (ms)", "track_scales plain (ms)", "track_scales unit-scaled (ms)",
             "measure + text + dot (ms)")]
    for d, layers in SIZES:
        model = GPT(vocab=256, d=d, layers=layers, heads=4)
        idx, tgt = gpt_batch(256, 4, 64)
        us = unit_scale(model, (idx, tgt))

        def plain_step() -> None:
            model(idx, tgt).backward()
            model.zero_grad(set_to_none=True)

        def dumps() -> None:
            m = measure_nodes(us, idx, tgt)
            graph_text(us.graph, us, m)
            graph_dot(us.graph, us, m)

        rows.append((f"GPT d={d} L={layers}", str(len(us.graph.nodes)), f"{best(plain_step) * 1e3:.0f}",
                     f"{best(lambda: track_scales(model, idx, tgt, progress=False)) * 1e3:.0f}",
                     f"{best(lambda: track_scales(us, idx, tgt, progress=False)) * 1e3:.0f}",
                     f"{best(dumps) * 1e3:.0f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    md = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    md.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    text = "\n".join(md)
    print(text)
    out = Path(__file__).parent / "results" / "track_scales_cost.md"
    out.write_text("# track_scales cost\n\n`python benchmarks/track_scales_cost.py` (CPU time, one thread, float32, best of 5, "
                   f"torch {torch.__version__}, batch 4 x 64 tokens)\n\n"
                   + text + "\n\nCPU seconds of this process (the machine was shared, so wall time would measure the "
                   "neighbours). track_scales runs the graph node by node (fx.Interpreter) and keeps "
                   "every activation until the backward is done.\n")


if __name__ == "__main__":
    main()
