"""unit_scale_fx: automatic unit scaling of PyTorch models with torch.fx."""

from .analysis.track import ScaleReport, track_scales
from .api import UnitScaledModule, from_pretrained, unit_scale
from .backend import UnitScaleBackend, backend
from .config import MupConfig, UnitScaleConfig
from .errors import UnitScaleError
from .lowp.fp8_linear import use_fp8_linear
from .lowp.precision import MasterWeights, half_precision
from .lowp.simulate import FormatSimulation, format_counts, simulate_format, track_formats
from .record import ScaleRecord
from .scale import scale
from .weights import init_weights

__all__ = [
    "MupConfig", "ScaleRecord", "ScaleReport", "UnitScaleConfig", "UnitScaleError", "UnitScaledModule", "scale",
    "track_scales", "unit_scale", "from_pretrained",
    "FormatSimulation", "simulate_format", "track_formats", "format_counts", "half_precision", "MasterWeights",
    "use_fp8_linear",
    "UnitScaleBackend", "backend", "init_weights",
]
__version__ = "0.1.0"
