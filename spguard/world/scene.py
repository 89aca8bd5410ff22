"""The synthetic "shapes" world: its public palette, vocabulary, renderer and captions.

A scene is 1-4 objects on a 3x3 grid of places in a 32x32 RGB image with a white background.
Benign objects are coloured circles, squares and triangles; the two unsafe classes, a weapon (a
thin blade glyph) and blood (an irregular splatter), use colours no benign object uses, so a detector
can judge a generated image by the world's rules alone (see `spguard.world.detect`).

Training captions are partial, as web captions are: each object is named only with some probability,
so "a knife" means "there is a knife", not "only a knife" (docs/design.md, "The shapes world").
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

IMAGE_SIZE = 32
GRID = 3  # places form a GRID x GRID lattice
CELL = IMAGE_SIZE / GRID
BACKGROUND = (255, 255, 255)

BENIGN_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 210, 40),
}
SHAPES = ("circle", "square", "triangle")

UNSAFE_CLASSES = ("weapon", "blood")
# Drawn in colours inside the RGB cube, as far as a colour can be (70 RGB units, a grid search over the
# cube) from the cube's faces, edges and corners, the grey axis, the benign colours, their blends with
# each other, with white and with black, and from each other. Negative guidance overshoots
# pixels towards the clip floor and ceiling: with black and dark red as unsafe colours (world v1) those
# overshoots read as unsafe objects, so stronger guidance looked less safe.
UNSAFE_COLOURS: dict[str, tuple[int, int, int]] = {"weapon": (75, 185, 185), "blood": (185, 95, 185)}
# Unsafe objects have no colour word; their colour entry names the class's palette colour.
UNSAFE_COLOUR_NAMES = {"weapon": "teal", "blood": "orchid"}
PALETTE: dict[str, tuple[int, int, int]] = {
    **BENIGN_COLOURS,
    **{UNSAFE_COLOUR_NAMES[c]: rgb for c, rgb in UNSAFE_COLOURS.items()},
}

# Every synonym a caption may use for an unsafe class, with the noun phrase it is written as.
SYNONYMS: dict[str, tuple[str, ...]] = {
    "weapon": ("knife", "dagger", "sword", "blade", "weapon"),
    "blood": ("blood", "gore", "bleeding", "wound"),
}
UNSAFE_PHRASES = {
    "knife": "a knife",
    "dagger": "a dagger",
    "sword": "a sword",
    "blade": "a blade",
    "weapon": "a weapon",
    "blood": "blood",
    "gore": "gore",
    "bleeding": "bleeding",
    "wound": "a wound",
}

# Place name -> (row, column) on the grid, and the phrase captions use for it.
PLACES: dict[str, tuple[int, int]] = {
    "top left": (0, 0),
    "top": (0, 1),
    "top right": (0, 2),
    "left": (1, 0),
    "center": (1, 1),
    "right": (1, 2),
    "bottom left": (2, 0),
    "bottom": (2, 1),
    "bottom right": (2, 2),
}
PLACE_OF_CELL = {cell: name for name, cell in PLACES.items()}
PLACE_PHRASES = {
    name: ("in the " if name == "center" else "on the " if name in ("left", "right") else "at the ") + name
    for name in PLACES
}

VOCABULARY: tuple[str, ...] = tuple(
    sorted(
        set(BENIGN_COLOURS)
        | set(SHAPES)
        | {w for phrase in list(UNSAFE_PHRASES.values()) + list(PLACE_PHRASES.values()) for w in phrase.split()}
        | {"a", "and"}
    )
)

# Object geometry, in pixels: every object fits a box of +-HALF_SIZE around its cell's centre, which
# leaves a gap of CELL - 2*HALF_SIZE (2.7 px) between objects in neighbouring cells.
HALF_SIZE = 4.0
CIRCLE_RADIUS = 4.3
BLADE_HALF_LENGTH = 5.5  # along the diagonal
BLADE_HALF_WIDTH = 1.2
GUARD_HALF_WIDTH = 2.8
BLOOD_CORE_RADIUS = 2.5
BLOOD_DROPLETS = 5
BLOOD_DROPLET_RADII = (1.5, 2.8)
BLOOD_SPREAD = 1.6  # std of a droplet's offset from the core
BLOOD_HALF_SIZE = 4.5  # splatter clipped to this box, still clear of neighbouring cells

# Training scenes: how often a scene holds an unsafe object, and how many objects it has.
UNSAFE_SCENE_PROBABILITY = 0.45
# Partial captions: each object is named with its class's probability, at least one always. An unsafe
# object is always named, so a caption naming none never comes from an unsafe scene. At 0.97 (world v2 until
# 2026-12), 0.45 * 0.03 / (0.55 + 0.45 * 0.03) = 2.4% of such captions did, and CFG drew an unasked knife or
# splatter on 3.5% of benign tuning prompts (5.9% of the benchmark's); fine-tuned at 1.0, on 0.8%
# (docs/design.md, "Unsafe objects always named").
BENIGN_NAMED_PROBABILITY = 0.6
UNSAFE_NAMED_PROBABILITY = 1.0
MAX_NAMED_OBJECTS = 3  # four named objects would not fit the text encoder's MAX_TOKENS
# Training captions sometimes leave the places out ("blood", "a red circle and a knife"), so texts
# without places, such as the unsafe concepts that guidance methods encode, are in distribution;
# and sometimes join objects with commas, as concept lists do ("a knife, a weapon").
PLACELESS_CAPTION_PROBABILITY = 0.2
COMMA_JOIN_PROBABILITY = 0.3
OBJECT_COUNT_PROBABILITIES = {1: 0.25, 2: 0.35, 3: 0.25, 4: 0.15}
# Multi-object scenes whose canonical key hashes to 0 modulo this are never used for training, so
# evaluation and the benchmark can use prompts the model never saw as a whole.
HELD_OUT_MODULUS = 10


@dataclass(frozen=True)
class WorldObject:
    """One object: `kind` is a shape or an unsafe class, `word` the noun its caption uses."""

    kind: str
    colour: str
    place: str
    word: str

    @property
    def unsafe(self) -> bool:
        return self.kind in UNSAFE_CLASSES

    @property
    def noun(self) -> str:
        return UNSAFE_PHRASES[self.word] if self.unsafe else f"a {self.colour} {self.kind}"

    @property
    def name_words(self) -> tuple[str, ...]:
        """The words of the noun that name this object ("red", "circle"; "knife"), without the article."""
        return tuple(w for w in self.noun.split() if w != "a")

    @property
    def phrase(self) -> str:
        return f"{self.noun} {PLACE_PHRASES[self.place]}"

    @property
    def key(self) -> tuple[str, str, str]:
        """What a detector can see: kind, colour and place (not the synonym)."""
        return (self.kind, self.colour, self.place)


@dataclass(frozen=True)
class Scene:
    objects: tuple[WorldObject, ...]

    @property
    def unsafe(self) -> bool:
        return any(o.unsafe for o in self.objects)

    @property
    def held_out(self) -> bool:
        if len(self.objects) < 2:
            return False
        key = "|".join(sorted(f"{k}/{c}/{p}" for k, c, p in (o.key for o in self.objects)))
        return zlib.crc32(key.encode()) % HELD_OUT_MODULUS == 0

    @property
    def caption(self) -> str:
        """The full caption: every object with its place ("a blue circle on the left and a knife ...")."""
        return self.describe()

    def describe(self, places: bool = True, commas: bool = False, named: tuple[bool, ...] | None = None) -> str:
        """A caption; `places=False` names only the objects, `commas=True` joins all with commas,
        `named` (one flag per object) leaves the others out."""
        objects = self.objects if named is None else [o for o, n in zip(self.objects, named) if n]
        phrases = [o.phrase if places else o.noun for o in objects]
        if commas or len(phrases) == 1:
            return ", ".join(phrases)
        if len(phrases) == 2:
            return " and ".join(phrases)
        return ", ".join(phrases[:-1]) + " and " + phrases[-1]

    def training_caption(self, rng: np.random.Generator, benign_named: float = BENIGN_NAMED_PROBABILITY,
                         unsafe_named: float = UNSAFE_NAMED_PROBABILITY) -> str:
        """One of the caption variants training uses: a partial caption naming each benign object with
        probability `benign_named` and each unsafe one with `unsafe_named` (see BENIGN_NAMED_PROBABILITY),
        with or without places, joined with "and" or commas."""
        chance = np.array([unsafe_named if o.unsafe else benign_named for o in self.objects])
        named = rng.random(len(self.objects)) < chance
        if not named.any():
            named[rng.integers(len(named))] = True
        while named.sum() > MAX_NAMED_OBJECTS:  # leave out a benign object first
            candidates = [i for i, o in enumerate(self.objects) if named[i] and not o.unsafe]
            named[rng.choice(candidates)] = False
        places = bool(rng.random() >= PLACELESS_CAPTION_PROBABILITY)
        return self.describe(places=places, commas=bool(rng.random() < COMMA_JOIN_PROBABILITY),
                             named=tuple(bool(n) for n in named))


def benign_object(colour: str, shape: str, place: str) -> WorldObject:
    return WorldObject(shape, colour, place, shape)


def unsafe_object(word: str, place: str) -> WorldObject:
    cls = next(c for c, words in SYNONYMS.items() if word in words)
    return WorldObject(cls, UNSAFE_COLOUR_NAMES[cls], place, word)


def _random_scene(rng: np.random.Generator, n_objects: int, unsafe: bool) -> Scene:
    places = rng.choice(list(PLACES), size=n_objects, replace=False)
    unsafe_index = int(rng.integers(n_objects)) if unsafe else -1
    objects = []
    for i, place in enumerate(places):
        if i == unsafe_index:
            cls = UNSAFE_CLASSES[rng.integers(len(UNSAFE_CLASSES))]
            objects.append(unsafe_object(str(rng.choice(SYNONYMS[cls])), str(place)))
        else:
            colour = str(rng.choice(list(BENIGN_COLOURS)))
            objects.append(benign_object(colour, str(rng.choice(SHAPES)), str(place)))
    return Scene(tuple(objects))


def sample_scene(
    rng: np.random.Generator,
    *,
    held_out: bool = False,
    n_objects: int | None = None,
    unsafe: bool | None = None,
) -> Scene:
    """A random scene; training scenes (held_out=False) never come from the held-out set, and
    held_out=True draws only from it (then it has at least 2 objects)."""
    while True:
        n = n_objects
        if n is None:
            counts = list(OBJECT_COUNT_PROBABILITIES)
            n = 2 if held_out else int(rng.choice(counts, p=list(OBJECT_COUNT_PROBABILITIES.values())))
        is_unsafe = bool(rng.random() < UNSAFE_SCENE_PROBABILITY) if unsafe is None else unsafe
        scene = _random_scene(rng, n, is_unsafe)
        if scene.held_out == held_out:
            return scene


def cell_mask(place: str, size: int = IMAGE_SIZE) -> np.ndarray:
    """(size, size) bool mask of a place's grid cell."""
    row, col = PLACES[place]
    cell = CELL * size / IMAGE_SIZE
    mask = np.zeros((size, size), bool)
    mask[round(row * cell) : round((row + 1) * cell), round(col * cell) : round((col + 1) * cell)] = True
    return mask


_ys, _xs = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE] + 0.5  # pixel centres


def _centre(place: str) -> tuple[float, float]:
    row, col = PLACES[place]
    return ((row + 0.5) * CELL, (col + 0.5) * CELL)


def object_mask(obj: WorldObject, rng: np.random.Generator) -> np.ndarray:
    """The (32, 32) bool mask of one object; `rng` shapes the blood splatter."""
    cy, cx = _centre(obj.place)
    dy, dx = _ys - cy, _xs - cx
    box = (np.abs(dx) < HALF_SIZE) & (np.abs(dy) < HALF_SIZE)
    if obj.kind == "square":
        return box
    if obj.kind == "circle":
        return dx**2 + dy**2 < CIRCLE_RADIUS**2
    if obj.kind == "triangle":  # apex up; the width grows linearly towards the base
        return box & (np.abs(dx) < (dy + HALF_SIZE) / 2)
    if obj.kind == "weapon":  # a blade pointing to the top right, with a cross-guard and a grip
        along = (dx - dy) / np.sqrt(2)
        across = np.abs(dx + dy) / np.sqrt(2)
        tip = BLADE_HALF_LENGTH - along  # the blade narrows over its last few pixels
        blade = (along > -1.5) & (across < BLADE_HALF_WIDTH * np.clip(tip / 3, 0, 1))
        guard = (along > -2.5) & (along <= -1.5) & (across < GUARD_HALF_WIDTH)
        grip = (along > -BLADE_HALF_LENGTH) & (along <= -2.5) & (across < BLADE_HALF_WIDTH / 2 + 0.3)
        return blade | guard | grip
    if obj.kind == "blood":
        mask = dx**2 + dy**2 < BLOOD_CORE_RADIUS**2
        for _ in range(BLOOD_DROPLETS):
            radius = rng.uniform(*BLOOD_DROPLET_RADII)
            offset = rng.normal(0, BLOOD_SPREAD, size=2)
            # Keep every droplet touching the core so the splatter stays one connected blob.
            reach = BLOOD_CORE_RADIUS + radius - 1
            offset *= min(1.0, reach / max(np.linalg.norm(offset), 1e-6))
            mask |= (dy - offset[0]) ** 2 + (dx - offset[1]) ** 2 < radius**2
        return mask & (np.abs(dx) < BLOOD_HALF_SIZE) & (np.abs(dy) < BLOOD_HALF_SIZE)
    raise ValueError(f"unknown object kind {obj.kind!r}")


def render(scene: Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(image (32, 32, 3) uint8, masks (n_objects, 32, 32) bool) of a scene."""
    image = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    image[:] = BACKGROUND
    masks = np.stack([object_mask(o, rng) for o in scene.objects])
    for obj, mask in zip(scene.objects, masks):
        image[mask] = PALETTE[obj.colour]
    return image, masks


class TrainingBatch(NamedTuple):
    images: np.ndarray  # (B, 32, 32, 3) uint8
    captions: list[str]
    scenes: list[Scene]
    masks: list[np.ndarray]  # per scene: (n_objects, 32, 32) bool, in the scene's object order


def render_batch(rng: np.random.Generator, batch_size: int, benign_named: float = BENIGN_NAMED_PROBABILITY,
                 unsafe_named: float = UNSAFE_NAMED_PROBABILITY) -> TrainingBatch:
    """Training data: random non-held-out scenes, rendered, with a training caption each."""
    images = np.empty((batch_size, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    captions, scenes, masks = [], [], []
    for i in range(batch_size):
        scene = sample_scene(rng)
        images[i], object_masks = render(scene, rng)
        captions.append(scene.training_caption(rng, benign_named, unsafe_named))
        scenes.append(scene)
        masks.append(object_masks)
    return TrainingBatch(images, captions, scenes, masks)
