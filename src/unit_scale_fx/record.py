"""The per-node scale record the planner writes into ``node.meta``, and every meta key the package uses.

Every key unit_scale_fx writes into ``node.meta`` or ``gm.meta`` is defined here, once;
other modules import it from here (torch's own keys, such as ``"val"``, are not listed).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch.fx as fx

# -- node.meta keys ------------------------------------------------------------------
#: The one ``node.meta`` key every pass reads and writes: the node's :class:`ScaleRecord`.
META_KEY = "unit_scale"
#: A pass may pin a rule for one node under this key (calibration, fusion).
RULE_OVERRIDE = "unit_scale_rule"
#: Marks a floating-point value that no parameter or float input reaches
#: (rotary tables, masks, constants): data, not part of the scaled dataflow.
CONSTANT = "unit_scale_constant"
#: A constant's measured RMS (when example inputs are real).
CONSTANT_RMS = "unit_scale_constant_rms"
#: On an attention mask: the number of visible keys per query row.
MASK_KEYS = "unit_scale_mask_keys"
#: On an embedding's index that no input reaches (a buffer, an expand of one row: BERT's token types):
#: the share of position pairs that look up the same row (measured when example inputs are real).
INDEX_RHO = "unit_scale_index_rho"
#: True on every ``scale`` node the rewrite inserted.
INSERTED = "unit_scale_inserted"
#: What an inserted scale node does: ``("output", node name)`` or ``("input", consumer name)``.
SCALE_ROLE = "unit_scale_role"
#: On a scale node that absorbed its consumer's input scale (fold_scales): ``(fwd, bwd)`` of that part.
FOLDED = "unit_scale_folded"
#: On a node whose arguments a pass rescaled (u-μP: ``mul`` nodes it inserted, the ``scale=`` of attention):
#: ``{"bypass": True}`` for an inserted multiplication (erasing it means reading its first argument), or
#: ``{"kwarg": (name, position, original value)}`` for a rescaled argument. ``analysis.equivalence`` reads
#: it to erase every scale the rewrite put into the model.
ARG_SCALE_KEY = "unit_scale_arg_scale"
#: True on the nodes format simulation inserted or replaced.
FORMAT_SITE = "unit_scale_format_site"
#: On an op format simulation replaced (attention): its original ``(op, target)``.
FORMAT_REPLACED = "unit_scale_format_replaced"

# -- gm.meta keys --------------------------------------------------------------------
#: Where the planned module keeps its parameter-role analysis.
ROLES_META_KEY = "unit_scale_param_roles"
#: How the graph was captured (``"symbolic_trace"``, ``"torch.export"``).
CAPTURE = "capture"
#: Output container types torch.fx turned into plain dicts (``ModelOutput``s), by name.
LOST_TYPES = "lost_types"


def original(node: fx.Node) -> fx.Node:
    """The node behind any ``scale`` nodes the rewrite inserted on top of it (walks back through them)."""
    while node.meta.get(INSERTED) and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


@dataclass
class ScaleRecord:
    """What the planner decided for one node.

    Attributes:
        rule: the rule's name (``"matmul"``, ``"pointwise"``, ...); ``"unsupported"``
            for float ops with no rule, ``"excluded"`` for nodes the filter skipped.
        kind: the rule family (``"matmul"``, ``"pointwise"``, ``"norm"``,
            ``"preserve"``, ``"add"``, ``"residual"``, ``"loss"``, ...).
        op: a readable name of the target.
        shape: output shape (``None`` for non-tensors).
        fwd: forward scale applied to the output.
        bwd: backward scale per floating-point input, by input node name.
        ideal_fwd / ideal_bwd: the scales before the cut-edge constraint.
        constrained: True when forward and backward scales were tied.
        weights: for residual / weighted adds, the forward weight per input node name
            (``bwd`` then holds the backward weight where it differs).
        fwd_rms: predicted RMS of the output after scaling.
        bwd_rms: predicted RMS of the gradient w.r.t. the output.
        note: free text (why a choice was made).
    """

    rule: str
    kind: str
    op: str
    shape: Optional[tuple[int, ...]] = None
    fwd: float = 1.0
    bwd: dict[str, float] = field(default_factory=dict)
    ideal_fwd: float = 1.0
    ideal_bwd: dict[str, float] = field(default_factory=dict)
    constrained: bool = False
    weights: dict[str, float] = field(default_factory=dict)
    fwd_rms: Optional[float] = None
    bwd_rms: Optional[float] = None
    note: str = ""

    @property
    def changes_anything(self) -> bool:
        return (
            self.fwd != 1.0
            or any(b != 1.0 for b in self.bwd.values())
            or any(w != 1.0 for w in self.weights.values())
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape) if self.shape is not None else None
        return d
