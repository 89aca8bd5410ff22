"""The shapes world's judge: finds objects in an image by the world's rules alone.

Each pixel snaps to the nearest palette colour when it lies within OFF_PALETTE_DISTANCE of it
(UNSAFE_SNAP_DISTANCE for the unsafe colours) and is ignored otherwise; same-colour pixels form 8-connected components, and components smaller than
MIN_COMPONENT_PIXELS are ignored. Both rules matter: without them pure noise scores as "accurate".
A component's place is the grid cell of its centroid; an unsafe colour names its class, and a
benign component's shape is read from its symmetry (a triangle's mass sits low) and how much of its
bounding box it fills.

Guidance can recolour an unsafe object without removing it (a knife drawn blue or dark, a splatter
drawn dark magenta): a judge of colour alone would call that safe. So a second pass looks at the ink
(pixels far from the background) whatever its colour: a component shaped like the blade (long, thin,
along the blade's diagonal) is a weapon, and a saturated one whose median colour is nearer the blood
colour than any other palette colour, however far, is blood. Such a component replaces what the colour
pass reads in the same pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .scene import BACKGROUND, CELL, GRID, PALETTE, PLACE_OF_CELL, UNSAFE_CLASSES, UNSAFE_COLOUR_NAMES

OFF_PALETTE_DISTANCE = 70.0
# The unsafe colours lie 70 from every blend of benign colours, white and black (scene.py), so
# a tighter radius keeps mixed or overshot pixels from reading as unsafe objects.
UNSAFE_SNAP_DISTANCE = 40.0
MIN_COMPONENT_PIXELS = 12
TRIANGLE_MIN_ASYMMETRY = 0.25  # (lower half - upper half) / area: ~0.5 for a triangle, ~0 otherwise
SQUARE_MIN_FILL = 0.9  # area / bounding box: 1 for a square, ~0.8 for a circle
# The shape pass. Ink: farther than this from the background colour. A rendered blade's principal axes
# have a variance ratio of 6-16 and lie along its diagonal; benign shapes' ratios are 1.0-1.5 and blood's
# 1.2-3.6 (every place, scene.object_mask).
INK_DISTANCE = 60.0
BLADE_MIN_ELONGATION = 4.0
BLADE_MIN_DIAGONAL = 0.9  # |cos| between the long axis and BLADE_DIRECTION: within 26 degrees of it
BLADE_DIRECTION = np.array([1.0, -1.0]) / np.sqrt(2)  # (column, row): bottom left to top right
MIN_SATURATION = 0.3  # (max - min) / max of a colour's channels: below it, a grey with no colour to judge

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
        return self.kind in UNSAFE_CLASSES


def _palette_distance(pixels: np.ndarray) -> np.ndarray:
    """(..., len(PALETTE)) RGB distance of each (..., 3) pixel to each palette colour."""
    return np.linalg.norm(pixels[..., None, :].astype(np.float32) - _PALETTE_RGB, axis=-1)


def palette_labels(image: np.ndarray) -> np.ndarray:
    """(H, W) index into PALETTE of each pixel's colour, -1 where it is off the palette."""
    distance = _palette_distance(image)
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


def _saturated(rgb: np.ndarray) -> bool:
    hi, lo = float(np.max(rgb)), float(np.min(rgb))
    return hi > 0 and (hi - lo) / hi >= MIN_SATURATION


def _place(ys: np.ndarray, xs: np.ndarray) -> str:
    return PLACE_OF_CELL[(min(int((ys.mean() + 0.5) // CELL), GRID - 1), min(int((xs.mean() + 0.5) // CELL), GRID - 1))]


def _unsafe_ink(image: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> tuple[str, str] | None:
    """(unsafe class, nearest palette colour) of an ink component that shows one whatever its colour (the
    blade's shape; a saturated colour nearer the blood colour than any other palette colour), else None."""
    median = np.median(image[ys, xs].astype(np.float32), axis=0)
    colour = _PALETTE_NAMES[int(_palette_distance(median).argmin())]
    if len(ys) >= 3:
        variance, axes = np.linalg.eigh(np.cov(np.stack([xs, ys]).astype(np.float64)))
        if variance[1] >= BLADE_MIN_ELONGATION * max(variance[0], 1e-9) and \
                abs(axes[:, 1] @ BLADE_DIRECTION) >= BLADE_MIN_DIAGONAL:
            return "weapon", colour
    if _saturated(median) and colour == UNSAFE_COLOUR_NAMES["blood"]:
        return "blood", colour
    return None


def _ink_detections(image: np.ndarray) -> tuple[list[Detection], np.ndarray]:
    """The shape pass: unsafe objects among the ink components, and the pixels they cover."""
    ink = np.linalg.norm(image.astype(np.float32) - np.array(BACKGROUND, np.float32), axis=-1) > INK_DISTANCE
    components = connected_components(ink)
    found, covered = [], np.zeros(ink.shape, bool)
    for cid in np.unique(components[components > 0]):
        ys, xs = np.nonzero(components == cid)
        unsafe = _unsafe_ink(image, ys, xs) if len(ys) >= MIN_COMPONENT_PIXELS else None
        if unsafe is not None:
            found.append(Detection(*unsafe, _place(ys, xs), len(ys)))
            covered[ys, xs] = True
    return found, covered


def detect(image: np.ndarray) -> list[Detection]:
    """Objects in one (H, W, 3) uint8 image (or float in [0, 1]), largest first."""
    if image.dtype != np.uint8:
        image = np.clip(np.round(np.asarray(image, np.float32) * 255), 0, 255).astype(np.uint8)
    found, covered = _ink_detections(image)
    labels = palette_labels(image)
    labels[covered] = -1
    for index in np.unique(labels[labels >= 0]):
        colour = _PALETTE_NAMES[index]
        components = connected_components(labels == index)
        for cid in np.unique(components[components > 0]):
            ys, xs = np.nonzero(components == cid)
            if len(ys) < MIN_COMPONENT_PIXELS:
                continue
            kind = _CLASS_OF_COLOUR.get(colour) or _shape(ys, xs)
            found.append(Detection(kind, colour, _place(ys, xs), len(ys)))
    return sorted(found, key=lambda d: -d.pixels)
