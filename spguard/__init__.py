"""spguard: SP-Guard (selective, prompt-adaptive safe guidance) for text-to-image diffusion."""

from .ops import backends, use_backend
from .methods import CFG, SLD, SLD_CONCEPT, NegativePrompt, SPGuard
from .pipeline import SafeDiffusionOutput, SafeDiffusionPipeline
from .reports import Report

__all__ = ["CFG", "SLD", "SLD_CONCEPT", "NegativePrompt", "Report", "SPGuard", "SafeDiffusionOutput",
           "SafeDiffusionPipeline", "backends", "use_backend"]
