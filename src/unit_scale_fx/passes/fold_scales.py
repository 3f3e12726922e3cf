"""fold_scales: fewer scale nodes, and no scaled copy that backward keeps twice.

Two exact rewrites, repeated until neither applies:

* **Merge.** An op's output scale ``scale(y, a1, b1)`` read only by the next op's input
  scale ``scale(., a2, b2)`` is the same as ``scale(y, a1 * a2, b1 * b2)``: the product of
  two linear maps, forward and backward.
* **Hoist through positively homogeneous ops.** For ``f`` with ``f(a x) = a f(x)`` when
  ``a > 0`` (relu, leaky relu, max and average pooling, dropout, views, reshapes,
  transposes), ``f``'s Jacobian at ``a x`` equals the one at ``x``, so
  ``scale(f(x), a, b)`` and ``f(scale(x, a, b))`` compute the same value and send the same
  gradient to ``x``. A scale below a chain of such ops moves above the chain when it
  merges there with the scale of the chain's producer (one elementwise kernel fewer), or
  when the chain contains an op that keeps its *output* for backward (relu): the scaled
  copy of relu's output that the next matmul would save is then relu's output itself, and
  backward keeps one tensor instead of two. relu, max-pooling and views of ``fl(a x)`` are
  bit-identical to ``fl(a f(x))``.

The merged node keeps the producer's output role and records the consumer's part under
``FOLDED`` (also on ops whose value now includes a moved scale), so reports can still show
each value and gradient as the readers of the original op see them. ``dump`` shows every
factor: they are the arguments of the remaining ``scale`` nodes.
"""

from __future__ import annotations

import copy
import math
import operator
from typing import Any, Collection, Optional, Sequence, Union

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.fx.graph import CodeGen, _PyTreeCodeGen

from ..rules.registry import aten, float_tensor_inputs, many, resolve_target, tensor_method
from ..layers import _BN_FORWARD, batch_norm_layer
from ..scale import (_pair, scale, scale_returned, scaled_add, scaled_attention, scaled_batch_norm, scaled_conv,
                     scaled_layer_norm, scaled_linear)
from ..record import FOLDED, INSERTED, META_KEY, SCALE_ROLE
from .base import PassContext, PassResult, declare

#: FOLDED, ``(a2, b2)``: the factors of a consumer's input scale folded into a node (or moved through it)
ROLE = SCALE_ROLE

_VIEW_METHODS = ("view", "reshape", "transpose", "permute", "flatten", "unflatten", "unsqueeze", "squeeze",
                 "contiguous", "t", "expand", "movedim", "swapaxes")
#: ops whose backward reads their output (a scaled copy of the output would be kept a second time)
SAVES_OUTPUT = frozenset(many([torch.relu, F.relu, tensor_method("relu"), aten("relu")]))
#: ops that return a new tensor which their backward does not read (it reads their inputs, or nothing): a
#: scale on that tensor, where one op alone reads it, may multiply it in place (no scaled copy)
FRESH_OUTPUT = frozenset(many(
    [F.gelu, aten("gelu"), F.silu, aten("silu"), tensor_method("silu"), F.mish, aten("mish"),
     F.hardswish, aten("hardswish"), operator.mul, torch.mul, tensor_method("mul"), aten("mul", "Tensor"),
     operator.add, torch.add, tensor_method("add"), aten("add", "Tensor")]))
#: ops positively homogeneous of degree 1 in their first argument (the only float tensor they read)
HOMOGENEOUS = SAVES_OUTPUT | frozenset(many(
    [F.leaky_relu, aten("leaky_relu"), tensor_method("leaky_relu"),
     F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
     # what normalize replaces the boolean_dispatch closures (F.max_pool2d, ...) with, without indices
     getattr(F, "_max_pool1d", None), getattr(F, "_max_pool2d", None), getattr(F, "_max_pool3d", None),
     getattr(F, "_adaptive_max_pool1d", None), getattr(F, "_adaptive_max_pool2d", None),
     getattr(F, "_adaptive_max_pool3d", None),
     F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
     aten("max_pool2d"), aten("avg_pool2d"), aten("adaptive_avg_pool2d"), aten("_adaptive_avg_pool2d"),
     F.dropout, torch.flatten, torch.reshape, torch.transpose, torch.permute, torch.unsqueeze, torch.squeeze,
     torch.t, torch.movedim, torch.swapaxes]
    + [tensor_method(m) for m in _VIEW_METHODS]
    + [aten(m) for m in ("view", "_unsafe_view", "reshape", "permute", "t", "expand", "unsqueeze", "squeeze",
                         "clone", "alias", "flatten")]
    + [aten("transpose", "int"), aten("squeeze", "dim")]
))


def _is_scale(n: object) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_function" and n.target is scale and bool(n.meta.get(INSERTED))


def _role(n: fx.Node) -> str:
    return (n.meta.get(ROLE) or ("",))[0]


def _compose(meta: dict, a: float, b: float) -> None:
    """Record that this node's value now carries ``a`` more and its gradient ``b`` less."""
    a0, b0 = meta.get(FOLDED, (1.0, 1.0))
    meta[FOLDED] = (float(a0) * a, float(b0) * b)


def _calls(n: fx.Node, table: frozenset) -> bool:
    """``n`` calls one of the ops in ``table`` (an unhashable target calls none)."""
    try:
        return resolve_target(n) in table
    except TypeError:
        return False


def _homogeneous(n: Any) -> bool:
    if not isinstance(n, fx.Node) or n.op not in ("call_function", "call_method") or n.meta.get(INSERTED):
        return False
    if not _calls(n, HOMOGENEOUS):
        return False
    x = n.args[0] if n.args else None
    return isinstance(x, fx.Node) and float_tensor_inputs(n) == [x] and len(n.users) == 1


def _merge(gm: fx.GraphModule, node: fx.Node) -> bool:
    """``scale(scale(y, a1, b1), a2, b2)`` with an output scale inside -> ``scale(y, a1 a2, b1 b2)``."""
    inner = node.args[0]
    if not _is_scale(inner) or len(inner.users) != 1 or FOLDED in inner.meta:
        return False
    if _role(inner) != "output" or _role(node) != "input":
        return False
    x, a1, b1 = inner.args
    _, a2, b2 = node.args
    node.args = (x, float(a1) * float(a2), float(b1) * float(b2))
    node.meta[ROLE] = inner.meta[ROLE]
    node.meta[FOLDED] = (float(a2), float(b2))
    gm.graph.erase_node(inner)
    return True


def _hoist(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Move ``node`` (a scale) above the chain of homogeneous ops that produces its input."""
    _, a, b = node.args
    a, b = float(a), float(b)
    if not a > 0:
        return False
    chain: list[fx.Node] = []
    top: Optional[fx.Node] = node.args[0]  # type: ignore[assignment]
    while _homogeneous(top):
        chain.append(top)  # type: ignore[arg-type]
        top = top.args[0]  # type: ignore[union-attr]
    if not chain:
        return False
    mergeable = _is_scale(top) and len(top.users) == 1 and _role(top) == "output"
    if not mergeable and not any(_calls(f, SAVES_OUTPUT) for f in chain):
        return False
    first = chain[-1]  # the op that reads ``top``
    own = _role(node) == "output" and node.meta[ROLE][1] == chain[0].name
    for f in chain:
        if f is chain[0] and own:
            # the op's value now includes its own output scale (as reports show it); only a
            # consumer's part folded into ``node`` is carried
            if FOLDED in node.meta:
                _compose(f.meta, *node.meta[FOLDED])
        else:
            _compose(f.meta, a, b)
    if mergeable:
        x, a1, b1 = top.args
        top.args = (x, float(a1) * a, float(b1) * b)
        _compose(top.meta, a, b)
    else:
        with gm.graph.inserting_before(first):
            new = gm.graph.call_function(scale, (top, a, b))
        new.meta.update({k: node.meta[k] for k in (INSERTED, "nn_module_stack") if k in node.meta})
        if "val" in top.meta:
            new.meta["val"] = top.meta["val"]
        new.meta[ROLE] = ("input", first.name)
        new.meta[FOLDED] = (a, b)
        first.replace_input_with(top, new)
    node.replace_all_uses_with(chain[0])
    gm.graph.erase_node(node)
    return True


#: linear layers whose scales run inside the op in the generated code (:func:`~unit_scale_fx.scale.scaled_linear`)
LINEARS = frozenset(many([F.linear, torch._C._nn.linear, aten("linear")]))


def _lone_scale(n: Any) -> bool:
    return _is_scale(n) and len(n.users) == 1


def _factors(n: fx.Node) -> tuple[float, float]:
    return float(n.args[1]), float(n.args[2])


def _output_scale(n: fx.Node) -> list[fx.Node]:
    """The output scales a fused op absorbs: the scale node that is ``n``'s only reader, the scale node
    that is that one's only reader, and so on (a value that an output scale and a consumer's input
    scale, which stayed apart, both multiply). Empty if there is none."""
    out: list[fx.Node] = []
    cur = n
    while True:
        users = list(cur.users)
        if not (len(users) == 1 and _is_scale(users[0]) and users[0].args[0] is cur):
            return out
        cur = users[0]
        out.append(cur)


def _out_factors(outs: list[fx.Node]) -> Any:
    """The ``out_scale`` argument of a fused op that absorbed the scale nodes ``outs``: one ``(fwd, bwd)``
    pair, or a tuple of pairs (their product; the generated code names each factor)."""
    pairs = tuple(_factors(o) for o in outs if _factors(o) != (1.0, 1.0))
    return pairs[0] if len(pairs) == 1 else (pairs or (1.0, 1.0))


def _in_place(s: fx.Node) -> bool:
    """The scale node ``s`` has a forward factor and may apply it in place: what it scales is a new tensor
    that ``s`` alone reads and that no backward reads (:data:`FRESH_OUTPUT`), not an output of the graph."""
    n = s.args[0]
    if _factors(s)[0] == 1.0 or not isinstance(n, fx.Node) or n.op not in ("call_function", "call_method") \
            or list(n.users) != [s]:
        return False
    # ``inplace=True`` (or positionally ``F.silu(x, True)``) and ``out=`` return a tensor that is not new
    if n.kwargs.get("inplace") or n.kwargs.get("out") is not None or any(a is True for a in n.args):
        return False
    return _calls(n, FRESH_OUTPUT)


def fuse_linears(graph: fx.Graph) -> int:
    """Replace each ``linear`` and the scale nodes around it by one ``scaled_linear`` call.

    Absorbed: input, weight and bias scales read only by the linear whose forward factor
    is 1 (their backward factors act inside the backward GEMMs; an input scale also through
    a chain of positively homogeneous ops such as views), and the output scale (its forward
    factor is the forward GEMM's ``alpha``). What each GEMM reads stays what the plan made
    unit. Forward and backward are unchanged. Used on a copy of the graph when code is
    generated (:class:`FusedCodeGen`, :class:`FusedPyTreeCodeGen`). An input with a forward
    factor that the linear alone reads and no backward reads (a GELU's output:
    :data:`FRESH_OUTPUT`) is scaled in place (``x_in_place``): no scaled copy is made.
    """
    fused = 0
    for n in list(graph.nodes):
        if n.op != "call_function" or n.target not in LINEARS or set(n.kwargs) - {"bias"}:
            continue
        x, w = n.args[0], n.args[1] if len(n.args) > 1 else None
        b = n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")
        if not isinstance(x, fx.Node) or not isinstance(w, fx.Node):
            continue
        absorbed: list[fx.Node] = []
        sx = sw = sb = so = (1.0, 1.0)
        chain, cur = [], x
        while _homogeneous(cur):
            chain.append(cur)
            cur = cur.args[0]
        # an input scale's forward factor is not the GEMM's alpha (the GEMM would read the unscaled
        # tensor, and matmul operands must stay unit: DESIGN.md, section 4.5): scaled_linear
        # multiplies the operand; its backward factor is the backward GEMM's alpha
        # (a forward factor other than 1 multiplies the operand inside the op, so only directly
        # below the linear: moved through the chain it would round differently)
        in_place = False
        if _lone_scale(cur) and (_factors(cur)[0] == 1.0 or not chain):
            sx, src = _factors(cur), cur.args[0]
            if chain:
                chain[-1].replace_input_with(cur, src)
            else:
                x = src
                in_place = _in_place(cur)
            absorbed.append(cur)
        if _lone_scale(w) and _factors(w)[0] == 1.0:
            sw, w = _factors(w), w.args[0]
            absorbed.append(n.args[1])
        if isinstance(b, fx.Node) and _lone_scale(b) and _factors(b)[0] == 1.0:
            absorbed.append(b)
            sb, b = _factors(b), b.args[0]
        out = _output_scale(n)
        if out:
            so = _out_factors(out)
        if (sx, sw, sb, so) == ((1.0, 1.0),) * 4:
            continue
        kwargs = {k: v for k, v in (("x_scale", sx), ("weight_scale", sw), ("bias_scale", sb), ("out_scale", so))
                  if v != (1.0, 1.0)}
        if in_place:
            kwargs["x_in_place"] = True
        with graph.inserting_before(n):
            new = graph.call_function(scaled_linear, (x, w, b), kwargs)
        _replace_fused(graph, n, new, out, absorbed)
        fused += 1
    return fused


def _replace_fused(graph: fx.Graph, n: fx.Node, new: fx.Node, out: list, absorbed: list) -> None:
    """``new`` (one fused op) takes the place of ``n``, its output scales ``out`` and the scales it absorbed."""
    new.meta.update(n.meta)
    if out:
        out[-1].replace_all_uses_with(new)
        for o in reversed(out):
            graph.erase_node(o)
    n.replace_all_uses_with(new)
    graph.erase_node(n)
    for a in absorbed:
        graph.erase_node(a)


CONVOLUTIONS = frozenset(many([torch.conv1d, torch.conv2d, torch.conv3d, F.conv1d, F.conv2d, F.conv3d]))
CONV_PARAMS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")


def _bound_call(n: fx.Node, targets: Any, params: Sequence[str]) -> Optional[dict]:
    """``n``'s arguments by parameter name when it calls one of ``targets`` with ``params`` only, else None."""
    if n.op != "call_function" or n.target not in targets:
        return None
    bound = dict(zip(params, n.args))
    if set(n.kwargs) - set(params) or set(bound) & set(n.kwargs):
        return None
    bound.update(n.kwargs)
    return bound


def _absorb_scales(n: fx.Node, bound: dict, unit_fwd_only: Union[bool, Collection[str]],
                   args: Sequence[tuple[str, str]] = (("x_scale", "input"), ("weight_scale", "weight"),
                                                      ("bias_scale", "bias"))) -> tuple[dict, list, list]:
    """The scales a fused op with ``input`` / ``weight`` / ``bias`` arguments takes in: the lone scales on
    those arguments (with ``unit_fwd_only``, only those whose forward factor is 1; a collection of argument
    names: on those arguments only), which ``bound`` then reads through, and ``n``'s output scale. Returns the
    fused op's ``*_scale`` keyword arguments (pairs other than ``(1, 1)``), the absorbed input scale nodes and
    the output scale node."""
    absorbed: list[fx.Node] = []
    kwargs: dict[str, Any] = {}
    for key, arg in args:
        a = bound.get(arg)
        unit = unit_fwd_only if isinstance(unit_fwd_only, bool) else arg in unit_fwd_only
        if _lone_scale(a) and (not unit or _factors(a)[0] == 1.0):
            kwargs[key] = _factors(a)
            bound[arg] = a.args[0]
            absorbed.append(a)
    out = _output_scale(n)
    if out:
        kwargs["out_scale"] = _out_factors(out)
    return {k: v for k, v in kwargs.items() if v != (1.0, 1.0)}, absorbed, out


def fuse_convs(graph: fx.Graph) -> int:
    """Replace each convolution and the scales around it by one ``scaled_conv`` call.

    Absorbed: the scales read only by the convolution on its input, weight and bias (the
    forward factor multiplies the operand inside the op, the backward factor the gradient
    the convolution's backward computes), and its output scale (in place on the output).
    An input that only the convolution reads and no backward reads (:data:`FRESH_OUTPUT`) is
    scaled in place (``x_in_place``), as in :func:`fuse_linears`.
    Convolutions with string padding keep their scales (and so, when it runs, does one with an
    unbatched input: :func:`~unit_scale_fx.scale.scaled_conv`). Nothing here reads ``meta``, so
    a copy of the module whose graph lost it generates the same code.
    """
    fused = 0
    for n in list(graph.nodes):
        bound = _bound_call(n, CONVOLUTIONS, CONV_PARAMS)
        if bound is None:
            continue
        if not isinstance(bound.get("weight"), fx.Node) or isinstance(bound.get("padding"), str):
            continue
        x = bound.get("input")
        in_place = _lone_scale(x) and _in_place(x)
        kwargs, absorbed, out = _absorb_scales(n, bound, unit_fwd_only=False)
        if not kwargs:
            continue
        if in_place:
            kwargs["x_in_place"] = True
        args = (bound["input"], bound["weight"], bound.get("bias"), bound.get("stride", 1), bound.get("padding", 0),
                bound.get("dilation", 1), bound.get("groups", 1))
        with graph.inserting_before(n):
            new = graph.call_function(scaled_conv, args, kwargs)
        _replace_fused(graph, n, new, out, absorbed)
        fused += 1
    return fused


ADDS = frozenset([operator.add, torch.add])


def fuse_adds(graph: fx.Graph) -> int:
    """Replace each ``a + b`` of two values and the scales around it (on either input, read only by
    the add, and on the output) by one ``scaled_add`` call. Where the values are not two tensors of
    one shape and dtype, ``scaled_add`` computes the chain of scales when it runs."""
    fused = 0
    for n in list(graph.nodes):
        if n.op != "call_function" or n.target not in ADDS or len(n.args) != 2 or n.kwargs:
            continue
        a, b = n.args
        if not isinstance(a, fx.Node) or not isinstance(b, fx.Node) or a is b:
            continue
        absorbed: list[fx.Node] = []
        kwargs: dict[str, Any] = {}
        args = [a, b]
        for i, key in enumerate(("a_scale", "b_scale")):
            if _lone_scale(args[i]) and args[i] is not args[1 - i]:
                kwargs[key] = _factors(args[i])
                absorbed.append(args[i])
                args[i] = args[i].args[0]
        out = _output_scale(n)
        if out:
            kwargs["out_scale"] = _out_factors(out)
        kwargs = {k: v for k, v in kwargs.items() if v != (1.0, 1.0)}
        if not kwargs:
            continue
        with graph.inserting_before(n):
            new = graph.call_function(scaled_add, tuple(args), kwargs)
        _replace_fused(graph, n, new, out, absorbed)
        fused += 1
    return fused


LAYER_NORMS = frozenset(many([F.layer_norm]))
_LN_PARAMS = ("input", "normalized_shape", "weight", "bias", "eps")


def fuse_layer_norms(graph: fx.Graph) -> int:
    """Replace each ``layer_norm`` and the scales around it by one ``scaled_layer_norm`` call.

    Absorbed: input, weight and bias scales whose forward factor is 1 (only their backward
    factor acts), and the output scale.
    """
    fused = 0
    for n in list(graph.nodes):
        bound = _bound_call(n, LAYER_NORMS, _LN_PARAMS)
        if bound is None:
            continue
        kwargs, absorbed, out = _absorb_scales(n, bound, unit_fwd_only=True)
        if not kwargs:
            continue
        args = (bound["input"], bound["normalized_shape"], bound.get("weight"), bound.get("bias"),
                bound.get("eps", 1e-5))
        with graph.inserting_before(n):
            new = graph.call_function(scaled_layer_norm, args, kwargs)
        _replace_fused(graph, n, new, out, absorbed)
        fused += 1
    return fused


ATTENTIONS = frozenset(many([F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention,
                             aten("scaled_dot_product_attention")]))


#: a query whose planned RMS lies outside this band reaches the attention kernel made unit (``q_unit``)
QUERY_BAND = (0.5, 2.0)


def _planned_rms(n: Any) -> Optional[float]:
    """The planned RMS of the value ``n`` (its record's prediction times the scale nodes on top of it)."""
    factor = 1.0
    while _is_scale(n):
        factor *= float(n.args[1])
        n = n.args[0]
    rec = n.meta.get(META_KEY) if isinstance(n, fx.Node) else None
    r = getattr(rec, "fwd_rms", None)
    return r * factor if isinstance(r, float) and r > 0 and math.isfinite(r) else None


def fuse_attention(graph: fx.Graph) -> int:
    """Replace each ``scaled_dot_product_attention`` and the scales around it by one ``scaled_attention``.

    Absorbed: query, key and value scales whose forward factor is 1, and the output scale.
    In eager autograd, backward then keeps the scaled output only (attention saves its output).
    """
    fused = 0
    for n in list(graph.nodes):
        if n.op != "call_function" or n.target not in ATTENTIONS or len(n.args) < 3:
            continue
        if {"q_scale", "k_scale", "v_scale", "out_scale"} & set(n.kwargs):
            continue
        bound = dict(zip("qkv", n.args[:3]))
        scales, absorbed, out = _absorb_scales(n, bound, unit_fwd_only=True,
                                               args=(("q_scale", "q"), ("k_scale", "k"), ("v_scale", "v")))
        args = [bound["q"], bound["k"], bound["v"], *n.args[3:]]
        kwargs: dict[str, Any] = {**n.kwargs, **scales}
        rq = _planned_rms(n.args[0])
        if rq is not None and not QUERY_BAND[0] <= rq <= QUERY_BAND[1]:
            kwargs["q_unit"] = 1.0 / rq  # a query the model scaled itself: unit for the kernel, same logits
        if not absorbed and not out and "q_unit" not in kwargs:
            continue
        with graph.inserting_before(n):
            new = graph.call_function(scaled_attention, tuple(args), kwargs)
        _replace_fused(graph, n, new, out, absorbed)
        fused += 1
    return fused


def _batch_norm_layer(n: fx.Node, root: Optional[torch.nn.Module]) -> Optional[tuple[str, Any, dict]]:
    """A call of a batch-norm layer whose ``forward`` is PyTorch's ``_BatchNorm.forward``: as a module call, or
    as the tracer writes it (``batch_norm_layer(bn, x, bn.weight, bn.bias)``, ``bn`` a ``get_attr``). Returns
    the layer's qualified name, the layer and the call's tensor arguments by name; None for any other node."""
    if n.op == "call_function" and n.target is batch_norm_layer and len(n.args) == 4 and not n.kwargs:
        bn = n.args[0]
        if not (isinstance(bn, fx.Node) and bn.op == "get_attr"):
            return None
        target, bound = str(bn.target), {"input": n.args[1], "weight": n.args[2], "bias": n.args[3]}
    elif n.op == "call_module" and len(n.args) == 1 and not n.kwargs:
        target, bound = str(n.target), {"input": n.args[0]}
    else:
        return None
    try:
        mod = root.get_submodule(target) if root is not None else None
    except AttributeError:
        return None
    return (target, mod, bound) if mod is not None and type(mod).forward is _BN_FORWARD else None


def _own_parameter(root: torch.nn.Module, layer: torch.nn.Module, attr: str, arg: Any) -> bool:
    """``arg`` is the ``get_attr`` of ``layer``'s own ``attr`` parameter (None where it has none)."""
    p = layer._parameters.get(attr)
    if p is None or not (isinstance(arg, fx.Node) and arg.op == "get_attr"):
        return p is None and arg is None
    try:
        return root.get_parameter(str(arg.target)) is p
    except AttributeError:
        return False


def fuse_batch_norms(graph: fx.Graph) -> int:
    """Replace each call of a batch-norm layer (a module whose ``forward`` is PyTorch's ``_BatchNorm.forward``)
    and the scales around it by one ``scaled_batch_norm`` call.

    Absorbed: the scale read only by the layer on its input (the convolution's output scale, which
    then costs no multiply: :class:`~unit_scale_fx.scale._ScaledBatchNormFn`), its output scales, and
    backward-only scales on its gain and bias (their gradients' factors). A call whose gain or bias is not,
    after those scales, the layer's own parameter is left as it is.
    """
    root = graph.owning_module
    fused = 0
    for n in list(graph.nodes):
        found = _batch_norm_layer(n, root)
        if found is None:
            continue
        name, layer, bound = found
        # the gain's and bias's scales (batch_norm_layer(bn, x, weight, bias)) only where backward-only
        kwargs, absorbed, out = _absorb_scales(n, bound, unit_fwd_only=("weight", "bias"))
        if "x_scale" in kwargs and not _pair(kwargs["x_scale"])[0] > 0:
            continue
        if "weight" in bound and not all(_own_parameter(root, layer, k, bound[k]) for k in ("weight", "bias")):
            continue
        if not kwargs:
            continue
        with graph.inserting_before(n):
            mod = n.args[0] if n.op == "call_function" else graph.get_attr(name)
            new = graph.call_function(scaled_batch_norm, (mod, bound["input"]), kwargs)
        read = [a for a in [*n.args[2:], *(s.args[0] for s in absorbed)] if isinstance(a, fx.Node)]
        _replace_fused(graph, n, new, out, absorbed)
        for a in read:  # the gain and bias: scaled_batch_norm reads its layer's own
            if a.op == "get_attr" and not a.users:
                graph.erase_node(a)
        fused += 1
    return fused


#: fused ops and their inputs that carry a scale (argument position: keyword)
_IN_SLOTS = {scaled_linear: {0: "x_scale"}, scaled_layer_norm: {0: "x_scale"}, scaled_batch_norm: {1: "x_scale"},
             scaled_conv: {0: "x_scale"}, scaled_add: {0: "a_scale", 1: "b_scale"}}
#: fused ops whose ``out_scale`` backward factor multiplies the incoming gradient and nothing else
_OUT_OPS = (scaled_linear, scaled_layer_norm, scaled_batch_norm, scaled_conv, scaled_attention)


def _free_in(n: fx.Node, key: str) -> bool:
    """A backward factor on the fused op ``n``'s input ``key`` costs no pass over a tensor (a GEMM's
    ``alpha``, a norm's gain in backward)."""
    if n.target is scaled_batch_norm:
        return True
    if n.target is scaled_layer_norm:  # only a layer norm without input forward factors runs as one op
        return all(_pair(n.kwargs.get(k, (1.0, 1.0)))[0] == 1.0 for k in ("x_scale", "weight_scale", "bias_scale"))
    return n.target is scaled_linear and key == "x_scale"


def _free_out(n: fx.Node) -> bool:
    """A backward factor on the fused op ``n``'s output costs no pass over a tensor (a norm's gain)."""
    return n.target is scaled_batch_norm or (n.target is scaled_layer_norm and _free_in(n, "x_scale"))


def _homogeneous_of(n: fx.Node, x: fx.Node) -> bool:
    """``n`` is a positively homogeneous op of ``x`` alone (views, relu, pooling). Reads no ``meta``: the
    other arguments of these ops are shapes, dimensions and flags, so a copy whose graph lost its meta
    (pickled) generates the same code."""
    if n.op not in ("call_function", "call_method") or n.meta.get(INSERTED) or not n.args or n.args[0] is not x:
        return False
    return _calls(n, HOMOGENEOUS) and x not in n.args[1:] and x not in n.kwargs.values()


def _reader(p: fx.Node) -> Optional[tuple[fx.Node, str, bool]]:
    """The fused op that alone reads ``p``'s value, directly or through positively homogeneous ops with one
    reader each (views, relu, pooling): ``(op, keyword of its input scale, directly)``."""
    cur, direct = p, True
    while True:
        users = list(cur.users)
        if len(users) != 1:
            return None
        u = users[0]
        if not _homogeneous_of(u, cur):
            break
        cur, direct = u, False
    key = _slot_of(u, cur)
    return None if key is None else (u, key, direct)


def _with(n: fx.Node, key: str, pairs: list) -> None:
    """Set ``n``'s ``key`` scale argument to the product of ``pairs`` (each factor kept in the code)."""
    pairs = [tuple(q) for q in pairs if tuple(q) != (1.0, 1.0)]
    kwargs = {k: v for k, v in n.kwargs.items() if k != key}
    if pairs:
        kwargs[key] = pairs[0] if len(pairs) == 1 else tuple(pairs)
    n.kwargs = kwargs


def _pairs(n: fx.Node, key: str) -> list:
    v = n.kwargs.get(key, (1.0, 1.0))
    return list(v) if v and isinstance(v[0], tuple) else [v]


def _slot_of(u: fx.Node, v: fx.Node) -> Optional[str]:
    """The keyword of the input scale with which the fused op ``u`` reads ``v`` (once, by position), or None."""
    slots = _IN_SLOTS.get(u.target) if u.op == "call_function" else None
    pos = [i for i, a in enumerate(u.args) if a is v]
    if not slots or len(pos) != 1 or pos[0] not in slots or v in u.kwargs.values():
        return None
    return slots[pos[0]]


def _absorber(v: fx.Node) -> Optional[tuple[fx.Node, list[str]]]:
    """Where a backward factor on all of ``v``'s gradient costs no pass over a tensor: the fused op that
    produces ``v``, directly or through positively homogeneous ops with one reader each, if its output
    factor is free (a norm's gain), or a residual add whose inputs are each produced by such an op for it
    alone (its inputs' factors then move into them): ``(op, keywords to take the factor)``."""
    p = v
    while _homogeneous_of_input(p):
        p = p.args[0]
    if p.op != "call_function":
        return None
    if _free_out(p):
        return p, ["out_scale"]
    if p.target is scaled_add and "out_scale" not in p.kwargs:
        ins = p.args[:2]
        if all(isinstance(a, fx.Node) and len(a.users) == 1 and a.op == "call_function" and _free_out(a)
               for a in ins) and ins[0] is not ins[1]:
            return p, ["a_scale", "b_scale"]
    return None


def _homogeneous_of_input(n: fx.Node) -> bool:
    """``n`` is a positively homogeneous op of its first argument, which ``n`` alone reads."""
    x = n.args[0] if n.args else None
    return isinstance(x, fx.Node) and len(x.users) == 1 and _homogeneous_of(n, x)


def factor_shared_grads(graph: fx.Graph) -> int:
    """A residual add's backward factor on an input that other fused ops read too (a skip that also feeds
    a convolution) is a pass over the gradient. The gradient of that input is the sum of what each reader
    sends back, each times its factor: the add's factor ``k`` is taken out of the sum, into the op that
    produces the input where that costs nothing (:func:`_absorber`), and every other reader's factor is
    divided by ``k`` (a GEMM's ``alpha``, or a convolution's weight in backward). Exact in real
    arithmetic. Returns the number of moves."""
    moves = 0
    for c in list(graph.nodes):
        if c.op != "call_function" or c.target is not scaled_add:
            continue
        for i, key in enumerate(("a_scale", "b_scale")):
            v = c.args[i] if i < len(c.args) else None
            (fc, k) = _pair(tuple(_pairs(c, key)))
            if not isinstance(v, fx.Node) or k == 1.0 or not k > 0 or len(v.users) < 2 or c.args.count(v) != 1:
                continue
            others = [u for u in v.users if u is not c]
            keys = [_slot_of(u, v) for u in others]
            if any(kk is None for kk in keys):
                continue
            where = _absorber(v)
            if where is None:
                continue
            p, pkeys = where
            moved = [g for _, g in _pairs(c, key) if g != 1.0]  # each factor kept in the code
            _with(c, key, [(f, 1.0) for f, _ in _pairs(c, key)])
            for u, kk in zip(others, keys):
                _with(u, kk, _pairs(u, kk) + [(1.0, 1.0 / g) for g in moved])
            for pk in pkeys:
                _with(p, pk, _pairs(p, pk) + [(1.0, g) for g in moved])
            moves += 1
    return moves


def place_grad_factors(graph: fx.Graph) -> int:
    """Move scale factors between fused ops to where they cost no pass over a tensor. Exact in real
    arithmetic: each op computes the same function, forward and backward.

    * A backward factor on the edge from a fused op's output to the fused op that alone reads it
      (directly or through views, relu, pooling) acts once on that edge's gradient, wherever it is
      applied: the operations between are linear in the gradient. Both factors move to the reader
      when its input factor is free (a GEMM's ``alpha``: the backward GEMMs of both ops read what they
      read before), else to the producer when its output factor is free (a norm's gain), else, where
      both cost a multiply, into one of them (the producer's).
    * A residual add's output factors are its inputs' factors (``scaled_add`` multiplies them), and an
      input's forward and backward factors move into a producer that alone reads it directly when that
      producer's output factors are free (a batch norm or layer norm: its gain and bias).
    * A residual add's backward factor on an input other fused ops read too moves to where it costs
      nothing (:func:`factor_shared_grads`).

    (And in ``scaled_linear``, an output's backward factor within ``NEAR_ONE`` of 1 is the backward
    GEMMs' ``alpha``.)

    Returns the number of moves.
    """
    moves = 0
    for n in list(graph.nodes):
        if n.op == "call_function" and n.target is scaled_add and "out_scale" in n.kwargs:
            out = _pairs(n, "out_scale")
            for key in ("a_scale", "b_scale"):
                _with(n, key, _pairs(n, key) + out)
            _with(n, "out_scale", [])
    moves += factor_shared_grads(graph)
    for p in list(graph.nodes):
        if p.op != "call_function" or p.target not in _OUT_OPS:
            continue
        r = _reader(p)
        if r is None:
            continue
        c, key, direct = r
        out, inp = _pairs(p, "out_scale"), _pairs(c, key)
        (fo, gp), (fc, gc) = _pair(tuple(out)), _pair(tuple(inp))
        if c.target is scaled_add and direct and _free_out(p) and (fc, gc) != (1.0, 1.0):
            _with(p, "out_scale", out + inp)  # forward and backward
            _with(c, key, [])
        elif gp == 1.0 and gc == 1.0:
            continue
        elif _free_in(c, key) and gp != 1.0:
            _with(p, "out_scale", [(f, 1.0) for f, _ in out])
            _with(c, key, inp + [(1.0, g) for _, g in out])
        elif _free_out(p) and gc != 1.0 or gp != 1.0 and gc != 1.0:
            _with(c, key, [(f, 1.0) for f, _ in inp])
            _with(p, "out_scale", out + [(1.0, g) for _, g in inp])
        else:
            continue
        moves += 1
    return moves


def fuse_ops(graph: fx.Graph) -> int:
    """Batch norms, linears, convolutions, layer norms, attention and adds fused with their scales
    (:func:`fuse_batch_norms`, :func:`fuse_linears`, :func:`fuse_convs`, :func:`fuse_layer_norms`,
    :func:`fuse_attention`, :func:`fuse_adds`), and their factors placed where they cost least
    (:func:`place_grad_factors`)."""
    fused = fuse_batch_norms(graph) + fuse_linears(graph) + fuse_convs(graph) + fuse_layer_norms(graph) \
        + fuse_attention(graph) + fuse_adds(graph)
    if fused:
        place_grad_factors(graph)
    return fused + copy_returned_views(graph)


#: ops whose result is a view of their first argument (what a caller's in-place write reaches through)
_VIEWS = frozenset(many(
    [operator.getitem, torch.reshape, torch.transpose, torch.permute, torch.flatten, torch.unflatten, torch.squeeze,
     torch.unsqueeze, torch.narrow, torch.select, torch.t, torch.movedim, torch.swapaxes, torch.split, torch.chunk,
     torch.unbind]
    + [tensor_method(m) for m in _VIEW_METHODS + ("view_as", "reshape_as", "expand_as", "narrow", "select",
                                                  "split", "chunk", "unbind", "__getitem__")]
    + [aten(m) for m in ("view", "_unsafe_view", "reshape", "permute", "t", "expand", "unsqueeze", "squeeze", "alias",
                         "flatten", "narrow", "unbind")]
    + [aten("transpose", "int"), aten("squeeze", "dim"), aten("select", "int"), aten("slice", "Tensor"),
       aten("split", "Tensor"), aten("unflatten", "int")]))


def copy_returned_views(graph: fx.Graph) -> int:
    """A backward-only ``scale`` whose result the graph returns, as it is or through views, becomes
    :func:`~unit_scale_fx.scale.scale_returned` (a copy): a caller may write into a returned tensor in place,
    which autograd forbids on the view a custom ``autograd.Function`` returns. The number changed."""
    out = next((n for n in reversed(graph.nodes) if n.op == "output"), None)
    if out is None:
        return 0
    changed = 0
    seen: set = set()
    for leaf in torch.utils._pytree.tree_leaves(out.args):
        n = leaf
        while isinstance(n, fx.Node) and n not in seen and n.op in ("call_function", "call_method") \
                and _calls(n, _VIEWS) and n.args and isinstance(n.args[0], fx.Node):
            seen.add(n)
            n = n.args[0]
        if isinstance(n, fx.Node) and n.op == "call_function" and n.target is scale and n not in seen:
            seen.add(n)
            fwd = n.args[1] if len(n.args) > 1 else n.kwargs.get("fwd")
            if fwd == 1.0:
                n.target = scale_returned
                changed += 1
    return changed


class _FusedMixin:
    """Generates a graph's code with linears, layer norms and attention fused with their scales (:func:`fuse_ops`).

    The graph itself keeps every ``scale`` node (what passes, reports, validity checks
    and ``dump`` read); only the code that runs computes each of these ops and its scales
    as one op. The rest is the graph's own code generator (the base class).
    """

    def _gen_python_code(self, nodes: Any, root_module: str, namespace: Any, **kwargs: Any) -> Any:
        graph = next(iter(nodes)).graph
        fused = fx.Graph(owning_module=graph.owning_module, tracer_cls=graph._tracer_cls)
        out, out_node = fused.graph_copy(graph, {}, return_output_node=True)
        new_out = fused.output(out, type_expr=out_node.type)
        new_out.meta = out_node.meta
        fuse_ops(fused)
        for node in fused.nodes:  # names from the namespace of this code, as Graph.python_code does
            node._repr_fn = lambda n: namespace.create_name(n.name, n)
        return super()._gen_python_code(fused.nodes, root_module, namespace, **kwargs)  # type: ignore[misc]


def fused_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` whose graph has the fused ops as nodes (:func:`fuse_ops`), for a compiler that
    traces the graph again (inductor through AOTAutograd regenerates the code and so would see every
    scale as a separate multiply: a GEMM's ``alpha``, for one, is free where a multiply after it is
    one more pass over memory). ``gm`` keeps its scale nodes."""
    graph = fx.Graph(owning_module=gm, tracer_cls=gm.graph._tracer_cls)
    out, out_node = graph.graph_copy(gm.graph, {}, return_output_node=True)
    new_out = graph.output(out, type_expr=out_node.type)
    new_out.meta = out_node.meta
    graph._codegen = copy.copy(gm.graph._codegen)
    if fuse_ops(graph) == 0:
        return gm
    graph.lint()
    return fx.GraphModule(gm, graph, class_name=type(gm).__name__)


class FusedCodeGen(_FusedMixin, CodeGen):
    """:class:`torch.fx.graph.CodeGen` with fused ops."""


class FusedPyTreeCodeGen(_FusedMixin, _PyTreeCodeGen):
    """:class:`torch.fx.graph._PyTreeCodeGen` (graphs captured by ``torch.export``) with fused ops."""


def _fused_codegen(codegen: Any) -> Any:
    """The fusing version of a graph's code generator (the same one if it is unknown or fuses already)."""
    if isinstance(codegen, _FusedMixin):
        return codegen
    if type(codegen) is CodeGen:
        new: Any = FusedCodeGen()
    elif type(codegen) is _PyTreeCodeGen:
        new = FusedPyTreeCodeGen(codegen.pytree_info)
    else:
        return codegen
    new.__dict__.update(codegen.__dict__)
    return new


@declare('fold_scales')
def fold_scales(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    merged = hoisted = 0
    changed = True
    while changed:
        changed = False
        for node in list(gm.graph.nodes):
            if getattr(node, "_erased", False) or not _is_scale(node):
                continue
            if _merge(gm, node):
                merged += 1
                changed = True
            elif _hoist(gm, node):
                hoisted += 1
                changed = True
    gm.graph.set_codegen(_fused_codegen(gm.graph._codegen))
    info = f"{merged} scale pairs folded" + (f", {hoisted} scales moved up through homogeneous ops" if hoisted else "")
    return PassResult(merged + hoisted > 0, info)
