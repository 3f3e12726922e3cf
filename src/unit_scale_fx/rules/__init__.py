"""Op rules, one module per family; importing this package fills the registry."""

from . import arith, attention, loss, matmul, norm, pointwise, shape  # noqa: F401
from . import batchnorm, conv, einsum, elementwise, fused, pool, reduce  # noqa: F401  (issue 6)
from . import inplace  # noqa: F401  (writes through views, issue 12)
from . import recurrent  # noqa: F401
from .registry import OpView, Rule, Scales, lookup, register, registered_targets

__all__ = ["OpView", "Rule", "Scales", "lookup", "register", "registered_targets"]
