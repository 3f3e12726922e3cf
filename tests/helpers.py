"""Shared test helpers: measurement that does not rely on the plan's own bookkeeping."""

from __future__ import annotations

import copy
from typing import Any, Callable, Optional

import torch

from unit_scale_fx.analysis.recorder import MatmulOperand, record_matmul_operands
from unit_scale_fx.scale import scale


def rms(t: torch.Tensor) -> float:
    return float(t.detach().float().pow(2).mean().sqrt())


def true_gradient_copy(us: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of a unit-scaled module whose every ``scale(x, f, b)`` is ``scale(x, f, f)``.

    Its gradients are autograd's true gradients of the same (scaled) forward.
    """
    twin = copy.deepcopy(us)
    for node in twin.graph.nodes:
        if node.op == "call_function" and node.target is scale:
            x, f, _ = node.args
            node.args = (x, f, f)
    twin.recompile()
    return twin


def gradient_cosines(us: torch.nn.Module, *inputs: Any,
                     loss_fn: Optional[Callable[[Any], torch.Tensor]] = None) -> dict[str, float]:
    """Cosine between each parameter's gradient and autograd's true gradient of the same forward."""
    twin = true_gradient_copy(us)
    twin.load_state_dict(us.state_dict())
    grads = []
    for m in (us, twin):
        m.zero_grad(set_to_none=True)
        out = m(*inputs)
        (loss_fn(out) if loss_fn else out).backward()
        grads.append({n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None})
    out = {}
    for name, g in grads[0].items():
        t = grads[1][name]
        if g.norm() == 0 and t.norm() == 0:
            out[name] = 1.0
            continue
        out[name] = float(torch.nn.functional.cosine_similarity(g.flatten().double(), t.flatten().double(), dim=0))
    return out


def band_fractions(records: list[MatmulOperand], lo: float = 0.5, hi: float = 2.0) -> dict[str, float]:
    out = {}
    for phase in ("fwd", "bwd"):
        rs = [r.rms for r in records if r.phase == phase]
        out[phase] = sum(lo <= r <= hi for r in rs) / max(1, len(rs))
    return out
