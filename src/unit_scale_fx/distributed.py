"""Data-parallel training of unit-scaled models (DDP, FSDP2).

Which batch size do the scales use?
-----------------------------------
Two kinds of scale depend on the batch:

* a mean-reduced loss scales the gradient into its input by ``N`` (rows), e.g.
  cross-entropy by ``N * sqrt(V)``, so that the per-row gradient is unit;
* every parameter's gradient is a sum over all rows, scaled by ``rows ** -0.5``.

Each rank plans with the batch it sees (its *local* batch). The loss scale then
cancels the ``1 / N_local`` of the mean, so every row's gradient signal is the
same as in one process on the whole (global) batch. Each rank's parameter
gradient is a sum over its ``rows_local`` rows times ``rows_local ** -0.5``:
unit RMS, like any local tensor should be for low-precision training. What
differs is the reduction across ranks: DDP and FSDP *average* gradients, giving
``world_size ** -0.5`` times the gradient one process computes on the global
batch. The unit-scaled reduction is a *sum times* ``world_size ** -0.5``: the sum
of ``world_size`` independent unit-RMS gradients, rescaled to unit RMS. It equals
exactly what a single process planned for the global batch computes, so a
learning rate tuned on one device carries over to any number of ranks.

The exact factor per parameter is ``s_global / s_local``, the ratio of its
gradient factor planned for the global batch to the one planned for the local
batch; :func:`reduction_factors` reads it off the two plans. It is
``world_size ** -0.5`` wherever the plan counts every row a parameter's gradient
sums over.

* DDP: ``ddp.register_comm_hook(reduce_state(us, *local_batch), allreduce_hook)``
  (exact), or ``ddp.register_comm_hook(None, allreduce_hook)`` (uniform
  ``world_size ** -0.5``).
* FSDP2: after ``fully_shard(us)``, ``post = set_fsdp_unit_scaled_reduction(us,
  factors)`` and ``scale_gradients(us, post)`` after each backward (a no-op when
  the factors are uniform).

Adam-type optimisers are (up to ``eps``) invariant to a constant gradient
factor, so with them the plain average only changes the gradient's RMS. With
SGD it changes the effective learning rate by ``world_size ** -0.5``.

All ranks must also use the *same* scales: plan with the same local batch shape
on every rank (``unit_scale(model, example_inputs=local_batch)``), before
wrapping; :func:`check_plan_consistent` verifies it across ranks.
"""

# No ``from __future__ import annotations`` here: DDP checks the hook's
# annotations against the real ``dist.GradBucket`` / ``Future`` objects.
import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
import torch.fx as fx
import torch.nn as nn

from .errors import UnitScaleError
from .scale import scale


@dataclass
class ReduceState:
    """State of :func:`allreduce_hook`: per-parameter factors applied to the *sum* of the ranks' gradients.

    Build it with :func:`reduce_state`. ``factors[name] = s_global / s_local``,
    the ratio of the parameter's gradient factor planned for the global batch to
    the one planned for the local batch (``world_size ** -0.5`` for a parameter
    whose gradient factor goes as ``rows ** -0.5``).
    """

    factors: dict[str, float]
    names: dict[int, str]
    process_group: Optional[dist.ProcessGroup] = None
    _cache: dict = field(default_factory=dict, repr=False)

    def multiplier(self, bucket: dist.GradBucket) -> Union[float, torch.Tensor]:
        params = bucket.parameters()
        key = tuple(id(p) for p in params)
        if key not in self._cache:
            fs = [self.factors.get(self.names.get(id(p), ""), None) for p in params]
            if any(f is None for f in fs):
                raise UnitScaleError("a DDP bucket holds a parameter the reduce state does not know",
                                     where="allreduce_hook", fix="build reduce_state from the module DDP wraps")
            if len(set(fs)) == 1:
                self._cache[key] = float(fs[0])  # type: ignore[arg-type]
            else:
                buf = bucket.buffer()
                vec = torch.cat([torch.full((p.numel(),), f, dtype=buf.dtype, device=buf.device)
                                 for p, f in zip(params, fs)])
                if vec.numel() != buf.numel():
                    raise UnitScaleError("unexpected DDP bucket layout", where="allreduce_hook",
                                         fix="use a uniform reduction (state=None)")
                self._cache[key] = vec
        return self._cache[key]


def allreduce_hook(state: Any, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: the unit-scaled gradient reduction.

    ``ddp.register_comm_hook(state, allreduce_hook)`` where ``state`` is

    * ``None`` (or a process group): ``sum * world_size ** -0.5`` for every
      parameter; exact when every parameter's planned gradient factor goes as
      ``rows ** -0.5`` (check with :func:`batch_scaling_exponents`);
    * a :class:`ReduceState` from :func:`reduce_state`: per-parameter factors
      read off the plan, so that the result always equals one process planned
      for and run on the global batch.
    """
    if isinstance(state, ReduceState):
        group = state.process_group if state.process_group is not None else dist.group.WORLD
        mult: Union[float, torch.Tensor] = state.multiplier(bucket)
    else:
        group = state if state is not None else dist.group.WORLD
        mult = dist.get_world_size(group) ** -0.5
    buf = bucket.buffer()
    buf.mul_(mult)  # before the sum: keeps the reduced values near unit
    fut = dist.all_reduce(buf, group=group, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def _repeat(x: Any, times: int, dim: int) -> Any:
    if isinstance(x, torch.Tensor) and x.dim() > dim:
        return torch.cat([x] * times, dim=dim)
    return x


def reduction_factors(model: nn.Module, *local_inputs: Any, world_size: Optional[int] = None, batch_dim: int = 0,
                      **local_kwargs: Any) -> dict[str, float]:
    """``parameter name -> factor`` to apply to the sum over ranks of the local gradients.

    Plans the module for the global batch (``local_inputs`` repeated
    ``world_size`` times along ``batch_dim``), reads every parameter's gradient
    factor, and plans it back for the local batch (the plan is a function of
    shapes and of the weights as ``unit_scale`` returned them, so this is exact).
    """
    gm = _graph_module(model)
    world = world_size if world_size is not None else dist.get_world_size()
    names = [n for n, _ in gm.named_parameters()]
    if world == 1:
        return {n: 1.0 for n in names}
    glob_args = tuple(_repeat(a, world, batch_dim) for a in local_inputs)
    glob_kwargs = {k: _repeat(v, world, batch_dim) for k, v in local_kwargs.items()}
    gm.replan(*glob_args, **glob_kwargs)
    glob = param_grad_scales(gm)
    gm.replan(*local_inputs, **local_kwargs)
    local = param_grad_scales(gm)
    factors: dict[str, float] = {}
    for name in names:
        ratios = [g / l for l, g in zip(local.get(name, []), glob.get(name, []))] or [1.0]
        if max(ratios) - min(ratios) > 1e-9 * max(ratios):
            raise UnitScaleError(
                f"parameter {name} is used {len(ratios)} times with batch factors {ratios}: no single "
                "reduction factor makes data-parallel gradients equal one process on the global batch",
                where="reduction_factors", fix="use the uniform reduction (allreduce_hook with state=None)")
        factors[name] = ratios[0]
    return factors


def reduce_state(model: nn.Module, *local_inputs: Any, world_size: Optional[int] = None, batch_dim: int = 0,
                 process_group: Optional[dist.ProcessGroup] = None, **local_kwargs: Any) -> ReduceState:
    """The :class:`ReduceState` for ``ddp.register_comm_hook(state, allreduce_hook)``.

    ``model`` is the unit-scaled module (the one DDP wraps), ``local_inputs`` one
    local batch of the shape every rank uses.
    """
    gm = _graph_module(model)
    world = world_size if world_size is not None else dist.get_world_size(process_group)
    factors = reduction_factors(gm, *local_inputs, world_size=world, batch_dim=batch_dim, **local_kwargs)
    names = {id(p): n for n, p in gm.named_parameters()}
    return ReduceState(factors, names, process_group)


def set_fsdp_unit_scaled_reduction(model: nn.Module, factors: Optional[dict[str, float]] = None,
                                   force_sum: Optional[bool] = None) -> dict[str, float]:
    """Make an FSDP2 (``fully_shard``) module reduce gradients the unit-scaled way.

    FSDP2 applies one divide factor per module. With uniform ``factors`` (or
    none: ``world_size ** -0.5``) the reduction is ``sum * factor`` and this
    returns ``{}``. Otherwise FSDP2 sums, and the returned per-parameter factors
    must be applied after backward with :func:`scale_gradients`.

    FSDP2 implements a custom divide factor with NCCL's ``PREMUL_SUM``, which
    gloo (CPU) lacks; ``force_sum`` (default: on unless the backend is NCCL)
    makes it reduce with a plain SUM and divide afterwards, on every backend.
    """
    if not hasattr(model, "set_gradient_divide_factor"):
        raise UnitScaleError(f"{type(model).__name__} is not an FSDP2 module", where="set_fsdp_unit_scaled_reduction",
                             fix="call torch.distributed.fsdp.fully_shard(model) first")
    values = set((factors or {}).values()) or {dist.get_world_size() ** -0.5}
    uniform = len(values) == 1
    model.set_gradient_divide_factor(1.0 / values.pop() if uniform else 1.0)
    if force_sum is None:
        force_sum = dist.get_backend() != "nccl"
    model.set_force_sum_reduction_for_comms(force_sum)
    return {} if uniform else dict(factors or {})


def scale_gradients(model: nn.Module, factors: dict[str, float]) -> None:
    """Multiply each named parameter's ``.grad`` by its factor (see :func:`set_fsdp_unit_scaled_reduction`)."""
    if not factors:
        return
    with torch.no_grad():
        for name, p in _graph_module(model).named_parameters():
            if p.grad is not None and factors.get(name, 1.0) != 1.0:
                p.grad.mul_(factors[name])


def _graph_module(model: nn.Module) -> fx.GraphModule:
    inner = getattr(model, "module", model)
    if not isinstance(inner, fx.GraphModule):
        raise UnitScaleError(f"expected a unit-scaled module, got {type(model).__name__}",
                             where="unit_scale_fx.distributed", fix="pass the module unit_scale returned")
    return inner


def plan_fingerprint(model: nn.Module) -> str:
    """A short hash of every scale factor in the graph (equal plans give equal fingerprints)."""
    gm = _graph_module(model)
    items = [(n.name, *[repr(a) for a in n.args[1:]]) for n in gm.graph.nodes
             if n.op == "call_function" and n.target is scale]
    return hashlib.sha256(repr(items).encode()).hexdigest()[:16]


def check_plan_consistent(model: nn.Module, group: Optional[dist.ProcessGroup] = None) -> str:
    """Raise :class:`UnitScaleError` unless every rank of ``group`` has the same scales.

    Ranks that planned on different local batch shapes (e.g. an uneven first
    batch) would apply different scales and DDP would average inconsistent
    gradients. Returns the common fingerprint.
    """
    gm = _graph_module(model)
    if not getattr(gm, "us_planned", True):
        raise UnitScaleError("the scales are not planned yet", where="check_plan_consistent",
                             fix="pass example_inputs to unit_scale (the same local batch shape on every rank)")
    mine = plan_fingerprint(gm)
    world = dist.get_world_size(group)
    prints: list = [None] * world
    dist.all_gather_object(prints, mine, group=group)
    if len(set(prints)) != 1:
        raise UnitScaleError(
            f"ranks planned different scales (fingerprints {prints})",
            where=f"rank {dist.get_rank(group)}",
            fix="plan every rank with the same local batch shape: unit_scale(model, example_inputs=...) "
            "before wrapping with DDP/FSDP, then never replan on one rank only",
        )
    return mine


def param_grad_scales(model: nn.Module) -> dict[str, list[float]]:
    """``parameter name -> backward factors`` the plan applies on each use of that parameter.

    Walking forward from the parameter through ops whose only floating-point
    input is that path (``scale`` nodes, embedding lookups, views), the backward
    factors of the ``scale`` nodes met multiply that parameter's gradient alone;
    the walk stops at the first op that mixes it with other tensors. A tied
    parameter has one entry per use. Useful to check how the plan depends on the
    batch size (see :func:`batch_scaling_exponents`).
    """
    from .rules.registry import float_tensor_inputs

    gm = _graph_module(model)
    params = {n for n, _ in gm.named_parameters(remove_duplicate=False)}
    out: dict[str, list[float]] = {}
    for node in gm.graph.nodes:
        if node.op != "get_attr" or str(node.target) not in params:
            continue
        factors = []
        frontier = [(u, node, 1.0) for u in node.users]
        while frontier:
            user, src, acc = frontier.pop()
            if user.op == "call_function" and user.target is scale:
                frontier.extend((u, user, acc * float(user.args[2])) for u in user.users)
            elif user.op != "output" and float_tensor_inputs(user) == [src] and user.users:
                frontier.extend((u, user, acc) for u in user.users)
            else:
                factors.append(acc)
        out.setdefault(str(node.target), []).extend(sorted(factors))
    return out


def batch_scaling_exponents(local: nn.Module, global_: nn.Module, world_size: int) -> dict[str, list[float]]:
    """How each parameter's gradient factor scales with the batch: ``log(s_global / s_local) / log(world_size)``.

    ``-0.5`` everywhere means every parameter gradient is scaled by
    ``rows ** -0.5``, the condition under which :func:`allreduce_hook` makes
    data-parallel training equal to one process on the global batch.
    """
    a, b = param_grad_scales(local), param_grad_scales(global_)
    return {k: [math.log(g / l) / math.log(world_size) for l, g in zip(a[k], b[k])] for k in a}
