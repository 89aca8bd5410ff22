"""Guidance methods: small immutable configurations, each starting a per-generation guider.

The pipeline's loop names no method; a method plugs in through this protocol:

- `negative_text(given, concepts)`: the unconditional branch's text(s) (`given`: the caller's
  negative_prompt; `concepts`: the model's default concepts), or None for the null text;
- `concept_texts(concepts)`: the texts of the concept rows it needs encoded (empty: none);
- `start(batch_size, num_steps, guidance_scale, concepts, report_masks)`: the per-generation guider.

A guider (`Guider`) tells the loop which concept rows the next UNet call must evaluate (`rows`),
turns one step's noise estimates into the guided estimate (`guide`), changes the denoiser only inside
`models(unet)` (diffusers' guiders' prepare_models / cleanup_models), offers its per-step tensors to the
step callback (`state_names`, `state`) and writes the per-image reports (`reports`). Every method runs in
the same loop with the same batching and one UNet call per step, so their images and costs compare fairly.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from . import ops
from .attention import ConceptAttention
from .ops.reference import aligned_scores, concept_specific, safe_cosine

# The concept Safe Latent Diffusion ships (Schramowski et al., CVPR 2023; diffusers'
# StableDiffusionPipelineSafe); SP-Guard's default too, so the two methods compare.
SLD_CONCEPT = (
    "an image showing hate, harassment, violence, suffering, humiliation, harm, suicide, sexual, nudity, "
    "bodily fluids, blood, obscene gestures, illegal activity, drug use, theft, vandalism, weapons, child "
    "abuse, brutality, cruelty"
)
# lambda(i) falls to this in late steps (paper Sec. 2.3: guidance capped at 1.0 avoids artifacts).
LATE_STRENGTH = 1.0
MASK_SNAPSHOTS = 4  # mask snapshots kept per image when reports ask for them, spread over phase 2


@dataclass(frozen=True)
class Text:
    """Encoded texts: embeddings (n, L, D), content-token masks (n, L) (not start, end or padding tokens)
    and, for SDXL, the pooled embeddings (n, P) its UNet also takes (None for SD 1.x/2.x)."""

    embeds: Tensor
    token_mask: Tensor
    pooled: Tensor | None = None

    def select(self, index: Tensor) -> "Text":
        return Text(self.embeds.index_select(0, index), self.token_mask.index_select(0, index),
                    None if self.pooled is None else self.pooled.index_select(0, index))

    @staticmethod
    def cat(texts: Sequence["Text"]) -> "Text":
        pooled = [t.pooled for t in texts]
        return Text(torch.cat([t.embeds for t in texts]), torch.cat([t.token_mask for t in texts]),
                    None if pooled[0] is None else torch.cat(pooled))


@dataclass(frozen=True)
class ConceptRows:
    """The concept rows of one UNet call: the sample each row belongs to and the row's text."""

    samples: Tensor  # (n,) long
    text: Text


@dataclass(frozen=True)
class Concepts:
    """Encoded unsafe concepts: N strings and their N encoded texts."""

    texts: tuple[str, ...]
    text: Text

    def rows(self, samples: Tensor, concept: Tensor) -> ConceptRows:
        return ConceptRows(samples, self.text.select(concept))


def is_integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_finite(name: str, value, minimum: float | None = None) -> None:
    """ValueError unless value is a finite real number (and at least `minimum`): NaN would pass a plain
    `value < minimum` test and silently spoil every image."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value!r}")


def cfg(e_u: Tensor, e_p: Tensor, guidance_scale: float) -> Tensor:
    """Classifier-free guidance (paper Eq. 1)."""
    return e_u + guidance_scale * (e_p - e_u)


def _unguided(batch_size: int) -> list[dict]:
    return [{"harmfulness": None, "concept": None, "guided": False, "guided_steps": [], "mask_coverage": []}
            for _ in range(batch_size)]


class Guider:
    """A per-generation guider's defaults: no concept rows, no change to the denoiser, no state."""

    rows: ConceptRows | None = None
    state_names: tuple[str, ...] = ()
    # The step before which the loop keeps its state (latents, scheduler, random generators) so that the
    # guider can later send it back there once (`rewind`); None: the guider never rewinds.
    checkpoint_step: int | None = None

    def rewind(self) -> int | None:
        """After a step: the step the loop must go back to (its checkpoint_step), at most once; else None."""
        return None

    def models(self, unet):
        """A context inside which the denoiser carries whatever this guider installs on it."""
        return contextlib.nullcontext()

    def state(self, name: str) -> Tensor:
        raise KeyError(name)


class _CFGGuider(Guider):
    def __init__(self, batch_size: int, guidance_scale: float):
        self.batch_size, self.guidance_scale = batch_size, guidance_scale

    def guide(self, i, e_u, e_p, e_s):
        return cfg(e_u, e_p, self.guidance_scale)

    def reports(self) -> list[dict]:
        return _unguided(self.batch_size)


@dataclass(frozen=True)
class CFG:
    """Plain classifier-free guidance (Ho & Salimans 2022)."""

    name = "cfg"

    def negative_text(self, given, concepts):
        return given

    def concept_texts(self, concepts) -> tuple[str, ...]:
        return ()

    def start(self, batch_size, num_steps, guidance_scale, concepts, report_masks=False):
        return _CFGGuider(batch_size, guidance_scale)


@dataclass(frozen=True)
class NegativePrompt(CFG):
    """CFG with the unconditional branch conditioned on a negative prompt (diffusers' `negative_prompt`).

    text=None takes the caller's negative_prompt, else the unsafe concepts themselves (the paper's NEG).
    """

    text: str | None = None
    name = "negative"

    def negative_text(self, given, concepts):
        if self.text is None:
            return ", ".join(concepts) if given is None else given
        if given is not None:
            raise ValueError(f"the negative-prompt method already carries its text {self.text!r}; "
                             "do not pass negative_prompt too")
        return self.text


@dataclass(frozen=True)
class SLD:
    """Safe Latent Diffusion (Schramowski et al., CVPR 2023), as diffusers' StableDiffusionPipelineSafe."""

    preset: str = "medium"
    concept: str | None = None  # None: the model's default concepts, joined into one string
    warmup_steps: int | None = None  # None: the preset's (diffusers' sld_warmup_steps)

    # (warmup_steps, sld_guidance_scale, sld_threshold, sld_momentum_scale, sld_mom_beta):
    # diffusers' SafetyConfig.WEAK/MEDIUM/STRONG/MAX.
    PRESETS = {
        "weak": (15, 20.0, 0.0, 0.0, 0.0),
        "medium": (10, 1000.0, 0.01, 0.3, 0.4),
        "strong": (7, 2000.0, 0.025, 0.5, 0.7),
        "max": (0, 5000.0, 1.0, 0.5, 0.7),
    }

    def __post_init__(self):
        if self.preset not in self.PRESETS:
            raise ValueError(f"unknown SLD preset {self.preset!r}; choose one of {', '.join(self.PRESETS)}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be non-negative, got {self.warmup_steps}")

    @property
    def name(self) -> str:
        return f"sld-{self.preset}"

    def negative_text(self, given, concepts):
        return given

    def concept_texts(self, concepts) -> tuple[str, ...]:
        return (", ".join(concepts) if self.concept is None else self.concept,)  # SLD takes one string

    def start(self, batch_size, num_steps, guidance_scale, concepts, report_masks=False):
        return _SLDGuider(self, batch_size, num_steps, guidance_scale, concepts)


class _SLDGuider(Guider):
    def __init__(self, method: SLD, batch_size, num_steps, guidance_scale, concepts: Concepts):
        self.batch_size, self.num_steps, self.guidance_scale = batch_size, num_steps, guidance_scale
        self.warmup, self.sld_scale, self.threshold, self.momentum_scale, self.beta = SLD.PRESETS[method.preset]
        if method.warmup_steps is not None:
            self.warmup = method.warmup_steps
        self.concept = concepts.texts[0]
        samples = torch.arange(batch_size, device=concepts.text.embeds.device)
        self.rows = concepts.rows(samples, torch.zeros_like(samples))
        self.momentum = None
        self.steps_run = 0

    def guide(self, i, e_u, e_p, e_s):
        self.steps_run = i + 1
        # diffusers' order of operations (pipeline_stable_diffusion_safe.py), so images match bit for bit.
        d_p = e_p - e_u
        if self.momentum is None:
            self.momentum = torch.zeros_like(d_p)
        scale = torch.clamp(torch.abs(e_p - e_s) * self.sld_scale, max=1.0)
        scale = torch.where((e_p - e_s) >= self.threshold, torch.zeros_like(scale), scale)
        g_s = torch.mul(e_s - e_u, scale) + self.momentum_scale * self.momentum
        self.momentum = self.beta * self.momentum + (1 - self.beta) * g_s
        if i >= self.warmup:
            d_p = d_p - g_s
        return e_u + self.guidance_scale * d_p

    def reports(self) -> list[dict]:
        steps = list(range(self.warmup, self.steps_run))
        return [{"harmfulness": None, "concept": self.concept, "guided": True, "guided_steps": steps,
                 "mask_coverage": []} for _ in range(self.batch_size)]


# SP-Guard's region R (docs/design.md, "SP-Guard"): "noise", the paper's Eq. 8 (|d_s| above its
# q-quantile); "attention", the concept tokens' cross-attention above its q-quantile; "aligned", the
# pixels where max(0, d_p . d_s), summed over the guided steps so far, is above its q-quantile
# (ops.reference.aligned_scores; docs/design.md, "The aligned mask").
MASKS = ("noise", "attention", "aligned")


@dataclass(frozen=True)
class SPGuard:
    """SP-Guard: selective, prompt-adaptive safe guidance (Yu & Moon, arXiv 2511.11014).

    Phase 1 (steps < t_p) is plain CFG while the prompt's harmfulness P is estimated (Eq. 6);
    phase 2 guides away from the most similar concept with strength lambda(i) * P+ inside the
    mask (Eq. 7, 8). Samples whose P does not exceed `harmfulness_threshold` (0: the paper's P+)
    stop evaluating their concept rows after phase 1: they cost what CFG costs.
    `scale_by_harmfulness=False` departs from Eq. 7: every guided sample gets strength lambda(i), so P
    only decides, through the threshold, which samples are guided (docs/design.md, "Strength").
    `guide_from` below t_p departs from the paper's timing: once P is known at t_p, a batch with a guided
    sample goes back to step guide_from and guides from there (docs/design.md, "Guiding from before t_p").
    `step_weights` departs from Eq. 6's uniform mean over the phase-1 steps: P is the mean of the steps'
    cosines weighted by these (one per step, from step 0; docs/design.md, "Weighting P's steps").
    """

    lambda_max: float = 4.0
    q: float = 0.9
    t_p: int = 10
    mask: str = "noise"  # one of MASKS
    concepts: str | Sequence[str] | None = None  # None: the model's default concepts, else SLD_CONCEPT
    schedule: str = "step"  # lambda(i): "step" (the paper's default) or "cosine"
    t_drop: int | None = None  # the step schedule drops to 1.0 here; None: half of the steps
    harmfulness_threshold: float = 0.0
    scale_by_harmfulness: bool = True  # Eq. 7's P+ factor; False: lambda(i) alone for the guided samples
    guide_from: int | None = None  # first guided step; None or >= t_p: t_p (the paper); below t_p the loop rewinds
    attention_layers: tuple[str, ...] | None = None  # substrings of attention-layer names; None: all
    step_weights: tuple[float, ...] | str | None = None  # P's weight of each phase-1 step; None or "uniform": Eq. 6
    name = "spguard"

    def __post_init__(self):
        if not 0.0 < self.q < 1.0:
            raise ValueError(f"q must lie in (0, 1), got {self.q}")
        if not (is_integer(self.t_p) and self.t_p >= 1):
            raise ValueError(f"t_p must be an integer of at least 1, got {self.t_p!r}")
        if self.t_drop is not None and not (is_integer(self.t_drop) and self.t_drop >= 0):
            raise ValueError(f"t_drop must be a non-negative integer, got {self.t_drop!r}")
        if self.guide_from is not None and not (is_integer(self.guide_from) and self.guide_from >= 0):
            raise ValueError(f"guide_from must be a non-negative integer, got {self.guide_from!r}")
        check_finite("lambda_max", self.lambda_max, minimum=0)
        threshold = self.harmfulness_threshold  # ±inf are meaningful: guide every prompt, or none
        if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or math.isnan(threshold):
            raise ValueError(f"harmfulness_threshold must be a number, got {threshold!r}")
        if not isinstance(self.scale_by_harmfulness, bool):
            raise ValueError(f"scale_by_harmfulness must be True or False, got {self.scale_by_harmfulness!r}")
        if self.mask not in MASKS:
            raise ValueError(f"mask must be one of {', '.join(MASKS)}, got {self.mask!r}")
        if self.schedule not in ("step", "cosine"):
            raise ValueError(f"schedule must be 'step' or 'cosine', got {self.schedule!r}")
        if isinstance(self.concepts, str):
            object.__setattr__(self, "concepts", (self.concepts,))
        elif self.concepts is not None:
            object.__setattr__(self, "concepts", tuple(self.concepts))
            if not self.concepts:
                raise ValueError("concepts must name at least one concept")
        if self.step_weights == "uniform":
            object.__setattr__(self, "step_weights", None)
        if self.step_weights is not None:
            weights = tuple(self.step_weights)
            for w in weights:
                check_finite("step_weights", w, minimum=0)
            if len(weights) < self.t_p or not any(weights[: self.t_p]):
                raise ValueError(f"step_weights must give each of the t_p = {self.t_p} phase-1 steps a weight, "
                                 f"not all zero, got {self.step_weights!r} ('uniform': Eq. 6's mean)")
            object.__setattr__(self, "step_weights", tuple(float(w) for w in weights))
        if isinstance(self.attention_layers, str):  # one name, not its characters
            object.__setattr__(self, "attention_layers", (self.attention_layers,))
        elif self.attention_layers is not None:
            object.__setattr__(self, "attention_layers", tuple(self.attention_layers))

    @classmethod
    def with_defaults(cls, defaults: dict | None, **given) -> "SPGuard":
        """SP-Guard from a model folder's defaults (spguard.json's "spguard"), overridden by the given
        parameters that are not None (a command line's unset flags)."""
        return cls(**{**(defaults or {}), **{k: v for k, v in given.items() if v is not None}})

    @property
    def first_guided_step(self) -> int:
        return self.t_p if self.guide_from is None else min(self.guide_from, self.t_p)

    def step_weight(self, i: int) -> float:
        """Phase-1 step i's weight in P: 1 for Eq. 6's uniform mean, else step_weights[i]."""
        return 1.0 if self.step_weights is None else self.step_weights[i]

    def harmfulness(self, weighted_sum: Tensor, t_p: int) -> Tensor:
        """P of each concept (Eq. 6) from its cosines summed over the steps before t_p, each times step_weight."""
        return weighted_sum / sum(self.step_weight(i) for i in range(t_p))

    def strength(self, i: int, num_steps: int) -> float:
        """lambda(i) of Eq. 7 for a guided step i (first_guided_step <= i < num_steps); never above lambda_max."""
        late = min(LATE_STRENGTH, self.lambda_max)
        if self.schedule == "step":
            t_drop = num_steps // 2 if self.t_drop is None else self.t_drop
            return self.lambda_max if i < t_drop else late
        # Cosine: from lambda_max at the first guided step down towards the late strength at the last step.
        start = self.first_guided_step
        progress = (i - start) / max(num_steps - start, 1)
        return late + (self.lambda_max - late) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def negative_text(self, given, concepts):
        return given

    def concept_texts(self, concepts) -> tuple[str, ...]:
        return self.concepts or tuple(concepts)

    def start(self, batch_size, num_steps, guidance_scale, concepts, report_masks=False):
        return _SPGuardGuider(self, batch_size, num_steps, guidance_scale, concepts, report_masks)


class _SPGuardGuider(Guider):
    state_names = ("guidance_mask",)

    def __init__(self, method: SPGuard, batch_size, num_steps, guidance_scale, concepts: Concepts, report_masks):
        self.m, self.num_steps, self.guidance_scale, self.concepts = method, num_steps, guidance_scale, concepts
        self.t_p = min(method.t_p, num_steps)
        self.start = min(method.first_guided_step, self.t_p)  # the first guided step
        self.checkpoint_step = self.start if self.start < self.t_p else None
        self.batch_size, n = batch_size, len(concepts.texts)
        device = concepts.text.embeds.device
        samples = torch.arange(batch_size, device=device)
        self.rows = concepts.rows(samples.repeat_interleave(n), torch.arange(n, device=device).repeat(batch_size))
        self.similarity = torch.zeros(batch_size, n, device=device)  # running weighted sum of Eq. 6's cosine
        self.coverage = torch.zeros(batch_size, num_steps, device=device)
        last = num_steps - 1
        spread = sorted({round(self.start + k * (last - self.start) / (MASK_SNAPSHOTS - 1))
                         for k in range(MASK_SNAPSHOTS)})
        self.snapshot_steps = spread if report_masks and self.start < num_steps else []
        self.snapshots = None  # (B, S, H, W), allocated at the first phase-2 step
        self.active = None  # samples guided in phase 2, known after phase 1
        self.weight = None  # this step's M of the active samples (phase 2)
        self.aligned_sum = None  # the aligned mask's scores summed over the guided steps so far
        # The aligned mask guiding from before t_p starts from phase 1's scores of every concept over the
        # steps it will guide again (B, N, H*W): where CFG drew each concept by t_p (docs/design.md, "The aligned mask").
        self.lookahead = method.mask == "aligned" and self.start < self.t_p
        self.phase1_scores = None
        self.capture = None  # the attention capture, while models() holds it
        self.guided_steps = []  # the phase-2 steps run, in order
        self.rewind_to = None  # set once at the end of phase 1 when the loop must go back to self.start

    @contextlib.contextmanager
    def models(self, unet):
        if self.m.mask != "attention":
            yield
            return
        # The concept rows follow the null and prompt rows in every UNet call.
        with ConceptAttention(unet, self.m.attention_layers, first_row=2 * self.batch_size) as self.capture:
            yield
        self.capture = None

    def state(self, name: str) -> Tensor:
        if name != "guidance_mask":
            raise KeyError(name)
        # M of Eq. 8 per sample, (B, C, H, W); 0 in phase 1 and for the samples phase 2 does not guide.
        mask = torch.zeros_like(self.latent_like, dtype=torch.float32)
        return mask if self.weight is None else mask.index_copy_(0, self.active, self.weight)

    def rewind(self) -> int | None:
        step, self.rewind_to = self.rewind_to, None
        return step

    def guide(self, i, e_u, e_p, e_s):
        self.weight, self.latent_like = None, e_u
        if self.active is None:  # phase 1
            e_s = e_s.unflatten(0, (self.batch_size, -1))
            eps, dot, sq_p, sq_s = ops.phase1_step(e_u, e_p, e_s, self.guidance_scale)
            self.similarity.add_(safe_cosine(dot, sq_p[:, None], sq_s), alpha=self.m.step_weight(i))  # Eq. 6
            if self.lookahead and i >= self.start:
                scores = aligned_scores(e_u[:, None], e_p[:, None], e_s)  # (B, N, H*W)
                self.phase1_scores = scores if self.phase1_scores is None else self.phase1_scores.add_(scores)
            if i == self.t_p - 1:
                self._end_phase1(e_u.shape[-2:])
            return eps
        eps = cfg(e_u, e_p, self.guidance_scale)
        if self.rows is None:
            return eps
        a = self.active
        self.guided_steps.append(i)
        strength = self.m.strength(i, self.num_steps) * self.active_scale  # Eq. 7
        e_u_a, e_p_a = e_u.index_select(0, a), e_p.index_select(0, a)
        if self.m.mask == "attention":
            scores = self.capture.take()
        elif self.m.mask == "aligned":
            scores = aligned_scores(e_u_a, e_p_a, e_s)
            self.aligned_sum = scores if self.aligned_sum is None else self.aligned_sum.add_(scores)
            scores = self.aligned_sum
        else:
            scores = None  # the noise mask: the op takes R on |d_s| itself
        eps_a, weight = ops.phase2_step(e_u_a, e_p_a, e_s, strength, self.guidance_scale, self.m.q, scores)
        self.weight = weight
        self.coverage[:, i].index_copy_(0, a, (weight > 0).flatten(1).float().mean(1))
        if i in self.snapshot_steps:
            if self.snapshots is None:
                self.snapshots = weight.new_zeros(self.batch_size, len(self.snapshot_steps), *weight.shape[2:])
            self.snapshots[:, self.snapshot_steps.index(i)].index_copy_(0, a, weight.mean(1))
        return eps.index_copy_(0, a, eps_a)

    def _end_phase1(self, latent_size):
        self.harmfulness, self.concept = self.m.harmfulness(self.similarity, self.t_p).max(1)  # Eq. 6
        guided = self.harmfulness > self.m.harmfulness_threshold
        self.active = guided.nonzero().squeeze(1)  # the generation's one host synchronisation
        p_plus = self.harmfulness.index_select(0, self.active).clamp(min=0)  # P+ of Eq. 7
        self.active_scale = p_plus if self.m.scale_by_harmfulness else torch.ones_like(p_plus)
        n_active = self.active.shape[0]
        if self.phase1_scores is not None and n_active:
            self.aligned_sum = concept_specific(self.phase1_scores)[self.active, self.concept[self.active]]
        self.phase1_scores = None  # read once
        self.rows = self.concepts.rows(self.active, self.concept.index_select(0, self.active)) if n_active else None
        if self.rows is not None and self.capture is not None:
            self.capture.begin(self.rows.text.token_mask, tuple(latent_size))
        if self.rows is not None and self.checkpoint_step is not None:
            self.rewind_to = self.checkpoint_step

    def reports(self) -> list[dict]:
        if self.active is None:  # interrupted during phase 1: no harmfulness yet
            return _unguided(self.batch_size)
        harmfulness, concept = self.harmfulness.tolist(), self.concept.tolist()
        active = set(self.active.tolist())
        steps = self.guided_steps
        coverage = self.coverage[:, steps].tolist()
        out = []
        for b in range(self.batch_size):
            guided = b in active and bool(steps)
            r = {"harmfulness": harmfulness[b], "concept": self.concepts.texts[concept[b]], "guided": guided,
                 "guided_steps": steps if guided else [], "mask_coverage": coverage[b] if guided else []}
            if self.snapshot_steps:
                r["mask_snapshots"] = {
                    s: (self.snapshots[b, k].tolist() if guided and s in steps else None)
                    for k, s in enumerate(self.snapshot_steps)
                }
            out.append(r)
        return out


# SP-Guard's fields a command line sets (`spguard generate`, `spguard bench safety`).
SPGUARD_FLAGS = ("lambda_max", "q", "t_p", "guide_from", "mask", "schedule", "t_drop", "harmfulness_threshold",
                 "scale_by_harmfulness", "step_weights")


def _step_weights(text: str):
    """--step-weights: "uniform", or comma-separated numbers."""
    if text == "uniform":
        return text
    try:
        return tuple(float(w) for w in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'uniform' or comma-separated numbers, got {text!r}") from None


def add_spguard_arguments(group, mask: bool = True) -> None:
    """SPGUARD_FLAGS as options of an argparse parser or group, unset (None) unless given, so a model
    folder's defaults apply (SPGuard.with_defaults); the help shows the engine's. `mask=False` leaves
    --mask out (for a caller that sets the mask itself)."""
    engine = SPGuard()
    group.add_argument("--lambda-max", type=float, help=f"({engine.lambda_max})")
    group.add_argument("--q", type=float, help=f"({engine.q})")
    group.add_argument("--t-p", type=int, help=f"({engine.t_p})")
    group.add_argument("--guide-from", type=int,
                       help="first guided step; below t_p a batch with a guided prompt goes back to it once P is "
                            "known (t_p or above: the paper's timing)")
    if mask:
        group.add_argument("--mask", choices=MASKS, help=f"({engine.mask})")
    group.add_argument("--schedule", choices=("step", "cosine"), help=f"({engine.schedule})")
    group.add_argument("--t-drop", type=int, help="step where lambda drops to 1 (half of the steps)")
    group.add_argument("--harmfulness-threshold", type=float,
                       help="guide only prompts whose P exceeds this (0: the paper's P+ rule)")
    group.add_argument("--scale-by-harmfulness", action=argparse.BooleanOptionalAction,
                       help="strength lambda(i) * P+ as in Eq. 7 (on), or lambda(i) for every guided prompt (off)")
    group.add_argument("--step-weights", type=_step_weights, metavar="W0,W1,...|uniform",
                       help="weights of phase-1 steps 0, 1, ... in P ('uniform': Eq. 6's mean)")


def spguard_knobs(args) -> dict:
    """The SPGUARD_FLAGS a parsed command line has (None where unset), for SPGuard.with_defaults."""
    return {name: getattr(args, name) for name in SPGUARD_FLAGS if hasattr(args, name)}


METHOD_NAMES = ("cfg", "negative", "sld-weak", "sld-medium", "sld-strong", "sld-max", "spguard")


def resolve_method(method, model_defaults: dict | None = None):
    """A method object from an object or one of METHOD_NAMES (any case); "spguard" takes the SP-Guard
    parameters of a model's defaults (spguard.json's "spguard")."""
    if not isinstance(method, str):
        if not callable(getattr(method, "start", None)):
            raise TypeError(f"method must be a method object or a name, got {type(method).__name__}")
        return method
    name = method.lower()
    if name == "cfg":
        return CFG()
    if name == "negative":
        return NegativePrompt()
    if name.startswith("sld-") and name[4:] in SLD.PRESETS:
        return SLD(name[4:])
    if name == "spguard":
        return SPGuard.with_defaults((model_defaults or {}).get("spguard"))
    raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHOD_NAMES)}")
