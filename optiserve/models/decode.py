"""What users send to the vision models (encoded image bytes) → PIL images, with one-line errors."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image

MAX_IMAGE_PIXELS = 40_000_000
"""Larger images are refused (a decompression bomb would otherwise exhaust the server's memory)."""


def decode_image(item: bytes, index: int = 0) -> Image.Image:
    """JPEG/PNG (or any format Pillow reads) bytes → an image; 415 for anything else, 413 when huge."""
    import io
    import warnings

    from PIL import Image as PILImage

    from optiserve.errors import PayloadTooLarge, UnsupportedMediaType

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PILImage.DecompressionBombWarning)
            img = PILImage.open(io.BytesIO(item))
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise PayloadTooLarge(
                    f"image {index}: {img.width}x{img.height} pixels; at most {MAX_IMAGE_PIXELS:,} accepted"
                )
            img.load()
    except (PayloadTooLarge, UnsupportedMediaType):
        raise
    except (PILImage.DecompressionBombError, PILImage.DecompressionBombWarning) as e:
        raise PayloadTooLarge(f"image {index}: too many pixels ({e})") from e
    except Exception as e:
        raise UnsupportedMediaType(
            f"image {index}: expected JPEG or PNG image bytes, could not decode {len(item)} bytes"
        ) from e
    return img
