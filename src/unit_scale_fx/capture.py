"""Model -> ``fx.GraphModule`` with the original parameter and buffer names.

Symbolic tracing is the fast path. Pure ``torch.nn`` layers (Linear, LayerNorm,
activations, ...) are traced *through*, so the graph holds functional calls on
``get_attr`` parameters; layers whose behaviour depends on train/eval mode
(Dropout, BatchNorm) stay module calls, so ``.train()`` / ``.eval()`` keep working.
When symbolic tracing fails and example inputs are given, ``torch.export``
(non-strict) captures the model instead; also when the traced graph calls Python functions a library kept
from tracing (``torch.fx.wrap``) that no rule knows (:func:`opaque_calls`).
"""

from __future__ import annotations

import copy
import logging
import os
import re
import traceback
from typing import Any, Callable, Optional, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from .errors import UnitScaleError
from .layers import _BN_FORWARD, batch_norm_layer, detach_values, functions_as_calls
from .record import CAPTURE, LOST_TYPES

log = logging.getLogger(__name__)

#: torch.nn layers traced through (their forward is a pure functional call).
INLINE_MODULES: tuple[type, ...] = tuple(
    t
    for t in (
        nn.Linear, nn.Embedding, nn.LayerNorm, getattr(nn, "RMSNorm", None), nn.GroupNorm,
        nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.GELU, nn.ReLU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Mish,
        nn.ELU, nn.LeakyReLU, nn.Softplus, nn.Hardswish, nn.Softmax, nn.LogSoftmax, nn.Identity,
        nn.Flatten, nn.Unflatten, nn.Sequential, nn.ModuleList, nn.ModuleDict, nn.CrossEntropyLoss,
        nn.MSELoss, nn.AvgPool1d, nn.AvgPool2d, nn.MaxPool1d, nn.MaxPool2d, nn.AdaptiveAvgPool1d,
        nn.AdaptiveAvgPool2d,
    )
    if t is not None
)


#: node meta: computed under ``torch.no_grad()`` in the model's forward
NO_GRAD = "unit_scale_no_grad"


def detach_no_grad_values(graph: fx.Graph) -> int:
    """The values a model computes under ``torch.no_grad()`` (or ``inference_mode``, ``set_grad_enabled(False)``)
    carry no gradient where it reads them after the block.

    torch.fx records the ops of such a block but not the grad mode: run as traced, gradients flowed through
    them (a frozen teacher's or a target network's weights got gradients, silently). Each value computed in a
    block that a node outside it reads (or the output) is read through :func:`~unit_scale_fx.layers.detach_values`
    (``detach()`` of each tensor in it): the same values, and no gradient into the block, as in the model. Returns
    the number of values detached."""
    n = 0
    for node in list(graph.nodes):
        if not node.meta.get(NO_GRAD):
            continue
        outside = [u for u in node.users if not u.meta.get(NO_GRAD)]
        if not outside:
            continue
        with graph.inserting_after(node):
            d = graph.call_function(detach_values, (node,))
        d.meta[NO_GRAD] = True
        for u in outside:
            u.replace_input_with(node, d)
        n += 1
    return n


class UnitScaleTracer(fx.Tracer):
    """A tracer that keeps train/eval-dependent torch layers as calls and inlines the rest."""

    def __init__(self, leaf_modules: Sequence[type] = ()) -> None:
        super().__init__()
        self.user_leaves = tuple(leaf_modules)

    def trace(self, root: Any, concrete_args: Optional[dict] = None) -> fx.Graph:  # type: ignore[override]
        self._names: Optional[tuple[dict[int, str], dict[int, str]]] = None
        self._params: dict[str, fx.Proxy] = {}
        self.lost_types: list[str] = []
        #: the forward changes autocast (``with torch.autocast(...)``): torch.fx records the ops, not the dtypes
        self.autocast_blocks = False
        self._autocast = _autocast_state()
        # grad mode as the model sets it: on, but for its own ``torch.no_grad()`` blocks (marked per node)
        with functions_as_calls(self), torch.enable_grad():
            graph = super().trace(root, concrete_args)
        detach_no_grad_values(graph)
        return graph

    def create_arg(self, a: Any) -> Any:
        """``fx.Tracer`` turns a dict subclass (a ``ModelOutput``) into a plain dict: note which were lost."""
        if isinstance(a, dict) and type(a) is not dict:
            self.lost_types.append(type(a).__qualname__)
        return super().create_arg(a)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        """Parameters and buffers become ``get_attr`` nodes, as in ``fx.Tracer``.

        ``fx.Tracer`` finds each one's name by scanning ``named_parameters()`` on
        every access (quadratic: 1 s of a 48-layer model's capture); this looks the
        name up in a dict built once per trace, with the same result.
        """
        if not isinstance(attr_val, torch.Tensor):
            return attr_val
        name = self._tensor_name(attr_val)
        if name is None:
            return attr_val
        if name not in parameter_proxy_cache:
            parameter_proxy_cache[name] = self._param_proxy(name)
        return parameter_proxy_cache[name]

    def _tensor_name(self, t: torch.Tensor) -> Optional[str]:
        """The qualified name of a parameter (or, with ``proxy_buffer_attributes``, a buffer) of the root."""
        if self._names is None:
            self._names = (
                {id(p): n for n, p in reversed(list(self.root.named_parameters()))},
                {id(b): n for n, b in reversed(list(self.root.named_buffers()))},
            )
        params, buffers = self._names
        name = params.get(id(t)) if isinstance(t, nn.Parameter) else None
        if name is None and self.proxy_buffer_attributes:
            name = buffers.get(id(t))
        return name

    def _param_proxy(self, name: str) -> fx.Proxy:
        """The one ``get_attr`` node of the parameter ``name`` in this trace."""
        if name not in self._params:
            self._params[name] = super().create_proxy("get_attr", name, (), {})
        return self._params[name]

    def create_proxy(self, kind: str, target: Any, args: tuple, kwargs: dict, name: Optional[str] = None,
                     type_expr: Any = None, proxy_factory_fn: Any = None) -> fx.Proxy:
        """A call of a batch-norm layer whose ``forward`` is PyTorch's becomes ``batch_norm_layer(bn, x,
        bn.weight, bn.bias)`` (the same function, train / eval behaviour included): its gain and bias are then
        nodes, which planning gives gradient factors of their own."""
        proxy = self._create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        if kind.startswith("call_"):
            if not torch.is_grad_enabled():
                proxy.node.meta[NO_GRAD] = True  # computed under ``torch.no_grad()`` (:func:`detach_no_grad_values`)
            if _autocast_state() != self._autocast:
                self.autocast_blocks = True
        return proxy

    def _create_proxy(self, kind: str, target: Any, args: tuple, kwargs: dict, name: Optional[str],
                      type_expr: Any, proxy_factory_fn: Any) -> fx.Proxy:
        if kind == "call_module" and len(args) == 1 and not kwargs:
            mod = self.root.get_submodule(str(target))
            if type(mod).forward is _BN_FORWARD:
                base = str(target).replace(".", "_")
                bn = super().create_proxy("get_attr", target, (), {}, name=f"{base}_layer")
                wb = []
                for attr in ("weight", "bias"):
                    p = mod._parameters.get(attr)
                    pname = self._tensor_name(p) if p is not None else None
                    wb.append(self._param_proxy(pname) if pname is not None else p)
                return super().create_proxy("call_function", batch_norm_layer, (bn, args[0], *wb), {}, name=base,
                                            type_expr=type_expr, proxy_factory_fn=proxy_factory_fn)
        return super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self.user_leaves and isinstance(m, self.user_leaves):
            return True
        if type(m) in INLINE_MODULES:
            return False
        if super().is_leaf_module(m, module_qualified_name):
            # a torch.nn layer stays one call only if a rule knows it (BatchNorm, Dropout, ...);
            # composite layers (TransformerEncoder, MultiheadAttention) are traced through
            from .rules import registered_targets

            return type(m) in registered_targets()
        return False


def _mirror_state(src: nn.Module, dst: nn.Module) -> None:
    """Give ``dst`` every parameter and buffer of ``src`` under the same name and persistence.

    ``fx.GraphModule`` copies only the attributes its graph uses; this adds the
    rest (unused parameters) and fixes buffer persistence, so state_dict keys match.
    """
    for mod_name, mod in src.named_modules(remove_duplicate=False):
        try:
            target = dst.get_submodule(mod_name) if mod_name else dst
        except AttributeError:
            target = dst
            for part in mod_name.split("."):
                if not hasattr(target, part):
                    target.add_module(part, nn.Module())
                target = getattr(target, part)
        for name, p in mod._parameters.items():
            if p is not None and target._parameters.get(name) is not p:
                if name in target._buffers:
                    del target._buffers[name]
                target.register_parameter(name, p)
        for name, b in mod._buffers.items():
            persistent = name not in mod._non_persistent_buffers_set
            if b is None:
                continue
            if name in target._parameters:
                del target._parameters[name]
            target.register_buffer(name, b, persistent=persistent)


#: this package's directory: its frames are not where a user's model failed
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)).replace("\\", "/") + "/"


def _location(exc: BaseException) -> str:
    """The last frame of ``exc``'s traceback in the user's code: not in torch, nor in this package (a custom
    ``autograd.Function`` that the export tracer refuses raises from ``layers.py``)."""
    frames = traceback.extract_tb(exc.__traceback__)
    user = [f for f in frames if "/torch/" not in f.filename.replace("\\", "/")
            and not os.path.abspath(f.filename).replace("\\", "/").startswith(_PACKAGE_DIR)]
    f = (user or frames)[-1] if (user or frames) else None
    return f"{f.filename}:{f.lineno} in {f.name}: {f.line}" if f else "unknown"


def _traced_location(exc: BaseException) -> str:
    """Where a dynamo failure happened in the user's code: the last frame its message gives under
    "from user code:" (its traceback holds only compiler frames), else :func:`_location`."""
    import re

    text = str(exc)
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)\n\s+(.*)', text.split("from user code:", 1)[-1])
    if "from user code:" in text and frames:
        f = frames[-1]
        return f"{f[0]}:{f[1]} in {f[2]}: {f[3].strip()}"
    return _location(exc)


def _autocast_state() -> tuple:
    """Whether autocast is on per device type, and its dtype where it is (a disabled block's dtype is moot)."""
    return tuple((torch.get_autocast_dtype(d) if torch.is_autocast_enabled(d) else None) for d in ("cpu", "cuda"))


def symbolic_capture(model: nn.Module, leaf_modules: Sequence[type] = ()) -> fx.GraphModule:
    tracer = UnitScaleTracer(leaf_modules)
    graph = tracer.trace(model)
    if tracer.autocast_blocks:
        # the graph would run the block in the caller's precision, not the one the forward asks for
        raise TypeError(f"{type(model).__name__}.forward changes autocast (a torch.autocast block), which "
                        "torch.fx does not record")
    gm = fx.GraphModule(tracer.root, graph, model.__class__.__name__)
    _mirror_state(model, gm)
    gm.meta[CAPTURE] = "symbolic_trace"
    gm.meta[LOST_TYPES] = sorted(set(tracer.lost_types))
    return gm


def reads_training_flag(model: nn.Module, gm: fx.GraphModule, leaf_modules: Sequence[type] = ()) -> bool:
    """Whether the graph torch.fx traced from ``model`` holds its train / eval mode as a constant: traced again in
    the other mode, it differs (``F.dropout(x, p, training=self.training)``, ``if self.training:``). torch.fx
    bakes the mode it traced in; such a graph would drop activations in evaluation. (Module calls that read
    their mode when they run, ``nn.Dropout`` and batch norms, give the same graph in both modes.) Every
    module's flag is restored as it was."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.train(not model.training)
        other = symbolic_capture(model, leaf_modules)
    except Exception:  # noqa: BLE001 - untraceable in the other mode: it depends on the mode
        return True
    finally:
        for m, t in modes:
            m.training = t
    # (fx numbers the tensor constants it lifts onto the root module per trace: ``_tensor_constant0``, then 1)
    same = re.compile(r"_tensor_constant\d+")
    return same.sub("_tensor_constant", other.code) != same.sub("_tensor_constant", gm.code)


def export_capture(model: nn.Module, example_inputs: tuple, example_kwargs: Optional[dict] = None) -> fx.GraphModule:
    with functions_as_calls(None):
        ep = torch.export.export(model, tuple(example_inputs), kwargs=example_kwargs or {}, strict=False)
    gm = ep.module()
    _mirror_state(model, gm)
    gm.meta[CAPTURE] = "torch.export"
    return gm


def opaque_calls(gm: fx.GraphModule) -> list[str]:
    """Python functions outside torch that a symbolically traced graph calls as single ops, taking traced values,
    with no rule: functions a library kept from tracing with ``torch.fx.wrap`` (torchvision's Swin attention,
    ``shifted_window_attention``), whose insides no rule can see. torch.export traces through them."""
    import types

    from .rules import lookup

    out = []
    for node in gm.graph.nodes:
        t = node.target
        if node.op != "call_function" or not isinstance(t, types.FunctionType):
            continue
        mod = getattr(t, "__module__", "") or ""
        if mod == "torch" or mod.startswith(("torch.", "operator", "math", "_operator")):
            continue
        if not node.all_input_nodes or lookup(node, gm) is not None:
            continue
        out.append(f"{mod}.{t.__qualname__}")
    return sorted(set(out))


def capture(
    model: nn.Module,
    example_inputs: Optional[tuple] = None,
    example_kwargs: Optional[dict] = None,
    leaf_modules: Sequence[type] = (),
) -> fx.GraphModule:
    """Capture ``model`` as a GraphModule; see the module docstring for the order of attempts."""
    try:
        gm = symbolic_capture(model, leaf_modules)
        lost = gm.meta.get(LOST_TYPES)
        if lost and example_inputs is not None:  # torch.export keeps them (pytree nodes)
            raise TypeError(f"torch.fx would return {', '.join(lost)} as a plain dict")
        if lost:
            log.warning("unit_scale: torch.fx returns %s as a plain dict; pass example_inputs=(...) to capture "
                        "%s with torch.export, which keeps the output type", ", ".join(lost), type(model).__name__)
        opaque = opaque_calls(gm)
        if opaque and example_inputs is not None:
            try:
                ex = export_capture(model, example_inputs, example_kwargs)
            except Exception as exc:  # noqa: BLE001 - the traced graph stands; its opaque calls are reported
                log.warning("unit_scale: torch.fx keeps %s as single calls with no rule, and torch.export failed "
                            "(%s: %s); they are left unscaled", ", ".join(opaque), type(exc).__name__, exc)
            else:
                log.info("captured %s with torch.export: torch.fx keeps %s as single calls with no rule, "
                         "torch.export traces through them (%d nodes)", type(model).__name__, ", ".join(opaque),
                         len(ex.graph.nodes))
                return ex
        log.info("captured %s with torch.fx symbolic tracing (%d nodes)", type(model).__name__, len(gm.graph.nodes))
        return gm
    except Exception as exc:  # tracing raises many kinds of errors
        where = _location(exc)
        if example_inputs is None:
            raise UnitScaleError(
                f"torch.fx could not trace {type(model).__name__}: {type(exc).__name__}: {exc}",
                where=where,
                fix="pass example_inputs=(...) so the model can be captured with torch.export instead, "
                "or list the offending module type in UnitScaleConfig(leaf_modules=(...))",
            ) from exc
        log.info("symbolic tracing failed (%s at %s); capturing with torch.export", type(exc).__name__, where)
    try:
        gm = export_capture(model, example_inputs, example_kwargs)
    except Exception as exc:
        raise UnitScaleError(
            f"neither torch.fx nor torch.export could capture {type(model).__name__}: {type(exc).__name__}: {exc}",
            where=_location(exc),
            fix="make the forward traceable (no data-dependent Python control flow) or mark the failing "
            "submodule type in UnitScaleConfig(leaf_modules=(...))",
        ) from exc
    log.info("captured %s with torch.export (%d nodes)", type(model).__name__, len(gm.graph.nodes))
    return gm


# -- capture of one call of a model's own forward (the path for models torch.fx cannot trace) -------------

#: Python values a call may pass besides tensors; they are baked into the captured graph.
CONSTANT_TYPES = (type(None), bool, int, float, str, bytes, torch.dtype, torch.device, torch.layout,
                  torch.memory_format, type(Ellipsis))


class CallSignature:
    """The shape of one call: where its tensors go, and the constants around them.

    Two calls with equal ``key`` (same pytree structure, same constants, same tensor
    dtypes and ranks) can run the same captured graph, provided the dimensions the
    graph specialised agree (:meth:`fits`).
    """

    def __init__(self, args: tuple, kwargs: dict, where: str) -> None:
        leaves, self.spec = torch.utils._pytree.tree_flatten((tuple(args), dict(kwargs)))
        self.tensors: list[torch.Tensor] = []
        self.slots: list[Any] = []  # per leaf: an int (tensor index) or ("const", value)
        key: list[Any] = []
        for i, leaf in enumerate(leaves):
            if isinstance(leaf, torch.Tensor):
                self.slots.append(len(self.tensors))
                self.tensors.append(leaf)
                key.append(("t", leaf.dtype, leaf.dim(), leaf.device.type, leaf.requires_grad))
            elif isinstance(leaf, CONSTANT_TYPES):
                self.slots.append(("const", leaf))
                key.append(("c", type(leaf).__name__, repr(leaf)))
            else:
                raise UnitScaleError(
                    f"forward was called with a {type(leaf).__module__}.{type(leaf).__qualname__} "
                    f"(input {i} of the call, after flattening), neither a tensor, a container of tensors "
                    "nor a Python constant: a captured graph cannot take it",
                    where=where,
                    fix="pass tensors (a cache object: call with use_cache=False, or generate(..., "
                    "use_cache=False)); or register the type with torch.utils._pytree.register_pytree_node",
                )
        self.key = (str(self.spec), tuple(key))

    def rebuild(self, tensors: Sequence[torch.Tensor]) -> tuple[tuple, dict]:
        leaves = [tensors[s] if isinstance(s, int) else s[1] for s in self.slots]
        args, kwargs = torch.utils._pytree.tree_unflatten(leaves, self.spec)
        return tuple(args), dict(kwargs)


def flatten_output(value: Any, tensors: list, seen: Optional[set] = None, depth: int = 0) -> Any:
    """``value`` as a skeleton whose tensors are indices into ``tensors`` (which this appends to).

    Tuples, lists and mappings (``ModelOutput`` is one) are walked, and so are the
    attributes of any other object that holds tensors (a key/value cache): the
    rebuilt output has the same types, with the captured graph's tensors in them.
    """
    seen = set() if seen is None else seen
    if isinstance(value, (torch.Tensor, torch.SymInt)):
        # a symbolic int (a cache's length under dynamic shapes) is an output of the graph too: the
        # rebuilt output then holds this call's value, not the symbol the capture saw
        tensors.append(value)
        return ("tensor", len(tensors) - 1)
    if depth > 12 or id(value) in seen or isinstance(value, CONSTANT_TYPES):
        return ("const", value)
    seen.add(id(value))
    if isinstance(value, (tuple, list)):
        items = [flatten_output(v, tensors, seen, depth + 1) for v in value]
        return ("seq", type(value), items) if any(_holds(i) for i in items) else ("const", value)
    if isinstance(value, dict):
        items = {k: flatten_output(v, tensors, seen, depth + 1) for k, v in value.items()}
        return ("map", value, items) if any(_holds(i) for i in items.values()) else ("const", value)
    attrs = getattr(value, "__dict__", None)
    if isinstance(attrs, dict) and not isinstance(value, (nn.Module, type)):
        items = {k: flatten_output(v, tensors, seen, depth + 1) for k, v in attrs.items()}
        if any(_holds(i) for i in items.values()):
            return ("obj", value, items)
    return ("const", value)


def _holds(skel: Any) -> bool:
    return skel[0] != "const"


def rebuild_output(skel: Any, tensors: Sequence[Any]) -> Any:
    """The inverse of :func:`flatten_output`: a fresh value of the same types holding ``tensors``."""
    kind = skel[0]
    if kind == "tensor":
        return tensors[skel[1]]
    if kind == "const":
        return skel[1]
    if kind == "seq":
        items = [rebuild_output(s, tensors) for s in skel[2]]
        typ = skel[1]
        if typ in (tuple, list):
            return typ(items)
        return typ(*items) if hasattr(typ, "_fields") else typ(items)
    if kind == "map":
        new = copy.copy(skel[1])
        for k, s in skel[2].items():
            new[k] = rebuild_output(s, tensors)
        return new
    new = copy.copy(skel[1])
    for k, s in skel[2].items():
        if _holds(s):
            object.__setattr__(new, k, rebuild_output(s, tensors))
    return new


def dynamic_dims(t: torch.Tensor) -> range:
    """The dimensions of an example tensor that :func:`export_call` exports as dynamic: all of an integer or
    boolean tensor's (its sizes are counts of tokens), the first of a float tensor's (the batch)."""
    return range(t.dim() if not (t.is_floating_point() or t.is_complex()) else min(1, t.dim()))


def export_call(model: nn.Module, sig: CallSignature, run: Callable[..., Any],
                dynamic: bool = True) -> tuple[fx.GraphModule, Any]:
    """Capture ``run(*sig.tensors)`` (which calls ``model``) with torch.export; return (graph, output skeleton).

    The graph takes the call's tensors, flat, and returns the output's tensors, flat;
    :func:`rebuild_output` with the skeleton gives back the output's types. Exported as
    dynamic where the model allows it (:func:`dynamic_dims`): every tensor's first
    (batch) dimension and every dimension of an integer or boolean tensor (token ids,
    positions, masks, labels), so a smaller last batch or a longer sequence runs the same
    graph. A float tensor's other sizes (an image's height and width, a spectrogram's bins)
    stay static: symbolic image sizes can keep export's shape reasoning busy for minutes
    (Swin's window partition: more than 4 minutes, against 3 seconds static); another size
    there captures again, with the same scales.
    """
    from torch.export import Dim

    box: dict[str, Any] = {}

    def flat_forward(*flat: torch.Tensor) -> tuple:
        out = run(*flat)
        tensors: list = []
        box["skeleton"] = flatten_output(out, tensors)
        return tuple(tensors)

    # one entry per parameter of the signature: ``*flat`` is one, a tuple of per-tensor specs
    shapes = (tuple({d: Dim.AUTO for d in dynamic_dims(t)} for t in sig.tensors),) if dynamic else None
    with _forward_replaced(model, flat_forward), functions_as_calls(None):
        ep = torch.export.export(model, tuple(sig.tensors), dynamic_shapes=shapes, strict=False)
    gm = ep.module()
    _mirror_state(model, gm)
    gm.meta[CAPTURE] = "torch.export"
    gm.meta["input_dims"] = _input_dims(ep)
    return gm, box["skeleton"]


def _bound(x: Any) -> Optional[int]:
    try:
        return int(x)
    except Exception:  # an infinite bound (sympy oo / torch's int_oo)
        return None


def _input_dims(ep: Any) -> list:
    """Per graph input, per dimension: its size where export specialised it, else the range it allows."""
    ranges = {str(k): v for k, v in ep.range_constraints.items()}
    out = []
    for node in ep.graph.nodes:
        if node.op != "placeholder" or node.name not in ep.graph_signature.user_inputs:
            continue
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            out.append(None)
            continue
        dims = []
        for s in val.shape:
            if isinstance(s, int):
                dims.append(s)
                continue
            r = ranges.get(str(s.node.expr))
            lo = _bound(r.lower) if r is not None else None
            dims.append((lo or 0, _bound(r.upper) if r is not None else None))
        out.append(tuple(dims))
    return out


#: the module's own hook tables: they run around the user's call of the model, outside the capture
_ROOT_HOOKS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_backward_pre_hooks",
               "_backward_hooks")


class _forward_replaced:
    """Make ``model(*flat)`` run ``fn`` for the duration of an export (an instance attribute, removed after).

    The model's own forward hooks are set aside meanwhile: a hook a user registered on the model runs
    around their call (which is what captures), and must not run inside the capture, where it would see
    the flat inputs and outputs of ``fn`` (and could not read, say, ``output.logits``).
    """

    def __init__(self, model: nn.Module, fn: Callable[..., Any]) -> None:
        self.model, self.fn = model, fn

    def __enter__(self) -> None:
        self.had = "forward" in self.model.__dict__
        self.old = self.model.__dict__.get("forward")
        self.model.__dict__["forward"] = self.fn
        self.hooks = {k: self.model.__dict__[k] for k in _ROOT_HOOKS if k in self.model.__dict__}
        for k, table in self.hooks.items():
            self.model.__dict__[k] = type(table)()

    def __exit__(self, *exc: Any) -> None:
        if self.had:
            self.model.__dict__["forward"] = self.old
        else:
            del self.model.__dict__["forward"]
        self.model.__dict__.update(self.hooks)
