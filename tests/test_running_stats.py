"""Trained batch-norm running statistics carried into the unit-scaled model's units (``running_stats.py``): a
pretrained model kept as it is (``init_weights=False``) evaluates as well as it trains from its first step, and
``replan`` keeps the statistics it trained."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from fixtures.families import BasicBlock
from fixtures.references import eval_vs_train, gather_statistics
from unit_scale_fx import unit_scale


class Net(nn.Module):
    """A small ResNet returning logits (``residual=False``: a plain chain of convolutions and batch norms)."""

    def __init__(self, width: int = 16, residual: bool = True) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        if residual:
            self.body = nn.Sequential(BasicBlock(width, width, 1), BasicBlock(width, 2 * width, 2))
        else:
            self.body = nn.Sequential(nn.Conv2d(width, 2 * width, 3, 2, 1), nn.BatchNorm2d(2 * width), nn.ReLU(),
                                      nn.Conv2d(2 * width, 2 * width, 3, 1, 1), nn.BatchNorm2d(2 * width))
        self.fc = nn.Linear(2 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.body(self.stem(x)), 1).flatten(1))


def _data(n: int = 6) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(16, 3, 16, 16, generator=g) * 3 + 1 for _ in range(n)]


def _gap(model: nn.Module, x: torch.Tensor) -> float:
    return eval_vs_train(model, x)[0]


def test_a_pretrained_model_kept_as_it_is_evaluates_as_it_trains():
    torch.manual_seed(0)
    data = _data()
    model = gather_statistics(Net(), data)
    before = copy.deepcopy(model.state_dict())
    us = unit_scale(model, (data[0],), init_weights=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()), "the original is not touched"
    gap_original = _gap(model, data[1])
    carried = _gap(us, data[1])  # a batch the plan did not see
    # the same unit-scaled model with the original's statistics as they were (what it had before)
    as_is = copy.deepcopy(us)
    as_is.load_state_dict({k: v for k, v in before.items() if "running" in k}, strict=False)
    kept = _gap(as_is, data[1])
    assert carried < 1.5 * gap_original + 0.05, (carried, gap_original)
    assert kept > 3 * carried, (kept, carried)


def test_a_plain_chain_of_convolutions_and_norms_is_carried_exactly():
    # each norm's unit-scaled input is its original input times a factor per channel: the carried statistics are
    # those the unit-scaled model itself gathers on the same data, whatever batch planned it
    torch.manual_seed(0)
    data = _data()
    model = gather_statistics(Net(residual=False), data)
    us = unit_scale(model, (data[-1],), init_weights=False)
    regathered = gather_statistics(copy.deepcopy(us), data)
    for (k, v), w in zip(us.state_dict().items(), regathered.state_dict().values()):
        if "running" in k:
            torch.testing.assert_close(v, w, rtol=2e-4, atol=1e-6)


def test_fresh_statistics_and_reinitialised_weights_are_left_alone():
    torch.manual_seed(0)
    data = _data()
    fresh = unit_scale(Net(), (data[0],), init_weights=False)  # never updated: 0 and 1
    for k, v in fresh.state_dict().items():
        if k.endswith("running_mean"):
            assert torch.equal(v, torch.zeros_like(v))
        elif k.endswith("running_var"):
            assert torch.equal(v, torch.ones_like(v))
    model = gather_statistics(Net(), data)
    us = unit_scale(model, (data[0],))  # init_weights=True: a new model; its statistics are not carried
    for k, v in us.state_dict().items():
        if "running" in k:
            assert torch.equal(v, model.state_dict()[k])


def test_replan_carries_the_statistics_of_the_last_plan():
    torch.manual_seed(0)
    data = _data()
    us = unit_scale(Net(), (data[0],))
    opt = torch.optim.SGD(us.parameters(), lr=0.05)
    y = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(1))
    for x in data * 3:  # training updates the running statistics in this plan's units
        opt.zero_grad()
        F.cross_entropy(us(x), y).backward()
        opt.step()
    trained = _gap(us, data[0])
    us.replan(data[1] * 0.5)  # another batch: other scales
    assert _gap(us, data[0]) < 1.5 * trained + 0.05


def test_statistics_loaded_without_a_batch_count_are_carried():
    # torchvision's older checkpoints have no num_batches_tracked: it loads as 0 beside trained statistics
    torch.manual_seed(0)
    data = _data()
    model = gather_statistics(Net(residual=False), data)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.num_batches_tracked.zero_()
    us = unit_scale(model, (data[-1],), init_weights=False)
    regathered = gather_statistics(copy.deepcopy(us), data)
    for (k, v), w in zip(us.state_dict().items(), regathered.state_dict().values()):
        if "running" in k:
            torch.testing.assert_close(v, w, rtol=2e-4, atol=1e-6)
