"""DDP and FSDP2 (gloo, 2 CPU processes) against one process on the combined batch.

The worker runs in a subprocess with a timeout, so a hung collective fails the
test instead of hanging CI.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from unit_scale_fx import unit_scale
from unit_scale_fx.distributed import batch_scaling_exponents, plan_fingerprint, reduction_factors

HERE = os.path.dirname(__file__)
sys.path.insert(0, HERE)
from dp_common import WORLD, batches, make_model  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dp")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, os.path.join(HERE, "dp_worker.py"), str(out)], capture_output=True,
                          text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = {}
    for f in os.listdir(out):
        if f.endswith(".pt"):
            res[f[:-3]] = torch.load(os.path.join(out, f), weights_only=False)
    return res


def _single(opt_name: str):
    """One process, planned and trained on the global batch."""
    us = unit_scale(make_model(), batches()[0])
    opt = torch.optim.SGD(us.parameters(), lr=0.05) if opt_name == "sgd" else torch.optim.Adam(us.parameters(), lr=1e-2)
    first = None
    losses = []
    for b in batches():
        opt.zero_grad()
        loss = us(*b)
        loss.backward()
        if first is None:
            first = {n: p.grad.detach().clone() for n, p in us.named_parameters()}
        opt.step()
        losses.append(float(loss.detach()))
    return {"params": {n: p.detach().clone() for n, p in us.named_parameters()}, "grads": first, "losses": losses,
            "fingerprint": plan_fingerprint(us)}


@pytest.fixture(scope="module")
def single_sgd():
    return _single("sgd")


def _assert_params_close(a, b, rtol=1e-4, atol=1e-5):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("setup", ["ddp_exact_sgd", "fsdp2_sgd"])
def test_unit_scaled_reduction_equals_single_process(results, single_sgd, setup):
    """Per-parameter factors read off the plan: 2 ranks == 1 process on the combined batch, SGD, 3 steps."""
    res = results[setup]
    assert "error" not in res, res.get("error")
    _assert_params_close(res["grads"], single_sgd["grads"])
    _assert_params_close(res["params"], single_sgd["params"])
    assert res["losses"] != single_sgd["losses"]  # each rank reports its own half-batch loss


def test_uniform_reduction_exact_where_factor_is_rows_to_minus_half(results, single_sgd):
    """``sum * world**-0.5`` (state=None, lazily planned) is exact for every parameter whose factor is world**-0.5."""
    res = results["ddp_uniform_sgd_lazy"]
    assert "error" not in res, res.get("error")
    factors = results["fsdp2_sgd"]["factors"]
    uniform = WORLD ** -0.5
    exact = {k for k, f in factors.items() if abs(f - uniform) < 1e-9}
    assert len(exact) >= len(factors) - 1
    for k, g in res["grads"].items():
        torch.testing.assert_close(g * factors[k] / uniform, single_sgd["grads"][k], rtol=1e-4, atol=1e-5,
                                   msg=lambda m, k=k: f"{k}: {m}")


def test_plain_mean_reduction_is_off_by_a_constant(results, single_sgd):
    """DDP's default average gives factor * world times the global-batch gradient (world**-0.5 for most)."""
    res = results["ddp_mean_sgd"]
    factors = results["fsdp2_sgd"]["factors"]
    for k, g in res["grads"].items():
        torch.testing.assert_close(g * WORLD * factors[k], single_sgd["grads"][k], rtol=1e-4, atol=1e-5,
                                   msg=lambda m, k=k: f"{k}: {m}")
    drift = max(float((res["params"][k] - single_sgd["params"][k]).abs().max()) for k in res["params"])
    assert drift > 1e-3  # with SGD this is a different learning rate: the parameters do differ


def test_plain_mean_with_adam_matches_closely(results):
    """Adam is invariant to a constant gradient factor (up to eps): the mean reduction is then harmless.

    Gradients that are pure rounding noise (the key bias of attention: softmax ignores
    it) are excluded: Adam normalises noise to steps of size lr whatever its origin.
    """
    single = _single("adam")
    res = results["ddp_mean_adam"]
    for k, p in res["params"].items():
        g = single["grads"][k]
        signal = g.abs() > 1e-6 * max(float(g.abs().max()), 1e-30)
        torch.testing.assert_close(p[signal], single["params"][k][signal], rtol=1e-3, atol=1e-4,
                                   msg=lambda m, k=k: f"{k}: {m}")


def test_ranks_agree_on_the_plan(results):
    prints = {results[s]["fingerprint"] for s in results if "error" not in results[s]}
    assert len(prints) == 1


def test_parameter_gradient_factors_and_reduction_factors():
    """Every parameter's factor goes as rows**-0.5, except where the plan does not count the batch."""
    b = batches()[0]
    local_in = tuple(t.chunk(WORLD)[0] for t in b)
    local = unit_scale(make_model(), local_in)
    glob = unit_scale(make_model(), b)
    exps = batch_scaling_exponents(local, glob, WORLD)
    assert exps.keys() == {n for n, _ in glob.named_parameters()}
    minus_half = {k for k, e in exps.items() if e and all(abs(x + 0.5) < 1e-9 for x in e)}
    # pos.weight: positions are looked up once per sequence and broadcast over the batch; the
    # plan does not count the broadcast (a core limitation), so its factor does not depend on the batch.
    assert set(exps) - minus_half <= {"pos.weight"}
    fp = plan_fingerprint(local)
    factors = reduction_factors(local, *local_in, world_size=WORLD)
    assert plan_fingerprint(local) == fp  # planned back for the local batch
    for k, e in exps.items():
        assert factors[k] == pytest.approx(WORLD ** e[0], rel=1e-9)
