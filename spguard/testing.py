"""Models built in code for tests and benchmarks: no weights are downloaded.

`tiny_components` gives random tiny Stable-Diffusion-shaped components in about a second;
`sd15_components` gives a randomly initialised UNet of the SD-1.5 configuration (860M parameters)
with small text encoder and VAE of matching widths, for timing the UNet against the guidance math.
`tiny_sdxl_components` and `sdxl_components` do the same for SDXL (two text encoders, pooled embeddings,
time ids, several transformer layers per block).
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from .methods import SLD_CONCEPT
from .tokenizer import offline_clip_tokenizer

# Words the tiny tokenizer knows as whole tokens; anything else is tokenized byte by byte.
TINY_WORDS = (
    "a an the of on in and with at photo painting picture portrait of cat dog horse bird tree house city "
    "street beach mountain forest sky red green blue yellow black white dark bright man woman child people "
    "knife gun sword weapon blood gore fight war naked violent peaceful garden flower flowers"
).split() + SLD_CONCEPT.replace(",", " ").split()

# Stable Diffusion 1.x's noise schedule (its scheduler_config.json).
SD_SCHEDULE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
               "num_train_timesteps": 1000, "steps_offset": 1}


def tiny_components(seed: int = 0) -> dict:
    """Random tiny components: 4×16×16 latents, 32×32 images, CLIP width 32. Deterministic for a seed."""
    tokenizer = offline_clip_tokenizer(TINY_WORDS)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )
    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModel(_clip_config(tokenizer, hidden_size=32, layers=2))
    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    )
    scheduler = DDIMScheduler(**SD_SCHEDULE, clip_sample=False, set_alpha_to_one=False)
    return {"unet": unet.eval(), "text_encoder": text_encoder.eval(), "tokenizer": tokenizer, "vae": vae.eval(),
            "scheduler": scheduler}


def sd15_unet(seed: int = 0) -> UNet2DConditionModel:
    """A randomly initialised UNet with Stable Diffusion 1.5's configuration (860M parameters)."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    ).eval()


def sd15_components(seed: int = 0) -> dict:
    """The SD-1.5-sized UNet with a small text encoder of CLIP-L's width and a small VAE of factor 8."""
    tokenizer = offline_clip_tokenizer(TINY_WORDS)
    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModel(_clip_config(tokenizer, hidden_size=768, layers=1))
    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,) * 4, norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )
    scheduler = DDIMScheduler(**SD_SCHEDULE, clip_sample=False, set_alpha_to_one=False)
    return {"unet": sd15_unet(seed), "text_encoder": text_encoder.eval(), "tokenizer": tokenizer,
            "vae": vae.eval(), "scheduler": scheduler}


# SDXL's scheduler_config.json and VAE scaling factor (stable-diffusion-xl-base-1.0).
SDXL_SCHEDULE = {**SD_SCHEDULE, "timestep_spacing": "leading"}
SDXL_VAE_SCALING = 0.13025
SDXL_TIME_IDS = 6  # original size, crop corner, target size: two numbers each


def _sdxl_unet(seed, sample_size, block_out_channels, layers_per_block, transformer_layers, cross_dim, pooled_dim,
               time_dim, head_dim, groups) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    levels = len(block_out_channels)
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=layers_per_block,
        block_out_channels=block_out_channels, transformer_layers_per_block=transformer_layers,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",),
        cross_attention_dim=cross_dim, attention_head_dim=head_dim, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=SDXL_TIME_IDS * time_dim + pooled_dim, norm_num_groups=groups,
    ).eval()


def _sdxl_parts(seed, unet, widths, layers, vae_channels) -> dict:
    """Text encoders of `widths` (the UNet's cross-attention width is their sum; the second one's width is
    the pooled embedding's), a VAE, SDXL's scheduler."""
    tokenizer = offline_clip_tokenizer(TINY_WORDS)
    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModel(_clip_config(tokenizer, hidden_size=widths[0], layers=layers))
    torch.manual_seed(seed + 2)
    text_encoder_2 = CLIPTextModelWithProjection(
        _clip_config(tokenizer, hidden_size=widths[1], layers=layers, projection_dim=widths[1]))
    torch.manual_seed(seed + 3)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=vae_channels, norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(vae_channels), scaling_factor=SDXL_VAE_SCALING,
    )
    return {"unet": unet, "text_encoder": text_encoder.eval(), "tokenizer": tokenizer,
            "text_encoder_2": text_encoder_2.eval(), "tokenizer_2": offline_clip_tokenizer(TINY_WORDS),
            "vae": vae.eval(), "scheduler": EulerDiscreteScheduler(**SDXL_SCHEDULE)}


def tiny_sdxl_components(seed: int = 0) -> dict:
    """Random tiny SDXL components: two CLIP encoders of width 32 (the second with a projection, giving the
    pooled embedding), a UNet with text-time conditioning and two transformer layers in its cross-attention
    blocks, 4×16×16 latents, 32×32 images. Deterministic for a seed."""
    unet = _sdxl_unet(seed, sample_size=16, block_out_channels=(16, 32), layers_per_block=1, transformer_layers=(1, 2),
                      cross_dim=64, pooled_dim=32, time_dim=8, head_dim=(2, 4), groups=8)
    return _sdxl_parts(seed, unet, widths=(32, 32), layers=2, vae_channels=(8, 16))


def sdxl_unet(seed: int = 0) -> UNet2DConditionModel:
    """A randomly initialised UNet with SDXL base's configuration (2.6B parameters)."""
    return _sdxl_unet(seed, sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
                      transformer_layers=(1, 2, 10), cross_dim=2048, pooled_dim=1280, time_dim=256,
                      head_dim=(5, 10, 20), groups=32)


def sdxl_components(seed: int = 0) -> dict:
    """SDXL base's UNet (random) with one-layer text encoders of its widths (768, 1280) and a small VAE of
    factor 8."""
    return _sdxl_parts(seed, sdxl_unet(seed), widths=(768, 1280), layers=1, vae_channels=(8,) * 4)


def _clip_config(tokenizer, hidden_size: int, layers: int, **extra) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **extra,
    )
