"""simulate_format: the user's entry to low-precision simulation.

:func:`simulate_format` joins a format simulation to a unit-scaled model's plan
(the ``simulate_format`` pass, :mod:`unit_scale_fx.passes.simulate_format`, places
the quantisers) or captures any other model and simulates its formats directly.
:func:`track_formats` and :func:`format_counts` count what rounding flushes to zero
or saturates.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any, Optional, Sequence

import torch.fx as fx
import torch.nn as nn

from ..api import UnitScaledModel, UnitScaledModule, _state
from ..capture import _mirror_state, capture
from ..errors import UnitScaleError
from ..passes.base import PassContext
from ..passes.normalize import normalize
from ..passes.shape_prop import shape_prop
from ..passes.simulate_format import SITES_ATTR, apply_format_simulation
from ..record import FORMAT_REPLACED, FORMAT_SITE
from .formats import FP8_POLICY, FormatCounter, FormatLike, FormatSimulation, Quantise

__all__ = ["FormatSimulatedModule", "FormatSimulation", "FP8_POLICY", "simulate_format", "format_sites",
           "track_formats", "format_counts"]


class FormatSimulatedModule(fx.GraphModule):
    """A plain (not unit-scaled) model whose matmul-class ops run in a simulated format.

    Made by :func:`simulate_format`; :meth:`without_format` gives the graph back
    without the quantisers (``unit_scale`` uses it to put the rounding after its scales).
    """

    us_format: FormatSimulation

    def without_format(self) -> fx.GraphModule:
        gm = fx.GraphModule(self, copy.deepcopy(self.graph), type(self).__name__)
        for node in list(gm.graph.nodes):
            if not node.meta.get(FORMAT_SITE):
                continue
            if FORMAT_REPLACED in node.meta:  # a replaced op (attention): restore it
                node.op, node.target = node.meta.pop(FORMAT_REPLACED)
                node.meta.pop(FORMAT_SITE)
            else:
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
        if hasattr(gm, SITES_ATTR):
            delattr(gm, SITES_ATTR)
        gm.graph.lint()
        gm.recompile()
        _mirror_state(self, gm)
        gm.train(self.training)
        return gm


def simulate_format(
    model: nn.Module,
    fwd: FormatLike = "e4m3",
    bwd: FormatLike = "e5m2",
    *,
    saturate: bool = True,
    attention: bool = True,
    passthrough: bool = False,
    high_precision: Sequence[str] = (),
    high_format: FormatLike = "bf16",
    example_inputs: Optional[Sequence[Any]] = None,
) -> nn.Module:
    """Simulate a low-precision format for the matmul-class ops of ``model``.

    Operands of linear / matmul / bmm / conv layers and of the matmuls inside
    attention are rounded to ``fwd`` in forward; gradients arriving at their
    outputs are rounded to ``bwd`` in backward. Everything else runs in the
    model's own dtype.

    Args:
        model: a :class:`~unit_scale_fx.UnitScaledModule`, or a model unit_scale
            returned with its own class kept (changed in place and returned: the
            simulation joins its plan, also when it is planned later, re-planned or
            captured for another call signature), or any other ``nn.Module`` (captured into a
            :class:`FormatSimulatedModule`; the model itself is not changed).
        fwd, bwd: format names (``"e4m3"``, ``"e5m2"``, ``"fp16"``, ``"bf16"``),
            torch dtypes, or ``None`` for no rounding in that direction.
        saturate: see :class:`FormatSimulation`.
        attention: also round the matmuls inside scaled-dot-product attention.
        passthrough: measure only (see :class:`FormatSimulation`).
        high_precision: op kinds kept in ``high_format``: ``"attention"``,
            ``"readout"``; ``FP8_POLICY`` (both) is the recommended FP8 policy.
        high_format: the format of those ops (default ``"bf16"``).
        example_inputs: for models that symbolic tracing cannot capture.

    Returns:
        the model with simulated formats. ``unit_scale`` accepts a
        :class:`FormatSimulatedModule` too: the result is the same as
        ``simulate_format(unit_scale(model), ...)``.
    """
    sim = FormatSimulation(fwd, bwd, saturate, attention, passthrough, tuple(high_precision), high_format)
    if isinstance(model, UnitScaledModule):
        if getattr(model.us_config, "simulate_format", None) is not None:
            raise UnitScaleError(
                "this unit-scaled model already simulates a number format",
                where="simulate_format(UnitScaledModule)",
                fix="call simulate_format once, on a model made by unit_scale(...)",
            )
        model.us_config = replace(model.us_config, simulate_format=sim)
        if model.us_planned:
            apply_format_simulation(model, sim)
            model.recompile()
        return model
    if isinstance(model, UnitScaledModel):  # the user's class kept: every captured graph, now and later
        st = _state(model)
        where = f"simulate_format({type(model).__name__})"
        if st.config.simulate_format is not None:
            raise UnitScaleError("this unit-scaled model already simulates a number format", where=where,
                                 fix="call simulate_format once, on a model made by unit_scale(...)")
        if st.backend is not None:
            raise UnitScaleError(
                "this model is unit-scaled through dynamo (torch.export could not capture it): its graphs are "
                "compiled by torch.compile, where no format simulation is placed", where=where,
                fix="use a model that torch.fx or torch.export captures as one graph (see docs/usage.md#capture)")
        st.config = replace(st.config, simulate_format=sim)  # graphs captured later plan with it
        for graphs in st.graphs.values():
            for g in graphs:
                g.gm.us_config = st.config
                apply_format_simulation(g.gm, sim)
                g.gm.recompile()
        return model
    if isinstance(model, FormatSimulatedModule):
        raise UnitScaleError(
            "this model already simulates a number format",
            where="simulate_format(FormatSimulatedModule)",
            fix="call simulate_format(model.without_format(), ...) to change the formats",
        )
    if example_inputs is not None and not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    args = tuple(example_inputs) if example_inputs is not None else None
    work = copy.deepcopy(model)
    gm = capture(work, args)
    ctx = PassContext(example_args=args)
    normalize(gm, ctx)
    if args is not None:
        shape_prop(gm, ctx)
    out = FormatSimulatedModule(gm, gm.graph, type(model).__name__)
    _mirror_state(work, out)
    out.us_format = sim
    apply_format_simulation(out, sim)
    out.recompile()
    out.train(model.training)
    return out


def format_sites(model: nn.Module) -> dict[str, Quantise]:
    """Every :class:`Quantise` of a simulated model, by qualified name.

    For a model that kept its class (:class:`~unit_scale_fx.api.UnitScaledModel`), the quantisers
    of every graph captured so far (one per call signature), named ``graph<i>.<name>``.
    """
    if isinstance(model, UnitScaledModel):
        graphs = [g.gm for gs in _state(model).graphs.values() for g in gs]
        return {f"graph{i}.{name}": m for i, gm in enumerate(graphs)
                for name, m in gm.named_modules() if isinstance(m, Quantise)}
    return {name: m for name, m in model.named_modules() if isinstance(m, Quantise)}


def track_formats(model: nn.Module, on: bool = True) -> None:
    """Start (reset) or stop counting underflow and overflow at every quantiser of ``model``."""
    for site in format_sites(model).values():
        site.track(on)


def format_counts(model: nn.Module, by_role: bool = False) -> dict[str, FormatCounter]:
    """Counters summed over all quantisers, by ``"fwd:<format>"`` / ``"bwd:<format>"``.

    With ``by_role`` the key also names the site's role (``"fwd:e4m3:matmul operand"``,
    ``"fwd:e4m3:p"`` for attention's softmax weights, ...).
    """
    out: dict[str, FormatCounter] = {}
    for site in format_sites(model).values():
        if site.stats is None:
            continue
        for direction, spec, counter in (("fwd", site.fwd, site.stats.fwd), ("bwd", site.bwd, site.stats.bwd)):
            if spec is not None and counter.total:
                key = f"{direction}:{spec.name}" + (f":{site.role}" if by_role else "")
                out.setdefault(key, FormatCounter()).merge(counter)
    return out
