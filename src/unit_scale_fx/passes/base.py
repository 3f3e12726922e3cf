"""What a pass is (:class:`Pass`: a function over a typed :class:`PassContext` with declared
inputs and outputs) and the driver that runs a list of them (:func:`run_passes`)."""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch.fx as fx

from ..config import UnitScaleConfig
from ..errors import UnitScaleError

log = logging.getLogger(__name__)


@dataclass
class UnsupportedOp:
    """A floating-point op with no rule, reported together with the others."""

    node: str
    op: str
    where: str
    reason: str = "no rule"


@dataclass
class PassContext:
    """The state of one transform: its inputs, and every value that flows between passes.

    Each value a pass produces for a later one is a typed field here. A pass declares the
    fields it needs and the ones it produces (:class:`Pass`), and :func:`run_passes` checks,
    before each pass, that what it needs was given by the caller or produced by a pass that
    ran earlier: a pass run out of order fails loudly instead of quietly doing less.
    """

    # -- given by the caller ------------------------------------------------------------
    config: UnitScaleConfig = field(default_factory=UnitScaleConfig)
    example_args: Optional[tuple] = None
    example_kwargs: Optional[dict] = None
    #: placeholders that are parameters, by name -> the parameter (graphs captured by dynamo take
    #: parameters as inputs instead of ``get_attr``); init and planning treat them like ``get_attr``.
    param_inputs: dict[str, Any] = field(default_factory=dict)
    #: names of values connected through code outside this graph (inputs that carry a gradient in from
    #: earlier graphs, outputs read by later ones); topology joins them through one virtual node, so an
    #: edge is called a cut edge only if it is one whatever the outside does.
    boundary: set[str] = field(default_factory=set)
    #: graph breaks: this graph's losses (0-dim float outputs) send their gradient in times the program's
    #: *break factor*, one constant for every loss of every graph (as a loss scale is), so the gradient
    #: crossing each break back to earlier graphs is unit-sized and every parameter's gradient stays a
    #: positive multiple of its true one. ``break_factor``: the factor an earlier graph fixed; None with
    #: ``join_breaks``: set it here, from the gradients of the inputs that came from earlier graphs.
    join_breaks: bool = False
    break_factor: Optional[float] = None
    #: RMS of floating-point placeholders by name; shape_prop measures the ones not given here.
    input_rms: dict[str, float] = field(default_factory=dict)
    #: how measurements become numbers (:class:`~.stats.Stats`): local, or summed over a process group
    #: (:func:`~.stats.planning_stats`); None: local
    stats: Any = None

    # -- produced by passes -------------------------------------------------------------
    #: the placeholders' real values (None when inputs are fake or on the meta device); shape_prop
    real_values: Optional[list] = None
    #: parameter name -> init kind ("unit", "zero", "one": how init_weights initialises it); init_weights
    init_kinds: dict[str, str] = field(default_factory=dict)
    #: how many parameters init_weights re-initialised
    n_initialised: int = 0
    #: the dataflow graph, bridges and residual adds (:class:`~.topology.Topology`); topology
    topology: Any = None
    #: node -> the scales its rule chose (before constraints); plan
    scales: dict[fx.Node, Any] = field(default_factory=dict)
    #: the fitted node potentials (:class:`~.balance.Potentials`); balance
    potentials: Any = None
    #: node -> measured RMS of its gradient under the final scales; calibrate_grads
    measured_grads: dict[fx.Node, float] = field(default_factory=dict)

    # -- bookkeeping --------------------------------------------------------------------
    unsupported: list[UnsupportedOp] = field(default_factory=list)
    timings: list[tuple[str, float]] = field(default_factory=list)
    #: the data fields that hold a value: given at construction (non-default) or produced by a pass
    available: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.name in PRODUCIBLE and getattr(self, f.name) != _default(f):
                self.available.add(f.name)

    def give(self, name: str, value: Any) -> None:
        """Set a data field from outside the passes (as a pass that produced it would)."""
        if name not in PRODUCIBLE:
            raise AttributeError(f"PassContext has no data field {name!r}")
        setattr(self, name, value)
        self.available.add(name)

    @property
    def param_roles(self) -> dict[str, str]:
        """The former name of :attr:`init_kinds`."""
        return self.init_kinds

    def __setattr__(self, name: str, value: Any) -> None:
        name = _RENAMED.get(name, name)
        if name not in _FIELD_NAMES:
            raise AttributeError(f"PassContext has no field {name!r}; declare it on PassContext")
        object.__setattr__(self, name, value)


def _default(f: Any) -> Any:
    if f.default_factory is not MISSING:  # type: ignore[misc]
        return f.default_factory()
    return f.default


_FIELD_NAMES = frozenset(f.name for f in fields(PassContext))
#: former field names -> their names now
_RENAMED = {"param_roles": "init_kinds"}
#: where a node keeps its example value: ``val`` (shape propagation, torch.export), ``example_value`` (dynamo's
#: graphs, before shape propagation runs)
VALUE_KEYS = ("val", "example_value")


def meta_value(node: fx.Node, default: Any = None) -> Any:
    """The node's example value (:data:`VALUE_KEYS`, in order), or ``default`` where it has none."""
    for k in VALUE_KEYS:
        if k in node.meta:
            return node.meta[k]
    return default


#: the fields a pass may declare in ``needs`` / ``produces``
PRODUCIBLE = frozenset({"real_values", "init_kinds", "n_initialised", "topology", "scales", "potentials",
                        "measured_grads", "input_rms"})


@dataclass
class PassResult:
    modified: bool
    info: str = ""


PassFn = Callable[[fx.GraphModule, PassContext], PassResult]


@dataclass(frozen=True)
class Pass:
    """One pass: a name, its function, and the context fields it needs and produces.

    ``needs`` must be available before the pass runs; ``produces`` are available after it.
    Calling a :class:`Pass` runs its function (without the checks of :func:`run_passes`).
    """

    name: str
    fn: PassFn
    needs: frozenset[str] = frozenset()
    produces: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        unknown = (self.needs | self.produces) - PRODUCIBLE
        if unknown:
            raise ValueError(f"pass {self.name}: unknown context fields {sorted(unknown)}")

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        return self.fn(gm, ctx)


def declare(name: str, needs: Iterable[str] = (), produces: Iterable[str] = ()) -> Callable[[PassFn], Pass]:
    """Decorator: make a pass function a :class:`Pass` with its declared data flow."""

    def wrap(fn: PassFn) -> Pass:
        return Pass(name, fn, frozenset(needs), frozenset(produces))

    return wrap


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector for a transform, then restore it.

    Passes allocate many small objects (fx nodes, networkx dicts); on a 48-layer
    model the collector's full sweeps over them cost about 40% of the transform.
    Nothing cyclic is freed later than it would be by the next collection.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def run_passes(gm: fx.GraphModule, ctx: PassContext, passes: Sequence[Pass]) -> fx.GraphModule:
    """Run ``passes`` in order (collector paused); lint after each that changed the graph.

    Before each pass, what it ``needs`` must be available in ``ctx``; after it, what it
    ``produces`` is. A failure names the pass and the ones that ran before it.
    """
    with gc_paused():
        done: list[str] = []
        for p in passes:
            missing = p.needs - ctx.available
            if missing:
                raise UnitScaleError(
                    f"pass {p.name!r} needs {', '.join(sorted(missing))}, which no earlier pass produced",
                    where=f"pass {p.name} (after: {', '.join(done) or 'none'})",
                    fix="build the pass list with unit_scale_fx.pipeline.build_pipeline, which orders the passes",
                )
            t0 = time.perf_counter()
            try:
                result = p.fn(gm, ctx)
                if result.modified:
                    gm.graph.lint()
            except UnitScaleError:
                raise
            except Exception as exc:
                raise UnitScaleError(
                    f"pass {p.name!r} failed: {type(exc).__name__}: {exc}",
                    where=f"pass {p.name} (after: {', '.join(done) or 'none'})",
                    fix="this is a bug or an unsupported construct; report it with the model, or exclude the part "
                    "with UnitScaleConfig(node_filter=...)",
                ) from exc
            ctx.available |= p.produces
            dt = time.perf_counter() - t0
            ctx.timings.append((p.name, dt))
            log.debug("pass %s: %s (%.1f ms)", p.name, result.info, dt * 1e3)
            done.append(p.name)
    return gm


def module_path(node: fx.Node) -> str:
    """The qualified name of the module a node came from ("" for the root)."""
    if node.op in ("call_module", "get_attr"):
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        last = list(stack.values())[-1]
        path = last[0] if isinstance(last, tuple) else str(last)
        return str(path)
    return ""


class preserved_state:
    """Run a measurement in the module's own mode without side effects.

    Buffers (e.g. BatchNorm running statistics) and the global RNG state are
    restored afterwards, and parameter gradients are cleared, so planning leaves
    no trace on the model or on the user's random stream.
    """

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm

    def __enter__(self) -> "preserved_state":
        import torch

        self.buffers = {k: v.detach().clone() for k, v in self.gm.named_buffers()}
        self.rng = torch.random.get_rng_state()
        return self

    def __exit__(self, *exc: object) -> None:
        import torch

        with torch.no_grad():
            for k, v in self.gm.named_buffers():
                if k in self.buffers:
                    v.copy_(self.buffers[k])
        torch.random.set_rng_state(self.rng)
        self.gm.zero_grad(set_to_none=True)
