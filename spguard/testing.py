"""Models built in code for tests and benchmarks: no weights are downloaded.

`tiny_components` gives random tiny Stable-Diffusion-shaped components in about a second;
`sd15_components` gives a randomly initialised UNet of the SD-1.5 configuration (860M parameters)
with small text encoder and VAE of matching widths, for timing the UNet against the guidance math.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

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


def _clip_config(tokenizer, hidden_size: int, layers: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
