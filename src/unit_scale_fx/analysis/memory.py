"""Exact memory counts: bytes saved for backward, and the peak of live tensor bytes.

* :func:`saved_tensor_bytes` runs a forward under
  :func:`torch.autograd.graph.saved_tensors_hooks` and adds up the distinct storages that
  autograd keeps for backward (a view saved twice, or a tensor and its view, count once;
  parameters count too, in both a model and its unit-scaled copy).
* :func:`peak_tensor_bytes` runs a function under a dispatch mode that sees every tensor an
  op creates and the moment its storage is freed, and reports the most bytes alive at once
  (above what was alive before). Counts are of tensor storages, so they do not depend on the
  allocator, the machine's load or other processes. A dispatch mode makes dynamo skip the
  frames it is active in, so measure eager code with it.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    st = t.untyped_storage()
    return st.data_ptr(), st.nbytes()


def saved_tensor_bytes(forward: Callable[[], Any]) -> tuple[int, Any]:
    """``(bytes, result)``: the distinct storages autograd saves while ``forward()`` runs.

    ``result`` (what ``forward`` returned) keeps the autograd graph alive; call
    ``backward`` on it or drop it.
    """
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "meta":
            ptr, n = _storage_key(t)
            if n:
                seen[ptr] = max(n, seen.get(ptr, 0))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = forward()
    return sum(seen.values()), result


def graph_saved_bytes(out: Any) -> int:
    """The distinct storages that the autograd graph behind ``out`` (a tensor, or a structure of tensors)
    holds for backward, read from its nodes without hooks: native nodes' saved variables
    (``grad_fn._saved_*``), custom Functions' ``saved_tensors`` and the tensors (and their graphs) they
    keep on their context. Unlike :func:`saved_tensor_bytes`,
    this sees what runs when no saved-tensor hook is active (the fused ops of a unit-scaled model then
    run as native autograd ops). Call it before backward frees what is saved. A saved tensor behind a
    saved-tensor hook is read through its unpack hook, which may make a new tensor (counted as well)."""
    from torch.utils._pytree import tree_leaves

    seen: dict[int, int] = {}
    todo = [t.grad_fn for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.grad_fn is not None]
    visited: set[int] = set()

    def add(v: Any) -> None:
        if isinstance(v, torch.Tensor):
            if v.device.type != "meta":
                ptr, n = _storage_key(v)
                if n:
                    seen[ptr] = max(n, seen.get(ptr, 0))
            if v.grad_fn is not None:  # a graph a custom Function keeps (its own backward runs it)
                todo.append(v.grad_fn)
        elif isinstance(v, (list, tuple)):
            for u in v:
                add(u)

    while todo:
        node = todo.pop()
        if node is None or id(node) in visited:
            continue
        visited.add(id(node))
        names = [k for k in dir(node) if k.startswith("_saved_")]
        if isinstance(node, torch.autograd.function.BackwardCFunction):
            names.append("saved_tensors")
            for v in vars(node).values():  # what a custom Function keeps on its context
                add(v)
        for k in names:
            try:
                add(getattr(node, k))
            except RuntimeError:  # already freed (after backward)
                pass
        todo.extend(f for f, _ in node.next_functions if f is not None)
    return sum(seen.values())


def _ptr(t: torch.Tensor) -> int:
    """The address of ``t``'s storage (0 where it has none to read: meta, fake, no storage)."""
    if t.device.type == "meta" or type(t).__name__ == "FakeTensor":
        return 0
    try:
        return t.untyped_storage().data_ptr()
    except Exception:
        return 0


class _LiveBytes(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def track(self, t: torch.Tensor) -> None:
        if t.device.type == "meta" or type(t).__name__ == "FakeTensor":
            return
        try:
            st = t.untyped_storage()
        except Exception:  # tensors without storage (sparse, nested, functional wrappers)
            return
        key = id(st)
        if key in self.live or st.nbytes() == 0:
            return
        self.live[key] = st.nbytes()
        self.current += st.nbytes()
        self.peak = max(self.peak, self.current)
        # storages keep their Python object while the C++ storage lives: this runs when it is freed
        weakref.finalize(st, self._free, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        out = func(*args, **(kwargs or {}))
        # an output on an input's storage (a view, ``detach``, an in-place op) allocated nothing: were it
        # counted, a parameter's detached alias would count the parameter as memory this call allocated
        inputs = {_ptr(t) for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and _ptr(t) not in inputs:
                self.track(t)
        return out


def peak_tensor_bytes(fn: Callable[[], Any]) -> tuple[int, Any]:
    """``(peak bytes, result)``: the most bytes of tensors created inside ``fn()`` alive at once.

    Counts every storage an op allocates while ``fn`` runs, forward and backward, until
    it is freed; tensors that existed before (parameters, inputs) are not counted.
    """
    mode = _LiveBytes()
    with mode:
        result = fn()
    return mode.peak, result
