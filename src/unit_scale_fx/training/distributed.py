"""Data-parallel training of unit-scaled models (DDP, FSDP2).

One plan for all ranks
----------------------
A plan is a fixed set of scale factors: it turns the model into one fixed
function. Planning reads the example batch (shapes, and the measured RMS of
activations and gradients), so ranks that plan on their own local batches get
slightly different factors and would run different functions. Plan once and
share the plan: :func:`sync_plan` sends rank ``src``'s plan to every rank;
:func:`check_plan_consistent` verifies that all ranks agree.

Which batch size do the scales use?
-----------------------------------
The plan is made for the *local* batch each rank runs, so every tensor a rank
computes (activations, gradients, each rank's weight gradient) is unit: that is
what low-precision formats need. Two kinds of factor depend on the batch: a
mean-reduced loss scales the gradient into its input by about ``N`` (rows),
e.g. cross-entropy by ``N * sqrt(V)``; and a parameter's gradient, a sum over
all rows, is scaled by about ``rows ** -0.5``.

* With DDP's default *mean* reduction, DDP with the shared plan computes exactly
  the gradient that one process with that plan computes on the combined batch
  (the loss is a mean over all rows either way). But the mean of ``world_size``
  independent unit gradients has RMS ``world_size ** -0.5``.
* :func:`allreduce_hook` reduces as ``sum * world_size ** -0.5`` instead: the
  reduced gradient is unit again, and equals ``sqrt(world_size)`` times the
  mean. That is (up to the measured, statistical part of the plan) what one
  process would get from a plan made for the global batch, whose parameter
  factors are ``sqrt(world_size)`` smaller and whose loss factor is
  ``world_size`` larger.

Adam-type optimisers are invariant (up to ``eps``) to a constant gradient
factor: with them both reductions train alike. With SGD the hook multiplies the
effective learning rate by ``sqrt(world_size)`` relative to the mean; choose one
and keep it when the number of ranks changes.

* DDP: ``ddp.register_comm_hook(None, allreduce_hook)``.
* FSDP2: ``set_fsdp_unit_scaled_reduction(model)`` after ``fully_shard(model)``.
"""

# No ``from __future__ import annotations`` here: DDP checks the hook's
# annotations against the real ``dist.GradBucket`` / ``Future`` objects.
import hashlib
import logging
from typing import Optional

import torch
import torch.distributed as dist
import torch.fx as fx
import torch.nn as nn

from ..errors import UnitScaleError
from ..scale import scale

log = logging.getLogger(__name__)


def allreduce_hook(process_group: Optional[dist.ProcessGroup],
                   bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: the unit-scaled gradient reduction ``sum * world_size ** -0.5``.

    Register with ``ddp.register_comm_hook(None, allreduce_hook)`` (or a process
    group as the state). See the module docstring for when to prefer it to the mean.
    """
    group = process_group if process_group is not None else dist.group.WORLD
    buf = bucket.buffer()
    buf.mul_(dist.get_world_size(group) ** -0.5)  # before the sum: keeps the reduced values near unit
    fut = dist.all_reduce(buf, group=group, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def set_fsdp_unit_scaled_reduction(model: nn.Module, force_sum: Optional[bool] = None) -> None:
    """Make an FSDP2 (``fully_shard``) module reduce gradients as ``sum * world_size ** -0.5``.

    FSDP2 implements a custom divide factor with NCCL's ``PREMUL_SUM``, which
    gloo (CPU) lacks; ``force_sum`` (default: on unless the backend is NCCL)
    makes it reduce with a plain SUM and divide afterwards, on every backend.
    """
    if not hasattr(model, "set_gradient_divide_factor"):
        raise UnitScaleError(f"{type(model).__name__} is not an FSDP2 module", where="set_fsdp_unit_scaled_reduction",
                             fix="call torch.distributed.fsdp.fully_shard(model) first")
    model.set_gradient_divide_factor(dist.get_world_size() ** 0.5)
    if force_sum is None:
        force_sum = dist.get_backend() != "nccl"
    model.set_force_sum_reduction_for_comms(force_sum)


def _graph_module(model: nn.Module) -> fx.GraphModule:
    inner = getattr(model, "module", model)  # DDP wraps ``.module``
    if not isinstance(inner, fx.GraphModule):
        raise UnitScaleError(f"expected a unit-scaled module, got {type(model).__name__}",
                             where="unit_scale_fx.training.distributed", fix="pass the module unit_scale returned")
    return inner


def _require_planned(gm: fx.GraphModule, where: str) -> None:
    if not getattr(gm, "us_planned", True):
        raise UnitScaleError("the scales are not planned yet", where=where,
                             fix="pass example_inputs=(local batch) to unit_scale before wrapping with DDP/FSDP")


def plan_fingerprint(model: nn.Module) -> str:
    """A short hash of every scale factor in the graph (equal plans give equal fingerprints)."""
    gm = _graph_module(model)
    items = [(n.name, *[repr(a) for a in n.args[1:]]) for n in gm.graph.nodes
             if n.op == "call_function" and n.target is scale]
    return hashlib.sha256(repr(items).encode()).hexdigest()[:16]


def sync_plan(model: nn.Module, src: int = 0, group: Optional[dist.ProcessGroup] = None) -> str:
    """Give every rank of ``group`` the plan of rank ``src``; returns the common fingerprint.

    Call it after planning (``unit_scale(model, example_inputs=local_batch)``)
    and before training. Only rank ``src`` needs to have planned. Weights are not
    touched (DDP broadcasts them when it wraps the model).
    """
    from ..api import _portable_graph

    gm = _graph_module(model)
    rank = dist.get_rank(group)
    if rank == src:
        _require_planned(gm, "sync_plan (source rank)")
    payload = [_portable_graph(gm.graph) if rank == src else None]
    dist.broadcast_object_list(payload, src=src, group=group)
    if rank != src:
        gm.graph = payload[0]  # binds the graph and regenerates forward
        gm.us_planned = True
    fp = plan_fingerprint(gm)
    log.info("sync_plan: rank %d uses the plan of rank %d (%s)", rank, src, fp)
    return fp


def check_plan_consistent(model: nn.Module, group: Optional[dist.ProcessGroup] = None) -> str:
    """Raise :class:`UnitScaleError` unless every rank of ``group`` has the same scales.

    Returns the common fingerprint.
    """
    gm = _graph_module(model)
    _require_planned(gm, "check_plan_consistent")
    mine = plan_fingerprint(gm)
    prints: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(prints, mine, group=group)
    if len(set(prints)) != 1:
        raise UnitScaleError(
            f"ranks use different scales (plan fingerprints {prints})",
            where=f"rank {dist.get_rank(group)}",
            fix="plan once and share it: unit_scale(model, example_inputs=local_batch) then "
            "unit_scale_fx.training.distributed.sync_plan(model) on every rank, before wrapping with DDP/FSDP",
        )
    return mine
