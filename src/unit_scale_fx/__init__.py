"""unit_scale_fx: automatic unit scaling of PyTorch models with torch.fx."""

from .api import UnitScaledModule, unit_scale
from .backend import UnitScaleBackend, backend
from .config import UnitScaleConfig
from .errors import UnitScaleError
from .record import ScaleRecord
from .scale import scale
from .weights import init_weights

__all__ = [
    "UnitScaleConfig", "UnitScaleError", "UnitScaledModule", "ScaleRecord", "scale", "unit_scale",
    "UnitScaleBackend", "backend", "init_weights",
]
__version__ = "0.1.0"
