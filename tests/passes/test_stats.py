"""passes/stats.py: rounding of measurements, local statistics, and the plan's stability (issue 13)."""

from __future__ import annotations

import math

import torch

from unit_scale_fx import unit_scale
from unit_scale_fx.examples import GPT, gpt_batch
from unit_scale_fx.passes.stats import LOCAL, RMS_BITS, planning_stats, round_bits


def test_round_bits_keeps_a_few_significant_bits():
    assert round_bits(1.0) == 1.0 and round_bits(0.0) == 0.0 and math.isinf(round_bits(math.inf))
    x = 0.123456789
    r = round_bits(x)
    assert r != x and abs(r - x) <= x * 2.0 ** -RMS_BITS
    assert round_bits(r) == r  # idempotent
    assert round_bits(x * (1 + 1e-9)) == r  # last-bit noise does not move it


def test_local_stats_measure_rms_and_count():
    t = torch.full((3, 4), 2.0)
    assert LOCAL.rms(t) == 2.0 and LOCAL.rms_count(t) == (2.0, 12.0)
    assert LOCAL.rms(torch.zeros(0)) is None and LOCAL.rms(torch.ones(2, dtype=torch.long)) is None
    assert LOCAL.tensor_rms(torch.tensor([3.0, 4.0]), bits=None) == math.sqrt(12.5)
    assert planning_stats() is LOCAL  # no process group in this process


def _factors(batch) -> dict:
    torch.manual_seed(0)
    us = unit_scale(GPT(vocab=64, d=32, layers=2, heads=2, max_len=16), batch)
    out = {}
    for node, r in us.scale_plan(all_nodes=True).items():
        out[(node, "fwd")] = r.fwd
        out.update({(node, k): v for k, v in r.bwd.items()})
        out.update({(node, "w", k): v for k, v in r.weights.items()})
    return out


def test_two_planning_batches_give_scales_within_ten_percent():
    a = _factors(gpt_batch(64, 32, 16, seed=1))
    b = _factors(gpt_batch(64, 32, 16, seed=2))
    assert a.keys() == b.keys()
    ratios = {k: max(abs(a[k]), abs(b[k])) / min(abs(a[k]), abs(b[k])) for k in a if a[k] and b[k]}
    worst = max(ratios, key=ratios.get)
    assert ratios[worst] < 1.1, (worst, ratios[worst])


def test_the_plan_does_not_depend_on_the_thread_count():
    batch = gpt_batch(64, 8, 16, seed=1)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _factors(batch)
        torch.set_num_threads(2)
        two = _factors(batch)
    finally:
        torch.set_num_threads(threads)
    assert one == two
