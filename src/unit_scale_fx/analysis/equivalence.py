"""Scale-erased equivalence: is the rewritten model the user's model plus scales, and nothing else?

The rewrite may change a model's numbers only by the scales it inserts. With every
inserted scale set to 1, forward and backward, the rewritten model must compute
exactly what the user wrote. :func:`scale_erased_copy` builds that model: a copy of
the unit-scaled module in which

* every ``scale(x, fwd, bwd)`` node the rewrite inserted (folded pairs included,
  see ``passes/fold_scales.py``) is bypassed: its readers read ``x``;
* every multiplication a pass inserted into an argument (u-μP's logit and
  activation multipliers) is bypassed, and every rescaled op argument (u-μP's
  ``scale=`` of attention) gets its original value back.

:func:`check_equivalence` loads the *original* model's weights into that copy (the
state_dict keys are the same) and compares outputs and parameter gradients with the
original model's, on the same inputs and the same RNG state. Together with
:func:`unit_scale_fx.analysis.gradient_cosines` (the gradients with the scales are
positive multiples of the true gradients of the rewritten forward) this shows the
rewrite is "the user's model plus scales": nothing dropped, moved or duplicated.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.fx as fx
import torch.nn as nn

from ..capture import flatten_output
from ..errors import UnitScaleError
from ..record import ARG_SCALE_KEY, INSERTED
from ..scale import scale
from ..tensor_stats import output_loss
from .validity import VANISHING, _graph_module

LossFn = Callable[[Any], torch.Tensor]


def all_outputs_loss(out: Any) -> torch.Tensor:
    """A scalar every float output contributes to: the scalar outputs themselves plus a fixed random
    projection of every other output. Use it as ``loss_fn`` to check every output at once."""
    return output_loss(out, seed=1234, where="all_outputs_loss", scalars_first=False)


def _erase(graph: fx.Graph) -> int:
    erased = 0
    for node in list(graph.nodes):
        info = node.meta.get(ARG_SCALE_KEY)
        if node.op == "call_function" and node.target is scale and node.meta.get(INSERTED) \
                or isinstance(info, dict) and info.get("bypass"):
            node.replace_all_uses_with(node.args[0])  # type: ignore[arg-type]
            graph.erase_node(node)
            erased += 1
        elif isinstance(info, dict) and "kwarg" in info:
            name, pos, old = info["kwarg"]
            if len(node.args) > pos:
                node.args = node.args[:pos] + (old,) + node.args[pos + 1:]
            else:
                kwargs = dict(node.kwargs)
                if old is None:
                    kwargs.pop(name, None)
                else:
                    kwargs[name] = old
                node.kwargs = kwargs
            erased += 1
    return erased


def _erase_module(gm: fx.GraphModule) -> None:
    _erase(gm.graph)
    gm.graph.lint()
    gm.recompile()


def _erased_graph(gm: fx.GraphModule, owner: nn.Module) -> fx.GraphModule:
    """A copy of one captured graph module of a class-kept model, on ``owner``'s parameters, scales erased."""
    from ..capture import _mirror_state

    erased = copy.deepcopy(gm)
    _mirror_state(owner, erased)
    _erase_module(erased)
    return erased


def scale_erased_copy(us_model: nn.Module) -> nn.Module:
    """A copy of the planned unit-scaled module with every inserted scale set to 1 (forward and backward).

    The copy has its own parameters and buffers (copies of ``us_model``'s).
    """
    state = us_model.__dict__.get("_us_state")
    if state is not None:  # the user's class kept (api.UnitScaledModel): graphs are captured per call signature
        if state.records is None or state.backend is not None:
            raise UnitScaleError("the unit-scaled model is not planned yet, or runs through dynamo",
                                 where="scale_erased_copy",
                                 fix="call the model once first; models unit-scaled through dynamo are not supported")
        if state.config.simulate_format is not None:
            raise UnitScaleError(
                "the model simulates a number format (simulate_format): rounding is not a scale and cannot be erased",
                where="scale_erased_copy", fix="check equivalence on the model unit-scaled without simulate_format")
        from ..api import _Graph

        erased_model = copy.deepcopy(us_model)  # a new call signature captures again, with the same scales
        copied = erased_model.__dict__["_us_state"]
        copied.post_capture = _erase_module
        for key, graphs in state.graphs.items():  # the graphs already captured: the very ones that train, erased
            copied.graphs[key] = [_Graph(_erased_graph(g.gm, erased_model), g.static, g.skeleton) for g in graphs]
        if state.primary is not None:
            copied.primary = next((g.gm for gs in copied.graphs.values() for g in gs), None)
        return erased_model
    gm = _graph_module(us_model)
    if not getattr(gm, "us_planned", True):
        raise UnitScaleError("the unit-scaled module is not planned yet", where="scale_erased_copy",
                             fix="pass example_inputs=(...) to unit_scale or call the module once first")
    if hasattr(gm, "us_formats"):
        raise UnitScaleError(
            "the module simulates a number format (simulate_format): rounding is not a scale and cannot be erased",
            where="scale_erased_copy",
            fix="check equivalence on the module unit-scaled without simulate_format")
    erased = copy.deepcopy(gm)
    _erase(erased.graph)
    erased.graph.lint()
    erased.recompile()
    return erased


@dataclass
class Equivalence:
    """What :func:`check_equivalence` found.

    ``outputs``: relative error (``|a - b| / |b|``, norms) of every float output leaf, in order;
    ``grads``: the same per parameter gradient; ``failures``: what differs, in words.
    """

    outputs: list[float] = field(default_factory=list)
    grads: dict[str, float] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    tolerance: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def max_error(self) -> float:
        return max([0.0, *self.outputs, *self.grads.values()])

    def __str__(self) -> str:
        head = (f"equivalent (max relative error {self.max_error:.2e} <= {self.tolerance:.0e})" if self.ok
                else f"NOT equivalent (tolerance {self.tolerance:.0e}): " + "; ".join(self.failures[:8]))
        return head + f" over {len(self.outputs)} outputs and {len(self.grads)} parameter gradients"


def _rel(a: Optional[torch.Tensor], b: Optional[torch.Tensor], floor: float) -> float:
    if a is None and b is None:
        return 0.0
    if a is None or b is None:
        other = b if a is None else a
        return 0.0 if float(other.detach().double().norm()) <= floor else math.inf  # type: ignore[union-attr]
    if a.shape != b.shape:
        return math.inf
    a64, b64 = a.detach().double(), b.detach().double()
    diff = float((a64 - b64).norm())
    if not math.isfinite(diff):
        same = torch.equal(a64.isnan(), b64.isnan()) and torch.equal(a64[~a64.isnan()], b64[~b64.isnan()])
        return 0.0 if same else math.inf
    return diff / max(float(b64.norm()), floor)


def _cast(x: Any, dtype: Optional[torch.dtype]) -> Any:
    if dtype is None:
        return x
    return torch.utils._pytree.tree_map(
        lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t, x)


def _structure(skel: Any) -> Any:
    """A comparable description of an output skeleton (:func:`~unit_scale_fx.capture.flatten_output`)."""
    kind = skel[0]
    if kind == "tensor":
        return "tensor"
    if kind == "const":
        v = skel[1]
        return (type(v).__name__, v) if v is None or isinstance(v, (bool, int, float, str)) else type(v).__name__
    if kind == "seq":
        return (skel[1].__name__, tuple(_structure(i) for i in skel[2]))
    return (type(skel[1]).__name__, tuple((k, _structure(v)) for k, v in skel[2].items()))


def _float_leaves(out: Any) -> list[Optional[torch.Tensor]]:
    return [t if isinstance(t, torch.Tensor) and t.is_floating_point() else None
            for t in torch.utils._pytree.tree_leaves(out)]


def _run(model: nn.Module, args: tuple, kwargs: dict, loss_fn: LossFn, rng: torch.Tensor):
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(rng)
        with torch.enable_grad():
            out = model(*args, **kwargs)
            loss = loss_fn(out)
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True)))
    return out, grads


def check_equivalence(original: nn.Module, unit_scaled: nn.Module, *inputs: Any,
                      kwargs: Optional[dict] = None, loss_fn: Optional[LossFn] = None,
                      dtype: Optional[torch.dtype] = None, tolerance: Optional[float] = None) -> Equivalence:
    """Compare the scale-erased ``unit_scaled`` (on ``original``'s weights) with ``original``.

    Both run ``model(*inputs, **kwargs)`` from the same RNG state, on copies (neither
    model, nor its ``.grad`` or buffers, is changed). Compared: the output's structure
    (container types included: a ``ModelOutput`` must stay one), every output leaf
    (floats: relative error of the norm; everything else: equality) and every
    parameter's gradient of ``loss_fn(output)`` (default: :func:`all_outputs_loss`, so
    every output counts). ``dtype=torch.float64`` runs both in double precision (float inputs
    cast too) for a tight check. ``tolerance`` defaults to 1e-4 (float32) or 1e-9
    (float64). Returns an :class:`Equivalence`; ``.ok`` says whether it holds.
    """
    kwargs = dict(kwargs or {})
    loss_fn = loss_fn or all_outputs_loss
    ref = copy.deepcopy(original)
    erased = scale_erased_copy(unit_scaled)
    # strict=False: a torch.export capture may add constants of its own (``lifted_tensor_0``)
    result = erased.load_state_dict(ref.state_dict(), strict=False)
    if result.unexpected_keys:
        raise UnitScaleError(
            f"the unit-scaled module lacks the original's state_dict keys {result.unexpected_keys}",
            where="check_equivalence", fix="pass the model given to unit_scale and the module it returned")
    for name, p in ref.named_parameters():  # frozen stays frozen in the copy as in the original
        erased.get_parameter(name).requires_grad_(p.requires_grad)
    from ..api import copy_modes

    copy_modes(ref, erased)  # each module in the original's mode (a frozen batch norm stays in evaluation)
    if dtype is not None:
        ref.to(dtype)
        erased.to(dtype)
    args, kwargs = _cast(inputs, dtype), _cast(kwargs, dtype)
    some = next((p for p in ref.parameters() if p.is_floating_point()), None)
    work_dtype = dtype or (some.dtype if some is not None else torch.float32)
    tol = tolerance if tolerance is not None else (1e-9 if work_dtype == torch.float64 else 1e-4)
    rng = torch.get_rng_state()
    try:
        out_ref, g_ref = _run(ref, args, kwargs, loss_fn, rng)
        out_us, g_us = _run(erased, args, kwargs, loss_fn, rng)
    finally:
        torch.set_rng_state(rng)
    report = Equivalence(tolerance=tol)
    # outputs are walked as capture walks them: containers, and the attributes of objects that hold
    # tensors (a Hugging Face key/value cache), so every tensor of the output is compared
    leaves_ref, leaves_us = [], []
    spec_ref = _structure(flatten_output(out_ref, leaves_ref))
    spec_us = _structure(flatten_output(out_us, leaves_us))
    if spec_ref != spec_us or type(out_ref) is not type(out_us):
        report.failures.append(f"the output's structure differs: {type(out_us).__name__} {spec_us} instead of "
                               f"{type(out_ref).__name__} {spec_ref}")
    for i, (a, b) in enumerate(zip(leaves_us, leaves_ref)):
        if isinstance(b, torch.Tensor) and b.is_floating_point():
            err = _rel(a if isinstance(a, torch.Tensor) else None, b, 0.0) if isinstance(a, torch.Tensor) \
                else math.inf
            report.outputs.append(err)
            if not err <= tol:
                report.failures.append(f"output {i}: relative error {err:.3g}")
        elif isinstance(b, torch.Tensor):
            if not (isinstance(a, torch.Tensor) and torch.equal(a, b)):
                report.failures.append(f"output {i} (non-float tensor) differs")
        elif a != b:
            report.failures.append(f"output {i}: {a!r} != {b!r}")
    norms = [float(g.detach().double().norm()) for g in g_ref.values() if g is not None]
    floor = VANISHING * max([x for x in norms if math.isfinite(x)], default=0.0)
    for name in sorted(set(g_ref) | set(g_us)):
        if name not in g_ref or name not in g_us:
            report.failures.append(f"parameter {name} needs grad in only one of the two models")
            continue
        err = _rel(g_us[name], g_ref[name], floor)
        report.grads[name] = err
        if not err <= tol:
            report.failures.append(f"gradient of {name}: relative error {err:.3g}")
    return report


def assert_equivalent(original: nn.Module, unit_scaled: nn.Module, *inputs: Any, **kwargs: Any) -> Equivalence:
    """:func:`check_equivalence`, raising ``AssertionError`` with what differs."""
    report = check_equivalence(original, unit_scaled, *inputs, **kwargs)
    if not report.ok:
        raise AssertionError(str(report))
    return report
