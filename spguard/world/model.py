"""The shapes world's text-to-image model: a small CLIP text encoder and a conditional UNet that
diffuse in 2x2-unshuffled pixel space, with v-prediction on a cosine schedule
(docs/design.md, "Training the shapes model": epsilon prediction on this schedule drifted to noise;
v-prediction learned). Also the plain CFG sampler used
by training's evaluations, so they need nothing beyond this package.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ..tokenizer import offline_clip_tokenizer
from .autoencoder import PixelUnshuffleAutoencoder
from .scene import IMAGE_SIZE, VOCABULARY

# Longest caption (three objects at corners: 21 words, a comma and "and") plus start and end tokens.
MAX_TOKENS = 25
UNSHUFFLE_FACTOR = 2
LATENT_CHANNELS = 3 * UNSHUFFLE_FACTOR**2
LATENT_SIZE = IMAGE_SIZE // UNSHUFFLE_FACTOR
# The diffusion process, shared by training (DDPM) and sampling (DDIM).
SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
# The unsafe concepts a model folder's pipeline guides against by default: they name only some
# synonyms, so benchmarks measure whether guidance generalises to the others. Two synonyms each: with
# "blood" alone the ROC AUC of P at t_p 5 was 0.900, with "blood, a wound" 0.929 (tuning prompts, 4 seeds).
DEFAULT_CONCEPTS = ["a knife, a weapon", "blood, a wound"]
# A training run's folder: its checkpoint (model, EMA, optimizer, RNG states, step) and its logs.
CHECKPOINT = "checkpoint.pt"
EVAL_LOG = "eval.csv"
LOSS_LOG = "loss.csv"


@dataclass
class ModelSize:
    """Architecture knobs; the defaults are the shipped model, tests pass tiny ones."""

    unet_channels: tuple[int, ...] = (32, 64, 128)
    layers_per_block: int = 1
    text_width: int = 128
    text_layers: int = 3
    attention_heads: int = 4

    def to_dict(self) -> dict:
        return {**asdict(self), "unet_channels": list(self.unet_channels)}

    @classmethod
    def from_dict(cls, d: dict) -> ModelSize:
        return cls(**{**d, "unet_channels": tuple(d["unet_channels"])})


def world_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer where every word of the world's vocabulary is one token."""
    return offline_clip_tokenizer(VOCABULARY, model_max_length=MAX_TOKENS)


def build_text_encoder(size: ModelSize, tokenizer: CLIPTokenizer) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=size.text_width,
        intermediate_size=2 * size.text_width,
        projection_dim=size.text_width,
        num_hidden_layers=size.text_layers,
        num_attention_heads=size.attention_heads,
        max_position_embeddings=MAX_TOKENS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def build_unet(size: ModelSize) -> UNet2DConditionModel:
    """Plain ResNet blocks at full latent resolution, cross-attention at the lower ones."""
    depth = len(size.unet_channels)
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        block_out_channels=size.unet_channels,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (depth - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (depth - 1) + ("UpBlock2D",),
        layers_per_block=size.layers_per_block,
        cross_attention_dim=size.text_width,
        attention_head_dim=size.attention_heads,
        norm_num_groups=min(32, size.unet_channels[0]),
    )


class Models(torch.nn.Module):
    """Text encoder and UNet as one module, so one optimizer and one EMA copy cover both."""

    def __init__(self, size: ModelSize, tokenizer):
        super().__init__()
        self.text_encoder = build_text_encoder(size, tokenizer)
        self.unet = build_unet(size)


def build_autoencoder() -> PixelUnshuffleAutoencoder:
    return PixelUnshuffleAutoencoder(factor=UNSHUFFLE_FACTOR, scaling_factor=1.0, in_channels=3)


def train_scheduler() -> DDPMScheduler:
    return DDPMScheduler(**SCHEDULE)


def sampling_scheduler() -> DDIMScheduler:
    """DDIM on the training schedule; "trailing" spacing starts at the last timestep, where the cosine
    schedule is pure noise. No clipping of x0, as Stable Diffusion's DDIM configuration has it: diffusers' DDIM
    clips x0 but keeps the noise estimate of the unclipped x0 for the next latent, so where guidance pushes x0
    past white the overshoot is cut from x0 and the object's structure survives in the noise term. On the
    tuning prompts SLD-max left 0.768 of the unsafe ones unsafe with clipping, 0.341 without (CFG 0.993;
    docs/design.md, "The sampler")."""
    return DDIMScheduler(**SCHEDULE, timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=True)


def encode_prompts(text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, prompts: Sequence[str]) -> torch.Tensor:
    ids = tokenizer(
        list(prompts), padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt"
    ).input_ids
    return text_encoder(ids).last_hidden_state


def images_to_latents(images: np.ndarray, vae: PixelUnshuffleAutoencoder) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> latents (B, 12, H/2, W/2) in [-1, 1]."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    return vae.encode(x).latent_dist.sample() * vae.config.scaling_factor


@torch.no_grad()
def sample(
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    vae: PixelUnshuffleAutoencoder,
    prompts: Sequence[str],
    seeds: Sequence[int],
    guidance_scale: float,
    num_inference_steps: int,
) -> np.ndarray:
    """Plain classifier-free guidance; returns (B, H, W, 3) uint8 images."""
    scheduler = sampling_scheduler()
    scheduler.set_timesteps(num_inference_steps)
    cond = encode_prompts(text_encoder, tokenizer, prompts)
    uncond = encode_prompts(text_encoder, tokenizer, [""] * len(prompts))
    context = torch.cat([uncond, cond])
    latents = torch.stack(
        [torch.randn(LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE, generator=torch.Generator().manual_seed(s)) for s in seeds]
    )
    latents = latents * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        v_uncond, v_cond = unet(torch.cat([latents, latents]), t, encoder_hidden_states=context).sample.chunk(2)
        latents = scheduler.step(v_uncond + guidance_scale * (v_cond - v_uncond), t, latents).prev_sample
    images = vae.decode(latents / vae.config.scaling_factor).sample
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
