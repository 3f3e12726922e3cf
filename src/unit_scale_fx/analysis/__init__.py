"""Measurement and reporting tools."""

from .recorder import MatmulOperand, MatmulRecorder, record_matmul_operands
from .validity import gradient_cosines, true_gradient_copy

__all__ = ["MatmulOperand", "MatmulRecorder", "gradient_cosines", "record_matmul_operands", "true_gradient_copy"]
