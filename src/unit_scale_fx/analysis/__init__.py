"""Measurement and reporting tools."""

from .recorder import MatmulOperand, MatmulRecorder, record_matmul_operands
from .track import Measured, NodeScale, ScaleReport, measure_nodes, track_scales

__all__ = ["MatmulOperand", "MatmulRecorder", "Measured", "NodeScale", "ScaleReport", "measure_nodes",
           "record_matmul_operands", "track_scales"]
