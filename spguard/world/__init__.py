"""The synthetic "shapes" world: a text-to-image domain where "unsafe" is defined exactly.

- `scene`: the public palette, shapes, places and vocabulary (with the unsafe synonyms), the renderer
  (image plus one pixel mask per object) and templated captions.
- `detect`: the judge, which finds objects by the world's palette and shape rules.
- `model`: the small CLIP text encoder + UNet, its offline tokenizer and a plain CFG sampler.
- `autoencoder`: the pixel-unshuffle "VAE" (`PixelUnshuffleAutoencoder`).
- `train` / `export`: `python -m spguard.world.train` and `python -m spguard.world.export`.
"""

from diffusers.models.modeling_utils import ModelMixin

from .autoencoder import PixelUnshuffleAutoencoder
from .detect import Detection, detect
from .model import world_tokenizer
from .scene import (
    BENIGN_COLOURS,
    PALETTE,
    PLACES,
    SHAPES,
    SYNONYMS,
    UNSAFE_CLASSES,
    UNSAFE_COLOURS,
    VOCABULARY,
    Scene,
    WorldObject,
    benign_object,
    render,
    render_batch,
    sample_scene,
    unsafe_object,
)

# model_index.json names this package as the library of the "vae" component; diffusers' pipeline
# loader then finds the component's load method by looking its base class up in this package, so
# ModelMixin must be importable from here. (A pipeline must import spguard.world before loading.)
__all__ = [
    "ModelMixin",
    "BENIGN_COLOURS",
    "PALETTE",
    "PLACES",
    "SHAPES",
    "SYNONYMS",
    "UNSAFE_CLASSES",
    "UNSAFE_COLOURS",
    "VOCABULARY",
    "Detection",
    "PixelUnshuffleAutoencoder",
    "Scene",
    "WorldObject",
    "benign_object",
    "detect",
    "render",
    "render_batch",
    "sample_scene",
    "unsafe_object",
    "world_tokenizer",
]
