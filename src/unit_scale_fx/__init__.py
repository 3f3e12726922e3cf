"""unit_scale_fx: automatic unit scaling of PyTorch models with torch.fx."""

from .api import UnitScaledModule, unit_scale
from .config import UnitScaleConfig
from .errors import UnitScaleError
from .mup import MupConfig
from .record import ScaleRecord
from .scale import scale

__all__ = ["MupConfig", "UnitScaleConfig", "UnitScaleError", "UnitScaledModule", "ScaleRecord", "scale", "unit_scale"]
__version__ = "0.1.0"
