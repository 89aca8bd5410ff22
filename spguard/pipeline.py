"""SafeDiffusionPipeline: Stable Diffusion 1.x/2.x sampling with SP-Guard and its baselines."""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from tqdm.auto import tqdm

from .attention import ConceptAttention
from .loading import ModelLoadError, load_components
from .methods import SLD_CONCEPT, Concepts, NegativePrompt, SPGuard, check_finite, is_integer, resolve_method
from .reports import Report

logger = logging.getLogger(__name__)

COMPONENTS = ("unet", "text_encoder", "tokenizer", "vae", "scheduler")
DEFAULTS_FILE = "spguard.json"  # optional defaults a model folder carries (concepts, guidance scale, ...)
TRUNCATION_WARNING = "prompt %d was truncated to the text encoder's %d tokens; dropped: %s"
DROPPED_SHOWN = 200  # characters of a truncated prompt's dropped words that its warning shows
FALLBACK_DEFAULTS = {"guidance_scale": 7.5, "num_inference_steps": 50, "concepts": [SLD_CONCEPT]}


def read_defaults(path) -> dict:
    """The defaults a model folder carries in spguard.json: guidance_scale, num_inference_steps, height,
    width, concepts, and "spguard" (SPGuard's parameters for the "spguard" method name)."""
    defaults_file = Path(path) / DEFAULTS_FILE
    if not defaults_file.is_file():
        return {}
    try:
        defaults = json.loads(defaults_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{defaults_file}: not readable JSON ({exc})") from None
    if not isinstance(defaults, dict):
        raise ModelLoadError(f"{defaults_file}: expected a JSON object")
    return defaults


@dataclass
class SafeDiffusionOutput:
    images: list[Image.Image] | np.ndarray | torch.Tensor
    reports: list[Report]


class SafeDiffusionPipeline:
    """Text-to-image sampling where every method (CFG, negative prompt, SLD, SP-Guard) shares one loop.

    Each denoising step makes one UNet call on one batch: [null rows, prompt rows, concept rows].
    Null and concept embeddings are encoded once and cached.
    """

    def __init__(self, unet, text_encoder, tokenizer, vae, scheduler, defaults: dict | None = None):
        self.unet, self.text_encoder, self.tokenizer, self.vae, self.scheduler = (
            unet, text_encoder, tokenizer, vae, scheduler)
        self.defaults = {**FALLBACK_DEFAULTS, **(defaults or {})}
        factor = getattr(vae.config, "factor", None)  # spguard's pixel-unshuffle autoencoder says so
        self.vae_scale_factor = factor or 2 ** (len(vae.config.block_out_channels) - 1)
        self.progress_bar_config = {}
        self.warn_truncation = True  # jobs warn themselves, naming a prompt by its index in the job
        self._text_cache: dict = {}

    # ----------------------------------------------------------------------------------------------
    # Construction
    @classmethod
    def from_components(cls, *, unet, text_encoder, tokenizer, vae, scheduler, defaults=None):
        return cls(unet, text_encoder, tokenizer, vae, scheduler, defaults)

    @classmethod
    def from_pipe(cls, pipe, defaults=None):
        """Share the components of a diffusers Stable Diffusion pipeline (no copies)."""
        return cls(*(getattr(pipe, name) for name in COMPONENTS), defaults=defaults)

    @classmethod
    def from_pretrained(cls, path, torch_dtype: torch.dtype | None = None, device=None):
        """Load a diffusers-format folder from local disk; never touches the network (see spguard.loading)."""
        parts = load_components(path, COMPONENTS)
        return cls(**parts, defaults=read_defaults(path)).to(device, torch_dtype)

    def to(self, device=None, dtype: torch.dtype | None = None):
        placement = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        for module in (self.unet, self.text_encoder, self.vae):
            module.to(**placement)
        self._text_cache.clear()
        return self

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def set_progress_bar_config(self, **kwargs):
        self.progress_bar_config = kwargs

    # ----------------------------------------------------------------------------------------------
    # Text
    def _tokenize(self, texts: list[str], max_length: int):
        return self.tokenizer(texts, padding="max_length", max_length=max_length, truncation=True,
                              return_tensors="pt")

    def _encode(self, texts: list[str]):
        """Embeddings and content-token masks of texts, as diffusers' StableDiffusionPipeline encodes them."""
        max_length = self.tokenizer.model_max_length
        tokens = self._tokenize(texts, max_length)
        if self.warn_truncation:
            for i, dropped in enumerate(self.dropped_words(texts)):
                if dropped:
                    logger.warning(TRUNCATION_WARNING, i, max_length, dropped)
        mask = tokens.attention_mask.to(self.device)
        use_mask = getattr(self.text_encoder.config, "use_attention_mask", False)
        embeds = self.text_encoder(tokens.input_ids.to(self.device), attention_mask=mask if use_mask else None)[0]
        ids = tokens.input_ids.to(self.device)
        special = torch.tensor(self.tokenizer.all_special_ids, device=self.device)
        content = (mask > 0) & ~torch.isin(ids, special)
        return embeds.to(self.dtype), content

    def dropped_words(self, texts: list[str]) -> list[str]:
        """For each text, what truncation to the text encoder's tokens drops ("" if nothing), as text: no
        padding or end tokens, and cut to DROPPED_SHOWN characters for a one-line warning."""
        max_length = self.tokenizer.model_max_length
        out = []
        if not texts:  # tokenizers cannot take an empty batch
            return out
        # Unpadded: each text's own tokens, start and end included. (verbose=False: no warning that they
        # are longer than the model takes; that is what is being asked.)
        for ids in self.tokenizer(texts, verbose=False).input_ids:
            dropped = self.tokenizer.decode(ids[max_length - 1 : -1]) if len(ids) > max_length else ""
            dropped = dropped.strip().lstrip("\ufffd")  # the cut may fall inside a character's bytes
            cut = len(dropped) - DROPPED_SHOWN
            out.append(f"{dropped[:DROPPED_SHOWN]}... ({cut} more characters)" if cut > 0 else dropped)
        return out

    def _encode_cached(self, texts: tuple[str, ...]):
        """Null and concept texts repeat across calls: encode them once per device and dtype."""
        key = (texts, self.device, self.dtype)
        if key not in self._text_cache:
            self._text_cache[key] = self._encode(list(texts))
        return self._text_cache[key]

    # ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        method="spguard",
        generator: torch.Generator | list[torch.Generator] | None = None,
        seed: int | list[int] | None = None,
        height: int | None = None,
        width: int | None = None,
        output_type: str = "pil",
        latents: torch.Tensor | None = None,
        eta: float = 0.0,
        report_masks: bool = False,
    ) -> SafeDiffusionOutput:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        method = resolve_method(method, self.defaults.get("spguard"))
        steps, scale, height, width = self.check_settings(num_inference_steps, guidance_scale, height, width)
        self._check(prompts, output_type)
        batch = len(prompts)
        generator = self._generators(generator, seed, batch)

        # Text: [null rows, prompt rows] and the method's concepts (cached).
        concept_texts = tuple(method.concepts or self.defaults["concepts"])
        negatives = self._negative_prompts(negative_prompt, method, concept_texts, batch)
        cond, _ = self._encode(prompts)
        if negatives is None:
            uncond = self._encode_cached(("",))[0].expand(batch, -1, -1)
        else:
            uncond = self._encode(negatives)[0]
        concepts = None
        if method.name in ("sld", "spguard"):
            if method.name == "sld":
                concept_texts = (", ".join(concept_texts),)
            concepts = Concepts(concept_texts, *self._encode_cached(concept_texts))

        # Scheduler and initial latents, as diffusers prepares them.
        self.scheduler.set_timesteps(steps, device=self.device)
        timesteps = self.scheduler.timesteps
        shape = (batch, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=self.device, dtype=self.dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {shape}")
        latents = latents.to(self.device, self.dtype) * self.scheduler.init_noise_sigma
        step_kwargs = self._step_kwargs(generator, eta)

        guider = method.start(batch, len(timesteps), scale, concepts, report_masks)
        attention = None
        if isinstance(method, SPGuard) and method.mask == "attention":
            attention = ConceptAttention(self.unet, method.attention_layers)
        with attention or contextlib.nullcontext(), tqdm(total=len(timesteps), **self.progress_bar_config) as progress:
            rows, embeds = None, torch.cat([uncond, cond])
            for i, t in enumerate(timesteps):
                if guider.rows is not rows:  # the rows change at most once, after phase 1
                    rows = guider.rows
                    embeds = torch.cat([uncond, cond] + ([] if rows is None else [rows.embeds]))
                x = self.scheduler.scale_model_input(latents, t)
                x_all = torch.cat([x, x] + ([] if rows is None else [x.index_select(0, rows.samples)]))
                if guider.needs_attention:
                    attention.begin(2 * batch, rows.token_mask, shape[2:])
                noise = self.unet(x_all, t, encoder_hidden_states=embeds).sample
                captured = attention.end() if guider.needs_attention else None
                e_u, e_p, e_s = noise[:batch], noise[batch : 2 * batch], noise[2 * batch :]
                eps = guider.guide(i, e_u, e_p, e_s, captured)
                latents = self.scheduler.step(eps, t, latents, **step_kwargs).prev_sample
                progress.update()

        images = self._decode(latents, output_type)
        reports = [Report(prompt=p, method=method.name, **r) for p, r in zip(prompts, guider.reports())]
        return SafeDiffusionOutput(images=images, reports=reports)

    # ----------------------------------------------------------------------------------------------
    def check_settings(self, num_inference_steps=None, guidance_scale=None, height=None, width=None):
        """(steps, guidance scale, height, width), the model's defaults for those that are None; ValueError
        for a number the model cannot take. Called by __call__, and by jobs before their first image."""
        d = self.defaults
        steps = d["num_inference_steps"] if num_inference_steps is None else num_inference_steps
        scale = d["guidance_scale"] if guidance_scale is None else guidance_scale
        native = self.unet.config.sample_size * self.vae_scale_factor
        height = (d.get("height") or native) if height is None else height
        width = (d.get("width") or native) if width is None else width
        train_steps = self.scheduler.config.num_train_timesteps  # a scheduler cannot take more steps
        if not (is_integer(steps) and 1 <= steps <= train_steps):
            raise ValueError(f"num_inference_steps must be an integer from 1 to the scheduler's {train_steps}, "
                             f"got {steps!r}")
        check_finite("guidance_scale", scale, minimum=0)
        factor = self.vae_scale_factor  # the latents are the image shrunk by this factor
        if not all(is_integer(x) and x > 0 and x % factor == 0 for x in (height, width)):
            raise ValueError(f"height and width must be positive multiples of {factor}, got {height!r}x{width!r}")
        return steps, scale, height, width

    def _check(self, prompts, output_type):
        if not prompts:
            raise ValueError("no prompts given")
        if not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompts must be strings")
        if output_type not in ("pil", "np", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'latent', got {output_type!r}")

    @staticmethod
    def _generators(generator, seed, batch):
        if generator is not None and seed is not None:
            raise ValueError("give either generator or seed, not both")
        if seed is None:
            generator_list = generator
        elif isinstance(seed, int):
            generator_list = torch.Generator().manual_seed(seed)
        else:
            generator_list = [torch.Generator().manual_seed(int(s)) for s in seed]
        if isinstance(generator_list, list) and len(generator_list) != batch:
            raise ValueError(f"{len(generator_list)} generators or seeds for {batch} prompts")
        return generator_list

    @staticmethod
    def _negative_prompts(negative_prompt, method, concept_texts, batch):
        if isinstance(method, NegativePrompt):
            if negative_prompt is not None:
                raise ValueError("the negative-prompt method carries its own text; do not pass negative_prompt too")
            negative_prompt = method.text if method.text is not None else ", ".join(concept_texts)
        if negative_prompt is None:
            return None
        negatives = [negative_prompt] * batch if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negatives) != batch:
            raise ValueError(f"{len(negatives)} negative prompts for {batch} prompts")
        return negatives

    def _step_kwargs(self, generator, eta):
        accepted = inspect.signature(self.scheduler.step).parameters
        kwargs = {}
        if "eta" in accepted:
            kwargs["eta"] = eta
        if "generator" in accepted:
            kwargs["generator"] = generator
        return kwargs

    def _decode(self, latents, output_type):
        if output_type == "latent":
            return latents
        image = self.vae.decode(latents / self.vae.config.scaling_factor).sample
        image = (image / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
        if output_type == "np":
            return image
        return [Image.fromarray(x) for x in (image * 255).round().astype("uint8")]
