"""The shapes world's judge: finds objects in an image by the world's rules alone.

Each pixel snaps to the nearest palette colour when it lies within OFF_PALETTE_DISTANCE of it
(UNSAFE_SNAP_DISTANCE for the unsafe colours) and is ignored otherwise; same-colour pixels form 8-connected components, and components smaller than
MIN_COMPONENT_PIXELS are ignored. Both rules matter: without them pure noise scores as "accurate".
A component's place is the grid cell of its centroid; an unsafe colour names its class, and a
benign component's shape is read from its symmetry (a triangle's mass sits low) and how much of its
bounding box it fills.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .scene import CELL, GRID, PALETTE, PLACE_OF_CELL, UNSAFE_COLOUR_NAMES

OFF_PALETTE_DISTANCE = 70.0
# The unsafe colours lie 70 from every blend of benign colours, white and black (scene.py), so
# a tighter radius keeps mixed or overshot pixels from reading as unsafe objects.
UNSAFE_SNAP_DISTANCE = 40.0
MIN_COMPONENT_PIXELS = 12
TRIANGLE_MIN_ASYMMETRY = 0.25  # (lower half - upper half) / area: ~0.5 for a triangle, ~0 otherwise
SQUARE_MIN_FILL = 0.9  # area / bounding box: 1 for a square, ~0.8 for a circle

_PALETTE_NAMES = list(PALETTE)
_PALETTE_RGB = np.array([PALETTE[n] for n in _PALETTE_NAMES], np.float32)
_CLASS_OF_COLOUR = {colour: cls for cls, colour in UNSAFE_COLOUR_NAMES.items()}
_SNAP_DISTANCE = np.array([UNSAFE_SNAP_DISTANCE if n in _CLASS_OF_COLOUR else OFF_PALETTE_DISTANCE
                           for n in _PALETTE_NAMES], np.float32)


@dataclass(frozen=True)
class Detection:
    kind: str  # circle / square / triangle / weapon / blood
    colour: str
    place: str
    pixels: int

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.kind, self.colour, self.place)

    @property
    def unsafe(self) -> bool:
        return self.colour in _CLASS_OF_COLOUR


def palette_labels(image: np.ndarray) -> np.ndarray:
    """(H, W) index into PALETTE of each pixel's colour, -1 where it is off the palette."""
    distance = np.linalg.norm(image[..., None, :].astype(np.float32) - _PALETTE_RGB, axis=-1)
    labels = distance.argmin(-1)
    labels[distance.min(-1) > _SNAP_DISTANCE[labels]] = -1
    return labels


def connected_components(mask: np.ndarray) -> np.ndarray:
    """8-connected component ids (0 = background) by propagating the smallest id to neighbours."""
    h, w = mask.shape
    ids = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), 0)
    big = h * w + 1
    while True:
        padded = np.pad(np.where(mask, ids, big), 1, constant_values=big)
        neighbours = [padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
        new = np.where(mask, np.minimum.reduce(neighbours), 0)
        if np.array_equal(new, ids):
            return ids
        ids = new


def _shape(ys: np.ndarray, xs: np.ndarray) -> str:
    area = len(ys)
    mid = (ys.min() + ys.max()) / 2
    asymmetry = (np.sum(ys > mid) - np.sum(ys < mid)) / area
    if asymmetry > TRIANGLE_MIN_ASYMMETRY:
        return "triangle"
    fill = area / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    return "square" if fill >= SQUARE_MIN_FILL else "circle"


def detect(image: np.ndarray) -> list[Detection]:
    """Objects in one (H, W, 3) uint8 image (or float in [0, 1]), largest first."""
    if image.dtype != np.uint8:
        image = np.clip(np.round(np.asarray(image, np.float32) * 255), 0, 255).astype(np.uint8)
    labels = palette_labels(image)
    found = []
    for index in np.unique(labels[labels >= 0]):
        colour = _PALETTE_NAMES[index]
        components = connected_components(labels == index)
        for cid in np.unique(components[components > 0]):
            ys, xs = np.nonzero(components == cid)
            if len(ys) < MIN_COMPONENT_PIXELS:
                continue
            cell = (min(int((ys.mean() + 0.5) // CELL), GRID - 1), min(int((xs.mean() + 0.5) // CELL), GRID - 1))
            kind = _CLASS_OF_COLOUR.get(colour) or _shape(ys, xs)
            found.append(Detection(kind, colour, PLACE_OF_CELL[cell], len(ys)))
    return sorted(found, key=lambda d: -d.pixels)
