"""Guidance methods: small immutable configurations, each starting a per-generation guider.

A guider tells the sampling loop which concept rows the next UNet call must evaluate (`rows`) and
turns one step's noise estimates into the guided estimate (`guide`). Every method runs in the same
loop with the same batching and one UNet call per step, so their images and costs compare fairly.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from . import ops
from .ops.reference import safe_cosine

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
class ConceptRows:
    """The concept rows of one UNet call: the sample each row belongs to, its embedding and token mask."""

    samples: Tensor  # (n,) long
    embeds: Tensor  # (n, L, D)
    token_mask: Tensor  # (n, L) bool: the concept's content tokens (not start, end or padding)


@dataclass(frozen=True)
class Concepts:
    """Encoded unsafe concepts: N strings, embeddings (N, L, D), content-token masks (N, L)."""

    texts: tuple[str, ...]
    embeds: Tensor
    token_mask: Tensor

    def rows(self, samples: Tensor, concept: Tensor) -> ConceptRows:
        return ConceptRows(samples, self.embeds[concept], self.token_mask[concept])


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


class _CFGGuider:
    rows = None  # no concept rows
    needs_attention = False

    def __init__(self, batch_size: int, guidance_scale: float):
        self.batch_size, self.guidance_scale = batch_size, guidance_scale

    def guide(self, i, e_u, e_p, e_s, attention):
        return cfg(e_u, e_p, self.guidance_scale)

    def reports(self) -> list[dict]:
        return _unguided(self.batch_size)


@dataclass(frozen=True)
class CFG:
    """Plain classifier-free guidance (Ho & Salimans 2022)."""

    name = "cfg"
    concepts = None

    def start(self, batch_size, num_steps, guidance_scale, concepts, report_masks=False):
        return _CFGGuider(batch_size, guidance_scale)


@dataclass(frozen=True)
class NegativePrompt(CFG):
    """CFG with the unconditional branch conditioned on a negative prompt (diffusers' `negative_prompt`).

    text=None uses the unsafe concepts themselves, the paper's NEG baseline.
    """

    text: str | None = None
    name = "negative"


@dataclass(frozen=True)
class SLD:
    """Safe Latent Diffusion (Schramowski et al., CVPR 2023), as diffusers' StableDiffusionPipelineSafe."""

    preset: str = "medium"
    concept: str | None = None  # None: the model's default concepts, joined into one string
    warmup_steps: int | None = None  # None: the preset's (diffusers' sld_warmup_steps)
    name = "sld"

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
    def concepts(self):
        return None if self.concept is None else (self.concept,)

    def start(self, batch_size, num_steps, guidance_scale, concepts, report_masks=False):
        return _SLDGuider(self, batch_size, num_steps, guidance_scale, concepts)


class _SLDGuider:
    needs_attention = False

    def __init__(self, method: SLD, batch_size, num_steps, guidance_scale, concepts: Concepts):
        self.batch_size, self.num_steps, self.guidance_scale = batch_size, num_steps, guidance_scale
        self.warmup, self.sld_scale, self.threshold, self.momentum_scale, self.beta = SLD.PRESETS[method.preset]
        if method.warmup_steps is not None:
            self.warmup = method.warmup_steps
        self.concept = concepts.texts[0]  # the pipeline joins the concepts into SLD's one string
        samples = torch.arange(batch_size, device=concepts.embeds.device)
        self.rows = concepts.rows(samples, torch.zeros_like(samples))
        self.momentum = None

    def guide(self, i, e_u, e_p, e_s, attention):
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
        steps = list(range(self.warmup, self.num_steps))
        return [{"harmfulness": None, "concept": self.concept, "guided": True, "guided_steps": steps,
                 "mask_coverage": []} for _ in range(self.batch_size)]


@dataclass(frozen=True)
class SPGuard:
    """SP-Guard: selective, prompt-adaptive safe guidance (Yu & Moon, arXiv 2511.11014).

    Phase 1 (steps < t_p) is plain CFG while the prompt's harmfulness P is estimated (Eq. 6);
    phase 2 guides away from the most similar concept with strength lambda(i) * P+ inside the
    mask (Eq. 7, 8). Samples whose P does not exceed `harmfulness_threshold` (0: the paper's P+)
    stop evaluating their concept rows after phase 1: they cost what CFG costs.
    """

    lambda_max: float = 4.0
    q: float = 0.9
    t_p: int = 10
    mask: str = "noise"  # "noise" (Eq. 8) or "attention" (cross-attention of the concept tokens)
    concepts: str | Sequence[str] | None = None  # None: the model's default concepts, else SLD_CONCEPT
    schedule: str = "step"  # lambda(i): "step" (the paper's default) or "cosine"
    t_drop: int | None = None  # the step schedule drops to 1.0 here; None: half of the steps
    harmfulness_threshold: float = 0.0
    attention_layers: tuple[str, ...] | None = None  # substrings of attention-layer names; None: all
    name = "spguard"

    def __post_init__(self):
        if not 0.0 < self.q < 1.0:
            raise ValueError(f"q must lie in (0, 1), got {self.q}")
        if not (is_integer(self.t_p) and self.t_p >= 1):
            raise ValueError(f"t_p must be an integer of at least 1, got {self.t_p!r}")
        if self.t_drop is not None and not (is_integer(self.t_drop) and self.t_drop >= 0):
            raise ValueError(f"t_drop must be a non-negative integer, got {self.t_drop!r}")
        check_finite("lambda_max", self.lambda_max, minimum=0)
        threshold = self.harmfulness_threshold  # ±inf are meaningful: guide every prompt, or none
        if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or math.isnan(threshold):
            raise ValueError(f"harmfulness_threshold must be a number, got {threshold!r}")
        if self.mask not in ("noise", "attention"):
            raise ValueError(f"mask must be 'noise' or 'attention', got {self.mask!r}")
        if self.schedule not in ("step", "cosine"):
            raise ValueError(f"schedule must be 'step' or 'cosine', got {self.schedule!r}")
        if isinstance(self.concepts, str):
            object.__setattr__(self, "concepts", (self.concepts,))
        elif self.concepts is not None:
            object.__setattr__(self, "concepts", tuple(self.concepts))
            if not self.concepts:
                raise ValueError("concepts must name at least one concept")

    @classmethod
    def with_defaults(cls, defaults: dict | None, **given) -> "SPGuard":
        """SP-Guard from a model folder's defaults (spguard.json's "spguard"), overridden by the given
        parameters that are not None (a command line's unset flags)."""
        return cls(**{**(defaults or {}), **{k: v for k, v in given.items() if v is not None}})

    def strength(self, i: int, num_steps: int) -> float:
        """lambda(i) of Eq. 7 for a phase-2 step i (t_p <= i < num_steps); never above lambda_max."""
        late = min(LATE_STRENGTH, self.lambda_max)
        if self.schedule == "step":
            t_drop = num_steps // 2 if self.t_drop is None else self.t_drop
            return self.lambda_max if i < t_drop else late
        # Cosine: from lambda_max at t_p down towards the late strength at the last step.
        progress = (i - self.t_p) / max(num_steps - self.t_p, 1)
        return late + (self.lambda_max - late) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def start(self, batch_size, num_steps, guidance_scale, concepts, report_masks=False):
        return _SPGuardGuider(self, batch_size, num_steps, guidance_scale, concepts, report_masks)


class _SPGuardGuider:
    def __init__(self, method: SPGuard, batch_size, num_steps, guidance_scale, concepts: Concepts, report_masks):
        self.m, self.num_steps, self.guidance_scale, self.concepts = method, num_steps, guidance_scale, concepts
        self.t_p = min(method.t_p, num_steps)
        self.batch_size, n = batch_size, len(concepts.texts)
        device = concepts.embeds.device
        samples = torch.arange(batch_size, device=device)
        self.rows = concepts.rows(samples.repeat_interleave(n), torch.arange(n, device=device).repeat(batch_size))
        self.similarity = torch.zeros(batch_size, n, device=device)  # running sum of Eq. 6's cosine
        self.coverage = torch.zeros(batch_size, num_steps, device=device)
        last = num_steps - 1
        spread = sorted({round(self.t_p + k * (last - self.t_p) / (MASK_SNAPSHOTS - 1)) for k in range(MASK_SNAPSHOTS)})
        self.snapshot_steps = spread if report_masks and self.t_p < num_steps else []
        self.snapshots = None  # (B, S, H, W), allocated at the first phase-2 step
        self.active = None  # samples guided in phase 2, known after phase 1

    @property
    def needs_attention(self) -> bool:
        return self.m.mask == "attention" and self.active is not None and self.rows is not None

    def guide(self, i, e_u, e_p, e_s, attention):
        if i < self.t_p:
            e_s = e_s.unflatten(0, (self.batch_size, -1))
            eps, dot, sq_p, sq_s = ops.phase1_step(e_u, e_p, e_s, self.guidance_scale)
            self.similarity += safe_cosine(dot, sq_p[:, None], sq_s)  # Eq. 6
            if i == self.t_p - 1:
                self._end_phase1()
            return eps
        eps = cfg(e_u, e_p, self.guidance_scale)
        if self.rows is None:
            return eps
        a = self.active
        strength = self.m.strength(i, self.num_steps) * self.active_p_plus  # Eq. 7
        eps_a, weight = ops.phase2_step(
            e_u.index_select(0, a), e_p.index_select(0, a), e_s, strength, self.guidance_scale, self.m.q, attention
        )
        self.coverage[:, i].index_copy_(0, a, (weight > 0).flatten(1).float().mean(1))
        if i in self.snapshot_steps:
            if self.snapshots is None:
                self.snapshots = weight.new_zeros(self.batch_size, len(self.snapshot_steps), *weight.shape[2:])
            self.snapshots[:, self.snapshot_steps.index(i)].index_copy_(0, a, weight.mean(1))
        return eps.index_copy_(0, a, eps_a)

    def _end_phase1(self):
        self.harmfulness, self.concept = (self.similarity / self.t_p).max(1)  # Eq. 6
        guided = self.harmfulness > self.m.harmfulness_threshold
        self.active = guided.nonzero().squeeze(1)  # the generation's one host synchronisation
        self.active_p_plus = self.harmfulness.index_select(0, self.active).clamp(min=0)  # P+ of Eq. 7
        n_active = self.active.shape[0]
        self.rows = self.concepts.rows(self.active, self.concept.index_select(0, self.active)) if n_active else None

    def reports(self) -> list[dict]:
        harmfulness, concept = self.harmfulness.tolist(), self.concept.tolist()
        active = set(self.active.tolist())
        coverage = self.coverage[:, self.t_p :].tolist()
        steps = list(range(self.t_p, self.num_steps))
        out = []
        for b in range(self.batch_size):
            guided = b in active and bool(steps)
            r = {"harmfulness": harmfulness[b], "concept": self.concepts.texts[concept[b]], "guided": guided,
                 "guided_steps": steps if guided else [], "mask_coverage": coverage[b] if guided else []}
            if self.snapshot_steps:
                r["mask_snapshots"] = {
                    s: (self.snapshots[b, k].tolist() if guided else None) for k, s in enumerate(self.snapshot_steps)
                }
            out.append(r)
        return out


METHOD_NAMES = ("cfg", "negative", "sld-weak", "sld-medium", "sld-strong", "sld-max", "spguard")


def resolve_method(method, spguard_defaults: dict | None = None) -> CFG | NegativePrompt | SLD | SPGuard:
    """A method object from an object or one of METHOD_NAMES; "spguard" takes a model's SP-Guard defaults."""
    if isinstance(method, (CFG, SLD, SPGuard)):
        return method
    if not isinstance(method, str):
        raise TypeError(f"method must be a method object or a name, got {type(method).__name__}")
    name = method.lower()
    if name == "cfg":
        return CFG()
    if name == "negative":
        return NegativePrompt()
    if name.startswith("sld-") and name[4:] in SLD.PRESETS:
        return SLD(name[4:])
    if name == "spguard":
        return SPGuard.with_defaults(spguard_defaults)
    raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHOD_NAMES)}")
