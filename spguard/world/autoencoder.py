"""A parameter-free "autoencoder" that folds 2x2 pixel blocks into channels (32x32x3 <-> 16x16x12).

Diffusing in this unshuffled pixel space is about 2.5x faster to train on a CPU than at 32x32x3
(docs/design.md, "Training the shapes model") while staying exactly invertible. The class mimics
diffusers' AutoencoderKL interface (`config.scaling_factor`, `encode(x).latent_dist`, `decode(z).sample`,
images in [-1, 1]), so a Stable Diffusion style pipeline can use it unchanged; `config.factor` is its spatial factor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput


@dataclass
class DecoderOutput(BaseOutput):
    sample: torch.Tensor


class ExactLatentDistribution:
    """The deterministic stand-in for AutoencoderKL's latent_dist: sampling returns the latents."""

    def __init__(self, latents: torch.Tensor):
        self.mean = latents

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.mean

    def mode(self) -> torch.Tensor:
        return self.mean


@dataclass
class EncoderOutput(BaseOutput):
    latent_dist: ExactLatentDistribution

    @property
    def latents(self) -> torch.Tensor:
        return self.latent_dist.mean


class PixelUnshuffleAutoencoder(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, factor: int = 2, scaling_factor: float = 1.0, in_channels: int = 3):
        super().__init__()
        self.latent_channels = in_channels * factor * factor
        # No weights; this empty buffer only lets `.dtype` and `.device` answer like any model's.
        self.register_buffer("_anchor", torch.zeros(0), persistent=False)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder: str | None = None, **kwargs):
        """Build from the saved config alone: there are no weights to load. Loading options a
        pipeline passes to every component (torch_dtype, device_map, ...) are accepted and ignored:
        shuffling pixels works in any dtype."""
        return cls.from_config(cls.load_config(pretrained_model_name_or_path, subfolder=subfolder))

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        latents = F.pixel_unshuffle(x, self.config.factor)
        return EncoderOutput(ExactLatentDistribution(latents)) if return_dict else (ExactLatentDistribution(latents),)

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator: torch.Generator | None = None):
        sample = F.pixel_shuffle(z, self.config.factor)
        return DecoderOutput(sample) if return_dict else (sample,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x).latents).sample
