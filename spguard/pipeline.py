"""SafeDiffusionPipeline: Stable Diffusion 1.x/2.x and SDXL sampling with SP-Guard and its baselines."""

from __future__ import annotations

import copy
import inspect
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from tqdm.auto import tqdm

from .loading import ModelLoadError, load_components, read_index
from .methods import SLD_CONCEPT, Concepts, Text, check_finite, is_integer, resolve_method
from .reports import Report

logger = logging.getLogger(__name__)

COMPONENTS = ("unet", "text_encoder", "tokenizer", "vae", "scheduler")
SDXL_COMPONENTS = ("text_encoder_2", "tokenizer_2")  # SDXL's second text encoder, when a model has one
DEFAULTS_FILE = "spguard.json"  # optional defaults a model folder carries (concepts, guidance scale, ...)
TRUNCATION_WARNING = "prompt %d was truncated to the text encoder's %d tokens; dropped: %s"
DROPPED_SHOWN = 200  # characters of a truncated prompt's dropped words that its warning shows
FALLBACK_DEFAULTS = {"guidance_scale": 7.5, "num_inference_steps": 50, "concepts": [SLD_CONCEPT]}
SDXL_GUIDANCE_SCALE = 5.0  # StableDiffusionXLPipeline's default
# What callback_on_step_end may ask for besides its guider's state: the latents after the step, the guided
# eps ("noise_pred", as diffusers names it), the step's UNet output on [null, prompt, concept rows], and the
# null (or negative) and prompt rows' embeddings.
CALLBACK_TENSORS = ("latents", "noise_pred", "unet_output", "prompt_embeds", "negative_prompt_embeds")


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
    Null and concept embeddings are encoded once and cached. With `text_encoder_2` and `tokenizer_2` the
    components are SDXL's: two text encoders, pooled embeddings and time ids.
    """

    def __init__(self, unet, text_encoder, tokenizer, vae, scheduler, defaults: dict | None = None,
                 text_encoder_2=None, tokenizer_2=None, force_zeros_for_empty_prompt: bool = False):
        self.unet, self.text_encoder, self.tokenizer, self.vae, self.scheduler = (
            unet, text_encoder, tokenizer, vae, scheduler)
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt  # SDXL: the null text's embedding is 0
        sdxl = {} if text_encoder_2 is None else {"guidance_scale": SDXL_GUIDANCE_SCALE}
        self.defaults = {**FALLBACK_DEFAULTS, **sdxl, **(defaults or {})}
        factor = getattr(vae.config, "factor", None)  # spguard's pixel-unshuffle autoencoder says so
        self.vae_scale_factor = factor or 2 ** (len(vae.config.block_out_channels) - 1)
        self.progress_bar_config = {}
        self.warn_truncation = True  # jobs warn themselves, naming a prompt by its index in the job
        self._text_cache: dict = {}
        self._interrupt = False

    # ----------------------------------------------------------------------------------------------
    # Construction
    @classmethod
    def from_components(cls, *, unet, text_encoder, tokenizer, vae, scheduler, defaults=None, **sdxl):
        """The components of a Stable Diffusion model; SDXL's add text_encoder_2, tokenizer_2 and
        force_zeros_for_empty_prompt."""
        return cls(unet, text_encoder, tokenizer, vae, scheduler, defaults, **sdxl)

    @classmethod
    def from_pipe(cls, pipe, defaults=None):
        """Share the components of a diffusers StableDiffusionPipeline or StableDiffusionXLPipeline (no copies)."""
        sdxl = {name: getattr(pipe, name) for name in SDXL_COMPONENTS if getattr(pipe, name, None) is not None}
        if sdxl:
            sdxl["force_zeros_for_empty_prompt"] = pipe.config.force_zeros_for_empty_prompt
        return cls(*(getattr(pipe, name) for name in COMPONENTS), defaults=defaults, **sdxl)

    @classmethod
    def from_pretrained(cls, path, torch_dtype: torch.dtype | None = None, device=None):
        """Load a diffusers-format folder (SD 1.x/2.x or SDXL) from local disk; never touches the network
        (see spguard.loading)."""
        parts = load_components(path, COMPONENTS, optional=SDXL_COMPONENTS)
        if "text_encoder_2" in parts:
            parts["force_zeros_for_empty_prompt"] = read_index(Path(path)).get("force_zeros_for_empty_prompt", True)
        return cls(**parts, defaults=read_defaults(path)).to(device, torch_dtype)

    def to(self, device=None, dtype: torch.dtype | None = None):
        placement = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        for module in (self.unet, self.text_encoder, self.text_encoder_2, self.vae):
            if module is not None:
                module.to(**placement)
        self._text_cache.clear()
        return self

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def interrupt(self) -> bool:
        """Set it (or diffusers' `_interrupt`) from a step callback to stop the loop after that step."""
        return self._interrupt

    @interrupt.setter
    def interrupt(self, value: bool):
        self._interrupt = bool(value)

    def set_progress_bar_config(self, **kwargs):
        self.progress_bar_config = kwargs

    # ----------------------------------------------------------------------------------------------
    # Text
    @staticmethod
    def _tokenize(tokenizer, texts: list[str]):
        max_length = tokenizer.model_max_length
        return tokenizer(texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")

    def _encode(self, texts: list[str]) -> Text:
        """Embeddings (and SDXL's pooled embeddings) and content-token masks of texts, as diffusers'
        StableDiffusionPipeline and StableDiffusionXLPipeline encode them."""
        if self.warn_truncation:
            for i, dropped in enumerate(self.dropped_words(texts)):
                if dropped:
                    logger.warning(TRUNCATION_WARNING, i, self.tokenizer.model_max_length, dropped)
        tokens = self._tokenize(self.tokenizer, texts)
        ids, mask = tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)
        special = torch.tensor(self.tokenizer.all_special_ids, device=self.device)
        content = (mask > 0) & ~torch.isin(ids, special)
        if self.text_encoder_2 is None:
            use_mask = getattr(self.text_encoder.config, "use_attention_mask", False)
            embeds = self.text_encoder(ids, attention_mask=mask if use_mask else None)[0]
            return Text(embeds.to(self.dtype), content)
        # SDXL: both encoders' penultimate hidden states side by side, the pooled output of the last one.
        hidden, pooled = [], None
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            out = encoder(self._tokenize(tokenizer, texts).input_ids.to(self.device), output_hidden_states=True)
            pooled = out[0] if out[0].ndim == 2 else pooled
            hidden.append(out.hidden_states[-2])
        return Text(torch.cat(hidden, dim=-1).to(self.dtype), content, pooled.to(self.dtype))

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

    def _encode_cached(self, texts: tuple[str, ...]) -> Text:
        """Null and concept texts repeat across calls: encode them once per device and dtype."""
        key = (texts, self.device, self.dtype)
        if key not in self._text_cache:
            self._text_cache[key] = self._encode(list(texts))
        return self._text_cache[key]

    def _unconditional(self, negatives: list[str] | None, cond: Text) -> Text:
        """The null rows: the negative prompts, else the empty text (SDXL: zeros where the model says so)."""
        if negatives is not None:
            return self._encode(negatives)
        if self.force_zeros_for_empty_prompt:
            return Text(torch.zeros_like(cond.embeds), cond.token_mask, torch.zeros_like(cond.pooled))
        return self._encode_cached(("",)).select(torch.zeros(len(cond.embeds), dtype=torch.long, device=self.device))

    def _time_ids(self, height, width, original_size, target_size, crops_coords_top_left) -> torch.Tensor | None:
        """SDXL's micro-conditioning (original size, crop corner, target size), as diffusers builds it."""
        if self.text_encoder_2 is None:
            return None
        ids = list((original_size or (height, width)) + tuple(crops_coords_top_left) + (target_size or (height, width)))
        return torch.tensor([ids], dtype=self.dtype, device=self.device)

    @staticmethod
    def _unet_kwargs(text: Text, time_ids) -> dict:
        kwargs = {"encoder_hidden_states": text.embeds}
        if text.pooled is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": text.pooled, "time_ids": time_ids.expand(len(text.pooled), -1)}
        return kwargs

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
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
    ) -> SafeDiffusionOutput:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        method = resolve_method(method, self.defaults)
        steps, scale, height, width = self.check_settings(num_inference_steps, guidance_scale, height, width)
        self._check(prompts, output_type)
        batch = len(prompts)
        generator = self._generators(generator, seed, batch)

        # Text: [null rows, prompt rows] and the method's concepts (cached).
        default_concepts = tuple(self.defaults["concepts"])
        negatives = self._batch_texts(method.negative_text(negative_prompt, default_concepts), batch)
        cond = self._encode(prompts)
        uncond = self._unconditional(negatives, cond)
        concept_texts = tuple(method.concept_texts(default_concepts))
        concepts = Concepts(concept_texts, self._encode_cached(concept_texts)) if concept_texts else None
        time_ids = self._time_ids(height, width, original_size, target_size, crops_coords_top_left)

        # Scheduler and initial latents, as diffusers prepares them.
        self.scheduler.set_timesteps(steps, device=self.device)
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(0)
        timesteps = self.scheduler.timesteps
        shape = (batch, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=self.device, dtype=self.dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {shape}")
        latents = latents.to(self.device, self.dtype) * self.scheduler.init_noise_sigma
        step_kwargs = self._step_kwargs(generator, eta)

        guider = method.start(batch, len(timesteps), scale, concepts, report_masks)
        callback_inputs = self._callback_inputs(callback_on_step_end, callback_on_step_end_tensor_inputs, guider)
        self._interrupt = False
        with guider.models(self.unet), tqdm(total=len(timesteps), **self.progress_bar_config) as progress:
            rows, checkpoint, i = None, None, 0
            unet_kwargs = self._unet_kwargs(Text.cat([uncond, cond]), time_ids)
            while i < len(timesteps):
                t = timesteps[i]
                if i == guider.checkpoint_step and checkpoint is None:
                    checkpoint = self._checkpoint(latents, generator)
                if guider.rows is not rows:  # the rows change at most once, after phase 1
                    rows = guider.rows
                    unet_kwargs = self._unet_kwargs(Text.cat([uncond, cond] + ([] if rows is None else [rows.text])),
                                                    time_ids)
                x = self.scheduler.scale_model_input(latents, t)
                x_all = torch.cat([x, x] + ([] if rows is None else [x.index_select(0, rows.samples)]))
                noise = self.unet(x_all, t, **unet_kwargs).sample
                eps = guider.guide(i, noise[:batch], noise[batch : 2 * batch], noise[2 * batch :])
                latents = self.scheduler.step(eps, t, latents, **step_kwargs).prev_sample
                if callback_inputs is not None:
                    tensors = dict(latents=latents, noise_pred=eps, unet_output=noise, prompt_embeds=cond.embeds,
                                   negative_prompt_embeds=uncond.embeds)
                    kwargs = {k: tensors[k] if k in tensors else guider.state(k) for k in callback_inputs}
                    latents = (callback_on_step_end(self, i, t, kwargs) or {}).get("latents", latents)
                progress.update()
                if self._interrupt:
                    break
                back = guider.rewind()
                if back is None:
                    i += 1
                else:  # the guider asks, once, for the steps from its checkpoint again (methods.Guider)
                    progress.total += i + 1 - back
                    latents, i = self._restore(checkpoint), back

        images = self._decode(latents, output_type)
        reports = [Report(prompt=p, method=method.name, **r) for p, r in zip(prompts, guider.reports())]
        return SafeDiffusionOutput(images=images, reports=reports)

    def _checkpoint(self, latents, generator) -> tuple:
        """What a later step needs to start again from here: the latents, the scheduler's state (multistep
        schedulers keep past outputs) and the random generators' states (stochastic schedulers)."""
        generators = generator if isinstance(generator, list) else [] if generator is None else [generator]
        return latents, copy.deepcopy(self.scheduler.__dict__), [(g, g.get_state()) for g in generators]

    def _restore(self, checkpoint) -> torch.Tensor:
        """Back to a checkpoint, which is used at most once, so its state is handed over, not copied."""
        latents, scheduler_state, generator_states = checkpoint
        self.scheduler.__dict__.update(scheduler_state)
        for g, state in generator_states:
            g.set_state(state)
        return latents

    @staticmethod
    def _callback_inputs(callback, names, guider) -> list[str] | None:
        """The tensors the step callback asked for (a diffusers PipelineCallback names its own)."""
        if callback is None:
            return None
        if isinstance(callback, (PipelineCallback, MultiPipelineCallbacks)):
            names = callback.tensor_inputs
        allowed = CALLBACK_TENSORS + tuple(guider.state_names)
        unknown = [k for k in names if k not in allowed]
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs: unknown {', '.join(unknown)}; "
                             f"this method offers {', '.join(allowed)}")
        return list(names)

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
    def _batch_texts(texts: str | list[str] | None, batch: int) -> list[str] | None:
        if texts is None:
            return None
        texts = [texts] * batch if isinstance(texts, str) else list(texts)
        if len(texts) != batch:
            raise ValueError(f"{len(texts)} negative prompts for {batch} prompts")
        return texts

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
        # SDXL's VAE overflows in fp16: diffusers' StableDiffusionXLPipeline decodes in fp32 where the VAE asks.
        upcast = (self.text_encoder_2 is not None and self.vae.dtype == torch.float16
                  and getattr(self.vae.config, "force_upcast", False))
        if upcast:
            self.vae.to(dtype=torch.float32)
        try:
            vae_dtype = next(self.vae.parameters(), latents).dtype
            image = self.vae.decode(latents.to(vae_dtype) / self.vae.config.scaling_factor).sample
        finally:
            if upcast:
                self.vae.to(dtype=torch.float16)
        image = (image / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
        if output_type == "np":
            return image
        return [Image.fromarray(x) for x in (image * 255).round().astype("uint8")]
