"""calibrate_grads on a class of several matmul outputs: a dense block (DenseNet), whose features are each read by
every later layer of the block. One potential cannot make all their gradients unit: the first feature, read by
every later layer, gets the largest; the last the smallest. The class is made unit at their geometric mean."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import gradient_cosines, rms
from unit_scale_fx import unit_scale


class DenseLayer(nn.Module):
    def __init__(self, c_in: int, growth: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(c_in)
        self.conv = nn.Conv2d(c_in, growth, 3, padding=1, bias=False)

    def forward(self, features: list) -> torch.Tensor:
        return self.conv(F.relu(self.norm(torch.cat(features, 1))))


class DenseNetLike(nn.Module):
    def __init__(self, layers: int = 10, growth: int = 8, c0: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c0, 3, padding=1, bias=False)
        self.layers = nn.ModuleList(DenseLayer(c0 + i * growth, growth) for i in range(layers))
        self.norm = nn.BatchNorm2d(c0 + layers * growth)
        self.head = nn.Linear(c0 + layers * growth, 10)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        features = [self.stem(x)]
        for layer in self.layers:
            features.append(layer(features))
        h = F.adaptive_avg_pool2d(F.relu(self.norm(torch.cat(features, 1))), 1).flatten(1)
        return F.cross_entropy(self.head(h), y)


def _batch(seed: int) -> tuple:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 3, 12, 12, generator=g), torch.randint(0, 10, (8,), generator=g)


def test_dense_block_features_share_one_potential_centred_on_their_gradients():
    torch.manual_seed(0)
    us = unit_scale(DenseNetLike(), _batch(0), unsupported="error")
    us(*_batch(1)).backward()
    convs = {k: rms(p.grad) for k, p in us.named_parameters() if p.dim() == 4}
    assert all(0.5 <= v <= 2.0 for v in convs.values()), sorted(convs.items(), key=lambda kv: kv[1])
    cos = gradient_cosines(us, *_batch(2))
    assert min(cos.values()) > 0.9999, min(cos.values())
