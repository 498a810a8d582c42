"""Test support: images, and (from scripts.inprocess) handlers called as TorchServe's worker
calls them."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

from scripts.inprocess import Reply, ServedModel, make_model_dir, parse_predict_response

__all__ = ["Reply", "ServedModel", "make_model_dir", "parse_predict_response"]


# ---------------------------------------------------------------------------------------------
# Images


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def image_bytes(image: Image.Image, image_format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    return buffer.getvalue()


def b64(data: bytes | Image.Image, image_format: str = "PNG") -> str:
    if isinstance(data, Image.Image):
        data = image_bytes(data, image_format)
    return base64.b64encode(data).decode("ascii")


def box_mask(width: int, height: int, box: tuple[int, int, int, int]) -> Image.Image:
    """0/255 mask with the box (left, top, right, bottom) set."""
    mask = np.zeros((height, width), dtype=np.uint8)
    left, top, right, bottom = box
    mask[top:bottom, left:right] = 255
    return Image.fromarray(mask)


def decode_image(data: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(data)))
    image.load()
    return image


def photo_like(width: int, height: int, seed: int = 0) -> Image.Image:
    """A synthetic photo: smooth colour regions, texture and sensor-like noise, so it compresses
    like a phone picture (12 MP: ~2 MB of JPEG at quality 90, ~13 MB of PNG) — random pixels
    would be incompressible, a flat image far too compressible."""
    rng = np.random.default_rng(seed)
    regions = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
    texture = Image.fromarray(
        rng.integers(0, 256, (height // 24 + 1, width // 24 + 1, 3), dtype=np.uint8)
    )
    image = Image.blend(
        regions.resize((width, height), Image.Resampling.BICUBIC),
        texture.resize((width, height), Image.Resampling.BILINEAR),
        0.3,
    )
    pixels = np.asarray(image).astype(np.int16)
    pixels += rng.integers(-6, 7, pixels.shape, dtype=np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def jpeg_request_fitting(image: Image.Image, mask: Image.Image, limit: int = 6_291_456) -> dict:
    """The AWS sample's erase/replace payload (image + mask_image) with the image as the
    highest-quality JPEG (90 down to 70) whose request fits `limit` bytes, as a client does."""
    mask_b64 = b64(mask)
    for quality in (90, 85, 80, 75, 70):
        image_b64 = b64(_jpeg(image, quality))
        if len(image_b64) + len(mask_b64) + 512 <= limit:
            return {"image": image_b64, "mask_image": mask_b64}
    raise AssertionError(f"a {image.size} JPEG does not fit a {limit}-byte request")


def _jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
