"""Shared test helpers: measurement that does not rely on the plan's own bookkeeping."""

from __future__ import annotations

import torch

from unit_scale_fx.analysis.recorder import MatmulOperand, record_matmul_operands  # noqa: F401
from unit_scale_fx.analysis.validity import gradient_cosines, true_gradient_copy  # noqa: F401


def rms(t: torch.Tensor) -> float:
    return float(t.detach().float().pow(2).mean().sqrt())


def band_fractions(records: list[MatmulOperand], lo: float = 0.5, hi: float = 2.0) -> dict[str, float]:
    out = {}
    for phase in ("fwd", "bwd"):
        rs = [r.rms for r in records if r.phase == phase]
        out[phase] = sum(lo <= r <= hi for r in rs) / max(1, len(rs))
    return out


def recorded_step(model, *args):
    """``model(*args)`` forward and backward under a :class:`MatmulRecorder`: ``(loss, records)``."""
    from unit_scale_fx.analysis.recorder import MatmulRecorder

    rec = MatmulRecorder()
    with rec:
        loss = model(*args)
        rec.backward()
        loss.backward()
    return loss, rec.records


def scale_constants(gm) -> list[float]:
    """Every scale factor in a generated graph: ``scale`` ops' arguments and fused ops' ``*_scale`` pairs."""
    from unit_scale_fx.scale import scale

    out = []
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        if n.target is scale:
            out += [float(a) for a in n.args[1:3]]
        out += [float(v) for k, pair in n.kwargs.items() if k.endswith("_scale") and isinstance(pair, tuple)
                for v in pair]
    return out


# -- running passes on tiny graphs, and the code they write -------------------------------------------

def graph_code(gm, digits: int = 3) -> str:
    """The code of ``gm``'s graph, one ``name = target(args)`` line per node, without codegen noise.

    Floats are rounded to ``digits`` significant figures (scale constants), keyword arguments
    that are ``None`` are left out, and the ``x = None`` frees of ``gm.code`` are not written:
    a golden test of what a pass writes then fails only when the graph changes.
    """
    import torch.fx as fx

    def fmt(a) -> str:
        if isinstance(a, fx.Node):
            return a.name
        if isinstance(a, bool) or a is None:
            return repr(a)
        if isinstance(a, float):
            return f"{a:.{digits}g}"
        if isinstance(a, tuple):
            return "(" + ", ".join(fmt(v) for v in a) + ("," if len(a) == 1 else "") + ")"
        if isinstance(a, list):
            return "[" + ", ".join(fmt(v) for v in a) + "]"
        if isinstance(a, dict):
            return "{" + ", ".join(f"{k!r}: {fmt(v)}" for k, v in a.items()) + "}"
        return str(a) if isinstance(a, torch.dtype) else repr(a)

    def call(args, kwargs) -> str:
        parts = [fmt(a) for a in args] + [f"{k}={fmt(v)}" for k, v in kwargs.items() if v is not None]
        return "(" + ", ".join(parts) + ")"

    lines = []
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            lines.append(f"{n.name} = input")
        elif n.op == "get_attr":
            lines.append(f"{n.name} = self.{n.target}")
        elif n.op == "call_function":
            t = n.target
            name = str(t) if isinstance(t, torch._ops.OpOverload) else getattr(t, "__name__", str(t))
            lines.append(f"{n.name} = {name}{call(n.args, n.kwargs)}")
        elif n.op == "call_method":
            lines.append(f"{n.name} = {fmt(n.args[0])}.{n.target}{call(n.args[1:], n.kwargs)}")
        elif n.op == "call_module":
            lines.append(f"{n.name} = self.{n.target}{call(n.args, n.kwargs)}")
        else:
            lines.append(f"return {fmt(n.args[0])}")
    return "\n".join(lines)


def golden(text: str) -> str:
    """An expected :func:`graph_code`, written indented in a test."""
    import textwrap

    return textwrap.dedent(text).strip("\n")


def pipeline_until(model, inputs: tuple, name: str, *, kwargs=None, boundary: bool = False, **cfg):
    """Capture ``model`` and run the full pipeline for ``UnitScaleConfig(**cfg)`` up to the pass ``name``.

    Returns ``(gm, ctx, the pass named name)``: the passes before it ran through the checked
    driver (:func:`run_passes`); the pass itself has not run.
    """
    from unit_scale_fx.capture import capture
    from unit_scale_fx.config import UnitScaleConfig
    from unit_scale_fx.passes.base import PassContext, run_passes
    from unit_scale_fx.pipeline import build_pipeline

    config = UnitScaleConfig(**cfg)
    gm = capture(model, inputs, kwargs)
    ctx = PassContext(config=config, example_args=inputs, example_kwargs=kwargs)
    passes = build_pipeline(config, ("prepare", "plan", "transform"), boundary=boundary)
    names = [p.name for p in passes]
    assert name in names, f"{name} is not in the pipeline {names}"
    i = names.index(name)
    run_passes(gm, ctx, passes[:i])
    gm.recompile()
    return gm, ctx, passes[i]


def run_pass(gm, ctx, p):
    """Run one pass through the checked driver (needs checked, graph linted) and recompile.

    Returns the :class:`PassResult` the pass reported.
    """
    from unit_scale_fx.passes.base import Pass, run_passes

    results = []

    def fn(g, c):
        results.append(p.fn(g, c))
        return results[-1]

    run_passes(gm, ctx, [Pass(p.name, fn, p.needs, p.produces)])
    gm.recompile()
    return results[0]


def hand_planned_small():
    """``x + gelu(linear(x))`` captured, with records written by hand (independent of any rule).

    Returns ``(model, gm)``: the matmul has backward scales 0.25 / 0.125 on its input and weight and
    forward scale 0.5; the gelu (2, 3); the residual add weights 0.6 / 0.8 (backward 0.6 / 0.9).
    """
    import torch.nn as nn
    import torch.nn.functional as F

    from unit_scale_fx.capture import capture
    from unit_scale_fx.record import META_KEY, ScaleRecord

    class Small(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return x + F.gelu(self.lin(x))

    model = Small()
    gm = capture(model, (torch.randn(2, 4),))
    n = {x.name: x for x in gm.graph.nodes}
    n["linear"].meta[META_KEY] = ScaleRecord("matmul", "matmul", "linear", fwd=0.5,
                                             bwd={"x": 0.25, "lin_weight": 0.125, "lin_bias": 1.0})
    n["gelu"].meta[META_KEY] = ScaleRecord("gelu", "pointwise", "gelu", fwd=2.0, bwd={"linear": 3.0})
    n["add"].meta[META_KEY] = ScaleRecord("add", "residual", "add", weights={"x": 0.6, "gelu": 0.8},
                                          bwd={"x": 0.6, "gelu": 0.9})
    return model, gm
