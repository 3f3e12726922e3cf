"""simulate_format: round the operands of every matmul-class op to a low-precision format.

For each matmul-class node (the targets of the matmul rule's layout table,
ops whose rule kind is ``"attention"``, and convolutions) the pass inserts
:class:`~unit_scale_fx.formats.Quantise` modules:

* before the op, on each operand (not on an added bias): round to ``fwd`` in forward;
* after the op: round the gradient arriving at its output to ``bwd`` in backward,
  so both matmuls of the op's backward consume rounded values.

Scaled-dot-product attention is replaced by :class:`SimulatedAttention`, which
rounds the operands of its two inner matmuls (Q, K, V, the softmax weights P) and
the gradients at their outputs.

In a unit-scaled graph the pass runs after ``rewrite``: the operand quantisers sit
after the inserted ``scale`` nodes, so what is rounded is exactly what the
matmul consumes, and the output quantiser sits between the op and its output
scale, so what is rounded in backward is the (unit) gradient the op's backward
matmuls consume.

Embedding lookups are left alone: a row gather does no arithmetic and FP8 training
recipes keep embedding tables in higher precision.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, replace
from typing import Any, Optional, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UnitScaleError
from ..formats import FormatCounter, FormatLike, Quantise, get_format
from ..rules.matmul import LAYOUTS
from ..rules.registry import aten, lookup, many, resolve_target
from ..simulated_attention import SimulatedAttention
from .base import PassContext, PassResult

log = logging.getLogger(__name__)

#: Rule kinds whose every target is matmul-class (the attention rules).
MATMUL_KINDS = frozenset({"attention"})

#: Convolutions (no unit-scaling rule yet; matmul-class all the same).
CONV_TARGETS = frozenset(many([
    F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
    aten("conv1d"), aten("conv2d"), aten("conv3d"), aten("convolution"),
]))

#: Where the container of quantisers lives in the GraphModule.
SITES_ATTR = "us_formats"
_SITE_META = "unit_scale_format_site"
_ORIG_META = "unit_scale_format_replaced"


@dataclass(frozen=True)
class FormatSimulation:
    """What :func:`simulate_format` rounds, and to which format.

    Attributes:
        fwd: format of matmul operands in forward (``"e4m3"``, ``"e5m2"``,
            ``"fp16"``, ``"bf16"``, a torch dtype, or ``None`` for no rounding).
        bwd: format of the gradients arriving at matmul outputs in backward.
        saturate: clamp values beyond the format's largest finite value to it
            (``True``), or let them overflow to ``inf`` (NaN in E4M3, which has no
            infinity) as a cast without saturation does (``False``).
        attention: also round the matmuls inside scaled-dot-product attention.
        passthrough: round nothing; only count (with :func:`track_formats`) what
            rounding would flush to zero or saturate.
    """

    fwd: FormatLike = "e4m3"
    bwd: FormatLike = "e5m2"
    saturate: bool = True
    attention: bool = True
    passthrough: bool = False

    def __post_init__(self) -> None:
        get_format(self.fwd)  # raises UnitScaleError on unknown names
        get_format(self.bwd)

    def describe(self) -> str:
        f, b = get_format(self.fwd), get_format(self.bwd)
        return (f"fwd={f.name if f else 'fp32'} bwd={b.name if b else 'fp32'} saturate={self.saturate}"
                + (" passthrough" if self.passthrough else ""))


def _bias_arg(node: fx.Node, target: Any) -> Any:
    lay = LAYOUTS.get(target)
    if lay is not None and lay.bias is not None:
        pos, name = lay.bias, ("bias" if lay.right_nk else "input")
    elif target in CONV_TARGETS:
        pos, name = 2, "bias"
    else:
        return None
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[pos] if len(node.args) > pos else None


def matmul_class(node: fx.Node, gm: fx.GraphModule) -> Optional[str]:
    """``"matmul"``, ``"attention"`` or ``"conv"`` for matmul-class nodes, else None."""
    if node.op not in ("call_function", "call_method", "call_module") or node.meta.get(_SITE_META):
        return None
    target = resolve_target(node, gm)
    try:
        if target in LAYOUTS:
            return "matmul"
        if target in CONV_TARGETS:
            return "conv"
    except TypeError:  # unhashable target
        return None
    rule = lookup(node, gm)
    if rule is not None and rule.kind in MATMUL_KINDS:
        return "attention"
    return None


def _operands(node: fx.Node, target: Any) -> list[fx.Node]:
    bias = _bias_arg(node, target)
    out: list[fx.Node] = []
    for n in node.all_input_nodes:
        if n is bias or n in out:
            continue
        val = n.meta.get("val")
        if isinstance(val, torch.Tensor) and not val.is_floating_point():
            continue
        out.append(n)
    return out


def _add_site(gm: fx.GraphModule, name: str, module: nn.Module) -> str:
    if not hasattr(gm, SITES_ATTR):
        gm.add_module(SITES_ATTR, nn.Module())
    getattr(gm, SITES_ATTR).add_module(name, module)
    return f"{SITES_ATTR}.{name}"


def _new_call(gm: fx.GraphModule, target: str, arg: fx.Node) -> fx.Node:
    new = gm.graph.call_module(target, (arg,))
    new.meta[_SITE_META] = True
    for key in ("val", "nn_module_stack", "tensor_meta"):
        if key in arg.meta:
            new.meta[key] = arg.meta[key]
    return new


def apply_format_simulation(gm: fx.GraphModule, sim: FormatSimulation) -> int:
    """Insert the quantisers of ``sim`` into ``gm``'s graph; returns the number of ops simulated.

    Does not recompile.
    """
    if hasattr(gm, SITES_ATTR):
        raise UnitScaleError(
            "this graph already simulates a number format",
            where=f"simulate_format({type(gm).__name__})",
            fix="apply simulate_format once; call it on the model without simulation to change the formats",
        )
    count = 0
    for node in list(gm.graph.nodes):
        klass = matmul_class(node, gm)
        if klass is None:
            continue
        if klass == "attention":
            if not sim.attention:
                continue
            name = _add_site(gm, node.name, SimulatedAttention(sim.fwd, sim.bwd, sim.saturate, sim.passthrough))
            node.meta[_ORIG_META] = (node.op, node.target)
            node.op, node.target = "call_module", name
            node.meta[_SITE_META] = True
            count += 1
            log.debug("simulate_format: %s -> SimulatedAttention", node.name)
            continue
        target = resolve_target(node, gm)
        for i, inp in enumerate(_operands(node, target)):
            site = _add_site(gm, f"{node.name}_in{i}",
                             Quantise(sim.fwd, None, sim.saturate, f"{klass} operand", sim.passthrough))
            with gm.graph.inserting_before(node):
                q = _new_call(gm, site, inp)
            node.replace_input_with(inp, q)
        site = _add_site(gm, f"{node.name}_grad",
                         Quantise(None, sim.bwd, sim.saturate, f"{klass} grad", sim.passthrough))
        with gm.graph.inserting_after(node):
            q = _new_call(gm, site, node)
        node.replace_all_uses_with(q, delete_user_cb=lambda u: u is not q)
        count += 1
        log.debug("simulate_format: %s (%s) operands -> %s, grad -> %s", node.name, klass, sim.fwd, sim.bwd)
    log.info("simulate_format: %d matmul-class ops simulated (%s)", count, sim.describe())
    return count


def simulate_formats(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Pipeline pass: apply ``ctx.config.simulate_format`` if it is set."""
    sim: Optional[FormatSimulation] = getattr(ctx.config, "simulate_format", None)
    if sim is None:
        return PassResult(False, "no format simulation")
    if hasattr(gm, SITES_ATTR):  # a replan: drop the previous sites, the graph is fresh
        delattr(gm, SITES_ATTR)
    n = apply_format_simulation(gm, sim)
    return PassResult(n > 0, f"{n} ops simulated ({sim.describe()})")


class FormatSimulatedModule(fx.GraphModule):
    """A plain (not unit-scaled) model whose matmul-class ops run in a simulated format.

    Made by :func:`simulate_format`; :meth:`without_format` gives the graph back
    without the quantisers (``unit_scale`` uses it to put the rounding after its scales).
    """

    us_format: FormatSimulation

    def without_format(self) -> fx.GraphModule:
        gm = fx.GraphModule(self, copy.deepcopy(self.graph), type(self).__name__)
        for node in list(gm.graph.nodes):
            if not node.meta.get(_SITE_META):
                continue
            if _ORIG_META in node.meta:  # a replaced op (attention): restore it
                node.op, node.target = node.meta.pop(_ORIG_META)
                node.meta.pop(_SITE_META)
            else:
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
        if hasattr(gm, SITES_ATTR):
            delattr(gm, SITES_ATTR)
        gm.graph.lint()
        gm.recompile()
        from ..capture import _mirror_state

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
    example_inputs: Optional[Sequence[Any]] = None,
) -> nn.Module:
    """Simulate a low-precision format for the matmul-class ops of ``model``.

    Operands of linear / matmul / bmm / conv layers and of the matmuls inside
    attention are rounded to ``fwd`` in forward; gradients arriving at their
    outputs are rounded to ``bwd`` in backward. Everything else runs in the
    model's own dtype.

    Args:
        model: a :class:`~unit_scale_fx.UnitScaledModule` (changed in place and
            returned: the simulation joins its plan, also when it is planned later
            or re-planned), or any other ``nn.Module`` (captured into a
            :class:`FormatSimulatedModule`; the model itself is not changed).
        fwd, bwd: format names (``"e4m3"``, ``"e5m2"``, ``"fp16"``, ``"bf16"``),
            torch dtypes, or ``None`` for no rounding in that direction.
        saturate: see :class:`FormatSimulation`.
        attention: also round the matmuls inside scaled-dot-product attention.
        passthrough: measure only (see :class:`FormatSimulation`).
        example_inputs: for models that symbolic tracing cannot capture.

    Returns:
        the model with simulated formats. ``unit_scale`` accepts a
        :class:`FormatSimulatedModule` too: the result is the same as
        ``simulate_format(unit_scale(model), ...)``.
    """
    from ..api import UnitScaledModule

    sim = FormatSimulation(fwd, bwd, saturate, attention, passthrough)
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
    if isinstance(model, FormatSimulatedModule):
        raise UnitScaleError(
            "this model already simulates a number format",
            where="simulate_format(FormatSimulatedModule)",
            fix="call simulate_format(model.without_format(), ...) to change the formats",
        )
    from ..capture import _mirror_state, capture
    from .normalize import normalize
    from .shape_prop import shape_prop

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
    """Every :class:`Quantise` of a simulated model, by qualified name."""
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
