"""``unit_scale(model)``: the one entry point that runs the pipeline."""

from __future__ import annotations

import copy
import functools
import logging
import os
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from .capture import (CallSignature, _location, _mirror_state, _traced_location, export_call, opaque_calls,
                      reads_training_flag, rebuild_output, symbolic_capture)
from .checkpoint import mark_weight_files, unmark_state_dict, unmarked_view
from .config import UnitScaleConfig
from .errors import UnitScaleError
from .passes import PassContext
from .passes.init_weights import parameter_init_kinds
from .passes.stats import planning_stats
from .pipeline import build_pipeline, gc_paused, run_passes
from .running_stats import carry_running_stats, trained_norms
from .rules.registry import Kind, lookup
from .scale import first_order_only
from .record import CAPTURE, INSERTED, META_KEY, ScaleRecord, original, LOST_TYPES
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
        #: the per-submodule modes the original's own ``train()`` sets, by mode (:func:`train_modes`), or None
        self.us_train_modes: Optional[dict[bool, dict[str, bool]]] = None

    def train(self, mode: bool = True) -> "UnitScaledModule":
        """Set train / eval mode, as the original model's ``train()`` does: where its class or a submodule's
        overrides ``train()`` (a backbone that keeps its batch norms in evaluation while it trains), the modes
        it sets on each submodule are set here too (:func:`train_modes`; its other side effects are not)."""
        super().train(mode)
        modes = getattr(self, "us_train_modes", None)
        if modes:
            mine = dict(self.named_modules(remove_duplicate=False))
            for name, flag in modes[bool(mode)].items():
                if name in mine:
                    mine[name].training = flag
        return self

    # -- planning ---------------------------------------------------------
    def _plan(self, args: tuple, kwargs: dict) -> None:
        # trained running statistics describe the function the module computes now: the original's (weights
        # kept, first plan) or the last plan's (replan); they are carried into the new plan's units
        reference = None
        if trained_norms(self) and (self.us_planned or not self.us_config.init_weights):
            reference = copy.deepcopy(self)
        if self.us_planned:
            self.graph = copy.deepcopy(self.us_source_graph)
        ctx = PassContext(config=self.us_config, example_args=args, example_kwargs=kwargs,
                          stats=planning_stats(getattr(self.us_config, "plan_across_ranks", True)))
        ctx.give("init_kinds", parameter_init_kinds(self))
        _check_input_devices(self, args, kwargs)
        run_passes(self, ctx, build_pipeline(self.us_config, ("plan", "transform")))
        self.us_timings = list(ctx.timings)
        self.us_unsupported = list(ctx.unsupported)
        self.us_planned = True
        if reference is not None:
            carry_running_stats(self, reference, args, kwargs)
        log.info("unit_scale: planned %d scaled nodes for input shapes %s", len(self.scale_plan()),
                 [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)])

    def _adopt(self, records: dict[str, tuple], args: tuple) -> tuple[int, list[str]]:
        """Take the scales of another capture of the same model (matched by node name and op); no measuring.

        Returns how many nodes took a record, and the floating-point ops of this graph
        the plan has no record for (left unscaled: their forward is the user's own,
        their backward the true gradient).
        """
        from .passes.constants import mark_constants
        from .passes.fuse import fuse
        from .passes.shape_prop import shape_prop

        ctx = PassContext(config=self.us_config, example_args=args, example_kwargs={})
        ctx.give("scales", {})
        surgery = [shape_prop, mark_constants, fuse]  # the same graph surgery as planning
        if self.us_config.parametrization == "u-mup":  # u-muP edits the graph too (attention scale, multipliers)
            from .passes.mup import mup
            from .passes.topology import topology

            surgery += [topology, mup]
        run_passes(self, ctx, surgery)
        matched, unplanned = 0, []
        for n, key in node_keys(self.graph).items():
            entry = records.get(key)
            if entry is None:
                rule = lookup(n, self)
                # (an op that moves values, as dropout in evaluation (``training=False``) does, takes no scale)
                if is_float_value(n) and (rule is None or rule.kind != Kind.PRESERVE):
                    unplanned.append(n.name)
                continue
            rec, inputs = entry[1], entry[2]
            if rec is None:  # the planned graph left this node alone too
                continue
            mine = [x.name for x in n.all_input_nodes]
            if len(mine) != len(inputs):
                unplanned.append(n.name)
                continue
            rename = dict(zip(inputs, mine))
            rec = copy.deepcopy(rec)
            rec.bwd = {rename[k]: v for k, v in rec.bwd.items() if k in rename}
            rec.weights = {rename[k]: v for k, v in rec.weights.items() if k in rename}
            rec.ideal_bwd = {rename.get(k, k): v for k, v in rec.ideal_bwd.items()}
            n.meta[META_KEY] = rec
            matched += 1
        run_passes(self, ctx, build_pipeline(self.us_config, ("transform",)))
        self.us_planned = True
        return matched, unplanned

    def _records(self) -> dict[str, tuple]:
        """The plan as ``node key -> (node name, record, input names)``, for :meth:`_adopt` on another capture.

        A node's key is its module, op and rank among that module's calls of that op
        (:func:`node_keys`): it names the same computation in every capture of the model.
        """
        return {key: (n.name, n.meta.get(META_KEY), [original(x).name for x in n.all_input_nodes])
                for n, key in node_keys(self.graph).items()}

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
            # inside a process group every rank plans on the global batch (passes/stats.py);
            # under FSDP2 the parameters are unsharded while planning
            with _unsharded(self):
                self._plan(args, kwargs)
        out = super().__call__(*args, **kwargs)
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            first_order_only(out, (args, kwargs), type(self).__name__)
        return out

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
    @property
    def us_module(self) -> "UnitScaledModule":
        """The unit-scaled GraphModule (itself; for a :class:`UnitScaledModel`, its planned graph)."""
        return self

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


def is_float_value(n: fx.Node) -> bool:
    val = n.meta.get("val")
    return isinstance(val, torch.Tensor) and val.is_floating_point()


def train_modes(model: nn.Module) -> Optional[dict[bool, dict[str, bool]]]:
    """The mode of each submodule after ``model.train(True)`` and after ``model.train(False)``, where ``model``'s
    class or a submodule's overrides ``train()`` (else None: ``nn.Module.train`` sets every submodule alike).
    ``model``'s modes are restored afterwards. Only the modes are read: a ``train()`` that does more (freezes
    parameters) does that here too, as it would when the user calls it."""
    if all(type(m).train is nn.Module.train for m in model.modules()):
        return None
    saved = {name: m.training for name, m in model.named_modules(remove_duplicate=False)}
    out: dict[bool, dict[str, bool]] = {}
    try:
        for flag in (True, False):
            model.train(flag)
            out[flag] = {name: m.training for name, m in model.named_modules(remove_duplicate=False)}
    finally:
        mods = dict(model.named_modules(remove_duplicate=False))
        for name, flag in saved.items():
            mods[name].training = flag
    return out


def copy_modes(src: nn.Module, dst: nn.Module) -> None:
    """``dst`` and each of its submodules in the train / eval mode of ``src``'s module of the same name (a frozen
    batch norm left in evaluation inside a model in training stays so; ``dst.train(src.training)`` alone would
    flip it, and the batch norm would normalise with batch statistics and update its running ones). Modules
    ``src`` does not have (the graph's own) take ``src``'s mode."""
    dst.train(src.training)
    mine = dict(dst.named_modules(remove_duplicate=False))
    for name, m in src.named_modules(remove_duplicate=False):
        if name and name in mine:
            mine[name].training = m.training


def node_keys(graph: fx.Graph) -> dict[fx.Node, str]:
    """A name for each op node that is the same in every capture of the model.

    fx names nodes by a counter per op over the whole graph, so one extra op early on (a
    cache, a mask) renames every later one. The key is instead the innermost module the
    op ran in, the op, its rank among that module's calls of that op, and its scalar
    options: a cross entropy summed (then divided by a count) is not the same op as a mean.
    """
    seen: dict[tuple[str, str], int] = {}
    out = {}
    for n in graph.nodes:
        if n.op not in ("call_function", "call_module", "call_method") or n.meta.get(INSERTED):
            continue
        stack = n.meta.get("nn_module_stack") or {}
        path = str(list(stack.values())[-1][0]) if stack else ""
        op = str(n.target).rstrip("0123456789_") if n.op == "call_module" else str(n.target)
        k = seen.get((path, op), 0)
        seen[(path, op)] = k + 1
        consts = [a for a in list(n.args) + list(n.kwargs.values())
                  if isinstance(a, (bool, int, float, str)) or a is None]
        out[n] = f"{path}|{op}|{k}|{consts}"  # the op's own options (a loss's reduction) are part of it
    return out


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


class _unsharded:
    """Unshard an FSDP2 module's parameters for the duration of planning (no-op for other modules).

    ``fully_shard`` gives the module a new class (``FSDP<name>``, a subclass of its own).
    ``GraphModule.recompile`` installs ``__call__`` on the instance's class, which on that
    subclass would call itself: planning runs with the module's own class, restored after.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.fsdp = callable(getattr(module, "unshard", None)) and hasattr(module, "reshard")
        self.cls = type(module)

    def __enter__(self) -> None:
        if self.fsdp:
            self.module.unshard()
            own = [c for c in self.cls.__bases__ if issubclass(c, fx.GraphModule)]
            if own:
                self.module.__class__ = own[-1]

    def __exit__(self, *exc: object) -> None:
        if self.fsdp:
            self.module.__class__ = self.cls
            self.module.reshard()


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
    if isinstance(model, (UnitScaledModule, UnitScaledModel)) or hasattr(model, "us_backend"):
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
    lazy = [k for k, t in [*model.named_parameters(), *model.named_buffers()]
            if isinstance(t, nn.parameter.UninitializedTensorMixin)]
    if lazy:
        raise UnitScaleError(
            f"{type(model).__name__} has parameters or buffers that are not initialised yet (a lazy layer's): "
            f"{', '.join(lazy[:4])}{' ...' if len(lazy) > 4 else ''}",
            where="unit_scale(model)",
            fix="run the model once on a batch (model(*example_inputs)) so that its lazy layers take their shapes, "
            "then unit_scale it",
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


# -- the model's own class, forward routed through captured graphs ------------------------------------------

#: Where a unit-scaled model keeps its plan on ``model.config`` (when it has one: Hugging Face's
#: ``save_pretrained`` writes it to config.json, :func:`from_pretrained` reads it back).
PLAN_ATTR = "unit_scale_plan"
PLAN_VERSION = 1


def encode_plan(records: dict[str, tuple]) -> dict:
    """A plan as plain JSON data."""
    return {"version": PLAN_VERSION,
            "records": {key: [name, None if rec is None else rec.to_dict(), inputs]
                        for key, (name, rec, inputs) in records.items()}}


def decode_plan(data: Any, where: str) -> dict[str, tuple]:
    if not isinstance(data, dict) or data.get("version") != PLAN_VERSION or not isinstance(data.get("records"), dict):
        raise UnitScaleError(
            f"the saved unit-scaling plan is not one this version reads (version {data.get('version') if isinstance(data, dict) else type(data).__name__})",
            where=where, fix="save the model again with this version of unit_scale_fx, or remove "
            f"'{PLAN_ATTR}' from its config to plan afresh (the trained weights then get other scales)")
    out = {}
    for key, (name, d, inputs) in data["records"].items():
        if d is not None:
            d = dict(d)
            d["shape"] = tuple(d["shape"]) if d.get("shape") is not None else None
            d = ScaleRecord(**d)
        out[key] = (name, d, list(inputs))
    return out


class _Graph:
    """One captured call signature: its unit-scaled graph, the dims it specialised, its output skeleton."""

    def __init__(self, gm: UnitScaledModule, static: list, skeleton: Any) -> None:
        self.gm, self.static, self.skeleton = gm, static, skeleton

    def fits(self, tensors: Sequence[torch.Tensor]) -> bool:
        if len(tensors) != len(self.static):
            return False
        for t, dims in zip(tensors, self.static):
            if dims is None:
                continue
            if len(dims) != t.dim():
                return False
            for d, s in zip(dims, t.shape):
                if isinstance(d, int) and d != s:
                    return False
                if isinstance(d, tuple) and (s < d[0] or (d[1] is not None and s > d[1])):
                    return False
        return True


class _ModelState:
    """What a :class:`UnitScaledModel` keeps besides the user's own attributes (not a module: no state_dict keys)."""

    def __init__(self, config: UnitScaleConfig, base: type, records: Optional[dict] = None,
                 init_pending: bool = True) -> None:
        self.config, self.base = config, base
        self.records = records  # the plan: node name -> (target, ScaleRecord); None until the first capture
        self.init_pending = init_pending and config.init_weights
        self.graphs: dict[Any, list[_Graph]] = {}
        self.primary: Optional[UnitScaledModule] = None
        self.backend: Any = None  # the dynamo backend, when export could not capture the model
        self.compiled: Any = None  # the user's forward compiled with it
        self.cause: Optional[UnitScaleError] = None  # why export failed
        #: called on each newly captured (and planned or adopted) graph module; analysis tools use it
        #: to check a copy (e.g. the scale-erased copy of :mod:`unit_scale_fx.analysis.equivalence`)
        self.post_capture: Optional[Callable[[UnitScaledModule], None]] = None

    def __getstate__(self) -> dict:
        # captured graphs are not copied or pickled: the copy captures again at its first call and
        # takes the same scales from ``records`` (nothing is measured again)
        state = self.__dict__.copy()
        state.update(graphs={}, primary=None, backend=None, compiled=None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)


def _state(model: nn.Module) -> _ModelState:
    return model.__dict__["_us_state"]


class UnitScaledModel(nn.Module):
    """The user's own model class with ``forward`` unit-scaled (what :func:`unit_scale` returns for models
    torch.fx cannot trace, which is most Hugging Face models).

    ``unit_scale`` makes a subclass of the model's class (same name) and gives the copy
    that class: every attribute and method stays (``config``, ``generate``,
    ``save_pretrained``, ``train()`` / ``eval()``); only ``forward`` changes. A call is
    captured with torch.export the first time its signature (which arguments, their
    dtypes and ranks, the constants, train or eval mode) is seen, with the batch and the sizes
    of integer inputs dynamic where the model allows it (:func:`~unit_scale_fx.capture.dynamic_dims`).
    The first capture plans the scales (measured on
    that call's inputs); every other signature takes the same scales by node (labels
    left out, eval mode, another output mode), so the model computes one function.

    The plan is written to ``model.config.unit_scale_plan`` when the model has a
    ``config`` (Hugging Face's ``save_pretrained`` saves it, with the weight files marked so
    that a loader without the plan refuses them; :func:`from_pretrained`, ``unit_scale`` and the
    unit-scaled class's ``from_pretrained`` read it back without measuring again).
    """

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        st = _state(self)
        if st.backend is None:
            g, tensors = self._us_graph_for(args, kwargs)
            if st.backend is None:
                return rebuild_output(g.skeleton, g.gm(*tensors))
        # export could not capture the model: dynamo splits it at what it cannot trace
        if st.backend.graphs:
            return st.compiled(*args, **kwargs)
        try:
            return st.compiled(*args, **kwargs)
        except Exception as exc:
            cause = st.cause
            raise UnitScaleError(f"{cause.what}; dynamo could not capture it either: {type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0] if str(exc) else ''}",
                                 where=f"torch.export: {cause.where}; dynamo: {_traced_location(exc)}",
                                 fix="make the code at both places traceable: no Python branch on a tensor's "
                                 "value (`if x.max() > n:`; torch._check or torch.cond instead), no write into "
                                 "a view a custom autograd.Function returned (clone it first); or turn the "
                                 "feature that runs there off in the model's config") from exc

    # -- capture and planning ---------------------------------------------------------------------------
    def _us_graph_for(self, args: tuple, kwargs: dict) -> tuple[Optional[_Graph], list]:
        st = _state(self)
        where = f"{st.base.__name__}.forward"
        sig = CallSignature(args, kwargs, where)
        key = (sig.key, self.training, torch.is_grad_enabled())
        for g in st.graphs.get(key, ()):
            if g.fits(sig.tensors):
                return g, sig.tensors
        g = self._us_capture(sig, where)
        if g is not None:
            st.graphs.setdefault(key, []).append(g)
        return g, sig.tensors

    def _us_capture(self, sig: CallSignature, where: str) -> Optional[_Graph]:
        st = _state(self)
        if st.records is None:
            saved = getattr(getattr(self, "config", None), PLAN_ATTR, None)
            if saved is not None:
                st.records = decode_plan(saved, f"{where} (the plan saved in config.{PLAN_ATTR})")
                st.init_pending = False
        base_forward = st.base.forward

        def run(*flat: torch.Tensor) -> Any:
            a, k = sig.rebuild(flat)
            return base_forward(self, *a, **k)

        if torch.compiler.is_compiling():
            raise UnitScaleError("a unit-scaled model met a new call signature inside torch.compile", where=where,
                                 fix="call the model once with this signature before compiling it")
        # capture and planning happen once, outside whatever dispatch modes the caller runs under
        # (a recorder, a format simulation): those see the call itself, not our bookkeeping
        from torch.utils._python_dispatch import _disable_current_modes

        with gc_paused(), _disable_current_modes():
            try:
                try:
                    gm, skeleton = export_call(self, sig, run, dynamic=True)
                except Exception as exc:
                    log.info("unit_scale: export of %s with dynamic shapes failed (%s: %s); exporting with static "
                             "shapes (another input shape then captures again, with the same scales)",
                             st.base.__name__, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
                    gm, skeleton = export_call(self, sig, run, dynamic=False)
            except Exception as exc:
                cause = UnitScaleError(
                    f"neither torch.fx nor torch.export could capture {st.base.__name__}.forward: "
                    f"{type(exc).__name__}: "
                    f"{str(exc).splitlines()[0] if str(exc) else ''}",
                    where=_location(exc),
                    fix="make the forward traceable (no data-dependent Python control flow), or keep "
                    "UnitScaleConfig(dynamo_fallback=True) to unit-scale it through dynamo")
                if not st.config.dynamo_fallback or st.records is not None:
                    raise cause from exc
                self._us_use_dynamo(cause)
                return None
            prep_cfg = st.config if st.init_pending and st.records is None else replace(st.config, init_weights=False)
            run_passes(gm, PassContext(config=prep_cfg), build_pipeline(prep_cfg, ("prepare",)))
            st.init_pending = False
            us = UnitScaledModule(gm, gm.graph, st.config, st.base.__name__)
            _mirror_state(self, us)
            us.train(self.training)
            us.us_capture = "torch.export"
            if st.records is None:
                us._plan(tuple(sig.tensors), {})
                st.records, st.primary = us._records(), us
                self._us_save_plan()
            else:
                matched, unplanned = us._adopt(st.records, tuple(sig.tensors))
                if st.primary is None:
                    st.primary = us
                if unplanned:
                    log.warning("unit_scale: a new call signature of %s has %d floating-point ops the plan does not "
                                "cover (left unscaled): %s", st.base.__name__, len(unplanned),
                                ", ".join(unplanned[:8]) + (" ..." if len(unplanned) > 8 else ""))
                log.info("unit_scale: captured another call signature of %s; %d nodes took the planned scales",
                         st.base.__name__, matched)
            if st.post_capture is not None:
                st.post_capture(us)
        return _Graph(us, gm.meta["input_dims"], skeleton)

    def _us_use_dynamo(self, cause: UnitScaleError) -> None:
        from .backend import UnitScaleBackend

        st = _state(self)
        log.warning("unit_scale: %s could not be captured as one graph (%s); unit-scaling it through dynamo "
                    "(torch.compile with the 'unit_scale' backend, inner compiler 'eager')",
                    st.base.__name__, cause.what.splitlines()[0])
        st.backend = UnitScaleBackend(replace(st.config, init_weights=st.init_pending), inner="eager")
        st.cause = cause
        base_forward = st.base.forward
        st.compiled = torch.compile(lambda *a, **k: base_forward(self, *a, **k), backend=st.backend)
        st.init_pending = False

    def _us_save_plan(self) -> None:
        cfg = getattr(self, "config", None)
        if cfg is not None and hasattr(cfg, "__dict__") and not isinstance(cfg, UnitScaleConfig):
            setattr(cfg, PLAN_ATTR, encode_plan(_state(self).records))

    # -- the module API ---------------------------------------------------------------------------------
    @property
    def us_backend(self) -> Any:
        st = self.__dict__.get("_us_state")
        if st is None or st.backend is None:
            raise AttributeError("us_backend")
        return st.backend

    @property
    def us_capture(self) -> str:
        st = _state(self)
        return "dynamo" if st.backend is not None else "torch.export"

    @property
    def us_planned(self) -> bool:
        st = _state(self)
        return st.records is not None or st.backend is not None

    @property
    def us_module(self) -> UnitScaledModule:
        """The GraphModule of the planned call (its ``graph``, ``code``, ``scale_plan()``)."""
        return self._primary()

    def _primary(self) -> UnitScaledModule:
        st = _state(self)
        if st.primary is None:
            raise UnitScaleError("no scales have been planned yet", where=f"{st.base.__name__}.scale_plan",
                                 fix="call the model once or pass example_inputs=(...) to unit_scale")
        return st.primary

    def scale_plan(self, all_nodes: bool = False) -> dict[str, ScaleRecord]:
        """``node name -> ScaleRecord`` of the planned call (see :meth:`UnitScaledModule.scale_plan`)."""
        st = _state(self)
        if st.records is None:
            self._primary()  # raises: nothing planned yet
        return {name: rec for name, rec, _ in st.records.values()
                if rec is not None and (all_nodes or rec.changes_anything or rec.rule == "unsupported")}

    def summary(self, all_nodes: bool = False) -> str:
        """The table of :meth:`UnitScaledModule.summary`, for the planned call."""
        return UnitScaledModule.summary(self, all_nodes)  # type: ignore[arg-type]

    @property
    def us_unsupported(self) -> list:
        st = _state(self)
        return list(st.primary.us_unsupported) if st.primary is not None else []

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        # .to() / .cuda() / .half() may replace buffers (and parameters): the graphs follow
        out = super()._apply(fn, *args, **kwargs)
        st = self.__dict__.get("_us_state")
        if st is not None:
            for graphs in st.graphs.values():
                for g in graphs:
                    _mirror_state(self, g.gm)
        return out

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """``nn.Module.load_state_dict``; loaded weights are never re-initialised.

        Loading before the first call (and without a saved plan) warns: the scales will be
        measured on the loaded weights, which differs from the plan they were trained with.
        """
        st = _state(self)
        if st.records is None and getattr(getattr(self, "config", None), PLAN_ATTR, None) is None:
            warnings.warn("loading weights into a unit-scaled model whose scales are not planned yet: the first "
                          "call will plan them on the loaded weights, which differs from the plan the saved model "
                          "trained with; save with save_pretrained (the plan travels in config."
                          f"{PLAN_ATTR}) or plan before loading", UserWarning, stacklevel=2)
        st.init_pending = False
        # weight files a unit-scaled model saved are marked (a leading axis of size 1): take them as they are
        state_dict = unmark_state_dict(state_dict, self.state_dict(keep_vars=True))
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _us_save_pretrained(self, save_directory: Any, *args: Any, **kwargs: Any) -> Any:
        """``save_pretrained``, with the weight files marked as a unit-scaled model's.

        The plan travels in ``config.json``; the weights are stored so that a loader without
        the plan refuses them (see :mod:`unit_scale_fx.checkpoint`): load the folder with
        :func:`unit_scale_fx.from_pretrained` or ``type(model).from_pretrained``.
        """
        st = _state(self)
        if kwargs.get("push_to_hub"):
            raise UnitScaleError("save_pretrained(push_to_hub=True) would upload the weights before they are "
                                 "marked as a unit-scaled model's", where=f"{st.base.__name__}.save_pretrained",
                                 fix="save_pretrained(folder), then upload the folder "
                                 "(huggingface_hub.upload_folder)")
        if st.records is not None and getattr(self, "config", None) is not None:
            setattr(self.config, PLAN_ATTR, encode_plan(st.records))
        elif st.backend is not None:
            warnings.warn(f"{st.base.__name__} was captured through dynamo (torch.export could not capture it): "
                          "its plan cannot be saved in config.json. The checkpoint resumes into this model "
                          "(load_state_dict, Trainer), but unit_scale_fx.from_pretrained will refuse it",
                          UserWarning, stacklevel=3)
        since = time.time() - 2.0  # file times may be coarse
        out = st.base.save_pretrained(self, save_directory, *args, **kwargs)
        planned = st.records is not None or st.backend is not None
        # before the first call nothing is unit-scaled yet: the weights are the user's own, plainly loadable
        if planned and kwargs.get("is_main_process", True) and os.path.isdir(save_directory):
            mark_weight_files(save_directory, since)
        return out

    def __reduce_ex__(self, protocol: Any) -> Any:
        return (_rebuild_model, (_state(self).base, self.__dict__))

    def _us_init_state(self) -> None:
        if "_us_state" not in self.__dict__:
            self.__dict__["_us_state"] = _ModelState(UnitScaleConfig(), _user_class(type(self)))


def _user_class(cls: type) -> type:
    for c in cls.__mro__:
        if c is not UnitScaledModel and not (isinstance(c, type) and issubclass(c, UnitScaledModel)):
            return c
    raise TypeError(cls)


_SUBCLASSES: dict[type, type] = {}


def unit_scaled_class(base: type) -> type:
    """The unit-scaled subclass of a user's model class (one per class; same name)."""
    cls = _SUBCLASSES.get(base)
    if cls is None:
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            # built directly (e.g. ``type(us).from_pretrained(path)``): plan from config, else at the first call
            base.__init__(self, *args, **kwargs)
            self._us_init_state()

        def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
            return UnitScaledModel.forward(self, *args, **kwargs)

        # the user's signature and docstring (Trainer picks dataset columns by forward's parameters)
        functools.update_wrapper(forward, base.forward)
        attrs = {"__init__": __init__, "forward": forward, "__module__": base.__module__,
                 "__qualname__": base.__qualname__}
        if callable(getattr(base, "save_pretrained", None)) and callable(getattr(base, "from_pretrained", None)):
            # a Hugging Face model: its checkpoints carry the plan and refuse a loader without it
            def save_pretrained(self: Any, save_directory: Any, *args: Any, **kwargs: Any) -> Any:
                return UnitScaledModel._us_save_pretrained(self, save_directory, *args, **kwargs)

            def from_pretrained_(klass: type, path: Any, *args: Any, **kwargs: Any) -> Any:
                return from_pretrained(base, path, *args, **kwargs)

            functools.update_wrapper(save_pretrained, base.save_pretrained)
            save_pretrained.__doc__ = UnitScaledModel._us_save_pretrained.__doc__
            from_pretrained_.__doc__ = from_pretrained.__doc__
            attrs.update(save_pretrained=save_pretrained, from_pretrained=classmethod(from_pretrained_))
        cls = type(base.__name__, (UnitScaledModel, base), attrs)
        _SUBCLASSES[base] = cls
    return cls


def _rebuild_model(base: type, state: dict) -> nn.Module:
    cls = unit_scaled_class(base)
    obj = cls.__new__(cls)
    obj.__dict__.update(state)
    return obj


def from_pretrained(model_class: type, path: Any, *args: Any, unit_scale_kwargs: Optional[dict] = None,
                    **kwargs: Any) -> Any:
    """Load a unit-scaled Hugging Face model saved with ``save_pretrained``: the same function it computed.

    ``model_class`` is the model's own class or an ``AutoModel...`` class; ``path``, ``*args`` and
    ``**kwargs`` go to its ``from_pretrained``. The weights are read through an unmarked view of
    the folder (see :mod:`unit_scale_fx.checkpoint`), the plan from ``config.json``; nothing is
    measured or re-initialised. ``unit_scale_kwargs`` go to :func:`unit_scale` (the model is
    converted in place). A checkpoint of a plain model loads too; it is planned at its first call.

    Example::

        us.save_pretrained("out")
        us = unit_scale_fx.from_pretrained(transformers.AutoModelForCausalLM, "out")
    """
    local = Path(path) if isinstance(path, (str, os.PathLike)) else None
    if local is None or not local.is_dir():
        try:
            from huggingface_hub import snapshot_download

            local = Path(snapshot_download(str(path)))
        except Exception as exc:
            raise UnitScaleError(f"cannot find the checkpoint {path!r}: {type(exc).__name__}: {exc}",
                                 where="unit_scale_fx.from_pretrained",
                                 fix="pass the folder save_pretrained wrote, or a Hub repository id") from exc
    with unmarked_view(local) as (folder, marked):
        model = model_class.from_pretrained(str(folder), *args, **kwargs)
    if marked:  # read through a temporary folder: the model names the one the user gave
        for obj in (getattr(model, "config", None), getattr(model, "generation_config", None)):
            if obj is not None and hasattr(obj, "_name_or_path"):
                obj._name_or_path = str(path)
        if hasattr(model, "name_or_path"):
            model.name_or_path = str(path)
    if marked and getattr(getattr(model, "config", None), PLAN_ATTR, None) is None:
        raise UnitScaleError(f"the unit-scaled checkpoint {path} has no plan in its config.json",
                             where="unit_scale_fx.from_pretrained",
                             fix=f"restore '{PLAN_ATTR}' in config.json from the folder save_pretrained wrote")
    kw = dict(unit_scale_kwargs or {})
    kw.setdefault("inplace", True)
    return unit_scale(model, **kw)


def _as_unit_scaled_model(work: nn.Module, cfg: UnitScaleConfig) -> UnitScaledModel:
    base = type(work)
    work.__class__ = unit_scaled_class(base)
    work.__dict__["_us_state"] = _ModelState(cfg, base)
    gen = getattr(work, "generation_config", None)
    if gen is not None and getattr(gen, "use_cache", False):
        # a key/value cache object cannot enter a captured graph; generation recomputes the prefix instead
        gen.use_cache = False
        log.info("unit_scale: %s.generation_config.use_cache set to False (generation recomputes the prefix "
                 "through the unit-scaled graph)", base.__name__)
    return work  # type: ignore[return-value]


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _warn_hooks(model: nn.Module) -> None:
    """Warn where ``model`` has module hooks: capture traces a forward hook into the graph once (what it computes
    on the output stays), but the unit-scaled model runs the graph, not the hook: its side effects (storing an
    activation, logging) do not happen, and a backward hook is not called."""
    from torch.nn.modules import module as torch_module

    hooked = [name or type(model).__name__ for name, m in model.named_modules()
              if any(getattr(m, d, None) for d in _HOOK_DICTS)]
    if any(getattr(torch_module, g, None) for g in ("_global_forward_hooks", "_global_forward_pre_hooks",
                                                       "_global_backward_hooks")):
        hooked.append("<global module hooks>")
    if hooked:
        warnings.warn(
            f"unit_scale: {len(hooked)} module(s) of {type(model).__name__} have hooks ({', '.join(hooked[:6])}"
            f"{' ...' if len(hooked) > 6 else ''}). The captured graph keeps what a forward hook does to the "
            "output (a hook that only changes the output, as the one transformers adds for gradient checkpointing, "
            "loses nothing), but the unit-scaled model does not call the hooks: side effects elsewhere (stored "
            "activations, logging) and backward hooks do not happen. Return such values from forward instead, or "
            "use torch.compile(model, backend='unit_scale'), which keeps hooks", UserWarning, stacklevel=3)


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
    _warn_hooks(model)
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
    given = args is not None or example_kwargs is not None
    with gc_paused():
        try:
            work = model if cfg.inplace else copy.deepcopy(model)
        except (RuntimeError, TypeError) as exc:
            raise UnitScaleError(
                f"{type(model).__name__} cannot be copied ({type(exc).__name__}: {str(exc).splitlines()[0]})",
                where="copy.deepcopy(model)",
                fix="pass inplace=True to unit-scale the model itself; for torch.nn.utils.weight_norm or "
                    "spectral_norm, use their torch.nn.utils.parametrizations versions, which copy") from exc
        try:
            gm = symbolic_capture(work, cfg.leaf_modules)
            lost = gm.meta.get(LOST_TYPES)
            if lost and given:  # torch.fx returns a ModelOutput as a plain dict; torch.export keeps it
                raise TypeError(f"torch.fx would return {', '.join(lost)} as a plain dict")
            opaque = opaque_calls(gm)
            if opaque:  # functions a library kept from torch.fx (torch.fx.wrap): torch.export traces through them
                raise TypeError(f"torch.fx keeps {', '.join(opaque)} as single calls, which no rule knows")
            if reads_training_flag(work, gm, cfg.leaf_modules):
                # one traced graph would run in both modes: capture per call signature and mode instead
                raise TypeError("its forward reads self.training (torch.fx would fix the mode it traced in)")
            if lost:
                log.warning("unit_scale: torch.fx returns %s as a plain dict; pass example_inputs=(...) to capture "
                            "%s with torch.export, which keeps the output type", ", ".join(lost),
                            type(model).__name__)
        except Exception as exc:  # tracing raises many kinds of errors
            # torch.fx cannot trace it (most real models): keep the model's class and capture each call
            # signature with torch.export, now if example inputs are given, else at the first call
            log.info("unit_scale: torch.fx could not trace %s (%s at %s); its forward is captured with "
                     "torch.export %s", type(model).__name__, type(exc).__name__, _location(exc),
                     "now" if given else "at the first call")
            msd = _as_unit_scaled_model(work, cfg)
            copy_modes(model, msd)
            if given:
                g, _ = msd._us_graph_for(args or (), example_kwargs or {})
                if g is None:  # dynamo took over: it captures and plans on a call
                    msd(*(args or ()), **(example_kwargs or {}))
                    msd.zero_grad(set_to_none=True)
            return msd  # type: ignore[return-value]
    ctx = PassContext(config=cfg)
    run_passes(gm, ctx, build_pipeline(cfg, ("prepare",)))
    us = UnitScaledModule(gm, gm.graph, cfg, type(model).__name__)
    _mirror_state(work, us)
    copy_modes(model, us)
    us.us_train_modes = train_modes(work)
    us.us_capture = gm.meta.get(CAPTURE, "")
    if given:
        us._plan(args or (), example_kwargs or {})
    return us
