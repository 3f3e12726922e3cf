"""``einsum`` of two operands, read as a matmul.

Indices in both operands but not in the output are contracted (``K`` = product
of their sizes); indices of one operand that reach the output are that side's
free dims. Forward ``1 / (ra rb sqrt(K))``; the gradient of ``a`` is an einsum of
``g`` with ``b`` summed over ``b``'s free dims (``N_b``): scale ``1 / (rb sqrt(N_b))``,
and symmetrically for ``b``. Indices summed inside one operand alone count in
that operand's sum as well.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.fx as fx

from .registry import Kind, OpView, Rule, Scales, aten, register


def parse(equation: str, shapes: list[tuple[int, ...]]) -> Optional[tuple[list[str], str, dict[str, int]]]:
    """``(input subscripts, output subscripts, index -> size)``; None for ``...`` or bad input."""
    eq = equation.replace(" ", "")
    if "..." in eq:
        return None
    lhs, _, out = eq.partition("->")
    ins = lhs.split(",")
    if not _:
        letters = "".join(ins)
        out = "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    if len(ins) != len(shapes) or any(len(s) != len(sh) for s, sh in zip(ins, shapes)):
        return None
    size: dict[str, int] = {}
    for s, sh in zip(ins, shapes):
        for c, d in zip(s, sh):
            size[c] = max(size.get(c, 1), int(d))
    return ins, out, size


def _operands(node: fx.Node) -> tuple[Any, list[Any]]:
    eq = node.args[0] if node.args else node.kwargs.get("equation")
    rest = list(node.args[1:])
    if len(rest) == 1 and isinstance(rest[0], (list, tuple)):
        rest = list(rest[0])
    return eq, rest


class EinsumRule(Rule):
    name = "einsum"
    kind = Kind.MATMUL

    def scales(self, op: OpView) -> Scales:
        eq, ops = _operands(op.node)
        if not isinstance(eq, str) or len(ops) != 2:
            return Scales(out_rms=None, note="einsum with other than two operands")
        a, b = ops
        shapes = [op.shape(a), op.shape(b)]
        if any(s is None for s in shapes):
            return Scales(out_rms=None, note="shapes unknown")
        parsed = parse(eq, shapes)  # type: ignore[arg-type]
        if parsed is None:
            return Scales(out_rms=None, note=f"einsum {eq!r} not understood")
        (sa, sb), out, size = parsed

        def prod(chars: set[str]) -> int:
            return math.prod(size[c] for c in chars) if chars else 1

        A, B, O = set(sa), set(sb), set(out)
        k = prod((A & B) - O) * prod((A - B) - O) * prod((B - A) - O)
        n_b = prod((B - A) & O) * prod((B - A) - O)
        n_a = prod((A - B) & O) * prod((A - B) - O)
        ra, rb = op.rms(a), op.rms(b)
        s = Scales(fwd=1.0 / (ra * rb * math.sqrt(max(1, k))), note=f"{eq}: K={k} N_a={n_a} N_b={n_b}")
        for x, gain in ((a, rb * math.sqrt(n_b)), (b, ra * math.sqrt(n_a))):
            if isinstance(x, fx.Node) and x in op.inputs:
                s.bwd[x], s.grad_gain[x] = 1.0 / gain, gain
        return s

    def init_kinds(self, node: fx.Node) -> dict[fx.Node, str]:
        _, ops = _operands(node)
        return {x: "unit" for x in ops if isinstance(x, fx.Node)}


register(torch.einsum, aten("einsum"))(EinsumRule())
