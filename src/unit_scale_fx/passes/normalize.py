"""normalize: one out-of-place form for in-place ops, and picklable targets.

``x.add_(y)``, ``operator.iadd``, ``F.relu(x, inplace=True)`` and aten's
``add_.Tensor`` on intermediate values (export graphs) become their out-of-place
forms; later readers of the mutated tensor read the new value.

A write through a view (``h.narrow(1, 0, 1).mul_(0)``, ``h[:, 0] = 0``,
``h[:, :2].masked_fill_(m, 0)``, ``index_put_`` on a slice) changes the tensor the
view was taken from. It becomes one ``write_through_view(h, views, op)`` node
(``rules/inplace.py``): the new value of ``h``, and of the written view. Every later
reader of ``h``, of the written view, or of any other view of ``h`` taken before
the write, reads the new value (views are taken again from the new ``h``).
Writes into buffers and inputs that are not through a view keep today's rules.

Targets that do not pickle (``F.max_pool2d`` is a ``boolean_dispatch`` closure) are
replaced by the function they dispatch to.
"""

from __future__ import annotations

import functools
import inspect
import logging
import operator
import pickle
from typing import Any, Optional

import torch
import torch.fx as fx

from ..errors import UnitScaleError
from ..rules.inplace import op_name, write_through_view
from .base import PassContext, PassResult, declare, meta_value

log = logging.getLogger(__name__)

_INPLACE_OPERATORS = {
    operator.iadd: operator.add,
    operator.isub: operator.sub,
    operator.imul: operator.mul,
    operator.itruediv: operator.truediv,
}


def _out_of_place_method(name: str) -> str | None:
    if not name.endswith("_") or name.startswith("_"):
        return None
    base = name[:-1]
    inplace, outplace = getattr(torch.Tensor, name, None), getattr(torch.Tensor, base, None)
    if inplace is None or outplace is None or not callable(outplace):
        return None
    return base


def _out_of_place_overload(target: object) -> object | None:
    """``aten.add_.Tensor`` -> ``aten.add.Tensor`` (same overload of the out-of-place op)."""
    if not isinstance(target, torch._ops.OpOverload):
        return None
    name = target.overloadpacket.__name__
    if not name.endswith("_") or name.startswith("_"):
        return None
    packet = getattr(torch.ops.aten, name[:-1], None)
    return getattr(packet, target._overloadname, None) if packet is not None else None


_VIEW_METHODS = frozenset({
    "view", "view_as", "reshape", "reshape_as", "transpose", "permute", "contiguous", "flatten", "unflatten",
    "unsqueeze", "squeeze", "expand", "expand_as", "t", "narrow", "select", "movedim", "moveaxis", "swapaxes",
    "swapdims", "diagonal", "unfold", "as_strided", "split", "chunk", "unbind", "tensor_split", "__getitem__",
})
_VIEW_FUNCTIONS = {
    operator.getitem, torch.reshape, torch.transpose, torch.permute, torch.flatten, torch.unflatten,
    torch.unsqueeze, torch.squeeze, torch.narrow, torch.select, torch.movedim, torch.moveaxis, torch.swapaxes,
    torch.swapdims, torch.t, torch.diagonal, torch.split, torch.chunk, torch.unbind, torch.tensor_split,
    torch.as_strided,
}


def _is_view(node: fx.Node) -> bool:
    """Does ``node`` return (a tuple of) views of its first argument?"""
    if not node.args or not isinstance(node.args[0], fx.Node):
        return False
    if node.op == "call_method":
        return str(node.target) in _VIEW_METHODS
    if node.op != "call_function":
        return False
    if isinstance(node.target, torch._ops.OpOverload):
        return bool(getattr(node.target, "is_view", False))
    if node.target is operator.getitem:  # of a tensor, or of the tuple a view op returned (split, chunk)
        parent = node.args[0]
        val = meta_value(parent)
        if parent.op == "call_function" and parent.target is write_through_view:
            return False  # the new value of a written tensor: a tensor of its own
        if isinstance(val, (tuple, list)) or parent.op == "call_module":
            return _is_view(parent)
        return True
    try:
        return node.target in _VIEW_FUNCTIONS
    except TypeError:
        return False


def _step(node: fx.Node) -> tuple:
    """``node``'s op without its first argument, as data (see ``rules/inplace.py``)."""
    if node.op == "call_method":
        return ("method", str(node.target), tuple(node.args[1:]), dict(node.kwargs))
    return ("function", op_name(node.target), tuple(node.args[1:]), dict(node.kwargs))


def _line(node: fx.Node) -> str:
    trace = node.meta.get("stack_trace")
    if trace:
        lines = [ln.strip() for ln in str(trace).strip().splitlines() if ln.strip()]
        return " / ".join(lines[-2:])
    return node.format_node()


def _inplace_form(node: fx.Node) -> Optional[tuple[Any, Any]]:
    """``(out-of-place form, mutated argument)`` of an in-place op, or None.

    The out-of-place form is ``("method", name)``, ``("target", fn)``, ``("kwargs", kwargs)`` or ``("args", args)``;
    ``operator.setitem`` has none (``("setitem", None)``).
    """
    if node.op == "call_method":
        base = _out_of_place_method(str(node.target))
        return (("method", base), node.args[0]) if base is not None and node.args else None
    if node.op != "call_function":
        return None
    if node.target is operator.setitem and node.args and isinstance(node.args[0], fx.Node):
        return ("setitem", None), node.args[0]
    if node.target in _INPLACE_OPERATORS:
        return ("target", _INPLACE_OPERATORS[node.target]), node.args[0]
    overload = _out_of_place_overload(node.target)
    if overload is not None and node.args and isinstance(node.args[0], fx.Node):
        return ("target", overload), node.args[0]
    if node.kwargs.get("inplace") is True and node.args:
        return ("kwargs", {**node.kwargs, "inplace": False}), node.args[0]
    pos = _inplace_position(node.target)
    if pos is not None and len(node.args) > pos and node.args[pos] is True:  # ``F.hardswish(x, True)`` (dynamo)
        return ("args", (*node.args[:pos], False, *node.args[pos + 1:])), node.args[0]
    return None


@functools.lru_cache(maxsize=None)
def _inplace_position(target: Any) -> Optional[int]:
    """Where a function such as ``F.relu(input, inplace=False)`` takes ``inplace`` positionally, or None."""
    try:
        names = list(inspect.signature(target).parameters)
    except (TypeError, ValueError):  # a builtin without a signature
        return None
    return names.index("inplace") if "inplace" in names[1:] else None


class _Functionalize:
    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.graph = gm.graph

    def order(self) -> dict[fx.Node, int]:
        return {n: i for i, n in enumerate(self.graph.nodes)}

    def chain(self, mutated: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
        """The tensor a view was taken from (walking up views), and the views from it down to ``mutated``."""
        views: list[fx.Node] = []
        node = mutated
        while _is_view(node):
            views.append(node)
            node = node.args[0]  # type: ignore[assignment]
        return node, views[::-1]

    def aliases(self, root: fx.Node) -> list[fx.Node]:
        """Every view (of a view ...) of ``root`` in the graph, parents first."""
        out, todo = [], [root]
        while todo:
            n = todo.pop(0)
            for u in n.users:
                if _is_view(u) and u.args[0] is n and u not in out:
                    out.append(u)
                    todo.append(u)
        return out

    def read_later(self, root: fx.Node, node: fx.Node, views: list[fx.Node]) -> bool:
        """Is ``root``, or a view of it other than the written one, read after the in-place ``node``?"""
        order = self.order()
        after = order[node]
        chain = set(views) | {node}
        for a in [root, *self.aliases(root)]:
            if a is views[-1]:
                continue  # readers of the written view read the op's result
            if any(u not in chain and order.get(u, -1) > after for u in a.users):
                return True
        return False

    def redirect(self, root: fx.Node, new_root: fx.Node, anchor: fx.Node) -> None:
        """Readers of ``root`` after ``anchor`` read ``new_root``; readers of earlier views of ``root`` read new views.

        The new views (copies of the old ones, taken from ``new_root``) go right after ``anchor``.
        """
        order = self.order()
        after = order[anchor]
        remade: dict[fx.Node, fx.Node] = {root: new_root}
        cursor = [anchor]

        def remake(a: fx.Node) -> fx.Node:
            if a not in remade:
                parent = remake(a.args[0])  # type: ignore[arg-type]
                with self.graph.inserting_after(cursor[0]):
                    new = self.graph.node_copy(a, lambda x: parent if x is a.args[0] else x)
                cursor[0] = remade[a] = new
            return remade[a]

        for u in list(root.users):
            if u is not new_root and order.get(u, -1) > after:
                u.replace_input_with(root, new_root)
        for a in self.aliases(root):
            if order.get(a, after + 1) > after:
                continue  # taken after the write: reads new_root already
            for u in list(a.users):
                if order.get(u, -1) > after:
                    u.replace_input_with(a, remake(a))

    def through_view(self, node: fx.Node, root: fx.Node, views: list[fx.Node]) -> None:
        """Replace the in-place ``node`` (writing through ``views`` of ``root``) by ``write_through_view``."""
        with self.graph.inserting_before(node):
            write = self.graph.call_function(write_through_view, (root, tuple(_step(v) for v in views), _step(node)))
            new_root = self.graph.call_function(operator.getitem, (write, 0))
            written = self.graph.call_function(operator.getitem, (write, 1))
        for key in ("stack_trace", "nn_module_stack"):
            if key in node.meta:
                for n in (write, new_root, written):
                    n.meta[key] = node.meta[key]
        order = self.order()
        for u in list(node.users):  # the in-place op's result is the written view
            u.replace_input_with(node, written)
        if views:
            for u in list(views[-1].users):
                if u is not node and order.get(u, -1) > order[node]:
                    u.replace_input_with(views[-1], written)
        self.graph.erase_node(node)
        if not written.users:
            self.graph.erase_node(written)
            self.redirect(root, new_root, new_root)
        else:
            self.redirect(root, new_root, written)


@declare('normalize')
def normalize(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    changed = viewed = 0
    fz = _Functionalize(gm)
    for node in list(gm.graph.nodes):
        found = _inplace_form(node)
        if found is None:
            continue
        form, mutated = found
        if not isinstance(mutated, fx.Node):
            continue
        root, views = fz.chain(mutated)
        if views and form[0] != "setitem" and not fz.read_later(root, node, views):
            views = []  # nothing reads the base again: an out-of-place op on the view is the same (rules apply)
        if views:
            if root.op == "get_attr":
                continue  # a write into a buffer through a view: kept in place, the buffer keeps its update
            log.debug("normalize: %s writes through %d view(s) of %s", node.format_node(), len(views), root.name)
            fz.through_view(node, root, views)
            viewed += 1
            continue
        if form[0] == "setitem":  # ``h[idx] = v``: h is the root, the index the view
            if mutated.op == "get_attr":
                continue
            fz.through_view(node, mutated, [])
            viewed += 1
            continue
        if form[0] == "target" and node.op == "call_function" and node.target not in _INPLACE_OPERATORS \
                and mutated.op in ("get_attr", "placeholder"):
            continue  # aten in-place ops on buffers and inputs keep their updates (export graphs)
        kind, value = form
        log.debug("normalize: %s -> out of place", node.format_node())
        if kind == "method":
            node.target = value
        elif kind == "target":
            node.target = value
        elif kind == "args":
            node.args = value
        else:
            node.kwargs = value
        fz.redirect(mutated, node, node)
        changed += 1
    changed_targets = _picklable_targets(gm)
    _check_picklable(gm)
    info = f"{changed} in-place ops made out-of-place"
    if viewed:
        info += f", {viewed} writes through views kept (write_through_view)"
    if changed_targets:
        info += f", {changed_targets} targets made picklable"
    return PassResult(changed + viewed + changed_targets > 0, info)


def _dispatch_target(node: fx.Node) -> Any:
    """The function a ``boolean_dispatch`` closure (``F.max_pool2d``) calls for this node's arguments."""
    from torch._jit_internal import boolean_dispatched

    info = boolean_dispatched.get(node.target)
    if info is None:
        return None
    name, index = info["arg_name"], info["index"]
    if name in node.kwargs:
        flag = node.kwargs[name]
    elif len(node.args) > index:
        flag = node.args[index]
    else:
        flag = info["default"]
    if not isinstance(flag, bool):
        return None
    return info["if_true"] if flag else info["if_false"]


def _picklable_targets(gm: fx.GraphModule) -> int:
    changed = 0
    for node in gm.graph.nodes:
        if node.op == "call_function":
            target = _dispatch_target(node)
            if target is not None:
                node.target = target
                changed += 1
    return changed


def _check_picklable(gm: fx.GraphModule) -> None:
    """Refuse, now, a call target that ``torch.save(module)`` could not store."""
    if gm.meta.get("capture") != "symbolic_trace":
        return  # export-captured modules refuse pickling with their own error; dynamo graphs are not pickled
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        try:
            pickle.dumps(node.target)
        except Exception as exc:  # a local closure or lambda
            raise UnitScaleError(
                f"the op {node.target!r} cannot be pickled ({type(exc).__name__}: {exc}), so torch.save(module) "
                "of the unit-scaled model would fail",
                where=_line(node),
                fix="call a module-level function (not a closure or lambda) in forward, or wrap the code that "
                "calls it in a module listed in UnitScaleConfig(leaf_modules=(...))") from exc
