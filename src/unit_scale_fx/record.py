"""The per-node scale record the planner writes into ``node.meta``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

#: The one ``node.meta`` key every pass reads and writes.
META_KEY = "unit_scale"


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


#: Where the planned module keeps its parameter-role analysis (``gm.meta``).
ROLES_META_KEY = "unit_scale_param_roles"

#: On a node whose arguments a pass rescaled (u-μP: ``mul`` nodes it inserted, the ``scale=`` of attention):
#: ``{"bypass": True}`` for an inserted multiplication (erasing it means reading its first argument), or
#: ``{"kwarg": (name, position, original value)}`` for a rescaled argument. ``analysis.equivalence`` reads
#: it to erase every scale the rewrite put into the model.
ARG_SCALE_KEY = "unit_scale_arg_scale"
