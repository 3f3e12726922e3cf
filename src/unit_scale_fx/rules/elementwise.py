"""More elementwise ops: sign/power ops through the pointwise quadrature, and more
scale-preserving forms (the aten spellings that ``torch.export`` produces).

``x ** p`` with a constant ``p`` is a pointwise function like any other; ``-x`` and
``|x|`` keep the RMS of values and of gradients exactly, so they preserve scale; ``where``
and ``masked_fill`` select values, so they keep the scale (a constant fill value
does not count as an input: see :mod:`unit_scale_fx.passes.constants`).
"""

from __future__ import annotations

import operator

import torch

from .pointwise import PointwiseRule
from .registry import aten, many, register, registered_targets, tensor_method
from .shape import PreserveRule


def _unique(targets: list) -> list:
    """Drop missing and repeated targets (``Tensor.neg is Tensor.__neg__``) and those
    another family already registered (this module only fills gaps)."""
    have = registered_targets()
    return [t for t in dict.fromkeys(many(targets)) if t not in have]

register(*_unique([
    torch.square, tensor_method("square"),
    torch.pow, operator.pow, tensor_method("pow"), tensor_method("__pow__"), aten("pow", "Tensor_Scalar"),
    aten("hardtanh"), aten("hardsigmoid"), aten("relu6"), aten("selu"), aten("celu"), aten("exp"), aten("erf"),
    # defined on the whole real line, so the quadrature over a Gaussian holds (not log, sqrt, rsqrt, log1p:
    # their inputs are positive by construction, which the Gaussian is not)
    *[t for n in ("expm1", "atan", "asinh", "sinh", "erfc", "clamp", "clip")
      for t in (getattr(torch, n, None), tensor_method(n), aten(n))],
]))(PointwiseRule())

register(*_unique([
    # sign flips keep the RMS of values and gradients exactly (and keep rotations rotations)
    torch.neg, operator.neg, tensor_method("neg"), tensor_method("__neg__"), aten("neg"),
    torch.abs, operator.abs, tensor_method("abs"), tensor_method("__abs__"), aten("abs"),
    aten("numpy_T"), aten("mT"), aten("mH"), aten("adjoint"),
    # ``x.T`` / ``x.mT`` as dynamo records them: the op packets (two overloads each, so the packet is the key)
    getattr(torch.ops.aten, "numpy_T", None), getattr(torch.ops.aten, "mT", None), aten("to", "dtype_layout"), aten("to", "device"), aten("to", "other"), aten("type_as"),
    aten("unflatten", "int"), aten("flatten", "using_ints"), aten("squeeze", "dims"), aten("squeeze", "default"),
    aten("repeat"), aten("flip"), aten("roll"), aten("narrow"), aten("movedim", "int"), aten("index_select"),
    aten("gather"), aten("tril"), aten("triu"), aten("constant_pad_nd"), aten("pad"),
    aten("where", "ScalarOther"), aten("where", "ScalarSelf"), aten("view_as"), aten("reshape_as"),
    aten("unsafe_split", "Tensor"), aten("split", "sizes"), aten("lift_fresh_copy"), aten("native_dropout"),
    aten("feature_dropout"), aten("alpha_dropout"),
    tensor_method("where"),
    getattr(torch._C._nn, "pad", None),  # what dynamo records for F.pad (torch.export records aten.pad)
]))(PreserveRule())
