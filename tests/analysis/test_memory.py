"""peak_tensor_bytes: storages an op allocates, not aliases of tensors that existed before."""

from __future__ import annotations

import torch

from unit_scale_fx.analysis.memory import peak_tensor_bytes


def test_aliases_of_existing_tensors_count_nothing():
    p = torch.nn.Parameter(torch.randn(64, 64))
    n, _ = peak_tensor_bytes(lambda: (p.detach(), p.view(-1), p.t(), p[:3]))
    assert n == 0


def test_new_storages_count_and_in_place_ops_do_not():
    x = torch.randn(100)

    def fn():
        y = x * 2.0  # 400 bytes
        y.mul_(3.0)  # in place: nothing new
        z = y.detach() + 1.0  # 400 bytes more, while y lives
        return y, z

    n, _ = peak_tensor_bytes(fn)
    assert n == 800
