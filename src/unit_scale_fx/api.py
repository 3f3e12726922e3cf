"""``unit_scale(model)``: the one entry point that runs the pipeline."""

from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import replace
from typing import Any, Optional, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from .capture import _mirror_state, capture
from .config import UnitScaleConfig
from .errors import UnitScaleError
from .passes import PassContext
from .passes.init_weights import parameter_init_kinds
from .pipeline import build_pipeline, gc_paused, run_passes
from .record import CAPTURE, META_KEY, ScaleRecord
from .table import format_table

log = logging.getLogger(__name__)


class UnitScaledModule(fx.GraphModule):
    """A unit-scaled model: a GraphModule with the original parameter names.

    Scales are planned for concrete shapes: from ``example_inputs`` given to
    :func:`unit_scale`, or else from the first call. Later calls with other shapes
    keep the planned scales (gradients stay valid; only their size drifts); call
    :meth:`replan` to plan again.
    """

    def __init__(self, root: nn.Module, graph: fx.Graph, config: UnitScaleConfig, class_name: str) -> None:
        super().__init__(root, graph, class_name)
        self.us_config = config
        self.us_planned = False
        self.us_source_graph = copy.deepcopy(graph)  # normalised, before any scale was inserted
        self.us_timings: list[tuple[str, float]] = []
        self.us_unsupported: list = []

    # -- planning ---------------------------------------------------------
    def _plan(self, args: tuple, kwargs: dict) -> None:
        if self.us_planned:
            self.graph = copy.deepcopy(self.us_source_graph)
        ctx = PassContext(config=self.us_config, example_args=args, example_kwargs=kwargs)
        ctx.give("init_kinds", parameter_init_kinds(self))
        _check_input_devices(self, args, kwargs)
        run_passes(self, ctx, build_pipeline(self.us_config, ("plan", "transform")))
        self.us_timings = list(ctx.timings)
        self.us_unsupported = list(ctx.unsupported)
        self.us_planned = True
        log.info("unit_scale: planned %d scaled nodes for input shapes %s", len(self.scale_plan()),
                 [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)])

    def replan(self, *args: Any, **kwargs: Any) -> "UnitScaledModule":
        """Plan the scales again for these inputs' shapes."""
        self._plan(args, kwargs)
        return self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.us_planned:
            if torch.compiler.is_compiling():
                raise UnitScaleError(
                    "a unit-scaled module was compiled before its scales were planned",
                    where=type(self).__name__,
                    fix="pass example_inputs=(...) to unit_scale, or call the module once before torch.compile",
                )
            if _distributed_world() > 1:
                warnings.warn(
                    "planning the scales lazily inside a distributed job: every rank plans on its own batch and "
                    "the ranks may get different scales; plan before wrapping (unit_scale(model, "
                    "example_inputs=...)) and call unit_scale_fx.training.distributed.sync_plan(model)",
                    UserWarning, stacklevel=2)
            self._plan(args, kwargs)
        return super().__call__(*args, **kwargs)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """``nn.Module.load_state_dict``; warns when the scales are not planned yet.

        Planning measures the model on the example batch, so planning *after*
        loading trained weights gives other scales than the saved model used:
        plan first (``unit_scale(model, example_inputs=...)``), then load.
        """
        if not self.us_planned:
            msg = ("loading weights into a unit-scaled module whose scales are not planned yet: the first call "
                   "will plan them on the loaded weights, which differs from the plan the saved model trained "
                   "with; pass example_inputs=(...) to unit_scale before load_state_dict")
            warnings.warn(msg, UserWarning, stacklevel=2)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # -- copying and pickling ---------------------------------------------
    # fx.GraphModule rebuilds copies through ``GraphModule.__init__`` (dropping
    # parameters the graph does not use and buffer persistence, so state_dict
    # keys change) and pickles by re-tracing its generated code (which fails on
    # string annotations, would inline ``scale`` and loses the plan). A
    # UnitScaledModule instead copies its whole ``__dict__`` and re-attaches the
    # graph, so a copy is the same module: same state, same plan, same config.
    def __deepcopy__(self, memo: dict) -> "UnitScaledModule":
        res = type(self).__new__(type(self))
        memo[id(self)] = res
        state = copy.deepcopy(self.__dict__, memo)
        _restore_state(res, state)
        return res

    def __reduce__(self) -> tuple:
        if getattr(self, "us_capture", "") == "torch.export":
            # torch.export's unlifted module holds a guard closure and aten overloads,
            # neither of which pickle (torch's own ep.module() does not pickle either).
            raise UnitScaleError(
                "a unit-scaled module captured with torch.export cannot be pickled",
                where=f"pickle / torch.save of {type(self).__name__}",
                fix="save its state_dict and rebuild with unit_scale(Model(...), example_inputs=...) before "
                "loading it; copy.deepcopy works",
            )
        state = self.__dict__.copy()
        state["_graph"] = _portable_graph(self._graph)
        state["us_source_graph"] = _portable_graph(self.us_source_graph)
        return (_rebuild_unit_scaled, (state,))

    # -- introspection ----------------------------------------------------
    def scale_plan(self, all_nodes: bool = False) -> dict[str, ScaleRecord]:
        """``node name -> ScaleRecord``; by default only nodes whose scales differ from 1."""
        if not self.us_planned:
            raise UnitScaleError(
                "no scales have been planned yet",
                where=f"{type(self).__name__}.scale_plan",
                fix="call the module once or pass example_inputs=(...) to unit_scale",
            )
        out = {}
        for n in self.graph.nodes:
            rec = n.meta.get(META_KEY)
            if rec is not None and (all_nodes or rec.changes_anything or rec.rule == "unsupported"):
                out[n.name] = rec
        return out

    def summary(self, all_nodes: bool = False) -> str:
        """An aligned table: node, rule, op, shape, scales, and the output and gradient RMS."""
        rows = [("node", "rule", "op", "shape", "fwd scale", "bwd scales", "fwd rms", "grad rms")]
        for name, r in self.scale_plan(all_nodes).items():
            bwd = ", ".join(f"{v:.3g}" for v in r.bwd.values()) or "-"
            fwd = "w " + ", ".join(f"{v:.3g}" for v in r.weights.values()) if r.weights else f"{r.fwd:.3g}"
            rows.append((
                name, r.rule + ("*" if r.constrained else ""), _short_op(r.op),
                "x".join(map(str, r.shape)) if r.shape else "-", fwd, bwd,
                "-" if r.fwd_rms is None else f"{r.fwd_rms:.3g}", "-" if r.bwd_rms is None else f"{r.bwd_rms:.3g}",
            ))
        lines = format_table(rows).splitlines()
        lines.append("(* = backward scales moved from the ideal to keep gradients valid; "
                     "rms: measured on the planning batch, or predicted when planning was analytic)")
        return "\n".join(lines)


def _portable_graph(graph: fx.Graph) -> fx.Graph:
    """A copy of ``graph`` without node metadata that cannot be pickled (fake tensors, symbolic shapes)."""
    import pickle

    out = copy.deepcopy(graph)
    for node in out.nodes:
        for key in list(node.meta):
            try:
                pickle.dumps(node.meta[key])
            except Exception:  # fake tensors, SymInts, local classes: analysis by-products only
                del node.meta[key]
    return out


def _restore_state(res: "UnitScaledModule", state: dict) -> None:
    graph = state.pop("_graph")
    res.__dict__.update(state)
    res.graph = graph  # binds the graph to ``res`` and regenerates ``forward``


def _rebuild_unit_scaled(state: dict) -> "UnitScaledModule":
    """Unpickle a :class:`UnitScaledModule` (see ``UnitScaledModule.__reduce__``)."""
    res = UnitScaledModule.__new__(UnitScaledModule)
    _restore_state(res, dict(state))
    return res


def _short_op(op: str) -> str:
    parts = op.split(".")
    if parts[-1] in ("default", "Tensor", "int", "Scalar", "using_ints") and len(parts) > 1:
        parts = parts[:-1]
    return parts[-1]


def _distributed_world() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _devices(model: nn.Module) -> set[torch.device]:
    return {t.device for t in list(model.parameters()) + list(model.buffers())}


def _check_input_devices(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """A model on the meta device can only be planned on meta inputs (shapes only), and vice versa."""
    on_meta = {d.type == "meta" for d in _devices(model)}
    inputs = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    in_meta = {t.device.type == "meta" for t in inputs}
    if on_meta == {True} and False in in_meta or on_meta == {False} and True in in_meta:
        what = ("the model is on the meta device but the example inputs are not" if True in on_meta
                else "the example inputs are on the meta device but the model is not")
        raise UnitScaleError(
            what,
            where=f"{type(model).__name__} planning",
            fix="plan a meta model with meta inputs (shapes only: analysis without memory), or materialise "
            "it first (model.to_empty(device=...) and initialise) and plan with real inputs",
        )


def _check_model(model: Any) -> None:
    if isinstance(model, UnitScaledModule) or hasattr(model, "us_backend"):
        raise UnitScaleError(
            "this model is already unit-scaled",
            where=type(model).__name__,
            fix="call unit_scale on the original model; use .replan(...) to plan for other shapes",
        )
    if not isinstance(model, nn.Module):
        raise UnitScaleError(
            f"unit_scale expects a torch.nn.Module, got {type(model).__name__}",
            where="unit_scale(model)",
            fix="wrap the function in an nn.Module whose forward calls it",
        )
    params = [p for p in model.parameters()]
    kinds = {d.type == "meta" for d in _devices(model)}
    if len(kinds) > 1:
        raise UnitScaleError(
            f"{type(model).__name__} has tensors both on the meta device and on real devices "
            f"({', '.join(sorted(str(d) for d in _devices(model)))})",
            where="unit_scale(model)",
            fix="materialise every submodule (module.to_empty(device=...) and initialise) or keep the whole "
            "model on meta for a shapes-only analysis",
        )
    if params and not any(p.is_floating_point() for p in params):
        raise UnitScaleError(
            f"{type(model).__name__} has no floating-point parameters",
            where="unit_scale(model)",
            fix="unit scaling rescales floating-point weights; quantised or integer models are not supported",
        )


def _dynamo_fallback(work: nn.Module, model: nn.Module, args: tuple, kwargs: dict, cfg: UnitScaleConfig,
                     cause: UnitScaleError) -> nn.Module:
    """Unit-scale through dynamo when neither torch.fx nor torch.export can capture the model.

    Dynamo splits the forward at whatever it cannot trace (data-dependent control flow)
    and the ``unit_scale`` backend rewrites each piece; gradients crossing a graph break
    stay true gradients. The model is compiled in place (``nn.Module.compile``), so it
    keeps its class and its state_dict keys; the backend that planned it is ``us_backend``.
    """
    from .backend import UnitScaleBackend

    log.warning("unit_scale: %s could not be captured as one graph (%s); unit-scaling it through dynamo "
                "(torch.compile with the 'unit_scale' backend, inner compiler 'eager')",
                type(model).__name__, cause.what.splitlines()[0])
    backend = UnitScaleBackend(cfg, inner="eager")
    try:
        work.compile(backend=backend)
        work.train(model.training)
        work(*args, **kwargs)  # dynamo captures, the backend plans, on the example inputs
    except Exception as exc:
        raise UnitScaleError(
            f"{cause.what}; dynamo could not capture it either: {type(exc).__name__}: {exc}",
            where=cause.where, fix=cause.fix) from exc
    work.zero_grad(set_to_none=True)
    if not backend.graphs:
        raise UnitScaleError(f"{cause.what}; dynamo captured no graph", where=cause.where, fix=cause.fix)
    object.__setattr__(work, "us_backend", backend)
    return work


def unit_scale(
    model: nn.Module,
    example_inputs: Optional[Sequence[Any]] = None,
    config: Optional[UnitScaleConfig] = None,
    *,
    example_kwargs: Optional[dict] = None,
    mup: bool = False,
    **overrides: Any,
) -> UnitScaledModule:
    """Return a unit-scaled copy of ``model``, ready to train.

    Stages: capture (torch.fx, or torch.export when tracing fails and example
    inputs are given) -> normalize -> init_weights; then, with example inputs or
    at the first call: shape_prop -> topology -> plan -> rewrite -> recompile.

    Args:
        model: any ``nn.Module``; it is not changed unless ``config.inplace``.
        example_inputs: positional inputs of one forward call; plans the scales now.
        config: a :class:`UnitScaleConfig`; keyword ``overrides`` replace its fields.
        example_kwargs: keyword inputs of that call.
        mup: shorthand for ``parametrization="u-mup"`` (see :mod:`unit_scale_fx.passes.mup`).

    Returns:
        a :class:`UnitScaledModule` with the same state_dict keys as ``model``. When
        neither torch.fx nor torch.export can capture the model (data-dependent
        control flow) and example inputs are given, a copy of ``model`` compiled with
        the ``unit_scale`` dynamo backend (inner compiler ``eager``) instead: same
        class, same state_dict keys, its plan in ``.us_backend``.

    Raises:
        UnitScaleError: the model cannot be captured or has unsupported ops under
        ``unsupported="error"``.
    """
    _check_model(model)
    cfg = config or UnitScaleConfig()
    if mup:
        overrides.setdefault("parametrization", "u-mup")
    cfg = cfg.with_overrides("unit_scale(**overrides)", **overrides)
    fmt = getattr(model, "us_format", None)
    if fmt is not None:  # simulate_format(model): scale the plain graph, round after the scales
        model, cfg = model.without_format(), replace(cfg, simulate_format=fmt)
    if example_inputs is not None and not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    args = tuple(example_inputs) if example_inputs is not None else None
    with gc_paused():
        work = model if cfg.inplace else copy.deepcopy(model)
        try:
            gm = capture(work, args, example_kwargs, cfg.leaf_modules)
        except UnitScaleError as exc:
            if (args is None and not example_kwargs) or not cfg.dynamo_fallback:
                raise
            return _dynamo_fallback(work, model, args or (), example_kwargs or {}, cfg, exc)
    ctx = PassContext(config=cfg)
    run_passes(gm, ctx, build_pipeline(cfg, ("prepare",)))
    us = UnitScaledModule(gm, gm.graph, cfg, type(model).__name__)
    _mirror_state(work, us)
    us.train(model.training)
    us.us_capture = gm.meta.get(CAPTURE, "")
    if args is not None or example_kwargs:
        us._plan(args or (), example_kwargs or {})
    return us
