"""Model, data and optimiser shared by the data-parallel worker and its test."""

import torch

from unit_scale_fx.examples import GPT, gpt_batch

WORLD = 2
STEPS = 3
LR = {"sgd": 0.05, "adam": 1e-2}


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return GPT(vocab=32, d=16, layers=2, heads=2, max_len=8)


def batches() -> list:
    """STEPS global batches of 4 sequences (2 per rank)."""
    return [gpt_batch(vocab=32, batch=4, seq=8, seed=s) for s in range(STEPS)]


def local(batch, rank: int) -> tuple:
    return tuple(t.chunk(WORLD)[rank] for t in batch)


def make_opt(params, name: str, lr: dict, lr_factor: float = 1.0) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr["sgd"] * lr_factor)
    return torch.optim.Adam(params, lr=lr["adam"])
