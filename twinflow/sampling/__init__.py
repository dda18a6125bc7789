"""Any-step sampling of TwinFlow models (ALGORITHM.md §4): one sampler for 1-NFE to multi-step."""
from .config import SAMPLER_PRESETS, SamplerConfig
from .sampler import Backbone, SampleResult, sample
from .schedule import kumaraswamy_warp, noise_ratio, num_intervals, time_grid

__all__ = [
    "SAMPLER_PRESETS",
    "Backbone",
    "SampleResult",
    "SamplerConfig",
    "kumaraswamy_warp",
    "noise_ratio",
    "num_intervals",
    "sample",
    "time_grid",
]
