"""The op registry: ``target -> Rule``.

A target is the real object a graph node calls: a function (``F.linear``,
``operator.add``), a tensor method (``torch.Tensor.softmax``), an aten overload
(``torch.ops.aten.mm.default``) or, for ``call_module`` nodes, a module class
(``nn.Dropout``). Adding an op is adding one entry with :func:`register`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch
import torch.fx as fx

from ..errors import UnitScaleError
from ..record import CONSTANT, CONSTANT_RMS, MASK_KEYS, RULE_OVERRIDE  # noqa: F401 - importable from here too

#: How a parameter is initialised (a rule's :meth:`Rule.init_kinds`): divided by its RMS, zeroed, or set to one;
#: ``"added"``: added to activations (divided by its RMS if a nonzero table of two or more dims, else kept).
INIT_KINDS = ("unit", "zero", "one", "added")
#: the former name of :data:`INIT_KINDS`
ROLES = INIT_KINDS


class Kind:
    """The op kinds: :attr:`Rule.kind` and :attr:`ScaleRecord.kind <unit_scale_fx.record.ScaleRecord>`.

    Plain strings (records stay JSON-friendly); compare against these names, never against literals.
    """

    MATMUL = "matmul"  # linear, matmul / mm / bmm / addmm, conv, einsum, embedding (a one-hot matmul)
    ATTENTION = "attention"  # scaled-dot-product attention
    SOFTMAX = "softmax"
    POINTWISE = "pointwise"  # one function of one tensor (activations, fused elementwise chains)
    NORM = "norm"  # layer / RMS / group / batch norm
    ADD = "add"
    MUL = "mul"  # products and quotients
    REDUCE = "reduce"
    POOL = "pool"
    LOSS = "loss"
    PRESERVE = "preserve"  # views, reshapes, dropout, ...: the scale passes through
    CALIBRATED = "calibrated"  # no rule: scales measured (passes/calibrate.py)
    UNSUPPORTED = "unsupported"  # a float op with no rule (records only)
    EXCLUDED = "excluded"  # left out by the config's filter (records only)


@dataclass
class Scales:
    """What a rule computes for one node (ideal values, before constraints).

    Attributes:
        fwd: forward scale of the output.
        bwd: ideal backward scale per floating-point input node.
        out_rms: predicted output RMS once ``fwd`` is applied.
        grad_gain: RMS of the unscaled gradient of each input relative to the
            output gradient (``1 / ideal bwd`` for most rules); used to predict
            backward RMS after constraints.
        fixed_fwd: the forward scale must stay as it is (losses).
        calibrate / calibrate_bwd: see the fields.
        weights: for adds: a weight per input, applied to the input instead of ``fwd``
            on the output; ``bwd`` then holds backward weights that differ from them.
        note: text for the record.
    """

    fwd: float = 1.0
    bwd: dict[fx.Node, float] = field(default_factory=dict)
    out_rms: Optional[float] = 1.0
    grad_gain: dict[fx.Node, float] = field(default_factory=dict)
    fixed_fwd: bool = False
    weights: Optional[dict[fx.Node, float]] = None
    note: str = ""
    #: the output scale depends on the data (attention, products of activations): when
    #: planning runs on real inputs, set ``fwd`` from the measured output RMS
    calibrate: bool = False
    #: calibration moves the backward scales by the same factor (they equal ``fwd``)
    calibrate_bwd: bool = False
    #: when planning runs on real inputs, measure the input gradient gain too: ``RMS(J^T g)`` for a
    #: unit Gaussian ``g`` at the real input (one-input functions a Gaussian probe may not represent)
    calibrate_grad_gain: bool = False
    #: the rule's backward factors are only known once measured (``calibrate_grad_gain``): analytic planning
    #: leaves the op unscaled and reports it as it reports an op without a rule
    measured_only: bool = False
    #: the op, as called, is outside what the rule can scale (an argument that undoes the scales): the
    #: reason; planning leaves it unscaled and reports it as it reports an op without a rule
    unsupported: Optional[str] = None
    #: cross-position correlation of the output: the mean of ``x_i . x_j / |x|^2`` over distinct
    #: positions (uncentered: a mean shared by all positions counts). ``None``: the inputs' carries over.
    out_rho: Optional[float] = None
    #: first moment of the output relative to its RMS, ``E[y] / RMS(y)`` in [-1, 1] (a ReLU's output:
    #: 0.56). ``None``: carried over from the inputs by ops that move values (views, dropout), else 0
    #: (a matmul with zero-mean weights, a norm).
    out_mean: Optional[float] = None
    #: backward: the cross-position correlation the op gives an input's gradient (a mean over positions:
    #: 1, every position gets the same gradient); inputs not listed keep the output gradient's
    grad_rho: dict[fx.Node, float] = field(default_factory=dict)
    #: backward: the part of the output gradient's cross-position correlation an input's gradient keeps, for
    #: inputs not in ``grad_rho`` (a ReLU's mask keeps half: the shared part is multiplied by the mean of its
    #: derivative, the whole by its RMS); inputs not listed keep all of it
    grad_rho_factor: dict[fx.Node, float] = field(default_factory=dict)
    #: backward: a part of the output gradient shared by a sample's positions, once through the op, is carried by the
    #: input gradient along the input's own values: the share of the correlation that becomes this coherence
    #: (``E[f'(x) z]^2 / E[f'(x)^2]`` for ``f(x)``, ``x = mu + sd z``; a ReLU: 0.32). A norm's gain sums its gradient
    #: times its normalised input, coherently where the gradient follows the values (``value_grad_gain``)
    grad_value_from_rho: dict[fx.Node, float] = field(default_factory=dict)
    #: backward: the coherence an input's gradient has with the input's values whatever the output gradient's
    #: (a ReLU then a mean over positions: ``1/pi``), as ``grad_rho`` gives a correlation
    grad_value: dict[fx.Node, float] = field(default_factory=dict)
    #: backward: the share of the output gradient's coherence with the output's values that an input's gradient keeps
    #: with its own (an add: that input's share of the output's variance; a view: 1); inputs not listed: none
    grad_value_pass: dict[fx.Node, float] = field(default_factory=dict)
    #: backward: an input's gradient gain when the output gradient follows the output's normalised values at every
    #: position (a norm's gain then sums its rows coherently); inputs not listed use ``grad_gain``
    value_grad_gain: dict[fx.Node, float] = field(default_factory=dict)
    #: backward: an input's gradient gain when the output gradient is the same at every position
    #: (attention's value gradient then sums coherently); inputs not listed use ``grad_gain``
    shared_grad_gain: dict[fx.Node, float] = field(default_factory=dict)


@dataclass
class OpView:
    """What a rule sees of a node: its arguments, input shapes and predicted RMS."""

    node: fx.Node
    inputs: list[fx.Node]  # floating-point tensor inputs, unique, in argument order
    in_rms: dict[fx.Node, float]
    module: Optional[torch.nn.Module] = None
    context: dict[str, Any] = field(default_factory=dict)
    #: predicted cross-position correlation of each input (see ``Scales.out_rho``)
    in_rho: dict[fx.Node, float] = field(default_factory=dict)
    #: predicted first moment of each input relative to its RMS (see ``Scales.out_mean``)
    in_mean: dict[fx.Node, float] = field(default_factory=dict)

    def rho(self, x: Any) -> float:
        r = self.in_rho.get(x) if isinstance(x, fx.Node) else None
        return 0.0 if r is None or not math.isfinite(r) else min(1.0, max(0.0, r))

    def mean(self, x: Any) -> float:
        """``E[x] / RMS(x)`` of an input (0 when unknown)."""
        m = self.in_mean.get(x) if isinstance(x, fx.Node) else None
        return 0.0 if m is None or not math.isfinite(m) else min(1.0, max(-1.0, m))

    def arg(self, pos: int, name: str, default: Any = None) -> Any:
        if name in self.node.kwargs:
            return self.node.kwargs[name]
        if len(self.node.args) > pos:
            return self.node.args[pos]
        return default

    @staticmethod
    def shape(x: Any) -> Optional[tuple[int, ...]]:
        val = x.meta.get("val") if isinstance(x, fx.Node) else x
        if isinstance(val, torch.Tensor):
            return tuple(int(s) for s in val.shape)
        return None

    @property
    def out_shape(self) -> Optional[tuple[int, ...]]:
        return self.shape(self.node)

    def rms(self, x: Any, default: float = 1.0) -> float:
        if isinstance(x, fx.Node):
            r = self.in_rms.get(x)
            return default if r is None or not math.isfinite(r) or r <= 0 else r
        if isinstance(x, (int, float)):
            return abs(float(x))
        return default


class Rule:
    """Base class of op rules.

    Subclasses set ``name`` and ``kind`` and implement :meth:`scales`; rules that
    know what their parameters are (weights, biases, gains) implement
    :meth:`init_kinds` so weight init can act on them.
    """

    name: str = "rule"
    kind: str = "rule"
    #: needs no scale at all (view, reshape, dropout, ...)
    preserves_scale: bool = False

    def scales(self, op: OpView) -> Scales:  # pragma: no cover - abstract
        raise NotImplementedError

    def init_kinds(self, node: fx.Node) -> dict[fx.Node, str]:
        """``input node -> init kind`` (:data:`INIT_KINDS`) of the parameters this op consumes."""
        if type(self).param_roles is not Rule.param_roles:  # a rule written against the former name
            return self.param_roles(node)
        return {}

    def param_roles(self, node: fx.Node) -> dict[fx.Node, str]:
        """The former name of :meth:`init_kinds`."""
        return self.init_kinds(node)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


_RULES: dict[Any, Rule] = {}
#: ops of optional packages, by import path: ``(module, attribute) -> Rule``. Registered the first time a
#: lookup finds that module imported (the registry never imports an optional package itself).
_PENDING: dict[tuple[str, str], Rule] = {}


class OptionalTarget:
    """An op of an optional package named by its import path (``torchvision.ops.stochastic_depth``,
    ``stochastic_depth``): :func:`register` accepts it; the real function is keyed once its module is imported."""

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name


#: every optional op ever registered, by ``(module, name)``: an op object that is not keyed (its module
#: imported again, or still importing when a lookup first looked) is still found by where it was defined
_OPTIONAL: dict[tuple[str, str], Rule] = {}


def _resolve_pending() -> None:
    import sys

    for key in [k for k in _PENDING if k[0] in sys.modules]:
        target = getattr(sys.modules[key[0]], key[1], None)
        if target is None:  # the module is still importing: look again at the next lookup
            continue
        rule = _PENDING.pop(key)
        if target not in _RULES:
            _RULES[target] = rule


def _optional_rule(target: Any) -> Optional[Rule]:
    """The rule of an optional package's op found by its defining module and name, not by identity."""
    if not _OPTIONAL or not (callable(target) or isinstance(target, type)):
        return None
    return _OPTIONAL.get((getattr(target, "__module__", None), getattr(target, "__name__", None)))


def register(*targets: Any) -> Callable[[Any], Any]:
    """Register a rule (instance or class, instantiated with no arguments) for targets.

    Refuses a target that already has a rule.
    """

    def deco(obj: Any) -> Any:
        rule = obj() if isinstance(obj, type) else obj
        for t in targets:
            if t is None:
                continue
            if isinstance(t, OptionalTarget):
                _PENDING[(t.module, t.name)] = rule
                _OPTIONAL[(t.module, t.name)] = rule
                continue
            if t in _RULES:
                raise UnitScaleError(
                    f"target {target_name(t)} already has rule {_RULES[t]!r}",
                    where="unit_scale_fx.rules.registry.register",
                    fix="register each op once; extend the existing rule instead",
                )
            _RULES[t] = rule
        return obj

    return deco


#: ops of other libraries (``"namespace::name.overload"``) that exist only once that library is imported:
#: the callback registers the op object when a graph first calls it (see :func:`register_library_op`)
_LIBRARY_OPS: dict[str, Callable[[Any], None]] = {}


def register_library_op(qualified: str, on_found: Callable[[Any], None]) -> None:
    """Know an op of another library by name (``"transformers::grouped_mm_fallback.default"``).

    The package never imports that library; when a graph calls an op object with this name,
    ``on_found(op)`` registers it (a rule through :func:`register`, and whatever table the rule reads).
    """
    _LIBRARY_OPS[qualified] = on_found


def resolve_library_op(target: Any) -> None:
    """Register ``target`` if it is a library op known by name (:func:`register_library_op`)."""
    if isinstance(target, torch._ops.OpOverload):
        schema = target._schema
        cb = _LIBRARY_OPS.pop(f"{schema.name}.{schema.overload_name or 'default'}", None)
        if cb is not None:
            cb(target)


def aten(name: str, overload: str = "default") -> Any:
    """An aten overload if this torch has it, else None (skipped by register)."""
    packet = getattr(torch.ops.aten, name, None)
    return getattr(packet, overload, None) if packet is not None else None


def tensor_method(name: str) -> Any:
    return getattr(torch.Tensor, name, None)


def resolve_target(node: fx.Node, root: Optional[torch.nn.Module] = None) -> Any:
    """The registry key of a node: the real object it calls. A call of an op packet with one overload
    (``torch.ops.ns.op(...)``, as dynamo records a library's custom op) is a call of that overload, the key
    its rule is registered under (``torch.export`` records the overload itself)."""
    if node.op == "call_function":
        t = node.target
        if isinstance(t, torch._ops.OpOverloadPacket):
            names = t.overloads()
            if len(names) == 1:
                return getattr(t, names[0])
            return _packet_overload(node, t)
        return t
    if node.op == "call_method":
        return getattr(torch.Tensor, str(node.target), None)
    if node.op == "call_module" and root is not None:
        try:
            return type(root.get_submodule(str(node.target)))
        except AttributeError:
            return None
    return None


#: node meta: ``(packet, overload)`` that :func:`_packet_overload` resolved (schema matching costs a few microseconds)
_OVERLOAD = "us_packet_overload"


def _stand_in(a: Any) -> Any:
    """A value of the type an argument node carries, for matching a schema (a tensor: an empty one)."""
    if isinstance(a, fx.Node):
        v = a.meta.get("val", a.meta.get("example_value"))
        if isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            return {torch.SymInt: 0, torch.SymFloat: 0.0, torch.SymBool: False}[type(v)]
        return v if isinstance(v, (int, float, bool)) else torch.empty(0)
    if isinstance(a, (list, tuple)):
        return type(a)(_stand_in(x) for x in a)
    return a


def _packet_overload(node: fx.Node, t: torch._ops.OpOverloadPacket) -> Any:
    """The overload a call of an op packet with several (``torch.ops.aten.slice(x, 0, 0, -1)``, as dynamo records
    it inside ``torch.vmap``) dispatches to, by its arguments' types; the packet itself where none matches."""
    cached = node.meta.get(_OVERLOAD)
    if cached is not None and cached[0] is t:
        return cached[1]
    try:
        name = torch._C._jit_resolve_packet(t._qualified_op_name, *[_stand_in(a) for a in node.args],
                                            **{k: _stand_in(v) for k, v in node.kwargs.items()})
        found: Any = getattr(t, name)
    except Exception:  # noqa: BLE001 - no overload takes these arguments: the packet is the key
        found = t
    node.meta[_OVERLOAD] = (t, found)
    return found


def lookup(node: fx.Node, root: Optional[torch.nn.Module] = None) -> Optional[Rule]:
    pinned = node.meta.get(RULE_OVERRIDE)
    if pinned is not None:
        return pinned
    key = resolve_target(node, root)
    if key is None:
        return None
    if _PENDING:
        _resolve_pending()
    if _LIBRARY_OPS:
        resolve_library_op(key)
    try:
        rule = _RULES.get(key)
    except TypeError:  # unhashable target
        return None
    return rule if rule is not None else _optional_rule(key)


def registered_targets() -> dict[Any, Rule]:
    """A copy of the registry (for reports and the coverage table); ops of optional packages once imported."""
    if _PENDING:
        _resolve_pending()
    return dict(_RULES)


def target_name(target: Any) -> str:
    if isinstance(target, str):
        return target
    if isinstance(target, type):
        return f"{target.__module__}.{target.__qualname__}"
    mod = getattr(target, "__module__", None)
    qual = getattr(target, "__qualname__", None) or getattr(target, "__name__", None)
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return str(target)
    if mod and qual:
        mod = {"torch._C._nn": "torch.nn.functional", "torch._C._VariableFunctions": "torch", "_operator": "operator"}.get(mod, mod)
        return f"{mod}.{qual}"
    return repr(target)


def node_op_name(node: fx.Node, root: Optional[torch.nn.Module] = None) -> str:
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    if node.op == "call_module":
        key = resolve_target(node, root)
        return target_name(key) if key is not None else str(node.target)
    if node.op == "call_function":
        return target_name(node.target)
    return node.op


def float_tensor_inputs(node: fx.Node) -> list[fx.Node]:
    """The node's inputs whose value is a floating-point tensor, unique, in order."""
    out: list[fx.Node] = []
    for n in node.all_input_nodes:
        if n in out:
            continue
        if is_float(n):
            out.append(n)
    return out


def constant_value(x: Any) -> Optional[float]:
    """The magnitude of a constant argument: a number, or a constant tensor's measured RMS."""
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return abs(float(x))
    if isinstance(x, fx.Node) and x.meta.get(CONSTANT):
        r = x.meta.get(CONSTANT_RMS)
        return None if r is None else float(r)
    return None


def has_float_value(node: fx.Node) -> bool:
    """The node's propagated value is a floating-point tensor (or a tuple holding one)."""
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return val.is_floating_point()
    if isinstance(val, (tuple, list)):
        return any(isinstance(v, torch.Tensor) and v.is_floating_point() for v in val)
    return False


def is_float(node: fx.Node) -> bool:
    """A floating-point tensor (or tuple of them) that parameters or float inputs reach."""
    return not node.meta.get(CONSTANT) and has_float_value(node)


def many(targets: Iterable[Any]) -> list[Any]:
    return [t for t in targets if t is not None]
