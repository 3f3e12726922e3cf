"""The passes, one job each. :mod:`unit_scale_fx.pipeline` orders them."""

from .base import Pass, PassContext, PassResult, UnsupportedOp
from .init_weights import init_weights, parameter_init_kinds, parameter_roles
from .normalize import normalize
from .plan import plan
from .rewrite import rewrite
from .shape_prop import shape_prop
from .topology import Topology, topology

__all__ = [
    "Pass", "PassContext", "PassResult", "UnsupportedOp", "init_weights", "parameter_init_kinds", "parameter_roles", "normalize",
    "plan", "rewrite", "shape_prop", "Topology", "topology",
]
