"""inline_functions: a call of a function that has no rule becomes the ops it is made of, where each has one.

Dynamo records some of torch's own functions as one call instead of tracing into them:
``F.multi_head_attention_forward`` (every ``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer``,
torchvision's ViT) is one node of a ``torch.compile`` graph. No rule scales such a node, so it was left
unscaled, with its projections' weights. ``torch.export`` records the same call as the ops it runs.

For each ``call_function`` node whose target has no rule, this pass traces the call on the node's own
example values (``make_fx`` in pre-dispatch form: the ops ``torch.export`` records, ``aten.linear``,
``aten.scaled_dot_product_attention``) and puts the traced ops in its place, when

* every argument that is a node has an example value, and none is a symbolic number (tensors' sizes may be
  symbolic: the trace then reads them from the tensors, ``aten.sym_size``);
* the trace is made of aten ops, ``getitem`` and size arithmetic only (no constants), and every one of its ops
  with a floating-point result has a rule (otherwise the call stays, as readable as before);
* the result is a tensor, or a tuple or list of tensors and ``None`` read through ``getitem``.

The traced ops compute what the call computes (they are what it runs), so the graph computes the same
function. Needs: nodes' ``val`` or ``example_value`` (dynamo's and export's graphs have them); a graph
without values (``symbolic_trace``) is left as it is.
"""

from __future__ import annotations

import logging
import operator
from typing import Any, Optional

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..layers import FunctionCall, functions_as_calls
from ..rules.registry import has_float_value, lookup
from .base import VALUE_KEYS, PassContext, PassResult, declare, meta_value

log = logging.getLogger(__name__)

_MISSING = object()


def _value(a: Any) -> Any:
    if isinstance(a, fx.Node):
        v = meta_value(a, _MISSING)
        if v is _MISSING:
            raise LookupError(a.name)
        return v
    return a


def _traceable(v: Any) -> bool:
    """An argument the trace may take: a tensor (its sizes may be symbolic: the trace reads them from it), or a
    constant that is not symbolic (a symbolic number would be fixed by the trace)."""
    return not isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool))


def _is_float(v: Any) -> bool:
    if isinstance(v, torch.Tensor):
        return v.is_floating_point()
    return isinstance(v, (tuple, list)) and any(_is_float(x) for x in v)


def _candidate(node: fx.Node) -> bool:
    if node.op != "call_function" or isinstance(node.target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return False
    if getattr(node.target, "__module__", None) in ("_operator", "operator", "builtins"):
        return False
    # a custom autograd.Function (its trace would drop its backward) or a higher-order op (subgraphs)
    if isinstance(node.target, (FunctionCall, torch._ops.HigherOrderOperator)):
        return False
    if lookup(node) is not None:
        return False
    return _is_float(meta_value(node))


def _trace(node: fx.Node) -> Optional[tuple[fx.GraphModule, list[fx.Node]]]:
    """The pre-dispatch trace of the call on its example values, and the graph nodes its placeholders stand
    for; None where the call cannot be traced as the pass needs."""
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch._subclasses.fake_tensor import FakeTensor

    flat, spec = tree_flatten((node.args, node.kwargs))
    try:
        values = [_value(a) for a in flat]
    except LookupError:
        return None
    slots = [i for i, v in enumerate(values) if isinstance(v, torch.Tensor) or not _traceable(v)]
    if any(not isinstance(flat[i], fx.Node) for i in slots):
        return None  # a tensor constant in the arguments
    target = node.target

    def call(*tensors: torch.Tensor) -> Any:
        vals = list(values)
        for i, t in zip(slots, tensors):
            vals[i] = t
        args, kwargs = tree_unflatten(vals, spec)
        return target(*args, **kwargs)

    inputs = [values[i] for i in slots]
    modes = {t.fake_mode for t in inputs if isinstance(t, FakeTensor)}
    if len(modes) > 1:
        return None
    try:
        # a custom autograd.Function met inside raises (its backward would be lost): the call stays
        with functions_as_calls(None):
            if modes:
                with next(iter(modes)):
                    sub = make_fx(call, tracing_mode="real", pre_dispatch=True)(*inputs)
            else:
                with torch.no_grad():
                    sub = make_fx(call, tracing_mode="real", pre_dispatch=True)(*inputs)
    except Exception as exc:  # anything the trace cannot follow: keep the call
        log.debug("inline_functions: %s not traced (%s: %s)", node.name, type(exc).__name__, exc)
        return None
    return sub, [flat[i] for i in slots]


def _inlinable(sub: fx.GraphModule) -> bool:
    for n in sub.graph.nodes:
        if n.op in ("placeholder", "output"):
            continue
        if n.op != "call_function":
            return False
        if n.target is operator.getitem:
            continue
        if isinstance(n.meta.get("val"), (int, float, bool, torch.SymInt, torch.SymFloat, torch.SymBool)):
            continue  # size arithmetic of symbolic sizes (``sym_size``, ``mul``)
        if not isinstance(n.target, torch._ops.OpOverload) or n.target.namespace != "aten":
            return False
        if has_float_value(n) and lookup(n) is None:
            return False
    return True


def _readers_ok(node: fx.Node, out: Any) -> bool:
    if isinstance(out, fx.Node) or out is None:
        return True
    if not isinstance(out, (tuple, list)) or not all(o is None or isinstance(o, fx.Node) for o in out):
        return False
    return all(u.op == "call_function" and u.target is operator.getitem and len(u.args) == 2
               and isinstance(u.args[1], int) and not u.kwargs for u in node.users)


def _splice(gm: fx.GraphModule, node: fx.Node, sub: fx.GraphModule, inputs: list[fx.Node]) -> bool:
    placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
    out_node = next(n for n in sub.graph.nodes if n.op == "output")
    if not _readers_ok(node, out_node.args[0]):
        return False
    keys = [k for k in VALUE_KEYS if k in node.meta] or ["val"]
    env: dict[fx.Node, Any] = dict(zip(placeholders, inputs))
    stack = node.meta.get("nn_module_stack")
    with gm.graph.inserting_before(node):
        for n in sub.graph.nodes:
            if n.op in ("placeholder", "output"):
                continue
            # named after the call (``<call>_<op>``): the same names in every graph of the call, with static
            # sizes or symbolic ones (the backend keys a graph's plan by its nodes' names)
            new = gm.graph.create_node("call_function", n.target, fx.map_arg(n.args, env.__getitem__),
                                       fx.map_arg(n.kwargs, env.__getitem__), name=f"{node.name}_{n.name}")
            for k in keys:
                new.meta[k] = n.meta.get("val")
            if stack is not None:
                new.meta["nn_module_stack"] = stack
            new.meta["inlined_from"] = node.name
            env[n] = new
    result = out_node.args[0]
    if isinstance(result, fx.Node):
        node.replace_all_uses_with(env[result])
    else:
        for u in list(node.users):
            piece = result[u.args[1]]
            if piece is None:
                if u.users:
                    return False  # (cannot happen in a graph that ran: a None read as a value)
                gm.graph.erase_node(u)
            else:
                u.replace_all_uses_with(env[piece])
                gm.graph.erase_node(u)
    gm.graph.erase_node(node)
    for n in reversed([env[n] for n in sub.graph.nodes if n in env and n.op != "placeholder"]):
        if not n.users and not n.is_impure():
            gm.graph.erase_node(n)  # what the call computed and did not return (``alias``, unused pieces)
    return True


@declare("inline_functions")
def inline_functions(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Calls with no rule that are made of ops with rules become those ops (module docstring)."""
    done: list[str] = []
    for node in list(gm.graph.nodes):
        if not _candidate(node):
            continue
        traced = _trace(node)
        if traced is None or not _inlinable(traced[0]):
            continue
        name = getattr(node.target, "__name__", str(node.target))
        if _splice(gm, node, *traced):
            done.append(name)
    if done:
        log.info("inline_functions: %d call(s) with no rule replaced by the ops they run: %s", len(done),
                 ", ".join(sorted(set(done))))
    return PassResult(bool(done), f"{len(done)} calls inlined")
