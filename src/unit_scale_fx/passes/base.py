"""What a pass is: ``(GraphModule, PassContext) -> PassResult``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch.fx as fx

from ..config import UnitScaleConfig


@dataclass
class UnsupportedOp:
    """A floating-point op with no rule, reported together with the others."""

    node: str
    op: str
    where: str
    reason: str = "no rule"


@dataclass
class PassContext:
    """State shared by the passes of one transform."""

    config: UnitScaleConfig = field(default_factory=UnitScaleConfig)
    example_args: Optional[tuple] = None
    example_kwargs: Optional[dict] = None
    topology: Any = None
    unsupported: list[UnsupportedOp] = field(default_factory=list)
    timings: list[tuple[str, float]] = field(default_factory=list)
    #: RMS of floating-point placeholders by name; shape_prop measures the ones not given here.
    input_rms: dict[str, float] = field(default_factory=dict)
    #: placeholders that are parameters, by name -> the parameter (graphs captured by dynamo take
    #: parameters as inputs instead of ``get_attr``); init and planning treat them like ``get_attr``.
    param_inputs: dict[str, Any] = field(default_factory=dict)
    #: names of values connected through code outside this graph (inputs that carry a gradient in from
    #: earlier graphs, outputs read by later ones); topology joins them through one virtual node, so an
    #: edge is called a cut edge only if it is one whatever the outside does.
    boundary: set[str] = field(default_factory=set)
    #: the placeholders' real values (None when inputs are fake or on the meta device)
    real_values: Optional[list] = None


@dataclass
class PassResult:
    modified: bool
    info: str = ""


Pass = Callable[[fx.GraphModule, PassContext], PassResult]


def module_path(node: fx.Node) -> str:
    """The qualified name of the module a node came from ("" for the root)."""
    if node.op in ("call_module", "get_attr"):
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        last = list(stack.values())[-1]
        path = last[0] if isinstance(last, tuple) else str(last)
        return str(path)
    return ""


class preserved_state:
    """Run a measurement in the module's own mode without side effects.

    Buffers (e.g. BatchNorm running statistics) and the global RNG state are
    restored afterwards, and parameter gradients are cleared, so planning leaves
    no trace on the model or on the user's random stream.
    """

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm

    def __enter__(self) -> "preserved_state":
        import torch

        self.buffers = {k: v.detach().clone() for k, v in self.gm.named_buffers()}
        self.rng = torch.random.get_rng_state()
        return self

    def __exit__(self, *exc: object) -> None:
        import torch

        with torch.no_grad():
            for k, v in self.gm.named_buffers():
                if k in self.buffers:
                    v.copy_(self.buffers[k])
        torch.random.set_rng_state(self.rng)
        self.gm.zero_grad(set_to_none=True)
