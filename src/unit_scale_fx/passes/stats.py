"""How planning turns measured tensors into numbers: on this process, or across a process group.

Every measurement the planner makes (the RMS of an input, of an activation, of a gradient)
goes through a :class:`Stats` object, ``ctx.stats``:

* :class:`Stats` (the default) measures the local tensor;
* :class:`GroupStats` sums the *statistics* (sum of squares and element count) over the
  ranks of a ``torch.distributed`` process group, so every rank gets the RMS of the global
  batch and plans the same scales as one process on the combined batch would.

Gradients follow DDP's convention: the global loss is the mean of the ranks' losses.
``calibrate_grads`` seeds each rank's backward with ``loss / world`` (:attr:`Stats.world`);
a gradient at a value computed from the batch is then the rank's part of the global
gradient (squares and counts add up), and a gradient at a value that every rank holds
whole (a parameter, a scalar loss) is the rank's share of it (:meth:`Stats.tensor_sum`).

Measured RMS values are rounded to :data:`RMS_BITS` significant bits: the last bits of a
float32 reduction depend on the thread count and the order of summation, and the plan
must not.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

#: significant bits kept of every measured RMS (relative step 2**-8: far below what unit scaling resolves)
RMS_BITS = 8


def round_bits(x: float, bits: int = RMS_BITS) -> float:
    """``x`` rounded to ``bits`` significant bits (0, inf and nan unchanged)."""
    if x == 0 or not math.isfinite(x):
        return x
    m, e = math.frexp(x)
    return math.ldexp(round(m * 2 ** bits) / 2 ** bits, e)


def physical(t: torch.Tensor) -> torch.Tensor:
    """The tensor that holds ``t``'s values: ``t`` inside ``torch.vmap`` (a graph may trace one: Mamba's
    associative scan) is a batched wrapper, whose values Python cannot read (``vmap: ... data-dependent control
    flow``); the tensor it wraps holds every batch entry, whose RMS is the RMS of all the entries'."""
    is_wrapped, unwrap = torch._C._functorch.is_functorch_wrapped_tensor, torch._C._functorch.get_unwrapped
    while is_wrapped(t):
        t = unwrap(t)
    return t


def sum_count(t: torch.Tensor) -> torch.Tensor:
    """``[sum of squares, element count]`` of a float tensor (float64, on the CPU).

    A reduction kernel: no full-size temporary (planning must cost no more than a training step).
    """
    acc_dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    t = physical(t)
    with torch.no_grad():
        norm = torch.linalg.vector_norm(t.detach(), dtype=acc_dtype).double().cpu()
    return torch.stack([norm * norm, torch.tensor(float(t.numel()), dtype=torch.float64)])


class Stats:
    """Local measurements (one process)."""

    world: int = 1

    def _reduce(self, values: torch.Tensor) -> torch.Tensor:
        return values

    def rms(self, t: torch.Tensor, bits: Optional[int] = RMS_BITS) -> Optional[float]:
        """RMS of a floating-point tensor (None for non-float, meta, empty on every rank).

        ``bits``: significant bits kept (None: unrounded, for callers that round what they derive).
        """
        return self.rms_count(t, bits)[0]

    def rms_count(self, t: torch.Tensor, bits: Optional[int] = RMS_BITS) -> tuple[Optional[float], float]:
        """``(RMS, element count)`` of a batch-carrying tensor, over all ranks."""
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.device.type == "meta":
            return None, 0.0
        return self.rms_of_sums(sum_count(t), bits)

    def rms_of_sums(self, acc: torch.Tensor, bits: Optional[int] = RMS_BITS) -> tuple[Optional[float], float]:
        """``(RMS, element count)`` over all ranks from a rank's ``[sum of squares, element count]`` (float64)."""
        acc = self._reduce(acc)
        if acc[1] == 0:
            return None, 0.0
        r = float((acc[0] / acc[1]).sqrt())
        return (r if bits is None else round_bits(r, bits)), float(acc[1])

    def tensor_sum(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of ``t`` over ranks (``t`` itself on one process)."""
        return t

    def tensor_rms(self, t: torch.Tensor, bits: Optional[int] = RMS_BITS) -> float:
        """RMS of the rank-sum of a tensor every rank holds whole (a parameter's gradient)."""
        with torch.no_grad():
            s = self.tensor_sum(t.detach().double())
            r = float(s.pow(2).mean().sqrt())
            return r if bits is None else round_bits(r, bits)


class GroupStats(Stats):
    """Measurements summed over the ranks of a process group (every rank must plan, in step)."""

    def __init__(self, group: Optional[object] = None) -> None:
        import torch.distributed as dist

        self.group = group
        self.world = dist.get_world_size(group)

        # NCCL reduces CUDA tensors only; gloo and the others CPU ones
        self.device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" \
            else torch.device("cpu")

    def _reduce(self, values: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        out = values.to(self.device, torch.float64).clone()
        dist.all_reduce(out, group=self.group)
        return out.cpu()

    def tensor_sum(self, t: torch.Tensor) -> torch.Tensor:
        return self._reduce(t.detach())


LOCAL = Stats()


def planning_stats(enabled: bool = True) -> Stats:
    """:class:`GroupStats` inside an initialised process group of more than one rank, else local."""
    dist = torch.distributed
    if enabled and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return GroupStats()
    return LOCAL
