"""The labelled photo set (``optiserve/data/labelled_photos.yaml``): real photos from installed packages,
each with the ImageNet classes a person would accept for it, cut into deterministic crops.

Each photo gives ``CROPS_PER_PHOTO`` crops: the centre crop the model's preprocessing makes, then seeded
random crops of 60-100% of the short side, half of them mirrored. Every crop of a photo keeps the
photo's acceptable classes. Photos whose package is not installed are left out, and
:func:`labelled_set` says how many photos and classes were used and which packages were missing.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

DATA = Path(__file__).resolve().parents[1] / "data" / "labelled_photos.yaml"
CROPS_PER_PHOTO = 12
SEED = 20261203
NO_CLASS = -1
"""Fills the rows of the acceptable-class matrix of photos with fewer classes than the widest one."""


@dataclass(frozen=True)
class Photo:
    id: str
    tier: str
    classes: tuple[int, ...]
    package: str
    kind: str
    loader: str | None
    path: str | None

    def load(self) -> Image.Image | None:
        """The photo as RGB (a transparent cut-out composited on white), or None when not installed."""
        from PIL import Image

        if self.loader:
            module, _, name = self.loader.rpartition(".")
            try:
                array = getattr(importlib.import_module(module), name)()
            except Exception:  # the package, or this photo in its version, is missing
                return None
            return Image.fromarray(array).convert("RGB")
        assert self.path is not None
        if not Path(self.path).is_file():
            return None
        with Image.open(self.path) as img:
            if img.mode in ("RGBA", "LA", "P"):
                rgba = img.convert("RGBA")
                white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return Image.alpha_composite(white, rgba).convert("RGB")
            return img.convert("RGB")


@dataclass(frozen=True)
class LabelledSet:
    crops: tuple[Image.Image, ...]
    classes: np.ndarray
    """(n crops, k) acceptable ImageNet classes per crop, padded with NO_CLASS."""
    photo_ids: tuple[str, ...]
    n_photos: int
    n_classes: int
    missing_packages: tuple[str, ...]

    @property
    def description(self) -> str:
        missing = f"; not installed: {', '.join(self.missing_packages)}" if self.missing_packages else ""
        return (
            f"{len(self.crops)} labelled crops of {self.n_photos} real photos, {self.n_classes} ImageNet "
            f"classes{missing}"
        )


def catalogue() -> tuple[Photo, ...]:
    import yaml

    entries: list[dict[str, Any]] = yaml.safe_load(DATA.read_text())
    return tuple(
        Photo(
            id=e["id"],
            tier=e["tier"],
            classes=tuple(int(c) for c in e["classes"]),
            package=e["source"]["package"],
            kind=e["source"]["kind"],
            loader=e["source"].get("loader"),
            path=e["source"].get("path"),
        )
        for e in entries
    )


@functools.cache
def labelled_set() -> LabelledSet:
    """Every installed photo of the catalogue, cut into crops (cached for the process)."""
    import numpy as np

    rng = np.random.default_rng(SEED)
    missing: dict[str, str] = {}
    used: list[tuple[Photo, list[Image.Image]]] = []
    for photo in catalogue():
        image = photo.load()
        if image is None:
            missing[photo.package] = photo.kind
            continue
        used.append((photo, _crops(image, rng)))
    # Round-robin over photos, so that any first n crops cover as many photos as they can.
    crops: list[Image.Image] = []
    classes: list[tuple[int, ...]] = []
    ids: list[str] = []
    for k in range(CROPS_PER_PHOTO):
        for photo, photo_crops in used:
            crops.append(photo_crops[k])
            classes.append(photo.classes)
            ids.append(photo.id)
    width = max((len(c) for c in classes), default=1)
    matrix = np.full((len(classes), width), NO_CLASS, dtype=np.int64)
    for i, c in enumerate(classes):
        matrix[i, : len(c)] = c
    return LabelledSet(
        crops=tuple(crops),
        classes=matrix,
        photo_ids=tuple(ids),
        n_photos=len(used),
        n_classes=len({p.classes[0] for p, _ in used}),
        missing_packages=tuple(f"{name} ({kind})" for name, kind in sorted(missing.items())),
    )


def _crops(image: Image.Image, rng: np.random.Generator) -> list[Image.Image]:
    from PIL import Image as PILImage

    w, h = image.size
    short = min(w, h)
    out = [image]  # the model's own preprocessing centre-crops it
    for k in range(CROPS_PER_PHOTO - 1):
        side = int(rng.uniform(0.6, 1.0) * short)
        left = int(rng.integers(0, w - side + 1))
        top = int(rng.integers(0, h - side + 1))
        crop = image.crop((left, top, left + side, top + side))
        out.append(crop.transpose(PILImage.Transpose.FLIP_LEFT_RIGHT) if k % 2 else crop)
    return out
