"""``track_scales``: measured forward and gradient RMS of every graph node.

One forward and one backward of the model. The model is run node by node with an
:class:`torch.fx.Interpreter` (a unit-scaled model as it is; a plain model as a
traced copy that shares its parameters), so every float tensor a node produces is
measured, and its gradient is taken with :func:`torch.autograd.grad` (the model's
``.grad`` fields are not touched). A model that cannot be traced is measured per
module instead, with forward hooks.

For a :class:`~unit_scale_fx.UnitScaledModule`, a node with a
:class:`~unit_scale_fx.ScaleRecord` is reported as the rest of the graph sees it:
after its own output scale (the ``scale`` node the rewrite put on top of it). That
is what the record's predicted RMS describes, so measured and predicted values sit
side by side. The inserted ``scale`` nodes get rows of their own with
``include_inserted=True``.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
import torch.fx as fx
import torch.nn as nn

from ..errors import UnitScaleError
from ..record import FOLDED, INSERTED, META_KEY, SCALE_ROLE, ScaleRecord, original
from ..rules.matmul import matmul_operands
from ..rules.registry import is_float, lookup, node_op_name
from ..tensor_stats import loss_outputs, rms
from ..table import format_table
from .progress import Progress

log = logging.getLogger(__name__)


@dataclass
class NodeScale:
    """One row of a :class:`ScaleReport`.

    Attributes:
        name: the graph node's name (or the module's qualified name in hook mode).
        op: a readable name of what the node calls (``parameter`` for weights).
        kind: the rule family of the op, ``""`` where no rule applies.
        shape: the output shape.
        fwd_rms: measured RMS of the output.
        grad_rms: measured RMS of the gradient of the loss w.r.t. the output
            (``None`` where no gradient flows).
        pred_fwd_rms / pred_grad_rms: the plan's predictions (unit-scaled models).
        fwd_scale: the forward scale the plan put on the output.
        bwd_scales: the backward scale per input, by input name.
        rule: the planner's rule name; ``constrained`` when forward and backward were tied.
        matmul: ``"in"`` if the output is an operand of a matmul in forward,
            ``"out"`` if it is a matmul's output (its gradient is a backward operand),
            ``"in,out"`` for both, ``""`` otherwise.
        inserted: the row is a ``scale`` node inserted by the rewrite.
        measured_at: the graph node actually measured (differs from ``name`` where
            the row reports a node after its output scale).
    """

    name: str
    op: str
    kind: str = ""
    shape: Optional[tuple[int, ...]] = None
    fwd_rms: Optional[float] = None
    grad_rms: Optional[float] = None
    pred_fwd_rms: Optional[float] = None
    pred_grad_rms: Optional[float] = None
    fwd_scale: Optional[float] = None
    bwd_scales: dict[str, float] = field(default_factory=dict)
    rule: str = ""
    constrained: bool = False
    matmul: str = ""
    inserted: bool = False
    measured_at: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape) if self.shape is not None else None
        return d


def short_op(op: str) -> str:
    """``torch.nn.functional.linear`` -> ``linear``; ``aten.mm.default`` -> ``mm``."""
    parts = op.split(".")
    if parts[0] == "aten" and len(parts) >= 2:
        return parts[1]
    return parts[-1]


def _fmt(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.3g}"


def _in_band(v: Optional[float], lo: float, hi: float) -> bool:
    return v is None or v == 0.0 or (lo <= v <= hi)


@dataclass
class ScaleReport:
    """Measured (and predicted) RMS per graph node; prints as an aligned table.

    Attributes:
        model: the model's class name.
        rows: one :class:`NodeScale` per floating-point node, in graph order.
        mode: ``"graph"`` (per fx node) or ``"modules"`` (per module, untraceable models).
        unit_scaled: whether the model was a ``UnitScaledModule``.
        loss: the scalar that was differentiated.
    """

    model: str
    rows: list[NodeScale]
    mode: str = "graph"
    unit_scaled: bool = False
    loss: Optional[float] = None

    # -- access -----------------------------------------------------------
    def __iter__(self) -> Iterator[NodeScale]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, name: str) -> NodeScale:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(name)

    def _with(self, rows: Iterable[NodeScale]) -> "ScaleReport":
        return replace(self, rows=list(rows))

    # -- filters ----------------------------------------------------------
    def filter(self, pred: Callable[[NodeScale], bool]) -> "ScaleReport":
        """A report with the rows for which ``pred(row)`` is true."""
        return self._with(r for r in self.rows if pred(r))

    def matmul_operands(self) -> "ScaleReport":
        """Rows that feed a matmul (forward operand) or are a matmul's output (gradient operand)."""
        return self.filter(lambda r: bool(r.matmul))

    def outliers(self, lo: float = 0.5, hi: float = 2.0) -> "ScaleReport":
        """Rows whose measured forward or gradient RMS lies outside ``[lo, hi]``.

        Exact zeros (zero-initialised biases, by design) are not outliers.
        """
        return self.filter(lambda r: not (_in_band(r.fwd_rms, lo, hi) and _in_band(r.grad_rms, lo, hi)))

    def ops(self) -> "ScaleReport":
        """Rows of ops only (no parameters, inputs or inserted scale nodes)."""
        return self.filter(lambda r: r.op not in ("parameter", "input") and not r.inserted)

    def fraction_in_band(self, lo: float = 0.5, hi: float = 2.0, phase: str = "both") -> float:
        """Share of measured values (``fwd``, ``grad`` or ``both``) inside ``[lo, hi]``."""
        vals = []
        for r in self.rows:
            if phase in ("fwd", "both") and r.fwd_rms is not None:
                vals.append(r.fwd_rms)
            if phase in ("grad", "both") and r.grad_rms is not None:
                vals.append(r.grad_rms)
        return sum(lo <= v <= hi for v in vals) / max(1, len(vals))

    # -- output -----------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "mode": self.mode, "unit_scaled": self.unit_scaled, "loss": self.loss,
                "rows": [r.to_dict() for r in self.rows]}

    def to_json(self, indent: Optional[int] = 2) -> str:
        def clean(x: Any) -> Any:  # JSON has no inf / nan
            if isinstance(x, float) and not math.isfinite(x):
                return str(x)
            if isinstance(x, dict):
                return {k: clean(v) for k, v in x.items()}
            if isinstance(x, list):
                return [clean(v) for v in x]
            return x

        return json.dumps(clean(self.to_dict()), indent=indent)

    def _table(self) -> list[tuple[str, ...]]:
        head = ("node", "op", "shape", "mm", "fwd rms", "grad rms")
        if self.unit_scaled:
            head += ("pred fwd", "pred grad", "scale fwd", "scale bwd")
        rows = [head]
        for r in self.rows:
            row: tuple[str, ...] = (
                r.name, short_op(r.op) + ("*" if r.constrained else ""),
                "x".join(map(str, r.shape)) if r.shape else "-", r.matmul or "", _fmt(r.fwd_rms), _fmt(r.grad_rms))
            if self.unit_scaled:
                bwd = ", ".join(f"{v:.3g}" for v in r.bwd_scales.values()) or "-"
                row += (_fmt(r.pred_fwd_rms), _fmt(r.pred_grad_rms), _fmt(r.fwd_scale), bwd)
            rows.append(row)
        return rows

    def __str__(self) -> str:
        lines = format_table(self._table()).splitlines()
        title = f"{self.model}: {len(self.rows)} nodes" + (f", loss {self.loss:.4g}" if self.loss is not None else "")
        foot = "mm: in = matmul operand in forward, out = matmul output (its gradient is a backward operand)"
        if self.unit_scaled:
            foot += "; * = forward and backward scales tied"
        return "\n".join([title] + lines + [foot])

    def to_markdown(self) -> str:
        rows = self._table()
        out = ["| " + " | ".join(rows[0]) + " |", "|" + "|".join("---" for _ in rows[0]) + "|"]
        out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows[1:]]
        return "\n".join(out)


# ---------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------
def _float_tensor(v: Any) -> bool:
    return isinstance(v, torch.Tensor) and v.is_floating_point()


class _Recorder(fx.Interpreter):
    """Runs the graph and keeps every node's floating-point tensor output."""

    def __init__(self, gm: fx.GraphModule, progress: Progress) -> None:
        super().__init__(gm)
        self.values: dict[fx.Node, torch.Tensor] = {}
        self.progress = progress

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if _float_tensor(out):
            self.values[n] = out
        self.progress.update()
        return out


def _loss_terms(out: Any, loss_fn: Optional[Callable[[Any], torch.Tensor]]):
    """``(tensors, grad_outputs, scalar loss or None)`` to differentiate a model output."""
    if loss_fn is not None:
        loss = loss_fn(out)
        return [loss], [None], loss
    tensors, grads = loss_outputs(out, where="track_scales")  # scalar outputs, else unit random gradients
    loss = None if grads[0] is not None else tensors[0] if len(tensors) == 1 else torch.stack(tensors).sum()
    return tensors, grads, loss


def _run_and_differentiate(
    gm: fx.GraphModule, inputs: tuple, loss_fn: Optional[Callable[[Any], torch.Tensor]], progress: Progress,
    output_of: Optional[Callable[[Any], Any]] = None,
) -> tuple[dict[fx.Node, torch.Tensor], dict[fx.Node, Optional[torch.Tensor]], Optional[float]]:
    rec = _Recorder(gm, progress)
    with torch.enable_grad():
        out = rec.run(*inputs)
        if output_of is not None:  # the model's own output type (a class-kept model's graph returns it flat)
            out = output_of(out)
        tensors, grads, loss = _loss_terms(out, loss_fn)
        track = {n: t for n, t in rec.values.items() if t.requires_grad}
        uniq: dict[int, torch.Tensor] = {}
        for t in track.values():
            uniq.setdefault(id(t), t)
        got = torch.autograd.grad(tensors, list(uniq.values()), grad_outputs=grads, allow_unused=True)
    by_id = dict(zip(uniq.keys(), got))
    grad_of = {n: by_id.get(id(t)) for n, t in track.items()}
    loss_val = float(loss.detach()) if isinstance(loss, torch.Tensor) and loss.numel() == 1 else None
    return rec.values, grad_of, loss_val


@dataclass
class Measured:
    """Shape, forward RMS and gradient RMS of one node's output."""

    shape: tuple[int, ...]
    fwd: float
    grad: Optional[float]


def measure_nodes(
    gm: fx.GraphModule, *inputs: Any, loss_fn: Optional[Callable[[Any], torch.Tensor]] = None
) -> dict[str, Measured]:
    """``node name -> Measured`` for every float tensor node, each measured at its own output."""
    values, grads, _ = _run_and_differentiate(gm, tuple(inputs), loss_fn, Progress(1, enabled=False))
    return {n.name: Measured(tuple(t.shape), rms(t), None if grads.get(n) is None else rms(grads[n]))
            for n, t in values.items()}


def _effective(node: fx.Node) -> fx.Node:
    """The node as its readers see it: after the output scale the rewrite put on top of it."""
    users = list(node.users)
    if len(users) == 1:
        u = users[0]
        role = u.meta.get(SCALE_ROLE)
        if u.meta.get(INSERTED) and u.args and u.args[0] is node and role is not None and role[0] == "output":
            return u
    return node


def _matmul_role(node: fx.Node, gm: fx.GraphModule, eff: fx.Node, floats: Callable[[fx.Node], bool]) -> str:
    """``in`` if ``eff`` (possibly through inserted input scales) is a matmul operand; ``out`` for matmul outputs."""
    roles = []
    frontier, seen, ins = [eff], set(), False
    while frontier and not ins:
        r = frontier.pop()
        for u in r.users:
            if u in seen:
                continue
            seen.add(u)
            if u.meta.get(INSERTED):
                frontier.append(u)
            elif r in matmul_operands(u, gm, floats):
                ins = True
    if ins:
        roles.append("in")
    if matmul_operands(node, gm, floats):
        roles.append("out")
    return ",".join(roles)


def _graph_rows(gm: fx.GraphModule, values: dict, grads: dict, include_inserted: bool) -> list[NodeScale]:
    rows = []

    def floats(n: fx.Node) -> bool:  # measured values stand in where shape propagation did not run
        return n in values or is_float(n)

    for node in gm.graph.nodes:
        inserted = bool(node.meta.get(INSERTED))
        if node.op == "output" or (inserted and not include_inserted):
            continue
        eff = node if inserted else _effective(node)
        if eff not in values:
            continue
        t, g = values[eff], grads.get(eff)
        if not inserted and FOLDED in eff.meta:  # undo the consumer's input scale folded into eff
            a2, b2 = eff.meta[FOLDED]
            t = t / a2 if a2 != 1.0 else t
            g = g * b2 if (g is not None and b2 != 1.0) else g
        rec: Optional[ScaleRecord] = node.meta.get(META_KEY)
        op = {"placeholder": "input", "get_attr": "parameter"}.get(node.op) or node_op_name(node, gm)
        row = NodeScale(
            name=node.name, op="scale" if inserted else op, shape=tuple(t.shape), fwd_rms=rms(t),
            grad_rms=None if g is None else rms(g), inserted=inserted, measured_at=eff.name,
            matmul="" if inserted else _matmul_role(node, gm, eff, floats),
        )
        rule = lookup(node, gm)
        row.kind = rule.kind if rule is not None else ""
        if inserted:
            row.fwd_scale, row.bwd_scales = float(node.args[1]), {original(node).name: float(node.args[2])}
        if rec is not None:
            row.kind, row.rule, row.constrained = rec.kind, rec.rule, rec.constrained
            row.pred_fwd_rms, row.pred_grad_rms = rec.fwd_rms, rec.bwd_rms
            row.fwd_scale = rec.fwd
            row.bwd_scales = dict(rec.weights) if rec.weights else dict(rec.bwd)
        rows.append(row)
    return rows


def _module_rows(model: nn.Module, inputs: tuple, loss_fn: Optional[Callable], progress: Progress
                 ) -> tuple[list[NodeScale], Optional[float]]:
    outs: list[tuple[str, str, torch.Tensor]] = []

    def hook(name: str) -> Callable:
        def fn(mod: nn.Module, args: Any, out: Any) -> None:
            if _float_tensor(out):
                outs.append((name, type(mod).__qualname__, out))
            progress.update()
        return fn

    handles = [m.register_forward_hook(hook(name or "<root>")) for name, m in model.named_modules()]
    try:
        with torch.enable_grad():
            out = model(*inputs)
            tensors, grads, loss = _loss_terms(out, loss_fn)
            track = [(n, op, t) for n, op, t in outs if t.requires_grad]
            got = torch.autograd.grad(tensors, [t for _, _, t in track], grad_outputs=grads, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    gmap = {id(t): g for (_, _, t), g in zip(track, got)}
    rows = [NodeScale(name=n, op=op, shape=tuple(t.shape), fwd_rms=rms(t),
                      grad_rms=None if gmap.get(id(t)) is None else rms(gmap[id(t)]), measured_at=n)
            for n, op, t in outs]
    loss_val = float(loss.detach()) if isinstance(loss, torch.Tensor) and loss.numel() == 1 else None
    return rows, loss_val


def traced_graph(model: nn.Module) -> Optional[fx.GraphModule]:
    """``model`` itself if it is a GraphModule, else a symbolically traced copy sharing its
    parameters (torch.nn layers traced through, as unit_scale captures); None if untraceable."""
    if isinstance(model, fx.GraphModule):
        return model
    from ..capture import UnitScaleTracer

    try:
        tracer = UnitScaleTracer()
        graph = tracer.trace(model)
    except Exception as exc:  # tracing raises many kinds of errors
        log.info("track_scales: %s is not traceable (%s: %s); measuring per module", type(model).__name__,
                 type(exc).__name__, exc)
        return None
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def track_scales(
    model: nn.Module,
    *inputs: Any,
    loss_fn: Optional[Callable[[Any], torch.Tensor]] = None,
    include_inserted: bool = False,
    progress: Optional[bool] = None,
    kwargs: Optional[dict] = None,
) -> ScaleReport:
    """Run ``model(*inputs, **kwargs)`` forward and backward once; measure every node's RMS.

    Args:
        model: any ``nn.Module``; a :class:`~unit_scale_fx.UnitScaledModule`, or a model
            :func:`~unit_scale_fx.unit_scale` returned with its own class kept (a Hugging
            Face model), adds the plan's predictions and scale factors to each row. The
            latter is measured on the graph captured for this call (captured and planned
            now if the call is its first).
        inputs: positional inputs of one forward call.
        kwargs: keyword inputs of that call.
        loss_fn: maps the output to a scalar loss. Without it the scalar outputs are the
            loss (outputs beside them get no gradient of their own); without a scalar
            output, every output receives a seeded unit-RMS random gradient.
        include_inserted: also give the rewrite's ``scale`` nodes rows of their own.
        progress: show a progress bar on stderr (default: only on a terminal).

    Returns:
        a :class:`ScaleReport`, one row per floating-point node in graph order.
    """
    if not isinstance(model, nn.Module):
        raise UnitScaleError(f"track_scales expects an nn.Module, got {type(model).__name__}",
                             where="track_scales(model)", fix="pass the model, then its inputs")
    from ..api import UnitScaledModel, UnitScaledModule

    name = type(model).__name__
    if isinstance(model, UnitScaledModel):  # the user's class kept: measure the graph of this call
        from .validity import class_kept_graph

        gm, flat, output_of = class_kept_graph(model, inputs, kwargs or {}, "track_scales")
        with Progress(len(gm.graph.nodes), "track_scales", enabled=progress) as bar:
            values, grads, loss = _run_and_differentiate(gm, flat, loss_fn, bar, output_of)
        return ScaleReport(name, _graph_rows(gm, values, grads, include_inserted), mode="graph", unit_scaled=True,
                           loss=loss)
    if kwargs:
        raise UnitScaleError("track_scales takes keyword inputs only for a model unit_scale returned with its "
                             "own class kept", where="track_scales(model, ..., kwargs=...)",
                             fix="pass the inputs positionally")
    unit_scaled = isinstance(model, UnitScaledModule)
    if unit_scaled and not model.us_planned:
        model.replan(*inputs)
    gm = traced_graph(model)
    if gm is None:
        with Progress(len(list(model.modules())), "track_scales", enabled=progress) as bar:
            rows, loss = _module_rows(model, inputs, loss_fn, bar)
        return ScaleReport(name, rows, mode="modules", unit_scaled=False, loss=loss)
    with Progress(len(gm.graph.nodes), "track_scales", enabled=progress) as bar:
        values, grads, loss = _run_and_differentiate(gm, inputs, loss_fn, bar)
    rows = _graph_rows(gm, values, grads, include_inserted)
    return ScaleReport(name, rows, mode="graph", unit_scaled=unit_scaled, loss=loss)


__all__ = ["Measured", "NodeScale", "ScaleReport", "measure_nodes", "short_op", "track_scales"]


def predicted_operands(gm: fx.GraphModule) -> list:
    """The plan's own prediction of the matmul operands :func:`~.recorder.record_matmul_operands` measures.

    Forward: the predicted RMS of each operand of every matmul-class op (weights: 1, as
    ``init_weights`` makes them); backward: the predicted gradient RMS at the op's output. Needs no
    data and no memory, so it works on a model planned on the meta device (a "bands prediction").
    """
    from .recorder import MatmulOperand

    out = []
    for node in gm.graph.nodes:
        if node.meta.get(INSERTED):
            continue
        ops = matmul_operands(node, gm)
        rec: Optional[ScaleRecord] = node.meta.get(META_KEY)
        if not ops or rec is None:
            continue
        name = node_op_name(node, gm)
        for role, a in zip(("left", "right", "v"), ops):
            src = original(a)
            r = src.meta.get(META_KEY)
            rms = r.fwd_rms if r is not None else (1.0 if src.op == "get_attr" else None)
            if rms is not None:
                val = src.meta.get("val")
                out.append(MatmulOperand(name, "fwd", role, tuple(getattr(val, "shape", ())), float(rms)))
        if rec.bwd_rms is not None:
            out.append(MatmulOperand(name, "bwd", "grad", tuple(rec.shape or ()), float(rec.bwd_rms)))
    return out
