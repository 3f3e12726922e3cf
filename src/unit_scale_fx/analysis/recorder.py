"""A dispatch-level recorder of matmul operands, independent of our own bookkeeping.

It sees the aten ops that actually run (``mm``, ``bmm``, ``addmm``, attention
kernels, convolutions: what the graph-level matmul-class ops of
:func:`~unit_scale_fx.rules.matmul.matmul_operands` run as, einsum included) in forward and backward, and records the RMS of their operands: both
inputs in forward; in backward, the incoming gradient (the operand that is not a
tensor saved from forward).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..tensor_stats import output_loss, rms

aten = torch.ops.aten

_MATMULS = {aten.mm.default: (0, 1), aten.bmm.default: (0, 1), aten.addmm.default: (1, 2),
            aten.baddbmm.default: (1, 2), aten.convolution.default: (0, 1)}  # a convolution is a matmul too
if hasattr(aten, "_grouped_mm"):  # mixture-of-experts layers: input [tokens, k], weight [experts, k, n]
    _MATMULS[aten._grouped_mm.default] = (0, 1)
#: ops of other libraries, by name: forward matmuls (operand positions) and their backward ops (the
#: position of the incoming gradient, which both backward matmuls read); a custom op runs its matmuls
#: out of this mode's sight
_NAMED_MATMULS = {"transformers::grouped_mm_fallback": (0, 1)}
_NAMED_BWD = {"transformers::grouped_mm_fallback_backward": 3}
_ATTN_FWD = {getattr(aten, n).default for n in (
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_attention_math") if hasattr(aten, n)}
_ATTN_BWD = {getattr(aten, n).default for n in (
    "_scaled_dot_product_flash_attention_for_cpu_backward", "_scaled_dot_product_flash_attention_backward",
    "_scaled_dot_product_efficient_attention_backward", "_scaled_dot_product_cudnn_attention_backward")
    if hasattr(aten, n)} | {aten.convolution_backward.default}  # each takes the incoming gradient first


@dataclass
class MatmulOperand:
    op: str
    phase: str  # "fwd" or "bwd"
    role: str  # "left", "right", "grad", "q", "k", "v"
    shape: tuple[int, ...]
    rms: float
    #: forward operands: the mean cosine between different rows (positions) of the operand,
    #: ``[..., rows, features]`` flattened to rows; near 1 when positions have collapsed to one vector
    row_cos: Optional[float] = None


def row_cosine(t: torch.Tensor, group: Optional[int] = None) -> Optional[float]:
    """Mean cosine between distinct rows of ``t`` (all leading dims flattened), in O(rows * features).

    ``group``: rows come in consecutive blocks of this many (the positions of one sequence, when a
    ``[batch, seq, features]`` activation was flattened for a matmul): only pairs within a block count.
    """
    if t.dim() < 2 or not t.is_floating_point():
        return None
    x = t.detach().reshape(-1, t.shape[-1]).double()
    n = x.shape[0]
    g = n if not group or n % group else group
    if g < 2:
        return None
    u = (x / x.norm(dim=1, keepdim=True).clamp_min(1e-300)).reshape(n // g, g, -1)
    s = u.sum(1)
    return float(((s * s).sum(-1) - g).mean() / (g * (g - 1)))


def _key(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except Exception:  # pragma: no cover - tensors without storage
        return id(t)


class MatmulRecorder(TorchDispatchMode):
    """Record matmul operands. Use :meth:`backward` to mark the start of backward."""

    def __init__(self, seq_len: Optional[int] = None) -> None:
        super().__init__()
        #: rows of a forward operand per sequence, for the cross-position cosine (``None``: all rows)
        self.seq_len = seq_len
        self.records: list[MatmulOperand] = []
        self.phase = "fwd"
        self._fwd_storages: set[int] = set()
        self._keep: list[torch.Tensor] = []  # keeps forward storages alive, so addresses are not reused

    @classmethod
    def ignore_compile_internals(cls) -> bool:  # let dynamo run under the recorder
        return True

    def backward(self) -> None:
        self.phase = "bwd"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = str(func.overloadpacket.__name__)
        qual = func._schema.name
        pos = _MATMULS.get(func) or _NAMED_MATMULS.get(qual)
        if qual in _NAMED_BWD and len(args) > _NAMED_BWD[qual]:
            g = args[_NAMED_BWD[qual]]  # read by two matmuls (input and weight gradients), as aten's backward does
            self.records += [MatmulOperand(name, "bwd", "grad", tuple(g.shape), rms(g)) for _ in range(2)]
        elif pos is not None:
            a, b = (args[i] for i in pos)
            if self.phase == "fwd":
                for role, t in (("left", a), ("right", b)):
                    self.records.append(MatmulOperand(name, "fwd", role, tuple(t.shape), rms(t),
                                                      row_cosine(t, self.seq_len) if role == "left" else None))
                    self._fwd_storages.add(_key(t))
            else:
                for t in (a, b):
                    if _key(t) not in self._fwd_storages and t.is_floating_point():
                        self.records.append(MatmulOperand(name, "bwd", "grad", tuple(t.shape), rms(t)))
        elif func in _ATTN_FWD and self.phase == "fwd":
            for role, t in zip("qkv", args[:3]):
                self.records.append(MatmulOperand(name, "fwd", role, tuple(t.shape), rms(t)))
                self._fwd_storages.add(_key(t))
        elif func in _ATTN_BWD:
            self.records.append(MatmulOperand(name, "bwd", "grad", tuple(args[0].shape), rms(args[0])))
        if self.phase == "fwd":
            for t in list(torch.utils._pytree.tree_leaves(out)) + [a for a in args if isinstance(a, torch.Tensor)]:
                if isinstance(t, torch.Tensor):
                    self._fwd_storages.add(_key(t))
                    self._keep.append(t)
        return out


def record_matmul_operands(model: torch.nn.Module, *inputs: Any,
                           loss_fn: Optional[Callable[[Any], torch.Tensor]] = None) -> list[MatmulOperand]:
    """Run one forward and backward of ``model(*inputs)`` and return every matmul operand's RMS.

    ``loss_fn`` maps the model output to a scalar (default: the scalar outputs, else
    a seeded random projection of every float output; see :func:`~unit_scale_fx.tensor_stats.loss_outputs`).
    """
    rec = MatmulRecorder()
    with rec:
        out = model(*inputs)
        loss = loss_fn(out) if loss_fn is not None else output_loss(out, where="record_matmul_operands")
        rec.backward()
        loss.backward()
    rec._keep.clear()
    return rec.records


def last_row_cosine(records: list[MatmulOperand]) -> Optional[float]:
    """The row cosine of the last forward left operand of a matmul (``mm``/``addmm``: a readout or head input)."""
    for r in reversed(records):
        if r.phase == "fwd" and r.role == "left" and r.op in ("mm", "addmm") and r.row_cos is not None:
            return r.row_cos
    return None


def fraction_in_band(records: list[MatmulOperand], lo: float = 0.5, hi: float = 2.0,
                     phase: Optional[str] = None) -> float:
    rs = [r for r in records if phase is None or r.phase == phase]
    return sum(lo <= r.rms <= hi for r in rs) / max(1, len(rs))
