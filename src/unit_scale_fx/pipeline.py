"""The ordered list of passes, and the driver that runs them.

    capture -> strip_asserts -> normalize -> init_weights               (at unit_scale time)
            -> shape_prop -> constants -> fuse -> topology -> roles -> [mup] -> [calibrate]
            -> plan -> [mup_readout] -> balance -> calibrate_grads -> predict_grads
            -> rewrite -> fold_scales -> [simulate_format] -> recompile
                                                    (once example inputs are known)

Bracketed passes do nothing unless their option is set (u-muP, calibrate=True,
simulate_format).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from typing import Iterator

import torch.fx as fx

from . import rules  # noqa: F401  (fills the registry)
from .errors import UnitScaleError
from .passes import PassContext, PassResult, init_weights, normalize, plan, rewrite, shape_prop, topology
from .passes.balance import balance
from .passes.calibrate_grads import calibrate_grads
from .passes.fold_scales import fold_scales
from .passes.plan import predict_grads
from .passes.base import Pass
from .passes.calibrate import calibrate
from .passes.constants import mark_constants
from .passes.fuse import fuse
from .passes.simulate_format import simulate_formats
from .passes.mup import mup, mup_readout, roles
from .passes.strip_asserts import strip_asserts

log = logging.getLogger(__name__)


def recompile(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    gm.recompile()
    return PassResult(True, "recompiled")


PREPARE: list[tuple[str, Pass]] = [
    ("strip_asserts", strip_asserts),
    ("normalize", normalize),
    ("init_weights", init_weights),
]

ANALYSE: list[tuple[str, Pass]] = [
    ("shape_prop", shape_prop),
    ("constants", mark_constants),
    ("fuse", fuse),
    ("topology", topology),
    ("roles", roles),
    ("mup", mup),  # u-mup only
    ("calibrate", calibrate),  # calibrate=True only
    ("plan", plan),
    ("mup_readout", mup_readout),  # u-mup only: before balance, which derives backward scales from it
    ("balance", balance),
    ("calibrate_grads", calibrate_grads),
    ("predict_grads", predict_grads),
]

TRANSFORM: list[tuple[str, Pass]] = [
    ("rewrite", rewrite),
    ("fold_scales", fold_scales),
    ("simulate_format", simulate_formats),  # only when config.simulate_format is set
    ("recompile", recompile),
]


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector for a transform, then restore it.

    Passes allocate many small objects (fx nodes, networkx dicts); on a 48-layer
    model the collector's full sweeps over them cost about 40% of the transform.
    Nothing cyclic is freed later than it would be by the next collection.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def run_passes(gm: fx.GraphModule, ctx: PassContext, passes: list[tuple[str, Pass]]) -> fx.GraphModule:
    """Run ``passes`` in order (collector paused); lint after each that changed the graph.

    A failure names the pass and the ones that ran before it.
    """
    with gc_paused():
        return _run_passes(gm, ctx, passes)


def _run_passes(gm: fx.GraphModule, ctx: PassContext, passes: list[tuple[str, Pass]]) -> fx.GraphModule:
    done: list[str] = []
    for name, fn in passes:
        t0 = time.perf_counter()
        try:
            result = fn(gm, ctx)
            if result.modified:
                gm.graph.lint()
        except UnitScaleError:
            raise
        except Exception as exc:
            raise UnitScaleError(
                f"pass {name!r} failed: {type(exc).__name__}: {exc}",
                where=f"pass {name} (after: {', '.join(done) or 'none'})",
                fix="this is a bug or an unsupported construct; report it with the model, or exclude the part "
                "with UnitScaleConfig(node_filter=...)",
            ) from exc
        dt = time.perf_counter() - t0
        ctx.timings.append((name, dt))
        log.debug("pass %s: %s (%.1f ms)", name, result.info, dt * 1e3)
        done.append(name)
    return gm
