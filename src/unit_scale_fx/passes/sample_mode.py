"""How passes run the model on the sample batch: as it will train.

Planning is for training, so sample runs use training mode: batch-norm layers
normalise with batch statistics (in eval mode, with fresh running statistics, they
would pass values through unnormalised and every measurement downstream would be
off), and dropout is active as in training. Buffers (running statistics, counters)
are restored afterwards, so planning leaves no trace in the model's state.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.fx as fx


@contextmanager
def sample_mode(gm: fx.GraphModule) -> Iterator[None]:
    """Training mode while the block runs; mode and buffers restored afterwards."""
    was_training = gm.training
    saved = {name: b.detach().clone() for name, b in gm.named_buffers()}
    gm.train()
    try:
        yield
    finally:
        gm.train(was_training)
        with torch.no_grad():
            for name, b in gm.named_buffers():
                if name in saved and b.shape == saved[name].shape:
                    b.copy_(saved[name])
