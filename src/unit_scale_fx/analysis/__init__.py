"""Measurement and reporting tools."""

from .recorder import MatmulOperand, MatmulRecorder, record_matmul_operands

__all__ = ["MatmulOperand", "MatmulRecorder", "record_matmul_operands"]
