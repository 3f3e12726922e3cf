"""Recurrent layers: ``nn.LSTM``, ``nn.GRU`` and ``nn.RNN`` as ``torch.export`` writes them (``aten.lstm``,
``aten.gru``, ``aten.rnn_tanh``, ``aten.rnn_relu``; one op for all layers and directions, its weights a list
argument, its result a tuple: the output sequence and the last states), or dynamo (``torch.lstm`` ...; dynamo
traces recurrent modules only with ``torch._dynamo.config.allow_rnn = True``, and otherwise runs the whole
frame eagerly, so the compile backend never sees it).

The op is left to compute what the user wrote: no forward scale (its outputs are bounded by ``tanh`` and
the gates, and the ops that read them scale from their measured RMS), and its weights keep their values
and initialisation (a forward factor on a weight would change the gates' nonlinearity). What unit scaling
adds is in backward: each input's gradient (the sequence, the initial states, every weight and bias) gets
a factor that makes it unit. The gains of a recurrence over time have no closed form worth trusting, so
planning measures them on the example batch (:class:`~unit_scale_fx.passes.plan._MeasuringPlanner`:
``RMS(J^T g)`` for unit Gaussian ``g`` on the outputs that are read). Analytic planning (``measure=False``,
the meta device) cannot, and reports the op as unscaled, as it does an op without a rule.
"""

from __future__ import annotations

import torch

from .registry import Kind, OpView, Rule, Scales, aten, register

_NAMES = ("lstm", "gru", "rnn_tanh", "rnn_relu")
#: the aten overloads (``torch.export``) and the torch functions (dynamo, with ``allow_rnn``)
RECURRENT_OPS = [aten(name, overload) for name in _NAMES for overload in ("input", "data")] \
    + [getattr(torch, name, None) for name in _NAMES]


@register(*RECURRENT_OPS)
class RecurrentRule(Rule):
    """Backward factors only, measured (see the module's docstring)."""

    name = "recurrent"
    kind = Kind.MATMUL
    #: its factors are measured, not derived (``Scales.measured_only``; the coverage table says so)
    measured = True

    def scales(self, op: OpView) -> Scales:
        s = Scales(fwd=1.0, fixed_fwd=True, out_rms=None, calibrate_grad_gain=True, measured_only=True,
                   note="forward as written; gradient gains measured on the example batch")
        for n in op.inputs:
            s.bwd[n], s.grad_gain[n] = 1.0, 1.0
        return s
