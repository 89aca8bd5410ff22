"""Shared setup for the engine's tests: tiny components, our pipeline and diffusers' on the same weights."""

import functools

import torch
from diffusers import StableDiffusionPipeline
from diffusers.pipelines.deprecated.stable_diffusion_safe import StableDiffusionPipelineSafe

from spguard import SafeDiffusionPipeline
from spguard.testing import tiny_components

STEPS = 8


@functools.lru_cache(maxsize=None)
def components(seed: int = 0) -> dict:
    return tiny_components(seed)


def ours(seed: int = 0) -> SafeDiffusionPipeline:
    pipe = SafeDiffusionPipeline.from_components(**components(seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_pipe(safe: bool = False, scheduler=None):
    parts = dict(components())
    if scheduler is not None:
        parts["scheduler"] = scheduler
    cls = StableDiffusionPipelineSafe if safe else StableDiffusionPipeline
    pipe = cls(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
