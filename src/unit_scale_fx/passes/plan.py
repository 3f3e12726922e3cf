"""plan: one :class:`ScaleRecord` per floating-point node, under ``node.meta["unit_scale"]``.

A forward sweep in topological order asks each node's rule for its ideal scales
given the predicted RMS of its inputs, ties forward and backward scales on
edges that are not cut edges, and predicts the output RMS. A backward sweep then
predicts gradient RMS from the chosen scales.
"""

from __future__ import annotations

import logging
import math
import operator
from typing import Callable, Optional

import torch
import torch.fx as fx

from ..errors import UnitScaleError
from ..record import INSERTED, META_KEY, ScaleRecord
from ..rules.matmul import LOGITS, logit_matmuls
from ..rules.registry import (Kind, OpView, Scales, float_tensor_inputs, has_float_value, is_float, lookup,
                               node_op_name)
from ..tensor_stats import rms
from .base import PassContext, PassResult, UnsupportedOp, declare, module_path, preserved_state
from .init_weights import _source_param
from .round_scales import pow2
from .stats import LOCAL

log = logging.getLogger(__name__)


def _shape(node: fx.Node) -> Optional[tuple[int, ...]]:
    val = node.meta.get("val")
    return tuple(int(s) for s in val.shape) if isinstance(val, torch.Tensor) else None


def _tensor_rms(t: torch.Tensor) -> Optional[float]:
    """A parameter's or buffer's RMS (the same on every rank; rounded as every measurement is)."""
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.device.type == "meta" or t.numel() == 0:
        return None
    return LOCAL.rms(t)


def _param_mean(t: Optional[torch.Tensor], init_kind: Optional[str], r: Optional[float]) -> float:
    """A parameter's or buffer's first moment relative to its RMS ``r`` (:func:`_param_rms`), in [-1, 1]: read
    from the tensor (a learned temperature ``logit_scale`` is one number, all mean: an ``exp`` of it is ``exp``
    of that number, not of a Gaussian of that RMS); on the meta device, by its init kind (a norm's gain of
    ones: 1). In float32, as :func:`~unit_scale_fx.tensor_stats.rms` is (no float64 copy of a large weight)."""
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.numel() == 0:
        return 0.0
    if t.device.type == "meta":
        return 1.0 if init_kind == "one" else 0.0
    if r is None or not r > 0 or not math.isfinite(r):
        return 0.0
    with torch.no_grad():
        m = float(t.detach().float().mean())
    return max(-1.0, min(1.0, m / r)) if math.isfinite(m) else 0.0


def _combine(values: list[float], how: str, fwd: float, fixed_fwd: bool) -> float:
    if fixed_fwd or how == "fwd":
        return fwd
    vals = values if how == "gmean" else values[1:] or values
    return math.exp(sum(math.log(v) for v in vals) / len(vals))


def _attr_tensor(gm: fx.GraphModule, node: fx.Node) -> Optional[torch.Tensor]:
    """The parameter or buffer a ``get_attr`` node reads (None: neither)."""
    try:
        return gm.get_parameter(str(node.target))
    except AttributeError:
        try:
            return gm.get_buffer(str(node.target))
        except AttributeError:
            return None


def _param_rms(t: Optional[torch.Tensor], init_kind: Optional[str]) -> Optional[float]:
    """A parameter's or buffer's RMS (None: no tensor); on the meta device, by its init kind."""
    if t is None:
        return None
    r = _tensor_rms(t)
    if r is None and t.device.type == "meta":
        return {"unit": 1.0, "one": 1.0, "zero": 0.0}.get(init_kind or "unit", 1.0)
    return r


class _Planner:
    """Plans one node at a time from the RMS of its inputs (predicted or measured)."""

    def __init__(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        self.gm, self.ctx, self.cfg, self.topo = gm, ctx, ctx.config, ctx.topology
        self.init_kinds = ctx.init_kinds
        self.rms: dict[fx.Node, Optional[float]] = {}
        #: predicted cross-position correlation of each value (0 for inputs and parameters)
        self.rho: dict[fx.Node, float] = {}
        #: predicted first moment of each value relative to its RMS (0 for inputs and parameters)
        self.mean: dict[fx.Node, float] = {}
        self.scales: dict[fx.Node, Scales] = {}
        self.rules: dict[fx.Node, object] = {}
        self.loss_cone = loss_cone(gm, ctx.param_inputs)
        self.decision_cone = decision_cone(gm) - self.loss_cone
        self.counts: dict[fx.Node, float] = {}  # RMS of integer tensors (measured planning only)
        self.logit_matmuls = logit_matmuls(gm)
        #: planning on real inputs (:class:`_MeasuringPlanner`): rules whose factors are measured may run
        self.measuring = False

    def source_rms(self, node: fx.Node) -> None:
        if node.op == "placeholder":
            self.rms[node] = self.ctx.input_rms.get(node.name, 1.0)
        elif node.op == "get_attr":
            t, kind = _attr_tensor(self.gm, node), self.init_kinds.get(str(node.target))
            self.rms[node] = _param_rms(t, kind)
            self.mean[node] = _param_mean(t, kind, self.rms[node])

    def scales_for(self, node: fx.Node) -> Optional[Scales]:
        """Ideal scales of ``node`` (None: no scale: unsupported, excluded, inserted)."""
        node.meta.pop(META_KEY, None)
        inputs = float_tensor_inputs(node)
        known = [self.rms[i] for i in inputs if self.rms.get(i) is not None and math.isfinite(self.rms[i])]
        passthrough = math.sqrt(sum(r * r for r in known) / len(known)) if known else None
        self.rms[node] = passthrough
        self.rho[node] = max((self.rho.get(i, 0.0) for i in inputs), default=0.0)
        self.mean[node] = 0.0
        if node.meta.get(INSERTED):
            return None
        op_name, qual = node_op_name(node, self.gm), module_path(node)
        if self.cfg.node_filter is not None and not self.cfg.node_filter(qual, node):
            node.meta[META_KEY] = ScaleRecord("excluded", Kind.EXCLUDED, op_name, _shape(node), fwd_rms=passthrough,
                                              note="left alone by node_filter")
            return None
        rule = lookup(node, self.gm)
        if rule is None:
            if inputs:
                self.ctx.unsupported.append(UnsupportedOp(node.name, op_name, qual or "<root>"))
                node.meta[META_KEY] = ScaleRecord("unsupported", Kind.UNSUPPORTED, op_name, _shape(node),
                                                  fwd_rms=passthrough, note="no rule; left unscaled")
            return None
        context: dict = {"params": {i for i in inputs
                                   if _source_param(i, self.gm, self.ctx.param_inputs) is not None}}
        if node in self.logit_matmuls:
            context[LOGITS] = True
        res = self.topo.residuals.get(node)
        if res is not None:
            context["residual"] = (res.skip, res.branch, res.tau)
        in_rms = {i: self.rms.get(i) for i in inputs}
        # integer tensors measured on the example batch (a token count a loss is divided by)
        in_rms.update({i: self.counts[i] for i in node.all_input_nodes if i in self.counts})
        # a number computed from shapes (``total_rows = 0.0 + x.shape[0] + ...``) is known without a batch
        in_rms.update({i: abs(float(i.meta["val"])) for i in node.all_input_nodes if i not in in_rms
                       and type(i.meta.get("val")) in (int, float)})
        view = OpView(node, inputs, in_rms,
                      module=self.gm.get_submodule(str(node.target)) if node.op == "call_module" else None,
                      context=context, in_rho={i: self.rho.get(i, 0.0) for i in inputs},
                      in_mean={i: self.mean.get(i, 0.0) for i in inputs})
        s = rule.scales(view)
        reason = s.unsupported or ("its scales are measured: plan with example inputs and measure=True (the default)"
                                   if s.measured_only and not self.measuring else None)
        if reason is not None:
            self.ctx.unsupported.append(UnsupportedOp(node.name, op_name, qual or "<root>", reason=reason))
            node.meta[META_KEY] = ScaleRecord("unsupported", Kind.UNSUPPORTED, op_name, _shape(node),
                                              fwd_rms=passthrough, note="left unscaled: " + reason)
            return None
        if node in self.loss_cone:
            _keep_value(s, rule)
        elif node in self.decision_cone:
            _keep_value(s, rule, "decides (a comparison, an index, a mask): forward value kept")
        if self.cfg.round_scales is not None and s.weights is not None:  # round_scales: the add runs rounded
            s.weights = {n: pow2(w) for n, w in s.weights.items()}
        if s.out_rho is not None:
            self.rho[node] = s.out_rho
        else:  # carried over from the activations (a weight's rows are not positions)
            acts = [i for i in inputs if i not in context["params"]] or inputs
            w = [(self.rms.get(i) or 1.0) ** 2 for i in acts]
            self.rho[node] = sum(wi * self.rho.get(i, 0.0) for wi, i in zip(w, acts)) / max(sum(w), 1e-30)
        if s.out_mean is not None:
            self.mean[node] = s.out_mean
        elif rule.kind == Kind.PRESERVE or (rule.kind == Kind.MUL and len(inputs) == 1):
            # values moved, selected or multiplied by a constant: the first moment goes with them
            acts = [i for i in inputs if i not in context["params"]] or inputs
            w = [(self.rms.get(i) or 1.0) ** 2 for i in acts]
            self.mean[node] = sum(math.sqrt(wi) * self.mean.get(i, 0.0) for wi, i in zip(w, acts)) \
                / max(math.sqrt(sum(w)), 1e-30)
        self.scales[node], self.rules[node] = s, rule
        return s

    def finalize(self, node: fx.Node, s: Scales) -> ScaleRecord:
        rule = self.rules[node]
        # gradients that meet at a value with several readers add up: give each reader a share
        ideal_bwd = {n.name: b / math.sqrt(max(1, self.topo.graph.out_degree(n))) for n, b in s.bwd.items()}
        rec = ScaleRecord(rule.name, "residual" if node in self.topo.residuals else rule.kind,
                          node_op_name(node, self.gm), _shape(node),
                          fwd=s.fwd, ideal_fwd=s.fwd, ideal_bwd=ideal_bwd, note=s.note)
        if s.weights is not None:
            rec.fwd = 1.0
            rec.weights = {n.name: w for n, w in s.weights.items()}
        if self.cfg.constraint != "potential":
            _tie_locally(rec, node, s, self.topo, self.cfg.constraint)
        if self.cfg.round_scales is not None:  # rounded here, so what later ops measure or predict is rounded
            rec.fwd = pow2(rec.fwd)
        out = s.out_rms
        if out is not None and s.weights is None and s.fwd:
            out = out * rec.fwd / s.fwd
        rec.fwd_rms = out
        self.rms[node] = out
        node.meta[META_KEY] = rec
        return rec


def loss_cone(gm: fx.GraphModule, param_inputs: dict) -> set[fx.Node]:
    """The ops that compute a loss from the model's outputs: their forward values are kept.

    An op is in the cone when no parameter is used at or after it and its value reaches
    the graph's outputs only as single numbers (0-dim outputs: the loss, an auxiliary
    loss). ``sum / num_items``, ``loss + coef * aux_loss``, a hand-written mean squared
    error: all keep the value the user's code computes from the (unit-scaled) logits;
    only their backward scales are planned.
    """
    nodes = list(gm.graph.nodes)
    out = next((n for n in reversed(nodes) if n.op == "output"), None)
    if out is None:
        return set()
    scalar_out = {n for n in _leaves(out.args) if isinstance(n, fx.Node) and _shape(n) == ()}
    if not scalar_out:
        return set()
    feeds_param: dict[fx.Node, bool] = {}
    cone: set[fx.Node] = set()
    for n in reversed(nodes):
        if n.op in ("output", "placeholder", "get_attr"):
            continue
        uses = any(_source_param(i, gm, param_inputs) is not None for i in n.all_input_nodes)
        feeds_param[n] = uses or any(feeds_param.get(u, False) for u in n.users)
        if feeds_param[n] or not n.users or not is_float(n):
            continue
        if all((u.op == "output" and n in scalar_out) or u in cone for u in n.users):
            cone.add(n)
    return cone


def decision_cone(gm: fx.GraphModule) -> set[fx.Node]:
    """The floating-point ops whose values only decide: every reader returns no floating-point value (a
    comparison, an index, a mask) or is in the cone itself. Their forward values are kept.

    A comparison is not invariant to scales its operands get separately: PhiMoE's router masks the experts
    whose ``(max - scores) / factor`` exceeds a threshold, and the subtraction planned as a weighted add (a
    different factor on ``max`` and on ``scores``) masked every expert, the top one too: a softmax of all
    ``-inf`` and a NaN loss. No gradient flows through a decision, so keeping these values costs no unit
    gradient; they reach no activation a later op scales."""
    cone: set[fx.Node] = set()
    for n in reversed(list(gm.graph.nodes)):
        if not n.op.startswith("call_") or not n.users or not is_float(n):
            continue
        if all(u in cone or (u.op.startswith("call_") and "val" in u.meta and not has_float_value(u))
               for u in n.users):
            cone.add(n)
    return cone


def _leaves(x: object) -> list:
    if isinstance(x, (tuple, list)):
        return [y for v in x for y in _leaves(v)]
    if isinstance(x, dict):
        return [y for v in x.values() for y in _leaves(v)]
    return [x]


def _keep_value(s: Scales, rule: object, why: str = "computes a loss: forward value kept") -> None:
    """An op in the loss cone: forward scale 1; a sum of losses passes each its gradient unchanged. The
    output's predicted RMS is the rule's without its forward scale (which multiplies the output), so that
    the ops after it in the cone read what the kept value is (a binary cross-entropy of a sigmoid's
    probabilities: their RMS, about 0.54, not 1); unknown for a weighted add, whose weights are dropped."""
    raw = None
    if s.weights is None and s.out_rms is not None and s.fwd and math.isfinite(s.fwd) and s.fwd > 0:
        raw = s.out_rms / s.fwd
    if s.weights is not None:
        s.weights = None
    if getattr(rule, "kind", "") == Kind.ADD:
        s.bwd = {n: 1.0 for n in s.bwd}
        s.grad_gain = {n: 1.0 for n in s.bwd}
    s.fwd, s.fixed_fwd, s.calibrate, s.calibrate_bwd = 1.0, True, False, False
    s.out_rms = raw
    s.note = (s.note + "; " if s.note else "") + why


class _MeasuringPlanner(fx.Interpreter):
    """Plans while running the graph on the real example inputs.

    Each op's rule sees the *measured* RMS of its (already scaled) inputs; ops whose
    output scale depends on the data (attention, softmax, products of two
    activations) are calibrated on the measured output; and the value passed on
    is the scaled one, so errors do not accumulate down the graph.
    """

    def __init__(self, gm: fx.GraphModule, planner: _Planner) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.planner = planner
        self.stats = planner.ctx.stats or LOCAL  # local, or summed over the ranks of a process group

    def run_node(self, n: fx.Node):
        p = self.planner
        if n.op in ("placeholder", "get_attr", "output"):
            value = super().run_node(n)
            if n.op != "output" and is_float(n):
                p.source_rms(n)
                if n.op == "placeholder" and isinstance(value, torch.Tensor):
                    measured = self.stats.rms(value)
                    if measured is not None:
                        p.rms[n] = measured
            return value
        if not is_float(n):
            value = super().run_node(n)
            if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_floating_point() \
                    and not value.is_complex() and value.dtype != torch.bool and value.device.type != "meta":
                p.counts[n] = float(abs(value))
            return value
        s = p.scales_for(n)
        if s is None:
            value = super().run_node(n)
        elif s.weights is not None:
            saved = {u: self.env[u] for u in s.weights}
            for u, w in s.weights.items():
                self.env[u] = saved[u] * w
            value = super().run_node(n)
            self.env.update(saved)
        else:
            value = super().run_node(n)
            raw = self.stats.rms(value) if isinstance(value, torch.Tensor) else None
            if s.calibrate and raw and math.isfinite(raw) and s.fwd:
                ratio = (1.0 / raw) / s.fwd
                s.fwd *= ratio
                if s.calibrate_bwd:
                    s.bwd = {k: b * ratio for k, b in s.bwd.items()}
                    s.grad_gain = {k: g / ratio for k, g in s.grad_gain.items()}
                s.note += f"; forward calibrated on the example batch (x{ratio:.3g})"
            if s.calibrate_grad_gain:
                self._measure_grad_gain(n, s)
        if s is not None:
            rec = p.finalize(n, s)
            if rec.weights is None or not rec.weights:
                if isinstance(value, torch.Tensor) and value.is_floating_point() and rec.fwd != 1.0:
                    value = value * rec.fwd
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            measured = self.stats.rms(value)
            p.rms[n] = measured
            rec = n.meta.get(META_KEY)
            if rec is not None:
                rec.fwd_rms = measured
        return value

    def _measure_grad_gain(self, n: fx.Node, s: Scales) -> None:
        """``RMS(J_i^T g)`` at the real inputs, for every floating-point input ``i``, with a seeded unit Gaussian
        ``g`` on each floating-point output that is read (a tuple's pieces read by ``getitem``; the others get
        no gradient, as in training). One-input ops; ops of several inputs or a tuple result only where the
        rule is measured only (a recurrent layer). An input whose gradient is zero or missing keeps its
        factor."""
        inputs = float_tensor_inputs(n)
        if (len(inputs) != 1 or isinstance(n.meta.get("val"), (tuple, list))) and not s.measured_only:
            return
        env = {x: self.env[x] for x in inputs if isinstance(self.env.get(x), torch.Tensor)}
        if not env:
            return
        leaves = {x: v.detach().requires_grad_(True) for x, v in env.items()}
        swap = {id(v): leaves[x] for x, v in env.items()}
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        args, kwargs = torch.utils._pytree.tree_map(
            lambda a: swap.get(id(a), a) if isinstance(a, torch.Tensor) else a, (args, kwargs))
        # a tuple's pieces read by index (``getitem`` with a slice or a tuple of them is a tensor's indexing)
        read = {u.args[1] for u in n.users if u.target is operator.getitem and u.users and len(u.args) > 1
                and isinstance(u.args[1], int)}
        gen = torch.Generator().manual_seed(1234)
        with torch.enable_grad():
            y = getattr(self, n.op)(n.target, args, kwargs)
            outs = list(enumerate(y)) if isinstance(y, (tuple, list)) else [(None, y)]
            pairs = [(t, torch.randn(t.shape, generator=gen, dtype=t.dtype).to(t.device)) for i, t in outs
                     if isinstance(t, torch.Tensor) and t.requires_grad and t.is_floating_point()
                     and (i is None or i in read)]
            if not pairs:
                return
            grads = torch.autograd.grad([t for t, _ in pairs], list(leaves.values()), [g for _, g in pairs],
                                        allow_unused=True)
        measured = []
        for x, dx in zip(leaves, grads):
            d = self.stats.rms(dx) if dx is not None else None
            if d is not None and d > 0 and math.isfinite(d):
                s.bwd[x], s.grad_gain[x] = 1.0 / d, d
                measured.append(d)
        if len(measured) == 1 and len(leaves) == 1:
            s.note += f"; gradient gain measured on the example batch ({measured[0]:.4g})"
        elif measured:
            s.note += "; gradient gains measured on the example batch"


@declare('plan', needs=('topology', 'init_kinds'), produces=('scales',))
def plan(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    if ctx.topology is None:
        raise UnitScaleError("the plan pass needs the topology pass first", where="pass plan",
                             fix="run the passes in pipeline order")
    _resolve_taus(gm, ctx)
    planner = _Planner(gm, ctx)
    real = ctx.real_values is not None and ctx.config.measure
    if real:
        planner.measuring = True
        with preserved_state(gm), torch.no_grad():
            _MeasuringPlanner(gm, planner).run(*ctx.real_values)
    else:
        for node in gm.graph.nodes:
            if node.op == "output" or not is_float(node):
                continue
            if node.op in ("placeholder", "get_attr"):
                planner.source_rms(node)
                continue
            s = planner.scales_for(node)
            if s is not None:
                planner.finalize(node, s)
    ctx.scales = planner.scales
    _apply_policy(ctx)
    n_rec = sum(1 for n in gm.graph.nodes if META_KEY in n.meta)
    how = "measured on the example batch" if real else "analytic"
    return PassResult(False, f"{n_rec} records ({how}), {len(ctx.unsupported)} unsupported")


def _resolve_taus(gm: fx.GraphModule, ctx: PassContext) -> None:
    """Residual adds whose tau the config leaves open (``None``) follow u-μP's depth rule, stream by stream."""
    open_ = [a for a, r in ctx.topology.residuals.items() if r.tau is None]
    if not open_:
        return
    from ..config import UNIT_DEPTH_RULE
    from .mup import depth_taus
    from .roles import residual_streams

    streams, _ = residual_streams(ctx.topology, gm)
    for stream in streams:
        kinds = [ctx.topology.residuals[a].kind for a in stream]
        for add, tau in zip(stream, depth_taus(kinds, UNIT_DEPTH_RULE)):
            if ctx.topology.residuals[add].tau is None:
                ctx.topology.residuals[add].tau = tau


def _tie_locally(rec: ScaleRecord, node: fx.Node, s: Scales, topo, how: str) -> None:
    """The local rule: forward and backward scales may differ only on cut edges."""
    if s.weights is not None:
        rec.bwd = {n.name: w for n, w in s.weights.items()}  # weighted adds keep the true gradient
        return
    fwd, bwd = s.fwd, {n: rec.ideal_bwd[n.name] for n in s.bwd}
    tied = [n for n in bwd if not topo.is_cut(n, node)]
    if tied and any(not math.isclose(bwd[n], fwd, rel_tol=1e-9) for n in tied):
        value = _combine([fwd] + [bwd[n] for n in tied], how, fwd, s.fixed_fwd)
        fwd = value
        for n in tied:
            bwd[n] = value
        rec.constrained = True
    rec.fwd = fwd
    rec.bwd = {n.name: b for n, b in bwd.items()}


def forward_factor(rec: ScaleRecord, name: str) -> float:
    """The factor the forward applies on the edge ``name -> node``: an add's weight, else the output scale."""
    if rec.kind in ("preserve", "unsupported", "excluded"):
        return 1.0
    return rec.weights.get(name, rec.fwd) if rec.weights else rec.fwd


def mixed_gain(gain: float, shared: Optional[float], rho: float) -> float:
    """An input's gradient gain when the gradient it reads shares a part ``rho`` of its square across a sample's
    positions: ``gain`` (the rule's, for independent positions) on the rest, ``shared`` (``Scales.shared_grad_gain``:
    the gain for a gradient the same at every position; none: ``gain`` throughout) on the shared part."""
    if shared is None or rho <= 0:
        return gain
    return math.sqrt((1.0 - rho) * gain * gain + rho * shared * shared)


def reverse_sweep(gm: fx.GraphModule, scales_of: dict[fx.Node, Scales],
                  edge_factor: Callable[[ScaleRecord, fx.Node], float],
                  measured: Optional[dict[fx.Node, float]] = None,
                  rho_out: Optional[dict[fx.Node, float]] = None,
                  value_out: Optional[dict[fx.Node, float]] = None) -> dict[fx.Node, float]:
    """Gradient RMS at every floating-point node, from the rules' gains, by one reverse sweep (``rho_out``, if
    given, receives each gradient's predicted cross-position correlation; ``value_out`` its coherence with the
    node's own values, ``Scales.grad_value_from_rho``).

    The gradient sent from ``v`` to its input ``u`` has RMS ``grad(v) * gain_vu * edge_factor(rec_v, u)``
    (``gain_vu``: the rule's ``grad_gain``, the Jacobian's gain); gradients that meet at a value
    with several readers are independent and add in quadrature. A loss starts at 1, and so does a
    value the graph returns (its gradient comes from outside). With ``edge_factor`` the forward
    factor this is the *true* gradient of the scaled forward; with the backward scale, what the
    gradients will measure.
    """
    measured = measured or {}
    grad: dict[fx.Node, float] = {}
    # beside a returned loss (a 0-dim float), the other returned values get no gradient from outside,
    # as in training (tensor_stats.loss_outputs): a returned cache or hidden state that nothing inside
    # reads has no gradient, rather than a unit one
    out = gm.graph.find_nodes(op="output")
    leaves = [n for n in torch.utils._pytree.tree_leaves(out[0].args) if isinstance(n, fx.Node)] if out else []
    returns_loss = any(isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].dim() == 0
                       and n.meta["val"].is_floating_point() for n in leaves)
    #: cross-position correlation of each gradient: a mean over positions sends every position the same
    #: gradient, and attention's value gradient (``A^T g``) then sums it coherently (Scales.shared_grad_gain)
    grho: dict[fx.Node, float] = {} if rho_out is None else rho_out
    #: each gradient's coherence with its node's values (a gain before a ReLU near a pooled readout sums it)
    gval: dict[fx.Node, float] = {} if value_out is None else value_out
    for node in reversed(list(gm.graph.nodes)):
        if node.op == "output" or not is_float(node):
            continue
        contribs, rhos, vals = [], [], []
        for user in node.users:
            if user.op == "output" or user not in grad:
                continue
            rec: Optional[ScaleRecord] = user.meta.get(META_KEY)
            s = scales_of.get(user)
            g = grad[user]  # a loss's too: one the graph divides (``sum / n``) receives 1 / n of the gradient
            loss = rec is not None and rec.kind == Kind.LOSS
            ru, qu = (0.0, 0.0) if loss else (grho.get(user, 0.0), gval.get(user, 0.0))
            if s is None or rec is None:
                contribs.append(g)
                rhos.append(ru)
                vals.append(qu)
                continue
            gain = s.grad_gain.get(node, 1.0 / s.bwd[node] if node in s.bwd else 1.0)
            gain = mixed_gain(gain, s.shared_grad_gain.get(node), ru)
            gain = mixed_gain(gain, s.value_grad_gain.get(node), qu)
            contribs.append(g * gain * edge_factor(rec, node))
            rhos.append(s.grad_rho.get(node, ru * s.grad_rho_factor.get(node, 1.0)))
            # a view passes the coherence on whole; an add by each input's share; other ops not at all
            keep = s.grad_value_pass.get(node, 1.0 if rec.kind == Kind.PRESERVE else 0.0)
            vals.append(s.grad_value.get(node, min(1.0, qu * keep + ru * s.grad_value_from_rho.get(node, 0.0))))
        total = sum(c * c for c in contribs)
        grho[node] = sum(c * c * r for c, r in zip(contribs, rhos)) / total if total > 0 else 0.0
        gval[node] = sum(c * c * q for c, q in zip(contribs, vals)) / total if total > 0 else 0.0
        if not contribs and returns_loss and node not in measured:
            val = node.meta.get("val")
            if not (isinstance(val, torch.Tensor) and val.dim() == 0) and any(u.op == "output" for u in node.users):
                grad[node] = 0.0
                continue
        if not contribs and node not in measured and not any(u.op == "output" or u in grad for u in node.users):
            grad[node] = 0.0  # unread (top-k values a loss ignores), or read only by ops no gradient flows through
            continue
        if node in measured:
            grad[node] = measured[node]
        elif isinstance(node.meta.get("val"), (tuple, list)):
            # readers of a tuple take disjoint pieces: their gradients are concatenated
            grad[node] = math.sqrt(sum(c * c for c in contribs) / len(contribs)) if contribs else 1.0
        else:
            grad[node] = math.sqrt(sum(c * c for c in contribs)) if contribs else 1.0
    return grad


def true_grad_rms(gm: fx.GraphModule, scales_of: dict[fx.Node, Scales],
                  rho_out: Optional[dict[fx.Node, float]] = None,
                  value_out: Optional[dict[fx.Node, float]] = None) -> dict[fx.Node, float]:
    """Predicted RMS of the true gradient (of the scaled forward) at every floating-point node (``rho_out``,
    ``value_out``: as in :func:`reverse_sweep`)."""
    return reverse_sweep(gm, scales_of, lambda rec, u: forward_factor(rec, u.name), rho_out=rho_out,
                         value_out=value_out)


def _chosen_factor(rec: ScaleRecord, u: fx.Node) -> float:
    fallback = rec.weights.get(u.name, rec.fwd) if rec.weights else 1.0
    return rec.bwd.get(u.name, fallback)


@declare('predict_grads', needs=('scales',))
def predict_grads(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Predict the RMS of every gradient from the chosen scales (reverse sweep).

    Where ``calibrate_grads`` measured a gradient, the measurement is used.
    """
    grad = reverse_sweep(gm, ctx.scales, _chosen_factor, ctx.measured_grads)
    for node, g in grad.items():
        rec = node.meta.get(META_KEY)
        if rec is not None:
            rec.bwd_rms = None if rec.kind == Kind.LOSS else g
    return PassResult(False, "gradient RMS predicted")


def _apply_policy(ctx: PassContext) -> None:
    if not ctx.unsupported:
        return
    lines = [f"  {u.node}: {u.op} (in {u.where})" + ("" if u.reason == "no rule" else f": {u.reason}")
             for u in ctx.unsupported]
    msg = (f"{len(ctx.unsupported)} floating-point op(s) are left unscaled (no unit-scaling rule, or one that "
           "cannot scale them as called):\n" + "\n".join(lines))
    policy = ctx.config.unsupported
    if policy == "error":
        raise UnitScaleError(msg, where="pass plan",
                             fix="do what a line's reason says, register a rule for these ops "
                             "(unit_scale_fx.rules.register), exclude them with UnitScaleConfig(node_filter=...), "
                             "or use unsupported='warn'")
    if policy == "warn":
        import warnings

        warnings.warn(msg, stacklevel=4)
    log.info(msg)
