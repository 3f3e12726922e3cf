"""Worker for tests/distributed/test_data_parallel.py: 2 gloo ranks on CPU.

Usage: python dp_worker.py OUT_DIR
Each rank trains the same small unit-scaled GPT on its half of every batch under
several set-ups and rank 0 writes the results to OUT_DIR/<setup>.pt.
"""

from __future__ import annotations

import math
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from unit_scale_fx import unit_scale
from unit_scale_fx.distributed import (allreduce_hook, check_plan_consistent, reduce_state, reduction_factors,
                                      scale_gradients, set_fsdp_unit_scaled_reduction)

sys.path.insert(0, os.path.dirname(__file__))
from dp_common import STEPS, WORLD, batches, make_model  # noqa: E402


def _local(batch, rank):
    return tuple(t.chunk(WORLD)[rank] for t in batch)


def _train(model, rank, opt, named, after_backward=None):
    losses, first_grads = [], None
    for batch in batches():
        opt.zero_grad()
        loss = model(*_local(batch, rank))
        loss.backward()
        if after_backward is not None:
            after_backward()
        if first_grads is None:
            first_grads = {n: p.grad.detach().clone() for n, p in named.named_parameters()}
        opt.step()
        losses.append(float(loss.detach()))
    return losses, first_grads


def _full(model):
    """Parameters as plain tensors (FSDP2 shards them as DTensors)."""
    out = {}
    for n, p in model.named_parameters():
        t = p.detach()
        out[n] = t.full_tensor() if hasattr(t, "full_tensor") else t.clone()
    return out


def _grads_full(grads):
    return {n: g.full_tensor() if hasattr(g, "full_tensor") else g for n, g in grads.items()}


def setup_ddp(rank, hook, opt_name, lazy=False):
    local_example = _local(batches()[0], rank)
    us = unit_scale(make_model(), None if lazy else local_example)
    state = reduce_state(us, *local_example) if hook == "exact" else None
    ddp = DDP(us)
    if hook:
        ddp.register_comm_hook(state, allreduce_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05) if opt_name == "sgd" else torch.optim.Adam(ddp.parameters(), lr=1e-2)
    losses, grads = _train(ddp, rank, opt, us)
    fingerprint = check_plan_consistent(ddp)
    return {"params": _full(us), "grads": grads, "losses": losses, "fingerprint": fingerprint}


def setup_fsdp2(rank):
    from torch.distributed.fsdp import fully_shard

    local_example = _local(batches()[0], rank)
    us = unit_scale(make_model(), local_example)  # plan (and read the factors) before sharding
    factors = reduction_factors(us, *local_example)
    fingerprint = check_plan_consistent(us)
    fully_shard(us)
    post = set_fsdp_unit_scaled_reduction(us, factors)
    opt = torch.optim.SGD(us.parameters(), lr=0.05)
    losses, grads = _train(us, rank, opt, us, after_backward=lambda: scale_gradients(us, post))
    return {"params": _full(us), "grads": _grads_full(grads), "losses": losses, "fingerprint": fingerprint,
            "factors": factors}


SETUPS = {
    "ddp_exact_sgd": lambda r: setup_ddp(r, "exact", "sgd"),
    "ddp_uniform_sgd_lazy": lambda r: setup_ddp(r, "uniform", "sgd", lazy=True),
    "ddp_mean_sgd": lambda r: setup_ddp(r, None, "sgd"),
    "ddp_mean_adam": lambda r: setup_ddp(r, None, "adam"),
    "fsdp2_sgd": setup_fsdp2,
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
