"""Real photos for evaluation and calibration, cut into deterministic crops.

The photos ship with scikit-image and scikit-learn, so nothing is downloaded. Each photo yields many
crops of varying size and position from a seeded generator; even-numbered crops form the eval split
and odd-numbered ones the calibration split, so the two never share a crop.
"""

from __future__ import annotations

import functools
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

# Photos that load without network access (others in skimage.data need the optional `pooch`).
SKIMAGE_PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "camera",
    "moon",
    "coins",
    "page",
    "grass",
    "gravel",
    "brick",
    "horse",
    "clock",
    "text",
    "colorwheel",
)


LABELLED_ELSEWHERE = ("coffee", "chelsea")
"""Photos of the labelled set (optiserve/data/labelled_photos.yaml): never calibrated on."""


def photo_names() -> tuple[str, ...]:
    """The name of each photo :func:`photos` returns, in the same order."""
    return tuple(name for name, _ in _loaded())


def calibration_photos() -> list[int]:
    """Indices of the photos that are not in the labelled evaluation set."""
    return [i for i, name in enumerate(photo_names()) if name not in LABELLED_ELSEWHERE]


def photos() -> tuple[np.ndarray, ...]:
    """Every available photo as an HxWx3 uint8 array (greyscale ones replicated to 3 channels)."""
    return tuple(image for _, image in _loaded())


@functools.cache
def _loaded() -> tuple[tuple[str, np.ndarray], ...]:
    import numpy as np
    import skimage.data
    from sklearn.datasets import load_sample_images

    out: list[np.ndarray] = []
    names: list[str] = []
    for name in SKIMAGE_PHOTOS:
        try:
            img = getattr(skimage.data, name)()
        except Exception:  # a photo that needs a download in this skimage version: skip it
            continue
        names.append(name)
        img = np.asarray(img)
        if img.dtype == bool:
            img = img.astype(np.uint8) * 255
        if img.dtype != np.uint8:
            img = (255 * (img - img.min()) / max(float(img.max() - img.min()), 1e-9)).astype(np.uint8)
        if img.ndim == 2:
            img = np.stack([img] * 3, axis=-1)
        out.append(np.ascontiguousarray(img[..., :3]))
    sample = load_sample_images()
    out.extend(np.asarray(img)[..., :3] for img in sample.images)
    names += [Path(f).stem for f in sample.filenames]
    return tuple(zip(names, out, strict=True))


def crops(
    split: str, n: int, seed: int = 20261125, photos: Collection[int] | None = None
) -> list[Image.Image]:
    """``n`` deterministic RGB crops for ``split`` ("eval" or "calibration").

    ``photos``: only crops of these photos (indices into :func:`photos`), e.g. to train on some photos
    and evaluate on others. The crops are then the subsequence of the unrestricted ones that comes from
    those photos, so the splits stay disjoint.
    """
    return [crop for _, crop in _crops(split, n, seed, photos)]


def crop_photos(split: str, n: int, seed: int = 20261125, photos: Collection[int] | None = None) -> list[int]:
    """The photo index of each crop :func:`crops` returns for the same arguments."""
    return [k for k, _ in _crops(split, n, seed, photos)]


def _crops(split: str, n: int, seed: int, only: Collection[int] | None) -> list[tuple[int, Image.Image]]:
    import numpy as np
    from PIL import Image

    if n < 1:
        raise ValueError("n must be >= 1")
    offset = 0 if split == "eval" else 1
    rng = np.random.default_rng(seed)
    images = photos()
    if only is not None and not any(0 <= i < len(images) for i in only):
        raise ValueError(f"photos: none of {sorted(only)} is a photo index (0-{len(images) - 1})")
    out: list[tuple[int, Image.Image]] = []
    k = 0
    while len(out) < n:
        img = images[k % len(images)]
        h, w = img.shape[:2]
        side = int(rng.uniform(0.35, 1.0) * min(h, w))
        top = int(rng.integers(0, h - side + 1))
        left = int(rng.integers(0, w - side + 1))
        flip = bool(rng.integers(0, 2))
        if k % 2 == offset and (only is None or k % len(images) in only):
            crop = img[top : top + side, left : left + side]
            if flip:
                crop = crop[:, ::-1]
            out.append((k % len(images), Image.fromarray(np.ascontiguousarray(crop))))
        k += 1
        if only is not None and k > 1000 * n * len(images):
            raise ValueError(f"photos {sorted(only)} give no {split} crops")
    return out
