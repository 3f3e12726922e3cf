"""balance: backward scales that are valid by construction, chosen by least squares.

Forward scales stay ideal (every op's output unit). Each edge ``u -> v`` carries a
forward factor ``f_uv`` (the op's output scale, or an add's input weight) and a
backward factor ``b_uv``. If there are positive *potentials* ``phi`` on the nodes with

    b_uv = f_uv * phi_u / phi_v          for every edge,

then by induction from the loss every node receives ``phi_u`` times its true
gradient (of the scaled forward), so every parameter gets a positive multiple of
its true gradient: the gradients are valid. Conversely, on edges where no scale
op can sit (views, ops without a rule) ``phi_u = phi_v``.

We pick ``log phi`` to make ``b_uv`` as close as possible to the ideal backward
scale ``b*_uv`` (the one that makes the gradient unit) in the least-squares
sense: a weighted graph-Laplacian system. On a bridge (cut edge) the fit is
exact, so this contains the cut-edge rule; around a residual block it spreads
the unavoidable mismatch over the whole block instead of one op, and a tied
weight gets one potential for both of its uses.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Collection

import numpy as np
import torch
import torch.fx as fx

from ..record import META_KEY, ScaleRecord
from ..rules.registry import Kind
from .base import PassContext, PassResult, declare
from .init_weights import _source_param

log = logging.getLogger(__name__)

#: Record kinds with no scale op of their own: their edges keep the true gradient.
FIXED_KINDS = frozenset({Kind.PRESERVE, Kind.UNSUPPORTED, Kind.EXCLUDED})

_EPS = 1e-9  # ties down potentials not reached by any equation


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[fx.Node, fx.Node] = {}

    def find(self, x: fx.Node) -> fx.Node:
        root = x
        while self.parent.get(root, root) is not root:
            root = self.parent[root]
        while self.parent.get(x, x) is not root:  # path compression
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, a: fx.Node, b: fx.Node) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra is not rb:
            self.parent[ra] = rb


def _forward_factor(rec: ScaleRecord, u: str) -> float:
    return rec.weights.get(u, 1.0) if rec.weights else rec.fwd


def _needs_grad(u: fx.Node, gm: fx.GraphModule) -> bool:
    """Buffers carry no gradient. Inputs do (a unit-scaled part of a larger model)."""
    if u.op == "get_attr":
        try:
            gm.get_parameter(str(u.target))
            return True
        except AttributeError:
            return False
    return True


def _numel(n: fx.Node) -> int:
    val = n.meta.get("val")
    return int(val.numel()) if hasattr(val, "numel") else 0


def parameter_edges(gm: fx.GraphModule, g: Any, recs: dict[fx.Node, ScaleRecord],
                    param_inputs: Collection[str] = ()) -> set[tuple[fx.Node, fx.Node]]:
    """Edges ``u -> v`` where a parameter (or a view, expand or copy of it alone: ``u``) enters an op without
    a scale of its own (``v``: a concatenation, a stack, a ``where``) together with values computed from
    the batch. A class token concatenated to the patch tokens, a learned register or padding row. Also
    where such an op makes more values of the parameter alone than it has (an expand over the batch, a
    table of rows gathered by index: a mixture of experts' per-expert biases): its gradient sums the
    copies, and the op's rule gives the edge the ideal factor ``1 / sqrt(copies)``.

    Such an op passes the true gradient to each input, so without this the parameter shares the potential
    of the batch's values, and its gradient, which sums a batch of rows (and in a class token, the one
    position a classifier reads), is tens of times unit. A backward-only scale on the edge is valid whatever
    its value: nothing but that parameter lies behind it. The edge gets a potential difference like any
    scaled op's input (:class:`Potentials`), and the rewrite puts ``scale(u, 1, b)`` on it."""
    out: set[tuple[fx.Node, fx.Node]] = set()
    for v, rec in recs.items():
        if rec.kind != Kind.PRESERVE or v.op not in ("call_function", "call_method"):
            continue
        ins = list(g.predecessors(v))  # (``g``: the planner's graph of floating-point values, networkx)
        if str(getattr(v.target, "__name__", v.target)).split(".")[0].endswith("_"):
            continue  # an in-place op
        if len(ins) == 1:
            # a parameter expanded, repeated or gathered into more values than it has (a class token over the
            # batch, a table of per-expert biases indexed by token): its gradient sums those copies. A view or
            # a slice of the parameter is the parameter's class.
            (u,) = ins
            s = _source_param(u, gm, param_inputs)
            if s is not None and _is_parameter(s, gm, param_inputs) and _numel(v) > _numel(u) > 0:
                out.add((u, v))
            continue
        sources = {u: _source_param(u, gm, param_inputs) for u in ins}
        if any(s is None for s in sources.values()):
            out.update((u, v) for u, s in sources.items() if s is not None and _is_parameter(s, gm, param_inputs))
    return out


def _is_parameter(n: fx.Node, gm: fx.GraphModule, param_inputs: Collection[str]) -> bool:
    return n.name in param_inputs if n.op == "placeholder" else (n.op == "get_attr" and _needs_grad(n, gm))


def solve_laplacian(n: int, rows: list[tuple[int, int, float, float]], anchors: list[int]) -> np.ndarray:
    """Least squares for ``x[i] - x[j] = c`` (weight w) and ``x[a] = 0``: the normal equations."""
    # dense solve for small systems; above that the sparse CG below (a 48-layer GPT: 0.02 s vs 0.5 s dense)
    lap = np.zeros((n, n)) if n <= 256 else None
    rhs = np.zeros(n)
    if lap is not None:
        for i, j, c, w in rows:
            lap[i, i] += w
            lap[j, j] += w
            lap[i, j] -= w
            lap[j, i] -= w
            rhs[i] += w * c
            rhs[j] -= w * c
        for a in anchors:
            lap[a, a] += 1.0
        lap[np.diag_indices(n)] += _EPS
        return np.linalg.solve(lap, rhs)
    # large graphs: conjugate gradients with a Jacobi preconditioner
    ii = np.array([r[0] for r in rows]); jj = np.array([r[1] for r in rows])
    cc = np.array([r[2] for r in rows]); ww = np.array([r[3] for r in rows])
    np.add.at(rhs, ii, ww * cc)
    np.add.at(rhs, jj, -ww * cc)
    anchor = np.zeros(n)
    anchor[anchors] = 1.0
    diag = np.bincount(ii, ww, n) + np.bincount(jj, ww, n) + anchor + _EPS

    def matvec(x: np.ndarray) -> np.ndarray:
        d = ww * (x[ii] - x[jj])
        return np.bincount(ii, d, n) - np.bincount(jj, d, n) + (anchor + _EPS) * x

    x = np.zeros(n)
    r = rhs - matvec(x)
    z = r / diag
    p = z.copy()
    rz = r @ z
    for _ in range(20 * n):
        ap = matvec(p)
        alpha = rz / (p @ ap)
        x += alpha * p
        r -= alpha * ap
        if np.linalg.norm(r) < 1e-10 * max(1.0, np.linalg.norm(rhs)):
            break
        z = r / diag
        rz_new = r @ z
        p = z + (rz_new / rz) * p
        rz = rz_new
    return x


def _is_loss_value(n: fx.Node) -> bool:
    val = n.meta.get("val")
    return isinstance(val, torch.Tensor) and val.dim() == 0 and val.is_floating_point()


class Potentials:
    """Union-find classes of nodes that must share a potential, and the potentials."""

    def __init__(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        self.g = ctx.topology.graph
        self.recs: dict[fx.Node, ScaleRecord] = {n: n.meta[META_KEY] for n in self.g if META_KEY in n.meta}
        self.uf = _UnionFind()
        self.free: list[tuple[fx.Node, fx.Node]] = []
        self.gm = gm
        self.boundary_names = set(ctx.boundary)
        #: the break factor on every returned loss (``ctx.join_breaks``; 1 otherwise): :meth:`join` sets it
        #: where no earlier graph fixed it
        self.joins = bool(ctx.join_breaks)
        self.fixed_factor = ctx.break_factor
        self.loss_factor = float(ctx.break_factor) if self.joins and ctx.break_factor else 1.0
        self.param_edges = parameter_edges(gm, self.g, self.recs, ctx.param_inputs)
        for u, v in self.g.edges:
            rec = self.recs.get(v)
            if (u, v) in self.param_edges:
                self.free.append((u, v))  # a parameter's own backward-only scale, before the op
            elif rec is None or rec.kind in FIXED_KINDS:
                self.uf.union(u, v)  # no scale op here: the true gradient passes
            elif _needs_grad(u, gm):
                # every float input of a scaled op has its own backward scale, listed by the rule or not
                # (a soft target the model computes itself): an unlisted one ideally gets the forward factor
                self.free.append((u, v))
        roots = {self.uf.find(n) for n in self.g}
        self.index = {r: i for i, r in enumerate(sorted(roots, key=lambda n: n.name))}
        # The graph's outputs: one class of their own (the caller's side of every returned value),
        # pinned to potential 1. Each returned float value ``n`` reaches it through a backward-only
        # scale ``phi_n`` (see :meth:`output_bwd`), so ``n`` keeps whatever potential fits inside.
        out = gm.graph.find_nodes(op="output")
        leaves = torch.utils._pytree.tree_leaves(out[0].args[0]) if out else []
        self.output_leaves = list(dict.fromkeys(n for n in leaves if isinstance(n, fx.Node) and n in self.g))
        self.output_cls = len(self.index)
        self.log_phi = np.zeros(len(self.index) + 1)
        #: each node's gradient correlation across a sample's positions, from the sweep (:meth:`fit_unit_grads`'s
        #: caller fills it; ``calibrate_grads`` corrects the parameters' rule scales with it)
        self.grad_rho: dict[fx.Node, float] = {}
        #: each node's gradient coherence with its own values, from the same sweep (a norm's gain sums it)
        self.grad_value: dict[fx.Node, float] = {}

    def pinned(self) -> set[int]:
        """Classes whose potential is exactly 1: the outputs' class and values shared with other graphs.

        With every returned value at one potential, the gradients the caller sends into the outputs
        (a sum of returned losses, a loss on ``(logits, hidden)``, an aux loss) keep their relative
        weights, and every parameter gets a positive multiple of its true gradient.
        """
        return {self.output_cls} | self.boundary()

    def output_bwd(self) -> dict[str, float]:
        """Backward factor of the edge from each returned float value ``n`` to the caller: ``phi_n / 1``
        (times the break factor for a returned loss)."""
        return {n.name: math.exp(self.log_phi[self.cls(n)] - self.log_phi[self.output_cls])
                * (self.loss_factor if _is_loss_value(n) else 1.0)
                for n in self.output_leaves}

    def join(self, true_rms: dict[int, float]) -> float:
        """With ``ctx.join_breaks`` and no factor fixed yet: the break factor that makes the gradient of
        the inputs from earlier graphs unit-sized (``true_rms``: class -> RMS of its gradient with 1 into
        each loss; the inverse of their geometric mean). Returns the factor by which it changed."""
        if not self.joins or self.fixed_factor is not None:
            return 1.0
        inputs = {self.cls(n) for n in self.g if n.name in self.boundary_names and n.op == "placeholder"}
        logs = [math.log(true_rms[c]) for c in inputs if c in true_rms and 0 < true_rms[c] < math.inf]
        if not logs:
            return 1.0
        new = math.exp(-float(np.mean(logs)))
        change, self.loss_factor = new / self.loss_factor, new
        return change

    def boundary(self) -> set[int]:
        """Classes of values linked to code outside the graph (``ctx.boundary``): their potential is 1.

        The other side (another graph of a model dynamo split) cannot know this graph's
        potentials; with the true gradient at every crossing, both sides agree.
        """
        return {self.cls(n) for n in self.g if n.name in self.boundary_names}

    def cls(self, n: fx.Node) -> int:
        return self.index[self.uf.find(n)]

    def loss_classes(self) -> set[int]:
        """The reference potentials (1): the losses the graph returns (its 0-dim outputs), else its loss ops.

        A loss returned as ``sum / num_items`` is the output; the cross entropy before the
        division receives ``1 / num_items`` of the gradient, so it cannot be the reference.
        """
        out = next((n for n in reversed(self.gm.graph.nodes) if n.op == "output"), None)
        leaves = torch.utils._pytree.tree_leaves(out.args) if out is not None else []
        scalars = {self.cls(n) for n in leaves if isinstance(n, fx.Node) and n in self.recs
                   and isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].dim() == 0}
        return scalars or {self.cls(n) for n, rec in self.recs.items() if rec.kind == Kind.LOSS}

    def members(self) -> dict[int, list[fx.Node]]:
        out: dict[int, list[fx.Node]] = {}
        for n in self.g:
            out.setdefault(self.cls(n), []).append(n)
        return out

    def fit_ideal(self) -> int:
        """Least-squares potentials for the rules' ideal backward scales."""
        rows = []
        for u, v in self.free:
            i, j = self.cls(u), self.cls(v)
            if i == j:
                continue
            rec = self.recs[v]
            f = _forward_factor(rec, u.name)
            c = math.log(rec.ideal_bwd.get(u.name, f)) - math.log(f)
            rows.append((i, j, c, 1.0))
        n_edges = len(rows)
        rows += [(self.cls(n), self.output_cls, 0.0, 1.0) for n in self.output_leaves]  # ideally the true gradient
        pinned = self.pinned()
        anchors = sorted(self.loss_classes() | pinned)
        if rows:
            self.log_phi = solve_laplacian(len(self.index) + 1, rows, anchors)
        for c in pinned:  # exactly 1, not only near it (any potentials are valid, if all outputs share one)
            self.log_phi[c] = 0.0
        return n_edges

    def fit_unit_grads(self, true_rms: dict[fx.Node, float]) -> int:
        """Potentials ``phi = 1 / (predicted true-gradient RMS)``: the gradient at each class is unit.

        ``true_rms`` comes from a reverse sweep of the rules' gains (:func:`.plan.true_grad_rms`).
        Each class takes the prediction at its largest matmul output (whose gradient the backward
        matmuls consume), else at its largest member (the fullest view of the value);
        classes without a prediction keep the least-squares fit. Any positive potentials are
        valid, so this only chooses their size, as :mod:`.calibrate_grads` does by measurement.
        """
        best: dict[int, tuple[tuple[bool, int], float]] = {}
        for n, g in true_rms.items():
            if n not in self.g or not (g > 0 and math.isfinite(g)):
                continue
            c = self.cls(n)
            # a matmul's output first: its gradient is what the backward matmuls consume
            rec = self.recs.get(n)
            key = (rec is not None and rec.kind in ("matmul", "attention"), _numel(n))
            if c not in best or key > best[c][0]:
                best[c] = (key, g)
        if not best:
            return 0
        typical = float(np.median([g for _, g in best.values()]))
        self.join({c: g for c, (_, g) in best.items()})  # the sweep starts from 1 into each loss
        done = 0
        for c, (_, g) in best.items():
            if g < 1e-4 * typical:
                continue  # a gradient that is zero up to rounding (a bias before a norm): keep the fit
            self.log_phi[c] = -math.log(g * self.loss_factor)
            done += 1
        for c in self.pinned():  # the outputs' class and values shared with other graphs stay at exactly 1
            self.log_phi[c] = 0.0
        return done

    def assign(self) -> None:
        """Write ``b_uv = f_uv * phi_u / phi_v`` into every record."""
        free = set(self.free)
        for v, rec in self.recs.items():
            if rec.kind in FIXED_KINDS:
                # a parameter's edge into a concatenation, an expand or a gather: a backward-only factor on that
                # input alone
                rec.bwd = {u.name: math.exp(self.log_phi[self.cls(u)] - self.log_phi[self.cls(v)])
                           for u in self.g.predecessors(v) if (u, v) in self.param_edges}
                continue
            bwd: dict[str, float] = {}
            for u in self.g.predecessors(v):  # every float input, listed by the rule or not
                f = _forward_factor(rec, u.name)
                if (u, v) in free:
                    bwd[u.name] = f * math.exp(self.log_phi[self.cls(u)] - self.log_phi[self.cls(v)])
                    if u.name not in rec.ideal_bwd and abs(bwd[u.name] / f - 1.0) < 1e-6:
                        bwd[u.name] = f  # an input the rule does not list: exactly the forward factor if that fits
                else:
                    bwd[u.name] = f
            rec.bwd = bwd
            rec.constrained = any(abs(math.log(b) - math.log(rec.ideal_bwd[k])) > 1e-3
                                  for k, b in bwd.items() if k in rec.ideal_bwd)


@declare('balance', needs=('topology', 'scales'), produces=('potentials',))
def balance(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    if ctx.config.constraint != "potential":
        return PassResult(False, f"local constraint {ctx.config.constraint!r}: nothing to do")
    from .plan import true_grad_rms

    pots = Potentials(gm, ctx)
    n_rows = pots.fit_ideal()
    n_swept = pots.fit_unit_grads(true_grad_rms(gm, ctx.scales, rho_out=pots.grad_rho, value_out=pots.grad_value))
    pots.assign()
    ctx.potentials = pots
    log.debug("balance: %d of %d potentials from a reverse sweep of the rules' gains", n_swept, len(pots.index))
    return PassResult(False, f"{len(pots.index)} potentials from {n_rows} edges")