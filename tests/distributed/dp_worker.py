"""Worker for tests/distributed/test_data_parallel.py: 2 gloo ranks on CPU.

Usage: python dp_worker.py OUT_DIR
Each rank trains the same small unit-scaled GPT on its half of every batch under
several set-ups; rank 0 writes the results to OUT_DIR/<setup>.pt.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from unit_scale_fx import UnitScaleError, unit_scale
from unit_scale_fx.training.distributed import (allreduce_hook, check_plan_consistent, plan_fingerprint,
                                      set_fsdp_unit_scaled_reduction, sync_plan)

sys.path.insert(0, os.path.dirname(__file__))
from dp_common import LR, WORLD, batches, local, make_model, make_opt  # noqa: E402


def _train(model, rank, opt, named):
    losses, first_grads = [], None
    for batch in batches():
        opt.zero_grad()
        loss = model(*local(batch, rank))
        loss.backward()
        if first_grads is None:
            first_grads = {n: _full(p.grad) for n, p in named.named_parameters()}
        opt.step()
        losses.append(float(loss.detach()))
    return {"params": {n: _full(p) for n, p in named.named_parameters()}, "grads": first_grads, "losses": losses}


def _full(t):
    """A plain tensor (FSDP2 shards parameters and gradients as DTensors)."""
    t = t.detach()
    return t.full_tensor() if hasattr(t, "full_tensor") else t.clone()


def _planned(rank):
    us = unit_scale(make_model(), local(batches()[0], rank))  # in the group: every rank plans the global batch
    sync_plan(us)  # ... and sync_plan (for plans made before the group) changes nothing
    return us


def setup_unsynced(rank):
    us = unit_scale(make_model(), local(batches()[0], rank), plan_across_ranks=False)  # each its own batch
    prints = [None] * WORLD
    dist.all_gather_object(prints, plan_fingerprint(us))
    try:
        check_plan_consistent(us)
        raised = ""
    except UnitScaleError as exc:
        raised = str(exc)
    return {"fingerprints": prints, "raised": raised}


def setup_ddp(rank, hook, opt_name):
    us = _planned(rank)
    ddp = DDP(us)
    if hook:
        ddp.register_comm_hook(None, allreduce_hook)
    res = _train(ddp, rank, make_opt(ddp.parameters(), opt_name, LR), us)
    res["fingerprint"] = check_plan_consistent(ddp)
    return res


def setup_fsdp2(rank):
    from torch.distributed.fsdp import fully_shard

    us = _planned(rank)  # plan before sharding
    fp = check_plan_consistent(us)
    fully_shard(us)
    set_fsdp_unit_scaled_reduction(us)
    res = _train(us, rank, make_opt(us.parameters(), "sgd", LR), us)
    res["fingerprint"] = fp
    return res


def setup_lazy_ddp(rank):
    """Zero-config: plan lazily at the first DDP call, plain DDP (mean), no sync_plan."""
    us = unit_scale(make_model())
    ddp = DDP(us)
    res = _train(ddp, rank, make_opt(ddp.parameters(), "sgd", LR), us)
    res["fingerprint"] = check_plan_consistent(us)
    return res


def setup_lazy_fsdp2(rank):
    """Zero-config: fully_shard an unplanned model; it plans (unsharded) at its first call."""
    from torch.distributed.fsdp import fully_shard

    us = unit_scale(make_model())
    fully_shard(us)
    res = _train(us, rank, make_opt(us.parameters(), "sgd", LR), us)
    res["fingerprint"] = check_plan_consistent(us)
    return res


SETUPS = {
    "unsynced": setup_unsynced,
    "lazy_ddp": setup_lazy_ddp,
    "lazy_fsdp2": setup_lazy_fsdp2,
    "ddp_mean_sgd": lambda r: setup_ddp(r, False, "sgd"),
    "ddp_hook_sgd": lambda r: setup_ddp(r, True, "sgd"),
    "ddp_hook_adam": lambda r: setup_ddp(r, True, "adam"),
    "fsdp2_hook_sgd": setup_fsdp2,
}


def run(rank: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="file://" + os.path.join(out_dir, "store"), rank=rank,
                            world_size=WORLD)
    try:
        for name, fn in SETUPS.items():
            try:
                res = fn(rank)
            except Exception as exc:  # report, keep going with the other set-ups
                res = {"error": f"{type(exc).__name__}: {exc}"}
            if rank == 0:
                torch.save(res, os.path.join(out_dir, f"{name}.pt"))
            dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(run, args=(sys.argv[1],), nprocs=WORLD, join=True)
