"""Gradient validity: are the unit-scaled gradients true gradients of the rewritten forward?

The rewrite inserts ``scale(x, fwd, bwd)`` nodes. Where ``fwd != bwd`` the
backward signal on that edge is rescaled on purpose; this is only allowed on cut
edges, so that every parameter still receives a *positive multiple* of the true
gradient of the function the rewritten forward computes.

:func:`true_gradient_copy` builds that reference: a copy of the graph in which
every ``scale(x, fwd, bwd)`` is replaced by ``scale(x, fwd, fwd)`` (an ordinary
multiplication, so autograd's gradient is the true one). It shares the
parameters of the original. :func:`gradient_cosines` compares, per parameter,
the unit-scaled gradient with the true one: a valid plan gives cosine 1 (up to
rounding) for every parameter.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Callable, Optional

import torch
import torch.fx as fx
import torch.nn as nn

from ..errors import UnitScaleError
from ..scale import scale
from ..tensor_stats import output_loss

LossFn = Callable[[Any], torch.Tensor]


def _graph_module(model: nn.Module) -> fx.GraphModule:
    inner = getattr(model, "module", model)  # DistributedDataParallel / DataParallel wrap ``.module``
    if "_us_state" in inner.__dict__ and not isinstance(inner, fx.GraphModule):
        # the user's class kept (api.UnitScaledModel): its planned graph takes the call's tensors in order
        inner = inner.us_module
    if not isinstance(inner, fx.GraphModule):
        raise UnitScaleError(
            f"expected a unit-scaled module (an fx.GraphModule), got {type(model).__name__}",
            where="gradient_cosines",
            fix="pass the module returned by unit_scale(...)",
        )
    return inner


def true_gradient_copy(us_model: nn.Module) -> fx.GraphModule:
    """A GraphModule computing the same forward, with every backward scale set to its forward scale.

    The copy shares parameters and buffers with ``us_model`` (nothing is
    cloned), so gradients of the copy are gradients with respect to the same
    tensors. ``us_model`` must already be planned (call it once first).
    """
    gm = _graph_module(us_model)
    graph = copy.deepcopy(gm.graph)
    for node in graph.nodes:
        if node.op == "call_function" and node.target is scale:
            args = list(node.args)
            kwargs = dict(node.kwargs)
            fwd = args[1] if len(args) > 1 else kwargs.get("fwd")
            if len(args) > 2:
                args[2] = fwd
            else:
                kwargs["bwd"] = fwd
            node.args, node.kwargs = tuple(args), kwargs
    ref = fx.GraphModule(gm, graph, f"{type(gm).__name__}TrueGrad")
    from ..api import copy_modes

    copy_modes(gm, ref)  # (the submodules are ``gm``'s own: a frozen batch norm stays in evaluation)
    return ref


def _default_loss(out: Any) -> torch.Tensor:
    """The model's loss as :func:`~unit_scale_fx.tensor_stats.loss_outputs` defines it: its scalar
    outputs, else a fixed random projection of every float output."""
    return output_loss(out, seed=1234, where="gradient_cosines")


def _grads(model: nn.Module, params: dict[str, torch.Tensor], inputs: tuple, loss_fn: LossFn,
           rng_state: torch.Tensor, kwargs: Optional[dict] = None) -> dict[str, Optional[torch.Tensor]]:
    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(rng_state)
        loss = loss_fn(model(*inputs, **(kwargs or {})))
    names = list(params)
    grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
    return dict(zip(names, grads))


#: A gradient whose norm is below this fraction of the largest parameter gradient's norm
#: is rounding noise (e.g. a bias followed by BatchNorm, whose true gradient is exactly zero).
VANISHING = 1e-5


def _norm(t: Optional[torch.Tensor]) -> float:
    return 0.0 if t is None else float(t.detach().double().norm())


def _cosine(a: Optional[torch.Tensor], b: Optional[torch.Tensor], max_a: float, max_b: float) -> float:
    na, nb = _norm(a), _norm(b)
    if not (math.isfinite(na) and math.isfinite(nb)):
        return float("nan")
    zero_a, zero_b = na <= VANISHING * max_a, nb <= VANISHING * max_b
    if zero_a and zero_b:
        return 1.0  # both vanish: the scaled gradient is (trivially) a multiple of the true one
    if na == 0.0 or nb == 0.0:
        return 0.0
    # one gradient may be far below the run's largest (ConvNeXt's layer scale of 1e-6 makes the true
    # gradient of the layer scale 1e5 times its branch's): it counts if it is parallel to the other
    a64, b64 = a.detach().double().flatten(), b.detach().double().flatten()  # type: ignore[union-attr]
    return float(a64 @ b64) / (na * nb)


def gradient_cosines(us_model: nn.Module, *inputs: Any, loss_fn: Optional[LossFn] = None,
                     kwargs: Optional[dict] = None) -> dict[str, float]:
    """Per-parameter cosine between the unit-scaled gradient and the true gradient of the rewritten forward.

    Runs one forward and backward of ``us_model(*inputs)`` and of its
    :func:`true_gradient_copy` (same RNG state, so dropout masks agree), and
    returns ``{parameter name: cosine}`` for every parameter that requires
    grad. A valid plan gives values > 0.999 everywhere. A gradient "vanishes"
    when its norm is below ``VANISHING`` times the largest parameter gradient
    norm of the same run (rounding noise, e.g. a bias before BatchNorm): a
    parameter whose two gradients both vanish counts as 1.0; otherwise the
    cosine of the two (0.0 when one is exactly zero).

    ``loss_fn`` maps the output to a scalar; by default the sum of the scalar outputs
    (the loss), else a fixed random projection of every float output
    (:func:`unit_scale_fx.analysis.all_outputs_loss` makes every output count). ``kwargs``: keyword
    inputs of the call. Gradients are computed
    with ``torch.autograd.grad``: ``.grad`` fields, parameters and buffers of
    ``us_model`` are left as they were (BatchNorm running stats are restored).
    """
    loss_fn = loss_fn or _default_loss
    inner = getattr(us_model, "module", us_model)  # DistributedDataParallel / DataParallel wrap ``.module``
    if "_us_state" in inner.__dict__ and not isinstance(inner, fx.GraphModule):
        gm, inputs, loss_fn = _class_kept_call(inner, inputs, kwargs or {}, loss_fn)
        kwargs = None
    else:
        gm = _graph_module(us_model)
    buffers = {k: v.detach().clone() for k, v in gm.named_buffers()}
    rng_state = torch.get_rng_state()
    try:
        if not getattr(gm, "us_planned", True):
            with torch.random.fork_rng(devices=[]):
                gm.replan(*inputs, **(kwargs or {}))  # what the first call would do
            _restore(gm, buffers)
        params = {n: p for n, p in gm.named_parameters() if p.requires_grad}
        if not params:
            return {}
        scaled = _grads(gm, params, inputs, loss_fn, rng_state, kwargs)
        _restore(gm, buffers)
        true = _grads(true_gradient_copy(gm), params, inputs, loss_fn, rng_state, kwargs)
    finally:
        _restore(gm, buffers)
        torch.set_rng_state(rng_state)
    max_s = max((_norm(g) for g in scaled.values() if math.isfinite(_norm(g))), default=0.0)
    max_t = max((_norm(g) for g in true.values() if math.isfinite(_norm(g))), default=0.0)
    return {n: _cosine(scaled[n], true[n], max_s, max_t) for n in params}


def class_kept_graph(model: nn.Module, inputs: tuple, kwargs: dict,
                     where: str) -> tuple[fx.GraphModule, tuple, Callable[[Any], Any]]:
    """For a model that kept its class (``api.UnitScaledModel``): the graph module that runs this call,
    its flat tensor inputs, and the function that rebuilds the model's own output from the graph's.

    The call's graph is captured (and planned, or given the plan's scales) as the model's own
    forward would do it; buffers the planning run changed (BatchNorm statistics) are put back.
    """
    from ..capture import rebuild_output

    state = model.__dict__["_us_state"]
    if state.backend is not None:
        raise UnitScaleError(
            f"{type(model).__name__} is unit-scaled through dynamo (torch.export could not capture it): its "
            "graphs are split at graph breaks, so there is no one graph to run", where=where,
            fix="use a model that torch.fx or torch.export captures as one graph (see docs/usage.md#capture)")
    buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
    try:
        with torch.random.fork_rng(devices=[]), torch.enable_grad():
            g, tensors = model._us_graph_for(tuple(inputs), dict(kwargs))
    finally:
        _restore(model, buffers)
    if g is None:  # export failed on this call and the model fell back to dynamo: raises above
        return class_kept_graph(model, inputs, kwargs, where)
    skeleton = g.skeleton
    return g.gm, tuple(tensors), lambda out: rebuild_output(skeleton, out)


def _class_kept_call(model: nn.Module, inputs: tuple, kwargs: dict,
                     loss_fn: LossFn) -> tuple[fx.GraphModule, tuple, LossFn]:
    gm, tensors, rebuild = class_kept_graph(model, inputs, kwargs, "gradient_cosines")
    return gm, tensors, lambda out: loss_fn(rebuild(out))


def _restore(gm: nn.Module, buffers: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for k, v in gm.named_buffers():
            if k in buffers:
                v.copy_(buffers[k])


def assert_valid_gradients(us_model: nn.Module, *inputs: Any, loss_fn: Optional[LossFn] = None,
                           min_cosine: float = 0.999, kwargs: Optional[dict] = None) -> dict[str, float]:
    """:func:`gradient_cosines`, raising ``AssertionError`` naming every parameter below ``min_cosine``."""
    cos = gradient_cosines(us_model, *inputs, loss_fn=loss_fn, kwargs=kwargs)
    bad = {k: v for k, v in cos.items() if not v > min_cosine}
    if bad:
        raise AssertionError(f"gradients not parallel to the true gradient (cosine <= {min_cosine}): {bad}")
    return cos
