"""Model folders shipped inside the package."""

from pathlib import Path

PACKAGED_MODEL = Path(__file__).parent / "shapes"  # the embedded default model: the shapes world (README)
