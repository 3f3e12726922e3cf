"""Memory: the unit-scaled model holds no extra persistent tensors.

    python benchmarks/memory.py

Compares, for the built-in GPT and residual MLP, the parameter and buffer bytes
of the original model, the eager unit-scaled model (``unit_scale``) and the model
after a ``torch.compile(backend=unit_scale_fx.backend(...))`` step, and looks for
tensors held outside parameters and buffers (attributes of any submodule).
"""

from __future__ import annotations

import copy
import logging

import torch
import torch.nn as nn

from _common import table, write_result
from unit_scale_fx import backend, unit_scale
from unit_scale_fx.examples import GPT, ResidualMLP, gpt_batch, mlp_batch


def tensor_bytes(m: nn.Module) -> tuple[int, int, int, int]:
    """(parameter bytes, buffer bytes, tensors, stray tensor attributes)."""
    params = {id(p): p for p in m.parameters()}
    bufs = {id(b): b for b in m.buffers()}
    stray = 0
    for mod in m.modules():
        for v in vars(mod).values():
            if isinstance(v, torch.Tensor) and id(v) not in params and id(v) not in bufs:
                stray += 1
    pb = sum(p.numel() * p.element_size() for p in params.values())
    bb = sum(b.numel() * b.element_size() for b in bufs.values())
    return pb, bb, len(params) + len(bufs), stray


def main() -> None:
    logging.basicConfig(level=logging.ERROR)
    rows = []
    for name, model, batch in (("gpt", GPT(vocab=256, d=128, layers=4, heads=4, max_len=128), gpt_batch(256, 8, 64)),
                               ("mlp", ResidualMLP(d_in=64, d=256, layers=4, d_out=16), mlp_batch(64, 16, 256))):
        orig = tensor_bytes(model)
        us = unit_scale(copy.deepcopy(model), batch)
        m = copy.deepcopy(model)
        torch.compile(m, backend=backend(inner="eager"))(*batch).backward()
        for label, stats in (("original", orig), ("unit_scale (eager)", tensor_bytes(us)),
                             ("torch.compile backend", tensor_bytes(m))):
            rows.append([name, label, f"{stats[0]:,}", f"{stats[1]:,}", str(stats[2]), str(stats[3]),
                         f"{stats[0] + stats[1] - orig[0] - orig[1]:+,}"])
        assert set(us.state_dict()) == set(model.state_dict())
    text = table(["model", "variant", "param bytes", "buffer bytes", "tensors", "stray tensor attrs",
                  "extra bytes"], rows)
    print(text)
    note = ("Scale factors are Python floats in the generated code: the rewrite adds no tensors. "
            "state_dict keys of the unit-scaled model equal the original's (asserted).")
    path = write_result("memory", "Memory: persistent tensors", text + "\n\n" + note)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
