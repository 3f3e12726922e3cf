"""Graphs people can read: one line per node, generated Python, Graphviz DOT / SVG, and a diff.

Every function takes an ``fx.Graph`` (with the module that owns its parameters)
and, optionally, measured values per node name (:func:`~.track.measure_nodes`).
Shapes come from ``node.meta["val"]`` where shape propagation left it, else from
the measurement. Scale factors and predicted RMS come from each node's
:class:`~unit_scale_fx.ScaleRecord`; inserted ``scale`` nodes show their factors.
"""

from __future__ import annotations

import difflib
import math
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
import torch.fx as fx
import torch.nn as nn

from ..errors import UnitScaleError
from ..record import INSERTED, META_KEY, ScaleRecord
from ..rules.registry import has_float_value, node_op_name
from ..table import format_table
from .track import Measured, short_op

#: log2 |RMS| thresholds and the edge colour up to each; beyond the last: red.
PALETTE: tuple[tuple[float, str], ...] = ((1.0, "#2ca02c"), (2.0, "#9acd32"), (4.0, "#ff7f0e"))
FAR = "#d62728"
UNKNOWN = "#9e9e9e"
SCALE_FILL = "#ffd54f"


def rms_colour(rms: Optional[float]) -> str:
    """Edge colour for an RMS: green within 2x of 1, then yellow-green, orange, red (beyond 16x)."""
    if rms is None or not math.isfinite(rms) or rms <= 0:
        return UNKNOWN
    a = abs(math.log2(rms))
    for limit, colour in PALETTE:
        if a <= limit:
            return colour
    return FAR


def _g(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.3g}"


def _log2(v: Optional[float]) -> str:
    return "?" if v is None or v <= 0 or not math.isfinite(v) else f"{math.log2(v):+.1f}"


@dataclass
class _Info:
    op: str
    shape: str
    scales: str
    pred: str
    measured: str
    fwd: Optional[float]


def _shape(node: fx.Node, measured: Mapping[str, Measured]) -> Optional[tuple[int, ...]]:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return tuple(int(s) for s in val.shape)
    m = measured.get(node.name)
    return m.shape if m is not None else None


def _is_float_node(node: fx.Node, measured: Mapping[str, Measured]) -> bool:
    if node.op in ("placeholder", "output"):
        return True
    return node.name in measured or has_float_value(node)


def _info(node: fx.Node, root: Optional[nn.Module], measured: Mapping[str, Measured]) -> _Info:
    rec: Optional[ScaleRecord] = node.meta.get(META_KEY)
    inserted = bool(node.meta.get(INSERTED))
    if inserted:
        op = "scale"
    elif node.op == "get_attr":
        op = "parameter"
    elif node.op in ("placeholder", "output"):
        op = node.op
    else:
        op = short_op(node_op_name(node, root))
    shape = _shape(node, measured)
    scales, pred = "", ""
    if inserted:
        scales = f"x{float(node.args[1]):.4g} / grad x{float(node.args[2]):.4g}"
    elif rec is not None and rec.changes_anything:
        if rec.weights:
            scales = "weights " + ", ".join(f"{k}:{v:.3g}" for k, v in rec.weights.items())
        else:
            scales = f"x{rec.fwd:.4g} / grad " + ", ".join(f"{k}:{v:.3g}" for k, v in rec.bwd.items())
        if rec.constrained:
            scales += " (moved for validity)"
    if rec is not None and (rec.fwd_rms is not None or rec.bwd_rms is not None):
        pred = f"pred {_g(rec.fwd_rms)}/{_g(rec.bwd_rms)}"
    m = measured.get(node.name)
    meas = f"rms {_g(m.fwd)}/{_g(m.grad)}" if m is not None else ""
    fwd = m.fwd if m is not None else (rec.fwd_rms if rec is not None else None)
    return _Info(op + (f" [{rec.rule}]" if rec is not None and rec.rule != op else ""),
                 "x".join(map(str, shape)) if shape else "-", scales, pred, meas, fwd)


def graph_text(graph: fx.Graph, root: Optional[nn.Module] = None,
               measured: Optional[Mapping[str, Measured]] = None, float_only: bool = True) -> str:
    """One line per node: name, op [rule], shape, scales, predicted and measured RMS (fwd/grad)."""
    measured = measured or {}
    rows = [("node", "op", "shape", "scales (fwd / grad)", "predicted", "measured")]
    for node in graph.nodes:
        if float_only and not _is_float_node(node, measured):
            continue
        i = _info(node, root, measured)
        rows.append((node.name, i.op, i.shape, i.scales, i.pred, i.measured))
    return format_table(rows) + "\n"


def graph_python(graph: fx.Graph, root: nn.Module) -> str:
    """The Python code torch.fx generates for ``graph``."""
    return fx.GraphModule(root, graph).code.strip() + "\n"


# -- DOT --------------------------------------------------------------------
def _q(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def graph_dot(graph: fx.Graph, root: Optional[nn.Module] = None,
              measured: Optional[Mapping[str, Measured]] = None, title: str = "",
              added: frozenset[str] = frozenset(), swapped: frozenset[str] = frozenset()) -> str:
    """Graphviz DOT of the floating-point dataflow.

    Edges are coloured by log2 of the forward RMS of their source (measured, else
    predicted) and labelled ``log2 fwd / log2 grad``; ``scale`` nodes are gold
    diamonds. ``added`` / ``swapped`` node names are outlined (for diffs).
    """
    measured = measured or {}
    keep = [n for n in graph.nodes if _is_float_node(n, measured)]
    kept = set(keep)
    out = ["digraph G {", "  rankdir=TB;", '  node [shape=box, style="rounded,filled", fillcolor="#ffffff", '
           'fontname="Helvetica", fontsize=10];', '  edge [fontname="Helvetica", fontsize=8];']
    if title:
        out.append(f"  labelloc=t; label={_q(title)};")
    infos = {}
    for n in keep:
        i = infos[n] = _info(n, root, measured)
        label = "\n".join(x for x in (n.name, f"{i.op}  {i.shape}", i.scales, i.pred, i.measured) if x)
        attrs = [f"label={_q(label)}"]
        if n.meta.get(INSERTED):
            attrs += ["shape=diamond", f'fillcolor="{SCALE_FILL}"']
        elif n.op in ("placeholder", "output"):
            attrs += ["shape=oval", 'fillcolor="#e3f2fd"']
        elif n.op == "get_attr":
            attrs += ["shape=note", 'fillcolor="#f5f5f5"']
        if n.name in added:
            attrs += ["penwidth=2.5", 'color="#1b5e20"']
        if n.name in swapped:
            attrs += ["penwidth=2.5", 'color="#e65100"', 'fillcolor="#ffe0b2"']
        out.append(f"  {_q(n.name)} [{', '.join(attrs)}];")
    for n in keep:
        for u in n.all_input_nodes:
            if u not in kept:
                continue
            m = measured.get(u.name)
            fwd = infos[u].fwd
            label = f"{_log2(fwd)} / {_log2(m.grad if m else None)}" if m else _log2(fwd)
            out.append(f"  {_q(u.name)} -> {_q(n.name)} [color={_q(rms_colour(fwd))}, label={_q(label)}];")
    legend = ["|log2 rms| <= 1", "<= 2", "<= 4", "> 4"]
    out.append("  subgraph cluster_legend { label=\"edge colour: log2 forward RMS (label: fwd / grad)\"; "
               "fontsize=9; style=dashed;")
    for k, (text, colour) in enumerate(zip(legend, [c for _, c in PALETTE] + [FAR])):
        out.append(f'    legend{k} [label={_q(text)}, shape=plaintext, fillcolor="{colour}", style=filled];')
    out.append("  }")
    out.append("}")
    return "\n".join(out) + "\n"


def dot_to_svg(dot_src: str, timeout: float = 120.0) -> str:
    """Render DOT with the Graphviz ``dot`` binary."""
    exe = shutil.which("dot")
    if exe is None:
        raise UnitScaleError("SVG output needs the Graphviz 'dot' program, which is not installed",
                             where="dump --format svg",
                             fix="install Graphviz (apt-get install graphviz / brew install graphviz) or use --format dot")
    res = subprocess.run([exe, "-Tsvg"], input=dot_src, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise UnitScaleError(f"dot failed: {res.stderr.strip().splitlines()[-1] if res.stderr.strip() else res.returncode}",
                             where="dot -Tsvg", fix="report this with the DOT file (use --format dot)")
    return res.stdout


# -- diff -------------------------------------------------------------------
def _arg(a: Any) -> str:
    if isinstance(a, fx.Node):
        return a.name
    if isinstance(a, float):
        return f"{a:.4g}"
    if isinstance(a, (list, tuple)):
        inner = ", ".join(_arg(x) for x in a)
        return f"({inner},)" if isinstance(a, tuple) and len(a) == 1 else (f"({inner})" if isinstance(a, tuple) else f"[{inner}]")
    if isinstance(a, dict):
        return "{" + ", ".join(f"{k}: {_arg(v)}" for k, v in a.items()) + "}"
    return repr(a)


def _target(node: fx.Node, root: Optional[nn.Module]) -> str:
    if node.meta.get(INSERTED):
        return "scale"
    if node.op == "get_attr":
        return f"self.{node.target}"
    if node.op in ("placeholder", "output"):
        return node.op
    return node_op_name(node, root)


def node_code(node: fx.Node, root: Optional[nn.Module] = None) -> str:
    """``name = target(args, key=value)`` with float constants rounded."""
    args = [_arg(a) for a in node.args] + [f"{k}={_arg(v)}" for k, v in node.kwargs.items()]
    if node.op in ("placeholder", "get_attr"):
        return f"{node.name} = {_target(node, root)}"
    return f"{node.name} = {_target(node, root)}({', '.join(args)})"


@dataclass
class GraphDiff:
    """What the rewrite changed: nodes added, ops swapped (same name, new target), inputs rewired."""

    added: list[str]
    swapped: list[str]
    rewired: list[str]
    unified: str

    def summary(self) -> str:
        return (f"{len(self.added)} nodes added, {len(self.swapped)} ops swapped, "
                f"{len(self.rewired)} ops read rewired inputs")

    def __str__(self) -> str:
        return f"# {self.summary()}\n" + self.unified


def graph_diff(before: fx.Graph, after: fx.Graph, root: Optional[nn.Module] = None, context: int = 1) -> GraphDiff:
    """Compare two graphs node by node name; a unified diff of :func:`node_code` lines."""
    b = {n.name: n for n in before.nodes}
    added, swapped, rewired = [], [], []
    for n in after.nodes:
        old = b.get(n.name)
        if old is None:
            added.append(n.name)
        elif _target(old, root) != _target(n, root):
            swapped.append(n.name)
        elif node_code(old, root) != node_code(n, root):
            rewired.append(n.name)
    lines_b = [node_code(n, root) for n in before.nodes]
    lines_a = [node_code(n, root) for n in after.nodes]
    unified = "".join(
        line + ("" if line.endswith("\n") else "\n")
        for line in difflib.unified_diff(lines_b, lines_a, "before", "after", n=context, lineterm="")
    )
    return GraphDiff(added, swapped, rewired, unified)
