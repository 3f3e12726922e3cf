"""calibrate_grads: make gradients unit by measurement, keeping them valid.

After ``balance``, every node ``u`` receives ``phi_u`` times its true gradient.
When real example inputs are known, this pass runs the planned model once,
forward and backward (from the loss as :func:`~unit_scale_fx.tensor_stats.loss_outputs`
defines it: the scalar outputs, else a unit random gradient at every output), and measures the gradient RMS ``m_u`` at every class of
nodes that shares a potential. The true gradient's RMS is ``m_u / phi_u``; the new
potential ``phi_u = 1 / (m_u / phi_u)`` makes the measured gradient exactly unit.
Any positive potentials give valid gradients, so this only changes their size.
Where rules cannot know the gradient (attention queries and keys, correlated
values), this is what makes backward RMS land near 1.

**Noise.** A vector parameter (a bias, a norm gain) has a gradient that sums its
per-row contributions over the whole batch and is seen through only ``d``
numbers: its measured RMS is dominated by sampling noise (two batches of the
same distribution gave potentials 2x apart). Such classes take their potential
from the measured class they feed, through the rule's ideal backward scale
(the analytic value), so plans do not wobble. A matrix (a weight of 2 or more
dimensions) is measured like an activation: its RMS over ``k n`` entries is a
stable statistic, and where the rows it sums are not independent the rules'
``sqrt(rows)`` is off by several times: where the rule would leave it more than
sqrt(2) off on the planning batch, the measurement replaces it. Measured RMS values are rounded
to a few significant bits (:mod:`.stats`), so the thread count does not change them.

**Data parallel.** Measurements go through ``ctx.stats`` (:mod:`.stats`): inside a
process group, gradients at batch-carrying values add up their squares and counts
over ranks, gradients of values every rank holds whole (parameters, a scalar loss)
are summed over ranks, and each rank's loss is seeded with ``1 / world`` (DDP's mean).
Every rank then gets the potentials one process would get on the combined batch.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Optional

import numpy as np
import torch
import torch.fx as fx

from ..record import META_KEY, ScaleRecord
from ..rules.registry import Kind, float_tensor_inputs, lookup, resolve_target
from ..scale import scale, scaled_add, scaled_conv
from ..tensor_stats import output_loss, rms
from .balance import FIXED_KINDS, _numel
from .fold_scales import ADDS, CONV_PARAMS, CONVOLUTIONS, SAVES_OUTPUT
from .base import PassContext, PassResult, declare, preserved_state
from .plan import mixed_gain
from .stats import LOCAL, round_bits, sum_count

log = logging.getLogger(__name__)


class _ScaledRun(fx.Interpreter):
    """Runs the planned (not yet rewritten) graph with its scales applied, as the rewrite will.

    Costs what a training step costs: values are freed once their last reader ran (what
    autograd saves for backward stays, as in training), and the gradient of each node is
    measured by a hook the moment backward computes it, and then dropped.
    """

    def __init__(self, gm: fx.GraphModule, output_bwd: dict[str, float], batch: set, keep_whole: bool) -> None:
        super().__init__(gm, garbage_collect_values=True)
        #: returned value name -> the backward-only scale between it and the caller
        self.output_bwd = output_bwd
        #: batch-carrying nodes (their gradients are summarised at once; others are kept whole)
        self.batch = batch
        #: node -> (sum of squares, element count) of its gradient, for batch-carrying nodes (filled in backward)
        self.batch_acc: dict[fx.Node, torch.Tensor] = {}
        #: node -> its gradient, for values every rank holds whole (parameters and what derives from them alone)
        self.whole: dict[fx.Node, torch.Tensor] = {}
        #: node -> RMS of its gradient, for those values on one process (no rank sums needed)
        self.whole_rms: dict[fx.Node, float] = {}
        self.keep_whole = keep_whole
        #: node -> number of elements and dimensions of its value
        self.sizes: dict[fx.Node, int] = {}
        self.dims: dict[fx.Node, int] = {}
        #: every hook this run registered: removed after its backward (a parameter would keep its hook)
        self.handles: list[Any] = []

    def run_node(self, n: fx.Node) -> Any:
        rec: ScaleRecord | None = n.meta.get(META_KEY)
        if n.op == "output":  # the backward scales between the returned values and the caller
            for u in n.all_input_nodes:
                b = self.output_bwd.get(u.name, 1.0)
                if b != 1.0 and isinstance(self.env.get(u), torch.Tensor):
                    self.env[u] = scale(self.env[u], 1.0, b)
            return super().run_node(n)
        if rec is None or (rec.kind in FIXED_KINDS and not rec.bwd) or n.op in ("placeholder", "get_attr", "output"):
            value = super().run_node(n)
        elif (_target(n) in ADDS and len(n.args) == 2 and not n.kwargs and float_tensor_inputs(n) == list(n.args)
              and all(isinstance(self.env.get(a), torch.Tensor) for a in n.args)):
            # an add with its scales computed as the fused op the rewrite runs computes it (no scaled
            # copy of either input): planning then costs no more memory than a training step
            a, b = n.args
            fa, fb = (rec.weights.get(u.name, 1.0) if rec.weights else 1.0 for u in (a, b))
            out = (1.0, 1.0) if rec.weights else (rec.fwd, 1.0)
            value = scaled_add(self.env[a], self.env[b], a_scale=(fa, rec.bwd.get(a.name, fa)),
                               b_scale=(fb, rec.bwd.get(b.name, fb)), out_scale=out)
        elif (_target(n) in CONVOLUTIONS and not rec.weights and not set(n.kwargs) - set(CONV_PARAMS)
              and not set(CONV_PARAMS[:len(n.args)]) & set(n.kwargs)
              and not isinstance(dict(zip(CONV_PARAMS, n.args), **n.kwargs).get("padding"), str)):
            # likewise a convolution (its output multiplied in place)
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            bound = dict(zip(CONV_PARAMS, args), **kwargs)
            nodes = dict(zip(CONV_PARAMS, n.args), **n.kwargs)
            factors = {key: (1.0, rec.bwd.get(nodes[arg].name, 1.0)) if isinstance(nodes.get(arg), fx.Node)
                       else (1.0, 1.0) for key, arg in (("x_scale", "input"), ("weight_scale", "weight"),
                                                         ("bias_scale", "bias"))}
            value = scaled_conv(bound["input"], bound["weight"], bound.get("bias"), bound.get("stride", 1),
                                bound.get("padding", 0), bound.get("dilation", 1), bound.get("groups", 1),
                                out_scale=(rec.fwd, 1.0), **factors)
        else:
            saved = {}
            inputs = float_tensor_inputs(n)
            # relu(a x) = a relu(x): scale the input, so backward keeps relu's output once (as fold_scales does)
            before = not rec.weights and rec.fwd > 0 and len(inputs) == 1 and _target(n) in SAVES_OUTPUT
            for u in inputs:
                f = rec.weights.get(u.name, 1.0) if rec.weights else (rec.fwd if before else 1.0)
                b = rec.bwd.get(u.name, f)
                if (f, b) != (1.0, 1.0) and isinstance(self.env.get(u), torch.Tensor):
                    saved[u] = self.env[u]
                    self.env[u] = scale(saved[u], f, b)
            value = super().run_node(n)
            self.env.update(saved)
            saved.clear()
            if not rec.weights and not before and rec.fwd != 1.0 and isinstance(value, torch.Tensor):
                value = scale(value, rec.fwd, 1.0)
        if isinstance(value, torch.Tensor) and value.requires_grad and n.op != "output":
            self.sizes[n], self.dims[n] = value.numel(), value.dim()
            self.handles.append(value.register_hook(self._measure(n)))
        return value

    def _measure(self, n: fx.Node):
        def hook(g: Optional[torch.Tensor]) -> None:
            if g is None:  # an undefined gradient (a custom autograd.Function's backward returned None for it)
                return
            if n in self.batch and g.dim() > 0:
                self.batch_acc[n] = sum_count(g)
            elif self.keep_whole:
                self.whole[n] = g.detach()
            else:  # one process: the RMS now, nothing kept (a reduction kernel: no full-size temporary)
                ss, count = sum_count(g).tolist()
                self.whole_rms[n] = math.sqrt(ss / count) if count else 0.0

        return hook

def _target(n: fx.Node) -> Any:
    try:
        return resolve_target(n)
    except Exception:
        return None


def _parameter_classes(pots: Any, params: set[fx.Node], batch: set[fx.Node]) -> dict[int, fx.Node]:
    """Classes made of one parameter and its copies alone (views, gathers, expands; no value computed from the
    batch): class -> the parameter."""
    out = {}
    for cls, members in pots.members().items():
        owned = [n for n in members if n in params]
        if len(owned) == 1 and not any(n in batch for n in members):
            out[cls] = owned[0]
    return out


def _repeats(u: fx.Node, param: Optional[fx.Node]) -> float:
    """How many copies of its parameter a member ``u`` of a parameter's class holds (1 for the parameter
    itself, a view or a slice): ``numel(u) / numel(p)`` where ``u`` is larger (a relative-position table
    gathered into a window's bias). The parameter's gradient sums them: ``sqrt`` of that times ``u``'s."""
    if param is None or u is param:
        return 1.0
    nu, np_ = _numel(u), _numel(param)
    return nu / np_ if np_ > 0 and nu > np_ else 1.0


def _shared_rows(pots: Any, scales_of: dict, u: fx.Node, v: fx.Node) -> float:
    """How much larger ``u``'s gradient through ``v`` is than the rule's ideal scale assumes (which takes the rows
    it sums as independent): where ``v``'s gradient is shared by a sample's positions (``pots.grad_rho``, the
    sweep's cross-position correlation: a mean-pooled readout, attention's value gradient) and the rule says what
    ``u``'s gain is then (``Scales.shared_grad_gain``: a bias, which sums it coherently), ``sqrt((1 - rho) + rho
    s^2)`` with ``s`` that gain over the independent one (:func:`~.plan.mixed_gain`, as the sweep mixes them); and
    the same where ``v``'s gradient follows its values (``pots.grad_value``; ``Scales.value_grad_gain``: a norm's
    gain)."""
    sv = scales_of.get(v)
    if sv is None or not sv.grad_gain.get(u):
        return 1.0
    k = 1.0
    if u in sv.shared_grad_gain:
        k = mixed_gain(k, sv.shared_grad_gain[u] / sv.grad_gain[u], pots.grad_rho.get(v, 0.0))
    if u in sv.value_grad_gain:
        k = mixed_gain(k, sv.value_grad_gain[u] / sv.grad_gain[u], pots.grad_value.get(v, 0.0))
    return k


def _analytic_vectors(pots: Any, noisy: set[int], done: set[int], new: np.ndarray, old: np.ndarray,
                      rows: dict[fx.Node, float], param_of: Optional[dict[int, fx.Node]] = None,
                      scales_of: Optional[dict] = None) -> int:
    """Potentials of parameter classes from the measured classes they feed, through the rules.

    On an edge ``u -> v`` the rule's ideal backward scale makes ``u``'s gradient unit when
    ``v``'s is; ``b_uv = f_uv * phi_u / phi_v`` then gives ``log phi_u``. The ideal scale
    of a parameter used by every row goes as ``rows ** -0.5``: where ``v`` carries the batch,
    it is corrected from the local to the global row count (``rows``: local / global).
    A class with no measured consumer moves with the mean shift of the measured classes. Where the edge
    leaves a copy of the parameter larger than the parameter (:func:`_repeats`), the parameter itself is
    made unit: its gradient sums the copies' (it is what the optimizer reads). Where the gradient it sums is
    shared by a sample's positions, the sweep's correlation corrects the rule (:func:`_shared_rows`).

    No measured correction: a parameter's gradient sums its rows over the batch, and the
    part of it that the rules do not predict (rows that are not independent) is, on one
    batch, as much sampling noise as signal. A correction taken from it (even one median
    over all such classes) moved every bias and gain scale by up to 1.28x between two
    batches of 32 (benchmarks/README.md, plan spread); what it corrected was about 1.1x.
    """
    shift = float(np.mean([new[c] - old[c] for c in done])) if done else 0.0
    param_of = param_of or {}
    for cls in noisy:
        logs = []
        for u, v in pots.free:
            if pots.cls(u) != cls or pots.cls(v) not in done:
                continue
            rec = pots.recs[v]
            f = rec.weights.get(u.name, 1.0) if rec.weights else rec.fwd
            ideal = rec.ideal_bwd.get(u.name)
            if not ideal or not f:
                continue
            logs.append(new[pots.cls(v)] + math.log(ideal / abs(f)) + 0.5 * math.log(rows.get(v, 1.0))
                        - 0.5 * math.log(_repeats(u, param_of.get(cls)))
                        - math.log(_shared_rows(pots, scales_of or {}, u, v)))
        a = float(np.mean(logs)) if logs else old[cls] + shift
        # rounded as measurements are: the same on every rank and for one process on the whole batch
        new[cls] = math.log(round_bits(math.exp(a)))
    return len(noisy)


def _measured_matrices(matrices: set[int], true_rms: dict[int, float], new: np.ndarray, old: np.ndarray) -> int:
    """A parameter matrix whose gradient the rule's scale leaves more than ``_MATRIX_TRUST`` off unit takes the
    measured scale instead. The rule's scale is the potential :func:`_analytic_vectors` gives it from the
    classes it feeds, once they were measured, not the one it was measured with: those classes move when
    measured, and the rule's scale with them (timm's LeViT: a downsampling attention's projection measured
    0.61 under the old potentials and came out 3.3 under the new ones). Returns how many took the measurement."""
    taken = 0
    for cls in matrices:
        g = true_rms.get(cls)
        if g and abs(math.log(g) + new[cls]) > _MATRIX_TRUST:
            new[cls] = float(np.clip(-math.log(g), old[cls] - _MAX_STEP, old[cls] + _MAX_STEP))
            taken += 1
    return taken


def _feeds_matmul_backward(n: fx.Node) -> bool:
    """Whether ``n``'s gradient is an operand of a matmul's backward (``n`` is a matmul's output).

    The members of a potential class are views of one value. Their gradients differ in size where a
    view repeats (the gradient of an expand sums its copies: a key / value head shared by several
    query heads) or selects: the class is made unit where its gradient enters a matmul, and
    otherwise at its fullest view.
    """
    rec = n.meta.get(META_KEY)
    return rec is not None and rec.kind == Kind.MATMUL


def _class_rms(measured: list[fx.Node], grads: dict[fx.Node, float], node: fx.Node) -> float:
    """The measured gradient RMS a class is made unit at: where its gradient enters a matmul's backward
    (:func:`_feeds_matmul_backward`), else at its fullest view. Several matmul outputs in one class (a
    concatenation of convolutions' outputs: DenseNet's features, each read by every later layer of its block;
    Inception's branches) have gradients of different sizes that one potential cannot all make unit: the
    class is made unit at their geometric mean, so that they spread evenly around 1 (at the first of them,
    DenseNet's most-read feature, the later layers' convolutions got weight gradients down to 0.27)."""
    mm = [grads[n] for n in measured if _feeds_matmul_backward(n) and grads[n] > 0 and math.isfinite(grads[n])]
    if len(mm) > 1:
        return math.exp(sum(math.log(g) for g in mm) / len(mm))
    return grads[node]


#: a matrix's measured gradient replaces the rule's scale only where the rule is more than this (log) factor
#: off: within it, the rule's scale stands (a measurement moves by ~12% between two planning batches, a GPT's
#: MLP weight in tests/passes/test_stats.py, and a parameter's gradient summed over data-parallel ranks differs
#: from one process's in its last bits); beyond it (rows that add up coherently) the measurement is taken whole.
#: sqrt(2), not 2: with 2, weights the rule left at 1.5-1.9 on the planning batch came out above 2 on the next
#: (benchmarks/unseen_timm.py: ViT-Tiny 94% of weight gradients in [1/2, 2] with 2, 100% with sqrt(2))
_MATRIX_TRUST = math.log(math.sqrt(2.0))
#: measured gradients this far below the typical one are rounding noise, not signal
_NO_SIGNAL = 1e-4
#: calibration moves a potential by at most this (log) factor from the analytic fit. The analytic sweep can be
#: off by thousands: PoolFormer / EfficientFormer mix tokens by ``pool(x) - x``, which the sweep takes for a
#: difference of independent values, where the gradients, smooth across positions as the activations are, mostly
#: cancel: about 2x too large a block, 2**12 at EfficientFormer-L1's stem (2**10 left its stem at 0.2)
_MAX_STEP = math.log(2.0 ** 24)


def _batch_nodes(gm: fx.GraphModule, ctx: PassContext) -> set[fx.Node]:
    """Nodes whose value is computed from the batch: reached from a placeholder that is not a parameter
    through tensor values (a size read from the batch, and positions built from it, carry no batch)."""
    out: set[fx.Node] = set()
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            if n.name not in ctx.param_inputs:
                out.add(n)
        elif any(u in out for u in n.all_input_nodes) and _holds_tensor(n.meta.get("val")):
            out.add(n)
    return out


def _holds_tensor(val: Any) -> bool:
    if isinstance(val, torch.Tensor):
        return True
    return isinstance(val, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in val)


@declare('calibrate_grads', needs=('potentials',), produces=('measured_grads',))
def calibrate_grads(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    pots = ctx.potentials
    if pots is None or ctx.real_values is None or not ctx.config.measure:
        return PassResult(False, "skipped (no real inputs or not the potential constraint)")
    stats = ctx.stats or LOCAL
    batch = _batch_nodes(gm, ctx)
    with preserved_state(gm), torch.enable_grad():
        run = _ScaledRun(gm, pots.output_bwd(), batch, keep_whole=stats.world > 1)
        out = run.run(*ctx.real_values)
        try:
            # the returned losses (0-dim outputs) where there are any: the gradient sizes of training on them,
            # also for a piece of a larger program (dynamo: a Hugging Face model's graph returns its loss beside
            # logits and a cache; probing every output gave its weights gradients of ~1e-3); a piece without a
            # loss, whose outputs feed later graphs, probes them all. Over ranks, the mean of the ranks' losses
            # (DDP's convention)
            loss = output_loss(out, where="calibrate_grads", scalars_first=True) / stats.world
            del out
            loss.backward()
        except RuntimeError as exc:  # UnitScaleError (no output carries a gradient) included
            log.info("calibrate_grads: no backward possible (%s); keeping analytic scales", exc)
            return PassResult(False, "skipped (no gradient)")
        finally:  # hooks on parameters outlive the run: every later training step would measure again
            for h in run.handles:
                h.remove()
            run.handles.clear()
        del loss
        # reduce over ranks in graph order (the same on every rank)
        grads: dict[fx.Node, float] = {}
        rows: dict[fx.Node, float] = {}  # batch-carrying nodes: local / global element count
        # 1-D parameters (biases, gains): noise-dominated measurements (see the module's docstring). A matrix's
        # gradient RMS over all its entries is not: where its rows are not independent (attention outputs and
        # the gradients of a pooled readout, shared across positions), the rule's sqrt(rows) is several
        # times off (timm's Swin: projection weights' gradients at 6.5-8.4), and the measurement corrects it
        vector: set[fx.Node] = set()
        params: set[fx.Node] = set()  # every parameter measured, whatever its dimensions
        for n in gm.graph.nodes:
            if n in run.batch_acc:
                r, count = stats.rms_of_sums(run.batch_acc[n], bits=None)
                if r is not None:
                    grads[n], rows[n] = r, run.sizes[n] / count
            elif n in run.whole or n in run.whole_rms:
                # held whole by every rank: its global gradient is the sum of the ranks' shares
                grads[n] = stats.tensor_rms(run.whole[n], bits=None) if n in run.whole else run.whole_rms[n]
                if run.dims[n] >= 1 and (n.op == "get_attr" or n.name in ctx.param_inputs):
                    params.add(n)
                    if run.dims[n] == 1:
                        vector.add(n)
        sizes = run.sizes
        run.whole.clear()
    new = pots.log_phi.copy()
    old = pots.log_phi
    true_rms: dict[int, float] = {}
    noisy: set[int] = set()
    matrices: set[int] = set()  # parameter matrices: the rule's scale, or the measurement where the rule is far off
    param_of = _parameter_classes(pots, params, batch)
    measured_by_rule = {pots.cls(u) for u, v in pots.free
                        if getattr(lookup(v, gm), "measured", False) and pots.cls(u) in param_of}
    for cls, members in pots.members().items():
        measured = [n for n in members if n in grads]
        if measured:
            node = max(measured, key=lambda n: (_feeds_matmul_backward(n), sizes[n]))
            # the true gradient's RMS, rounded; a parameter's copies (a gathered table): at the parameter
            repeats = _repeats(node, param_of.get(cls))
            g = round_bits(_class_rms(measured, grads, node) * math.sqrt(repeats) / math.exp(old[cls]))
            if g > 0 and math.isfinite(g):
                true_rms[cls] = g
                if node in vector or cls in param_of:
                    # a vector; or a matrix, which takes the rule's scale unless that is far off (below)
                    noisy.add(cls)
                    if node not in vector and cls not in measured_by_rule:  # (a recurrent layer's: its own gains)
                        matrices.add(cls)
    updated = 0
    done: set[int] = set()
    if true_rms:
        typical = float(np.median([g for c, g in true_rms.items() if c not in noisy] or list(true_rms.values())))
        for cls, g in true_rms.items():
            if g < _NO_SIGNAL * typical:
                noisy.discard(cls)
                continue  # a gradient that is zero up to rounding (a bias before a norm): no signal to scale
            if cls in noisy:
                continue
            new[cls] = float(np.clip(-math.log(g), old[cls] - _MAX_STEP, old[cls] + _MAX_STEP))
            done.add(cls)
            updated += 1
    updated += _analytic_vectors(pots, noisy, done, new, old, rows, param_of, ctx.scales)
    updated += _measured_matrices(matrices & noisy, true_rms, new, old)
    # The outputs' class (and every value shared with other graphs) keeps potential 1 exactly: gradients
    # that the caller sends into several outputs keep their relative weights. The measured potentials are
    # already relative to it: they make gradients unit for a unit gradient (1 into a loss) at the outputs.
    # Graph breaks: the break factor from the measured gradients of the inputs from earlier graphs
    # (measured with the factor so far on each loss); every other gradient follows it
    before = pots.loss_factor
    change = pots.join({c: g / before for c, g in true_rms.items()})
    if change != 1.0:
        new -= math.log(change)
    for c in pots.pinned():
        new[c] = 0.0
    pots.log_phi = new
    pots.assign()
    # what the gradients will measure with the new potentials
    ctx.measured_grads = {n: g * math.exp(new[pots.cls(n)] - old[pots.cls(n)])
                          for n, g in grads.items() if n in pots.g}
    for rec in pots.recs.values():
        if rec.kind not in FIXED_KINDS:
            rec.note = (rec.note + "; " if rec.note else "") + "gradient scales calibrated"
    return PassResult(False, f"{updated} of {len(pots.index)} potentials measured")
