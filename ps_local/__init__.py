"""ps-local: power sampling (p^alpha via block-wise Metropolis-Hastings) on GGUF models."""

from .sampler import sample
from .settings import Sample, SampleStats, SamplingSettings

__all__ = ["sample", "Sample", "SampleStats", "SamplingSettings"]
__version__ = "0.1.0"
