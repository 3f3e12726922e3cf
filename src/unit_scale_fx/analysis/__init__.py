"""Measurement and reporting tools."""

from .recorder import MatmulOperand, MatmulRecorder, record_matmul_operands
from .track import Measured, NodeScale, ScaleReport, measure_nodes, track_scales
from .validity import gradient_cosines, true_gradient_copy

__all__ = ["MatmulOperand", "MatmulRecorder", "Measured", "NodeScale", "ScaleReport", "gradient_cosines",
           "measure_nodes", "record_matmul_operands", "track_scales", "true_gradient_copy"]
