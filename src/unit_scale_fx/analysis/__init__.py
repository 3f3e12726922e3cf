"""Measurement and reporting tools."""

from .equivalence import Equivalence, all_outputs_loss, assert_equivalent, check_equivalence, scale_erased_copy
from .recorder import MatmulOperand, MatmulRecorder, record_matmul_operands
from .track import Measured, NodeScale, ScaleReport, measure_nodes, track_scales
from .validity import gradient_cosines, true_gradient_copy

__all__ = ["Equivalence", "MatmulOperand", "MatmulRecorder", "Measured", "NodeScale", "ScaleReport",
           "all_outputs_loss", "assert_equivalent", "check_equivalence", "gradient_cosines", "measure_nodes",
           "record_matmul_operands", "scale_erased_copy", "track_scales", "true_gradient_copy"]
