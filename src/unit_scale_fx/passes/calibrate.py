"""calibrate: measured scales for the ops that no rule covers (``calibrate=True``).

Rules cover the known ops; the long tail is measured. On the example batch:

1. plan and rewrite a trial copy of the graph (with the scales calibrated so far);
2. run it forward and backward (from the scalar outputs, the loss, if the model returns
   any, else a unit-Gaussian cotangent on every float output), recording at each op to
   calibrate the RMS of its raw output ``y``, of the gradient arriving at ``y`` and
   of the gradient it sends to each input (each input is read through an alias, so
   only this op's share of the gradient is seen);
3. pin a :class:`CalibratedRule` on the op: forward scale ``1 / RMS(y)``, backward
   scale ``RMS(grad y) / RMS(grad x_i)`` per input.

The plan then treats the pinned rules like any other: when it runs on the real
batch it re-measures their forward scale in place (so chains of uncovered ops see
the scales upstream of them), and the backward scales go through the same
validity constraint as every rule's (cut edges / gradient potentials), so
gradients stay valid. ``calibrate_rounds > 1`` repeats the trial with the pins of
the round before, for gradient gains that depend on upstream scales. Ops calibrated: those with no rule, and those whose rule could not
predict their output (``fwd_rms`` unknown). Buffers (batch-norm statistics) and
parameter gradients are restored afterwards. :func:`measure` is the probe on its own.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
import torch.fx as fx

from ..config import UnitScaleConfig
from ..errors import UnitScaleError
from ..record import META_KEY, RULE_OVERRIDE, original
from ..rules.registry import Kind, OpView, Rule, Scales, is_float
from ..tensor_stats import loss_outputs, rms

from .base import Pass, PassContext, PassResult, preserved_state, run_passes
from .shape_prop import placeholder_values

log = logging.getLogger(__name__)


@dataclass
class Measurement:
    """RMS measured at one node on a sample batch."""

    out_rms: float
    grad_out_rms: Optional[float] = None
    grad_in_rms: dict[str, float] = field(default_factory=dict)
    in_rms: dict[str, float] = field(default_factory=dict)


class CalibratedRule(Rule):
    """Static scales measured on a sample batch (pinned on one node)."""

    name = "calibrated"
    kind = Kind.CALIBRATED

    def __init__(self, fwd: float, gains: dict[str, float], note: str) -> None:
        self.fwd = fwd
        self.gains = gains
        self.note = note

    def scales(self, op: OpView) -> Scales:
        # calibrate=True: when planning runs on the real batch, the forward scale is
        # re-measured in place (it then sees the scales planned upstream of it)
        s = Scales(fwd=self.fwd, out_rms=1.0, note=self.note, calibrate=True)
        for x in op.inputs:
            g = self.gains.get(x.name)
            if g is not None and g > 0 and math.isfinite(g):
                s.bwd[x], s.grad_gain[x] = 1.0 / g, g
        return s


def _real_values(gm: fx.GraphModule, args: tuple, kwargs: dict) -> list[Any]:
    values = placeholder_values(gm, args, kwargs)
    for t in torch.utils._pytree.tree_leaves(values):
        if isinstance(t, torch.Tensor) and (t.device.type == "meta" or isinstance(t, torch._subclasses.FakeTensor)):
            raise UnitScaleError(
                "calibration needs real example inputs, got meta/fake tensors",
                where="pass calibrate",
                fix="pass a real sample batch as example_inputs=(...), or calibrate=False",
            )
    return values


def measure(gm: fx.GraphModule, names: Iterable[str], args: tuple, kwargs: Optional[dict] = None,
            seed: int = 0) -> dict[str, Measurement]:
    """Run ``gm`` forward and backward once; the RMS at each node in ``names``.

    Runs in the module's own mode; buffers and the RNG state are restored
    (:class:`~unit_scale_fx.passes.base.preserved_state`).
    Backward starts from the model's loss as :func:`~unit_scale_fx.tensor_stats.loss_outputs`
    defines it (the scalar outputs, else unit-Gaussian gradients on every float output).
    Buffers and parameter gradients are left as they were.
    """
    wanted = set(names)
    values = _real_values(gm, args, kwargs or {})
    out: dict[str, Measurement] = {}
    hooks_in: dict[str, dict[str, list[float]]] = {}

    class _Probe(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            if n.name not in wanted or n.op not in ("call_function", "call_method", "call_module"):
                return super().run_node(n)
            args_, kwargs_ = self.fetch_args_kwargs_from_env(n)
            # inputs by their name before any inserted scale op (the names the plan uses)
            owners = {id(self.env[i]): original(i).name for i in n.all_input_nodes
                      if isinstance(self.env.get(i), torch.Tensor)}
            m = Measurement(out_rms=float("nan"))
            grads: dict[str, list[float]] = {}

            def alias(t: Any) -> Any:
                if isinstance(t, torch.Tensor) and id(t) in owners and t.is_floating_point():
                    name = owners[id(t)]
                    m.in_rms[name] = rms(t)
                    if t.requires_grad:
                        a = t.view_as(t)
                        a.register_hook(lambda g, k=name: grads.setdefault(k, []).append(rms(g)))
                        return a
                return t

            args_ = torch.utils._pytree.tree_map(alias, args_)
            kwargs_ = torch.utils._pytree.tree_map(alias, kwargs_)
            result = getattr(self, n.op)(n.target, args_, kwargs_)
            if isinstance(result, torch.Tensor) and result.is_floating_point():
                m.out_rms = rms(result)
                if result.requires_grad:
                    result.register_hook(lambda g: setattr(m, "grad_out_rms", rms(g)))
            out[n.name] = m
            hooks_in[n.name] = grads
            return result

    params = [p for p in gm.parameters()]
    saved_grads = [p.grad for p in params]
    try:
        for p in params:
            p.grad = None
        with preserved_state(gm), torch.enable_grad():
            result = _Probe(gm).run(*values)
            try:
                tensors, grads = loss_outputs(result, seed, where="calibrate")
            except UnitScaleError:  # nothing to differentiate: forward measurements only
                tensors, grads = [], []
            if tensors:
                torch.autograd.backward(tensors, grads)
    finally:
        for p, g in zip(params, saved_grads):
            p.grad = g
    for name, grads in hooks_in.items():
        out[name].grad_in_rms = {k: math.sqrt(sum(v * v for v in vs)) for k, vs in grads.items()}
    return out


def _needs_calibration(node: fx.Node, scales: dict) -> bool:
    rec = node.meta.get(META_KEY)
    if rec is None or not isinstance(node.meta.get("val"), torch.Tensor) or not is_float(node):
        return False
    if rec.rule in ("unsupported", "calibrated"):
        return True
    s = scales.get(node)
    return s is not None and s.out_rms is None and rec.kind not in (Kind.LOSS, Kind.EXCLUDED)


#: builds the passes a calibration trial runs (topology, planning after calibrate, rewrite) for a config
TrialBuilder = Callable[[UnitScaleConfig], Sequence[Pass]]


def _trial(gm: fx.GraphModule, ctx: PassContext, pins: dict[str, CalibratedRule],
           build: TrialBuilder) -> tuple[fx.GraphModule, dict]:
    """A planned and rewritten copy of ``gm`` (sharing its parameters) with ``pins`` applied."""
    trial = fx.GraphModule(gm, copy.deepcopy(gm.graph), type(gm).__name__)
    trial.meta.update(gm.meta)  # e.g. the parameter roles that later passes read
    for n in trial.graph.nodes:
        if n.name in pins:
            n.meta[RULE_OVERRIDE] = pins[n.name]
    # measure in full precision, without recursing into calibration
    trial_cfg = replace(ctx.config, calibrate=False, unsupported="ignore", simulate_format=None)
    tctx = PassContext(config=trial_cfg,
                       example_args=ctx.example_args, example_kwargs=ctx.example_kwargs,
                       input_rms=dict(ctx.input_rms), real_values=ctx.real_values,
                       init_kinds=dict(ctx.init_kinds))
    # the passes before this one (fuse, roles, u-muP graph edits) already shaped the copied graph;
    # the trial re-derives the topology of the copy and runs everything after calibrate
    run_passes(trial, tctx, build(trial_cfg))
    return trial, dict(tctx.scales)


def make_calibrate(build: TrialBuilder) -> Pass:
    """The ``calibrate`` pass; ``build`` gives the passes of one trial (the pipeline injects it)."""

    def calibrate(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        return _calibrate(gm, ctx, build)

    return Pass("calibrate", calibrate, needs=frozenset({"topology", "init_kinds"}))


def _calibrate(gm: fx.GraphModule, ctx: PassContext, build: TrialBuilder) -> PassResult:
    cfg = ctx.config
    if not cfg.calibrate:
        return PassResult(False, "off")
    pins: dict[str, CalibratedRule] = {}
    targets: set[str] = set()
    for _ in range(max(1, int(cfg.calibrate_rounds))):
        trial, scales = _trial(gm, ctx, pins, build)
        targets |= {n.name for n in trial.graph.nodes if _needs_calibration(n, scales)}
        if not targets:
            break
        found = measure(trial, targets, ctx.example_args or (), ctx.example_kwargs or {})
        for name in sorted(targets):
            m = found.get(name)
            if m is None or not (m.out_rms > 0 and math.isfinite(m.out_rms)):
                continue
            gains = {}
            if m.grad_out_rms:
                gains = {k: v / m.grad_out_rms for k, v in m.grad_in_rms.items() if v > 0}
            note = (f"calibrated: out rms {m.out_rms:.4g}, grad gains "
                    + (", ".join(f"{k}={v:.3g}" for k, v in gains.items()) or "-"))
            pins[name] = CalibratedRule(1.0 / m.out_rms, gains, note)
    for n in gm.graph.nodes:
        if n.name in pins:
            n.meta[RULE_OVERRIDE] = pins[n.name]
    log.info("calibrate: %d ops calibrated: %s", len(pins), ", ".join(sorted(pins)))
    return PassResult(False, f"{len(pins)} ops calibrated")
