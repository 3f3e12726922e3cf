"""A ``torch.compile`` backend that unit-scales every graph dynamo captures.

::

    compiled = torch.compile(model, backend="unit_scale")      # by name, no import needed
    be = unit_scale_fx.backend(config=UnitScaleConfig(...), inner="inductor")
    compiled = torch.compile(model, backend=be)                # be.graphs: what it rewrote

Stages for each captured graph (the same passes as :func:`unit_scale_fx.unit_scale`):

1. find the placeholders that are parameters (dynamo passes parameters as graph
   inputs) and tell the passes (``PassContext.param_inputs``);
2. ``normalize``; initialise the parameters not initialised before (see below);
3. ``shape_prop -> topology -> plan -> rewrite -> recompile`` (``build_pipeline(..., boundary=True)``);
4. hand the rewritten graph to the inner compiler (``"inductor"``, ``"aot_eager"``,
   ``"eager"`` or any dynamo backend callable).

**Graph breaks.** A model dynamo splits into several graphs is planned graph by
graph, consistently with the unbroken model:

* inputs that carry a gradient in from outside, and non-scalar outputs, form
  ``PassContext.boundary``: topology joins them through one virtual node when it
  finds cut edges, and ``balance`` / ``calibrate_grads`` pin their gradient
  potential to 1 (the true gradient crosses every break), so both sides of a
  break agree without knowing each other's scales and every parameter still gets
  a positive multiple of its true gradient. Scalar outputs are taken to be losses;
* forward scales come from the RMS measured on dynamo's real example inputs (as
  in ``unit_scale``); on fake or meta inputs, a tensor that crosses a break keeps
  the RMS the planner predicted for it in the earlier graph (the backend
  remembers the outputs of each graph's first run).

**One plan per model.** The first graph of each structure is planned (measured on its
example inputs, before any optimizer step); its scale records are stored by node name
(:class:`PlanStore`). A recompile of that structure (a guard failure, ``eval()``,
``no_grad``, another batch size or sequence length, dynamic shapes) applies the stored
scales and measures nothing, so training, evaluation and every shape run one function.
A graph of a *new* structure (another call signature, a graph after a break compiled
later) is planned as before while the model's parameters are untouched; once a
parameter it planned with has changed (an optimizer step), a new structure is planned
analytically (shapes and the RMS predicted by earlier graphs; nothing is measured on
trained weights) and the log says so. Only :meth:`UnitScaleBackend.replan` plans again:
every compiled graph re-plans on its next call. Symbolic shapes (``dynamic=True`` or
dynamo's automatic dynamic shapes) are planned on their concrete hints.

**Recompile limit.** With ``torch.compile(..., dynamic=False)`` every new shape is a
recompile, and after ``torch._dynamo.config.recompile_limit`` of them dynamo would run
the model's own (unscaled) code. When the backend sees a structure recompiled for
another static shape, it sets ``torch._dynamo.config.fail_on_recompile_limit_hit``
(and logs a warning): a storm of shapes then raises instead of silently training the
unscaled model. Use ``dynamic=None`` (the default) or ``dynamic=True`` to avoid it.

**Weight initialisation contract.** Unit scaling wants unit-RMS weights, zero
biases and unit norm gains. With ``UnitScaleConfig(init_weights=True)`` (the
default) the backend re-initialises, *once per parameter*, every parameter that
reaches a graph it compiled, before that graph runs with it, i.e. during the first
forward call and so before the first optimizer step. It says so in the log
(a WARNING with the count). A parameter is marked when initialised (by the backend
or by :func:`unit_scale_fx.init_weights`) and is never initialised again, so
recompiles (new shapes, other graphs) leave trained weights alone. To keep weights
you loaded, either call :func:`unit_scale_fx.init_weights` *before* loading them,
or compile with ``UnitScaleConfig(init_weights=False)``.

Nothing in torch is patched. The only torch internal used is
``torch._dynamo.lookup_backend`` (to find the inner compiler by name); see
:func:`_lookup_inner`. Two of dynamo's public settings are set, each logged:
``allow_rnn`` when a backend is made or resolved by name (:func:`trace_recurrent_layers`: by
default dynamo runs a frame with a recurrent layer without any backend), and
``fail_on_recompile_limit_hit`` on a storm of static shapes (above).
"""

from __future__ import annotations

import copy
import logging
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.fx as fx
import torch.nn as nn

from .config import UnitScaleConfig
from .errors import UnitScaleError
from .passes import PassContext, PassResult
from .passes.base import Pass
from .passes.boundary import output_leaves
from .passes.fold_scales import fused_graph_module
from .passes.init_weights import init_parameter, parameter_init_kinds
from .passes.stats import planning_stats
from .pipeline import build_pipeline, run_passes
from .record import META_KEY, ScaleRecord, original
from .scale import first_order_only
from .rules.registry import float_tensor_inputs, is_float, node_op_name
from .weights import INIT_MARK, is_initialised, mark_initialised

log = logging.getLogger(__name__)

CompilerFn = Callable[[fx.GraphModule, list], Callable[..., Any]]
Inner = Union[str, CompilerFn]


@dataclass
class CapturedGraph:
    """One graph the backend rewrote, kept for inspection.

    Attributes:
        index: order of capture (0 = first graph this backend compiled).
        source: dynamo's graph, before any change.
        gm: the rewritten GraphModule (what the inner compiler received).
        params: placeholder name -> parameter shape, for the placeholders that are parameters.
        boundary: names of the values joined to the outside (see the module docstring).
        input_rms: RMS assumed for each floating-point input (predicted across a break, else measured).
        inherited: inputs whose RMS was the earlier graph's prediction.
        initialised: how many parameters this graph initialised.
        timings: ``(pass, seconds)`` per pass.
        unsupported: float ops with no rule.
        decision: how its scales came: ``"planned"`` (measured), ``"reused"`` (the stored plan of
            its structure) or ``"analytic"`` (a new structure after training started).
    """

    index: int
    source: fx.Graph
    gm: fx.GraphModule
    params: dict[str, tuple[int, ...]]
    boundary: set[str]
    input_rms: dict[str, float]
    inherited: set[str]
    initialised: int
    timings: list[tuple[str, float]]
    unsupported: list = field(default_factory=list)
    decision: str = "planned"

    def scale_plan(self, all_nodes: bool = False) -> dict[str, ScaleRecord]:
        """``node name -> ScaleRecord`` of this graph (by default only nodes that are scaled)."""
        out = {}
        for n in self.gm.graph.nodes:
            rec = n.meta.get(META_KEY)
            if rec is not None and (all_nodes or rec.changes_anything or rec.rule == "unsupported"):
                out[n.name] = rec
        return out


def _lookup_inner(inner: Inner) -> CompilerFn:
    """The inner compiler: a callable as is, ``"eager"`` directly, other names through dynamo's registry.

    ``torch._dynamo.lookup_backend`` is the one torch internal this module uses; it has
    been stable since torch 2.0. If it moves, the error says so and how to get past it.
    """
    if callable(inner):
        return inner
    if inner == "eager":
        return lambda gm, example_inputs: gm.forward
    try:
        from torch._dynamo import lookup_backend
    except ImportError as exc:  # pragma: no cover - depends on the torch version
        raise UnitScaleError(
            f"torch {torch.__version__} has no torch._dynamo.lookup_backend to find the inner compiler {inner!r}",
            where="unit_scale_fx.backend",
            fix="pass the inner compiler as a callable, e.g. inner=torch._inductor.compile_fx.compile_fx",
        ) from exc
    try:
        return lookup_backend(inner)
    except Exception as exc:
        raise UnitScaleError(
            f"unknown inner compiler {inner!r}",
            where="unit_scale_fx.backend(inner=...)",
            fix=f"use one of torch._dynamo.list_backends() (e.g. 'inductor', 'aot_eager') or 'eager', "
            f"or pass a callable ({type(exc).__name__}: {exc})",
        ) from exc


class _Tracked:
    """Tensors some graph produced, with the RMS the planner predicted for them (weak references)."""

    def __init__(self) -> None:
        self._by_id: dict[int, tuple[weakref.ref, float]] = {}

    def add(self, t: Any, rms: Optional[float]) -> None:
        if isinstance(t, torch.Tensor) and rms is not None:
            self._by_id[id(t)] = (weakref.ref(t), rms)

    def get(self, t: Any) -> Optional[float]:
        hit = self._by_id.get(id(t))
        if hit is None or hit[0]() is not t:
            return None
        return hit[1]

    def prune(self) -> None:
        self._by_id = {k: v for k, v in self._by_id.items() if v[0]() is not None}


class PlanStore:
    """The plan of one backend: the scale records of each graph structure it planned, by node name.

    A *structure* is the graph after normalisation and fusion, without shapes: the name,
    target and floating-point inputs of every floating-point op. A recompile of the same
    code (new shapes, symbolic shapes, ``eval()``, ``no_grad``) has the same structure,
    and gets the stored records instead of a new measurement. The parameters a plan was
    made with are kept (weak references and their version counters), so the store can
    tell whether they were trained since.
    """

    def __init__(self) -> None:
        self.plans: dict[tuple, tuple[list[weakref.ref], dict[str, ScaleRecord]]] = {}
        self.shapes: dict[tuple, set[tuple]] = {}
        self._versions: dict[int, tuple[weakref.ref, int]] = {}

    def __len__(self) -> int:
        return len(self.plans)

    def lookup(self, key: tuple, params: Sequence[torch.Tensor]) -> Optional[dict[str, ScaleRecord]]:
        hit = self.plans.get(key)
        if hit is None:
            return None
        refs, records = hit
        if len(refs) != len(params) or any(r() is not p for r, p in zip(refs, params)):
            return None  # the same code on other parameters (another instance of the model)
        return records

    def add(self, key: tuple, params: Sequence[torch.Tensor], records: dict[str, ScaleRecord]) -> None:
        self.plans[key] = ([weakref.ref(p) for p in params], records)
        self.remember(params)

    def remember(self, params: Sequence[torch.Tensor]) -> None:
        for p in params:
            self._versions.setdefault(id(p), (weakref.ref(p), p._version))

    def trained(self) -> bool:
        """Whether a parameter some plan was made with has changed since (an optimizer step)."""
        return any(r() is not None and r()._version != v for r, v in self._versions.values())

    def clear(self) -> None:
        self.plans.clear()
        self.shapes.clear()
        self._versions.clear()


_PLAN_PASSES = frozenset({"topology", "roles", "mup", "calibrate", "plan", "mup_readout", "balance",
                          "calibrate_grads", "round_scales", "predict_grads"})
_PREPARE_PASSES = frozenset({"strip_asserts", "inline_functions", "normalize", "init_weights", "shape_prop",
                             "boundary_outputs", "constants", "fuse"})


def _returns_loss(gm: fx.GraphModule) -> bool:
    """Whether the graph returns a 0-dim floating-point value (a loss, where gradients start)."""
    for n in output_leaves(gm):
        val = n.meta.get("val") if isinstance(n, fx.Node) else None
        if isinstance(val, torch.Tensor) and val.dim() == 0 and val.is_floating_point():
            return True
    return False


def structure_key(gm: fx.GraphModule, scalars: frozenset[str] = frozenset()) -> tuple:
    """What identifies a graph's plan: every floating-point op's name, target and float inputs (no shapes).

    Placeholders count only as the inputs of ops: dynamo lifts some module attributes
    (``eps``, ``norm_type``) as inputs in one graph and specialises them in the next.
    ``scalars``: placeholders that hold Python numbers; they are left out.
    """
    key = []
    for n in gm.graph.nodes:
        if n.op in ("call_function", "call_method", "call_module") and is_float(n):
            key.append((n.name, node_op_name(n, gm),
                        tuple(u.name for u in float_tensor_inputs(n) if u.name not in scalars)))
    return tuple(key)


def _concrete(v: Any) -> Any:
    """A symbolic size (``dynamic=True``, automatic dynamic shapes) as its concrete hint."""
    if isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        hint = getattr(v.node, "hint", None)
        if hint is None:
            raise UnitScaleError(
                f"a symbolic size without a concrete value ({v}) reached the unit_scale backend",
                where="unit_scale_fx.backend", fix="compile with dynamic=False, or report the model")
        return type(hint)(hint) if not isinstance(v, torch.SymBool) else bool(hint)
    return v


def _shape_sig(values: Sequence[Any]) -> tuple:
    return tuple(tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__ for v in values)


def _reuse_pass(records: dict[str, ScaleRecord]) -> Pass:
    def reuse_plan(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        n = 0
        for node in gm.graph.nodes:
            node.meta.pop(META_KEY, None)
            rec = records.get(node.name)
            if rec is not None:
                node.meta[META_KEY] = copy.deepcopy(rec)
                n += 1
        ctx.scales = {}
        return PassResult(False, f"{n} stored records applied")

    return Pass("reuse_plan", reuse_plan, produces=frozenset({"scales"}))


class _Compiled:
    """The callable dynamo runs: initialises unseen parameters, runs the inner code, remembers outputs.

    After :meth:`UnitScaleBackend.replan`, it plans its graph again at its next call.
    """

    def __init__(self, fn: Callable, backend: "UnitScaleBackend", entry: CapturedGraph,
                 param_pos: list[int], roles: dict[int, tuple[str, str]], out_rms: list[Optional[float]],
                 root: fx.GraphModule) -> None:
        self.fn = fn
        self.backend = backend
        self.entry = entry
        self.param_pos = param_pos if backend.config.init_weights else []
        self.roles = roles
        self.out_rms = out_rms
        self.first = True
        self.root = root
        self.generation = backend.generation
        # the inner code runs the fused ops eagerly ("eager", or a callable handed the graph itself), whose
        # backward is first-order only; a named compiler's AOT autograd raises at a double backward itself
        self.first_order = not isinstance(backend.inner, str) or backend.inner == "eager"

    def __call__(self, *args: Any) -> Any:
        if self.generation != self.backend.generation:  # replan(): plan this graph again on these inputs
            gm = fx.GraphModule(self.root, copy.deepcopy(self.entry.source))
            fresh = self.backend._compile(gm, list(args))
            self.__dict__.update({k: v for k, v in fresh.__dict__.items()})
        for i in self.param_pos:  # a graph dynamo reuses for another module of the same structure
            p = args[i]
            if not getattr(p, INIT_MARK, False):
                role, name = self.roles[i]
                self.backend._init_one(p, role, name)
                self.backend.store.remember([p])
        out = self.fn(*args)  # dynamo calls what a backend returns with positional args
        if self.first_order and torch.is_grad_enabled():
            first_order_only(out, args, f"unit_scale backend, graph {self.entry.index}")
        if self.first:
            self.first = False
            tracked = self.backend._tracked
            tracked.prune()
            for t, r in zip(torch.utils._pytree.tree_leaves(out), self.out_rms):
                tracked.add(t, r)
        return out


class UnitScaleBackend:
    """A dynamo backend that unit-scales each captured graph, then compiles it with ``inner``.

    Keeps every graph it rewrote in :attr:`graphs` (a :class:`CapturedGraph` each) and
    its plan in :attr:`store` (a :class:`PlanStore`). See the module docstring for the
    one-plan rule, graph breaks and the weight-initialisation contract.
    """

    def __init__(self, config: Optional[UnitScaleConfig] = None, inner: Inner = "inductor",
                 keep: bool = True, **overrides: Any) -> None:
        cfg = (config or UnitScaleConfig()).with_overrides("unit_scale_fx.backend(**overrides)", **overrides)
        if cfg.inplace:
            log.debug("UnitScaleConfig.inplace has no meaning for the backend (it always acts on the model)")
        self.config = cfg
        self.inner = inner
        trace_recurrent_layers()
        self._inner_fn: Optional[CompilerFn] = None if isinstance(inner, str) else inner
        self.keep = keep
        self.graphs: list[CapturedGraph] = []
        self._count = 0
        self._tracked = _Tracked()
        self.initialised: int = 0
        self.store = PlanStore()
        #: graph breaks: the factor on every loss of every graph (``PassContext.join_breaks``); None until the
        #: first graph that returns a loss in a program dynamo split is planned
        self.break_factor: float | None = None
        self.generation = 0
        #: how each compiled graph got its scales: "planned", "reused" or "analytic"
        self.decisions: list[str] = []

    def __repr__(self) -> str:
        return f"UnitScaleBackend(inner={self.inner!r}, graphs={len(self.graphs)})"

    def replan(self) -> None:
        """Forget the plan: every compiled graph plans again (measured, on the current weights) at its next call."""
        self.store.clear()
        self.break_factor = None
        self.generation += 1

    # -- the dynamo entry ---------------------------------------------------
    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
        return self._compile(gm, example_inputs)

    def _compile(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> "_Compiled":
        t0 = time.perf_counter()
        source = copy.deepcopy(gm.graph)
        placeholders = list(gm.graph.find_nodes(op="placeholder"))
        if len(placeholders) != len(example_inputs):
            raise UnitScaleError(
                f"dynamo passed {len(example_inputs)} example inputs for {len(placeholders)} placeholders",
                where="unit_scale_fx.backend", fix="report this with the torch version")
        symbolic = any(isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)) for v in example_inputs)
        vals = {n.name: n.meta.get("val") for n in gm.graph.nodes} if symbolic else None
        params = {n.name: v for n, v in zip(placeholders, example_inputs) if isinstance(v, nn.Parameter)}
        # The passes may run the graph forward and backward on the example inputs (measured
        # planning, gradient calibration): give them detached aliases (same memory, no copy) so
        # that run never adds to the parameters' .grad nor reaches into an earlier graph's autograd.
        # Parameters keep requires_grad, so calibrate_grads measures their gradients as it does
        # for get_attr parameters in eager unit_scale, and both plan the same scales.
        detached = tuple(v.detach().requires_grad_(v.requires_grad)
                         if isinstance(v, torch.Tensor) else _concrete(v) for v in example_inputs)
        ctx = PassContext(config=self.config, example_args=detached, example_kwargs={}, param_inputs=params,
                          stats=planning_stats(self.config.plan_across_ranks))
        inherited = set()
        for n, v in zip(placeholders, example_inputs):
            if n.name in params or not isinstance(v, torch.Tensor) or not v.is_floating_point():
                continue
            r = self._tracked.get(v)
            if r is not None:
                ctx.input_rms[n.name] = r
                inherited.add(n.name)
            if v.requires_grad:
                ctx.boundary.add(n.name)
        init = Pass("init_weights", self._init_pass, produces=frozenset({"init_kinds", "n_initialised"}))
        passes = build_pipeline(self.config, ("prepare", "plan", "transform"), boundary=True, init=init)
        head = [p for p in passes if p.name in _PREPARE_PASSES]
        run_passes(gm, ctx, head)
        key = structure_key(gm, frozenset(n.name for n, v in zip(placeholders, example_inputs)
                                          if not isinstance(v, torch.Tensor)))
        # Graph breaks: every loss sends its gradient in times one factor, set by the first graph with a
        # loss so that the gradient it sends back across the break is unit-sized (1 if that graph has no
        # input from an earlier graph: its own loss, of size 1, comes before the later ones)
        joins = _returns_loss(gm) and bool(ctx.boundary)
        if joins:
            ctx.join_breaks = True
            from_earlier = any(n.name in ctx.boundary for n in placeholders)
            if self.break_factor is None and not from_earlier:
                self.break_factor = 1.0
            ctx.break_factor = self.break_factor
        param_list = [params[n.name] for n in placeholders if n.name in params]
        stored = self.store.lookup(key, param_list)
        shapes = self.store.shapes.setdefault(key, set())
        sig = _shape_sig(detached)
        if stored is not None:
            decision = "reused"
            if not symbolic and sig not in shapes:
                _guard_recompile_storm(len(shapes) + 1)
            tail = [_reuse_pass(stored)] + [p for p in passes if p.name not in _PREPARE_PASSES | _PLAN_PASSES]
        else:
            decision = "planned"
            if len(self.store) and self.store.trained():
                decision = "analytic"
                ctx.real_values = None  # nothing is measured on trained weights
                log.warning("unit_scale backend: a graph of a new structure after training started: planned "
                            "analytically (shapes and predicted RMS), nothing measured on the trained weights")
            tail = [p for p in passes if p.name not in _PREPARE_PASSES]
        shapes.add(sig)
        run_passes(gm, ctx, tail)
        if joins and self.break_factor is None and ctx.potentials is not None:
            self.break_factor = ctx.potentials.loss_factor
            log.info("unit_scale backend: graph breaks: every loss's gradient enters times %.4g, so that the "
                     "gradient sent back across a break is unit-sized", self.break_factor)
        if stored is None:
            self.store.add(key, param_list, {n.name: copy.deepcopy(n.meta[META_KEY]) for n in gm.graph.nodes
                                             if META_KEY in n.meta and not n.meta.get("unit_scale_inserted")})
        if vals is not None:  # hand the inner compiler dynamo's symbolic metadata, not our concrete one
            for n in gm.graph.nodes:
                src = original(n)
                if src.name in vals and vals[src.name] is not None:
                    n.meta["val"] = vals[src.name]
        self.decisions.append(decision)
        roles = ctx.init_kinds
        entry = CapturedGraph(
            index=self._count, source=source, gm=gm,
            params={k: tuple(v.shape) for k, v in params.items()}, boundary=set(ctx.boundary),
            input_rms=dict(ctx.input_rms), inherited=inherited, initialised=ctx.n_initialised,
            timings=list(ctx.timings), unsupported=list(ctx.unsupported), decision=decision)
        self._count += 1
        if self.keep:
            self.graphs.append(entry)
        out_rms = [_predicted_rms(n, ctx) if isinstance(n, fx.Node) else None for n in output_leaves(gm)]
        pos_roles = {i: (roles[n.name], n.name) for i, n in enumerate(placeholders) if n.name in roles}
        param_pos = [i for i in pos_roles if placeholders[i].name in params]
        n_scaled = len(entry.scale_plan())
        log.info("unit_scale backend: graph %d (%s): %d nodes, %d parameters, %d scaled nodes, %d inputs from "
                 "earlier graphs (%.0f ms)", entry.index, decision, len(gm.graph.nodes), len(params), n_scaled,
                 len(inherited), (time.perf_counter() - t0) * 1e3)
        if self._inner_fn is None:
            self._inner_fn = _lookup_inner(self.inner)
        # a named compiler gets the fused ops as nodes (it traces the graph again, and the fused code
        # the graph generates does not reach it); a callable gets the graph with its scale nodes
        inner_gm = fused_graph_module(gm) if isinstance(self.inner, str) and self.inner != "eager" else gm
        compiled = self._inner_fn(inner_gm, list(example_inputs))
        return _Compiled(compiled, self, entry, param_pos, pos_roles, out_rms, gm)

    # -- weights ------------------------------------------------------------
    def _init_one(self, p: torch.Tensor, role: str, name: str) -> bool:
        done = init_parameter(p, role, name)
        mark_initialised(p)
        self.initialised += done
        return done

    def _init_pass(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        roles = parameter_init_kinds(gm, ctx.param_inputs)
        ctx.init_kinds = roles
        if not self.config.init_weights:
            return PassResult(False, "disabled")
        n = 0
        for name, role in roles.items():
            p = ctx.param_inputs.get(name)
            if p is not None and not is_initialised(p):
                n += self._init_one(p, role, name)
        ctx.n_initialised = n
        if n:
            log.warning("unit_scale backend: re-initialised %d parameters for unit scaling (unit-RMS weights, zero "
                        "biases, unit gains) before their first use; compile with UnitScaleConfig(init_weights=False) "
                        "or call unit_scale_fx.init_weights(model) before loading weights to keep yours", n)
        return PassResult(n > 0, f"{n} parameters initialised")

    # -- inspection ---------------------------------------------------------
    def scale_plan(self, all_nodes: bool = False) -> dict[str, ScaleRecord]:
        """Records of every kept graph, keyed ``"g<index>.<node>"``."""
        return {f"g{g.index}.{k}": v for g in self.graphs for k, v in g.scale_plan(all_nodes).items()}

    def summary(self) -> str:
        lines = []
        for g in self.graphs:
            lines.append(f"graph {g.index}: {len(g.gm.graph.nodes)} nodes, {len(g.params)} parameter inputs, "
                         f"{len(g.scale_plan())} scaled nodes, boundary={sorted(g.boundary)}, "
                         f"inherited={sorted(g.inherited)}")
        return "\n".join(lines) or "(no graph compiled yet)"

    def clear(self) -> None:
        """Forget the kept graphs (compiled code keeps working; the plan is kept, see :meth:`replan`)."""
        self.graphs.clear()


def _guard_recompile_storm(n_shapes: int) -> None:
    """A structure recompiled for another static shape: make dynamo's recompile limit an error, not a fallback.

    Past ``torch._dynamo.config.recompile_limit`` recompiles dynamo runs the frame's own
    Python code: the model *without* its scales. ``fail_on_recompile_limit_hit`` makes
    that an exception instead (a process-wide dynamo setting; set once, and logged).
    """
    import torch._dynamo.config as dcfg

    if not getattr(dcfg, "fail_on_recompile_limit_hit", True):
        dcfg.fail_on_recompile_limit_hit = True
        log.warning("unit_scale backend: a graph was recompiled for a new static shape (%d shapes so far; "
                    "torch.compile(dynamic=False)?). Past torch._dynamo.config.recompile_limit (%s) dynamo would "
                    "run the model unscaled, so torch._dynamo.config.fail_on_recompile_limit_hit is now True: a "
                    "storm of shapes raises instead. Compile with dynamic=None or dynamic=True to avoid "
                    "recompiles.", n_shapes, getattr(dcfg, "recompile_limit", "?"))


def _predicted_rms(node: fx.Node, ctx: PassContext) -> Optional[float]:
    src = original(node)
    if src.op == "placeholder":
        return ctx.input_rms.get(src.name)
    rec = src.meta.get(META_KEY)
    return rec.fwd_rms if rec is not None else None


def backend(config: Optional[UnitScaleConfig] = None, inner: Inner = "inductor", **overrides: Any) -> UnitScaleBackend:
    """A new :class:`UnitScaleBackend`: ``torch.compile(model, backend=backend(config, inner="inductor"))``.

    Raises:
        UnitScaleError: ``inner`` names no known compiler.
    """
    be = UnitScaleBackend(config, inner, **overrides)
    be._inner_fn = _lookup_inner(inner)
    return be


def trace_recurrent_layers() -> None:
    """Make dynamo trace recurrent layers (``torch._dynamo.config.allow_rnn = True``).

    By default dynamo runs a frame that calls ``nn.LSTM``, ``nn.GRU`` or ``nn.RNN`` as plain Python without
    calling any backend: the model would train unscaled, and nothing would say so. Set when a unit_scale backend
    is made or resolved by name (dynamo is loaded then), not at import; logged once."""
    import torch._dynamo.config as dcfg

    if not getattr(dcfg, "allow_rnn", True):
        dcfg.allow_rnn = True
        log.info("unit_scale backend: torch._dynamo.config.allow_rnn set to True, so that dynamo traces recurrent "
                 "layers (by default it runs a frame that calls one without calling any backend: unscaled)")


_DEFAULT: Optional[UnitScaleBackend] = None
_VARIANTS: dict[str, UnitScaleBackend] = {}


def __getattr__(name: str) -> Any:
    # ``default_backend``: the backend ``torch.compile(model, backend="unit_scale")`` resolves to (through the
    # ``torch_dynamo_backends`` entry point, which loads ``unit_scale_backend``). One object, because dynamo's
    # registry maps a name to one callable; its ``graphs`` grow with every graph compiled by name (``clear()``).
    # Both are made on first access, so that importing the package does not load dynamo.
    if name == "default_backend":
        return named_backend()
    if name == "unit_scale_backend":
        trace_recurrent_layers()  # dynamo resolves the name at torch.compile(), before it traces a frame
        return _unit_scale_backend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def named_backend(options: Optional[dict] = None) -> UnitScaleBackend:
    """The backend object ``backend="unit_scale"`` uses for these ``torch.compile(options=...)``."""
    global _DEFAULT
    if not options:
        if _DEFAULT is None:
            _DEFAULT = UnitScaleBackend()
        return _DEFAULT
    key = repr(sorted(options.items()))
    if key not in _VARIANTS:
        opts = dict(options)
        inner = opts.pop("inner", "inductor")
        _VARIANTS[key] = UnitScaleBackend(inner=inner, **opts)
    return _VARIANTS[key]


def _unit_scale_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], options: Optional[dict] = None,
                        mode: Optional[str] = None) -> Callable[..., Any]:
    """The named backend ``"unit_scale"``.

    ``torch.compile(model, backend="unit_scale", options={"inner": "aot_eager", "attn_tau": 0.3})``:
    ``inner`` picks the inner compiler, other keys are :class:`UnitScaleConfig` fields.
    The backend objects are ``default_backend`` (no options) and :func:`named_backend` (options).
    """
    if mode is not None:
        log.info("unit_scale backend: torch.compile(mode=%r) is not forwarded to the inner compiler", mode)
    return named_backend(options)(gm, example_inputs)
