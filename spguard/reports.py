"""Per-image transparency reports: how harmful the prompt looked and what guidance did about it."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field


@dataclass
class Report:
    """What the engine decided for one image. JSON-serialisable through `to_dict` / `to_json`."""

    prompt: str
    method: str
    harmfulness: float | None  # P of Eq. 6 (SP-Guard only)
    concept: str | None  # the concept guided against (SP-Guard: argmax of Eq. 6)
    guided: bool
    guided_steps: list[int]
    mask_coverage: list[float]  # share of latent elements in the guidance region, per guided step
    mask_snapshots: dict[int, list[list[float]] | None] | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())
