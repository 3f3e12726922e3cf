"""DDP and FSDP2 (gloo, 2 CPU processes) against one process on the combined batch.

The worker runs in a subprocess with a timeout, so a hung collective fails the
test instead of hanging CI. All set-ups share one worker run (~20 s on 2 cores).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from unit_scale_fx import unit_scale
from unit_scale_fx.training.distributed import plan_fingerprint

HERE = os.path.dirname(__file__)
sys.path.insert(0, HERE)
from dp_common import LR, WORLD, batches, local, make_model, make_opt  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")


def _run_worker(out: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        proc = subprocess.run([sys.executable, os.path.join(HERE, "dp_worker.py"), out], capture_output=True,
                              text=True, timeout=300, env=env)
        rc, err = proc.returncode, proc.stderr[-4000:]
    except subprocess.TimeoutExpired as exc:
        rc, err = -1, f"the worker hung: {exc}"
    with open(os.path.join(out, "stderr.txt"), "w") as f:
        f.write(err)
    with open(os.path.join(out, "rc"), "w") as f:  # written last: the run is complete
        f.write(str(rc))


@pytest.fixture(scope="session")
def results(tmp_path_factory):
    """The worker's results: one run per test session. Under pytest-xdist (the README's test command) the
    workers share it through a folder of the session's own temporary root: the first runs it, others wait."""
    from filelock import FileLock  # a dependency of torch

    if os.environ.get("PYTEST_XDIST_WORKER"):
        out = str(tmp_path_factory.getbasetemp().parent / "dp")  # pytest-N/, this session's, shared by workers
    else:
        out = str(tmp_path_factory.mktemp("dp"))
    with FileLock(out + ".lock"):
        if not os.path.exists(os.path.join(out, "rc")):
            os.makedirs(out, exist_ok=True)
            _run_worker(out)
    with open(os.path.join(out, "rc")) as f, open(os.path.join(out, "stderr.txt")) as e:
        assert f.read() == "0", e.read()
    return {f[:-3]: torch.load(os.path.join(out, f), weights_only=False) for f in os.listdir(out) if f.endswith(".pt")}


def _single(opt_name: str, lr_factor: float = 1.0) -> dict:
    """One process, planned on the whole first batch, trained on the combined batches."""
    us = unit_scale(make_model(), batches()[0])
    opt = make_opt(us.parameters(), opt_name, LR, lr_factor)
    first, losses = None, []
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


def _close(a: dict, b: dict, factor: float = 1.0, rtol: float = 1e-4, atol: float = 1e-5, mask=None) -> None:
    assert a.keys() == b.keys()
    for k in a:
        x, y = a[k] * factor, b[k]
        if mask is not None:
            x, y = x[mask[k]], y[mask[k]]
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


def _ok(res: dict) -> dict:
    assert "error" not in res, res.get("error")
    return res


def _rel_diff(a: dict, b: dict) -> float:
    """``|a - b| / |b|`` over all parameters together."""
    num = sum(float((a[k] - b[k]).double().pow(2).sum()) for k in b)
    den = sum(float(b[k].double().pow(2).sum()) for k in b)
    return math.sqrt(num / den)


def test_ranks_planning_on_their_own_batches_are_caught(results):
    """plan_across_ranks=False: each rank plans its own half batch; check_plan_consistent says so."""
    res = _ok(results["unsynced"])
    # plans measured on different batches differ (else there would be nothing to catch) ...
    assert len(set(res["fingerprints"])) > 1
    # ... and the check says so, and how to fix it
    assert "sync_plan" in res["raised"]


@pytest.mark.parametrize("setup", ["lazy_ddp", "lazy_fsdp2"])
def test_lazy_planning_equals_one_process_on_the_whole_batch(results, setup):
    """Zero-config data parallel: plan at the first call inside the group (no sync_plan, no hook), SGD, 3 steps."""
    res = _ok(results[setup])
    single = _single("sgd")
    assert res["fingerprint"] == single["fingerprint"]  # every rank, and one process: the same plan
    assert _rel_diff(res["params"], single["params"]) < 1e-5
    _close(res["grads"], single["grads"])
    _close(res["params"], single["params"])


def test_mean_reduction_equals_one_process_with_the_same_plan(results):
    """DDP (mean) with the shared plan == one process, same plan, combined batch, SGD: grads and 3 steps."""
    res = _ok(results["ddp_mean_sgd"])
    single = _single("sgd")
    assert res["fingerprint"] == single["fingerprint"]
    _close(res["grads"], single["grads"])
    _close(res["params"], single["params"])


@pytest.mark.parametrize("setup", ["ddp_hook_sgd", "fsdp2_hook_sgd"])
def test_unit_scaled_reduction_is_sqrt_world_times_the_mean(results, setup):
    """sum * world**-0.5 == sqrt(world) x the one-process gradient; SGD then equals lr * sqrt(world)."""
    res = _ok(results[setup])
    single = _single("sgd", lr_factor=math.sqrt(WORLD))
    assert res["fingerprint"] == single["fingerprint"]
    _close(res["grads"], single["grads"], factor=1 / math.sqrt(WORLD))
    _close(res["params"], single["params"])


def test_unit_scaled_reduction_with_adam_matches_the_mean(results):
    """Adam is invariant to a constant gradient factor (up to eps): hook or mean train alike.

    Gradients that are rounding noise (the attention key bias: softmax ignores it)
    are excluded: Adam turns noise into steps of size lr whatever its scale.
    """
    res = _ok(results["ddp_hook_adam"])
    single = _single("adam")
    mask = {k: g.abs() > 1e-6 * max(float(g.abs().max()), 1e-30) for k, g in single["grads"].items()}
    _close(res["params"], single["params"], rtol=1e-3, atol=1e-4, mask=mask)


def test_unit_scaled_reduction_keeps_gradients_unit(results):
    """The point of the hook: the reduced weight gradients keep the RMS of one rank's, not world**-0.5 of it."""
    mean, hook = _ok(results["ddp_mean_sgd"]), _ok(results["ddp_hook_sgd"])
    ratios = [float(hook["grads"][k].pow(2).mean().sqrt() / mean["grads"][k].pow(2).mean().sqrt())
              for k in mean["grads"] if mean["grads"][k].abs().max() > 0]
    assert ratios and all(abs(r - math.sqrt(WORLD)) < 1e-3 for r in ratios)
