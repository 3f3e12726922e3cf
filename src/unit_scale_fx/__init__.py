"""unit_scale_fx: automatic unit scaling of PyTorch models with torch.fx."""

from .analysis.track import ScaleReport, track_scales
from .api import UnitScaledModule, unit_scale
from .config import UnitScaleConfig
from .errors import UnitScaleError
from .mup import MupConfig
from .record import ScaleRecord
from .scale import scale

__all__ = ["MupConfig", "ScaleRecord", "ScaleReport", "UnitScaleConfig", "UnitScaleError", "UnitScaledModule", "scale",
           "track_scales", "unit_scale"]
__version__ = "0.1.0"
