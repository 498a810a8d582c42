"""What all three mmekit handlers share: request parsing, image codec, validation, typed errors.

This module ships inside every model archive next to the handler file; TorchServe puts the
archive's root on sys.path, so handlers import it as a top-level module (`import mmekit_common`).

A handler is a subclass of `EditHandler` that reads as decode -> validate -> infer -> encode.
Bad input raises `RequestError`; `EditHandler.handle` is the one place that turns it into an
HTTP 400 with a JSON body {"error": code, "message": what to fix}. Never 413: the frontend
rewrites 413 to 507, and SageMaker evicts models when it sees 507.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import json
import logging
import math
import os
import re
import zlib
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from types import UnionType
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

import numpy as np
import torch
from mmekit_limits import RESPONSE_FRAMING_BYTES, SAGEMAKER_PAYLOAD_BYTES
from PIL import Image, UnidentifiedImageError

import mmekit_cuda

logger = logging.getLogger(__name__)

# Formats a client may send; everything else (TIFF, BMP, PSD, ...) is refused before decoding.
ALLOWED_IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
RESPONSE_FORMATS = {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG", "webp": "WEBP"}
# A 24 MP camera photo (6000x4000, 6048x4024) with room; checked on the header before decoding.
DEFAULT_MAX_IMAGE_PIXELS = 6144 * 4096
# Wider than this, models that resize the longest side (SAM to 1024 px) lose the short side.
DEFAULT_MAX_ASPECT_RATIO = 20.0
# SageMaker's InvokeEndpoint response limit (and TorchServe's max_response_size in our
# profiles), less room for TorchServe's framing; a larger response would crash the worker.
DEFAULT_MAX_RESPONSE_BYTES = SAGEMAKER_PAYLOAD_BYTES - RESPONSE_FRAMING_BYTES
# Room in the response for the fields beside the image ("format", "seed", keys, quotes).
RESPONSE_FIELDS_RESERVE = 256
# A JPEG that does not fit at the first quality is tried at the next: high quality first; the
# step-down stops at 50, below which block artefacts show on photos.
JPEG_QUALITIES = (95, 90, 85, 80, 70, 60, 50)
LOSSLESS_FORMATS = ("PNG", "WEBP")
_DATA_URI = re.compile(r"^data:[\w.+/-]*(;[\w.+=-]+)*;base64,", re.IGNORECASE)
_WHITESPACE = re.compile(r"\s+")


class RequestError(Exception):
    """Bad input: carries an error code, a message saying what to fix, and its HTTP status."""

    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        if status == 413:  # TorchServe turns 413 into 507, and SageMaker evicts on 507
            status = 400
        self.code = code
        self.message = message
        self.status = status

    def body(self) -> str:
        return json.dumps({"error": self.code, "message": self.message})


# --------------------------------------------------------------------------------------------
# Request envelope


def read_payload(row: Any) -> dict:
    """One TorchServe batch row -> the request object.

    TorchServe hands the body as raw bytes when `decode_input_request=false` (SageMaker's
    toolkit), or already decoded (dict for JSON, str for text) with the default setting.
    """
    body = row.get("body", row.get("data")) if isinstance(row, Mapping) else row
    if body is None:
        # TorchServe splits form-encoded bodies (curl -d's default type) into named fields
        raise RequestError(
            "empty_request",
            "no JSON body: send a JSON object with the header Content-Type: application/json",
        )
    if isinstance(body, (bytes, bytearray)):
        try:
            body = bytes(body).decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError(
                "invalid_json", "the request body is not UTF-8 JSON: send a JSON object"
            ) from None
    if isinstance(body, str):
        try:
            body = json.loads(body)
        except json.JSONDecodeError as error:
            raise RequestError(
                "invalid_json",
                f"the request body is not valid JSON ({error.msg} at "
                f"position {error.pos}): send a JSON object",
            ) from None
        except (ValueError, RecursionError):  # a number too long, nesting too deep
            raise RequestError(
                "invalid_json", "the request body nests too deeply or holds a number too long"
            ) from None
    if not isinstance(body, dict):
        raise RequestError(
            "invalid_request",
            f"the request body must be a JSON object, got {type(body).__name__}",
        )
    return body


def require(payload: Mapping, field: str) -> Any:
    if field not in payload or payload[field] is None:
        raise RequestError("missing_field", f"the request needs the field '{field}'")
    return payload[field]


def read_json_object(value: Any, field: str) -> dict:
    """A field sent as a JSON object or as a string holding one (as the AWS sample sends)."""
    if value is None:
        return {}
    if isinstance(value, (str, bytes, bytearray)):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError included
            raise RequestError(
                "invalid_field", f"'{field}' must be a JSON object or a string holding one"
            ) from None
    if not isinstance(value, dict):
        raise RequestError("invalid_field", f"'{field}' must be a JSON object")
    return value


# --------------------------------------------------------------------------------------------
# Scalar validation


def read_int(options: Mapping, name: str, default: int, low: int, high: int) -> int:
    value = options.get(name, default)
    if value is None:
        return default
    # bool is an int subclass in Python; true/false is never a meaningful count here
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError("invalid_field", f"'{name}' must be an integer from {low} to {high}")
    if isinstance(value, float) and (not math.isfinite(value) or not value.is_integer()):
        raise RequestError("invalid_field", f"'{name}' must be an integer from {low} to {high}")
    value = int(value)
    if not low <= value <= high:
        raise RequestError("out_of_range", f"'{name}' must be from {low} to {high}, got {value}")
    return value


def read_float(options: Mapping, name: str, default: float, low: float, high: float) -> float:
    value = options.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError("invalid_field", f"'{name}' must be a number from {low} to {high}")
    try:
        value = float(value)
    except OverflowError:  # an integer beyond float range
        value = math.inf
    if not math.isfinite(value):
        raise RequestError("invalid_field", f"'{name}' must be a finite number")
    if not low <= value <= high:
        raise RequestError("out_of_range", f"'{name}' must be from {low} to {high}, got {value}")
    return value


def read_bool(options: Mapping, name: str, default: bool) -> bool:
    value = options.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise RequestError("invalid_field", f"'{name}' must be true or false")
    return value


def read_text(options: Mapping, name: str, max_chars: int, required: bool = False) -> str:
    value = require(options, name) if required else options.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RequestError("invalid_field", f"'{name}' must be a string")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate ("\\ud800" in the JSON)
            raise RequestError(
                "invalid_field", f"'{name}' must be valid Unicode text (no lone surrogates)"
            ) from None
    if len(value) > max_chars:
        raise RequestError(
            "too_long", f"'{name}' has {len(value)} characters; the limit is {max_chars}"
        )
    return value


def read_response_format(options: Mapping) -> str | None:
    """The Pillow format asked for, or None: then the input's own format (see fit_image)."""
    value = options.get("format")
    if value is None:
        return None
    if not isinstance(value, str) or value.lower() not in RESPONSE_FORMATS:
        raise RequestError("invalid_field", "'format' must be one of: png, jpeg, webp")
    return RESPONSE_FORMATS[value.lower()]


# --------------------------------------------------------------------------------------------
# Image codec


def decode_base64(value: Any, field: str) -> bytes:
    """Strict base64: every character must belong to the alphabet (after line breaks and a
    data-URI prefix are removed), so corrupted uploads fail here instead of as odd pixels."""
    if not isinstance(value, str):
        raise RequestError("invalid_field", f"'{field}' must be a base64 string")
    text = value.strip()
    if text[:5].lower() == "data:":
        text = _DATA_URI.sub("", text, count=1)
    if not text:
        raise RequestError("invalid_base64", f"'{field}' is empty: send a base64-encoded image")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        pass
    # `base64` without -w0 wraps lines at 76 characters: strip whitespace, then try once more
    # (only here: scanning a megabyte-sized string for it costs more than the decode)
    unwrapped = _WHITESPACE.sub("", text)
    try:
        if unwrapped and unwrapped != text:
            return base64.b64decode(unwrapped, validate=True)
    except (binascii.Error, ValueError):
        pass
    raise RequestError(
        "invalid_base64", f"'{field}' is not valid base64 (standard alphabet, with padding)"
    )


@dataclass(frozen=True)
class ImageLimits:
    """What an input image may be; from the model config's handler section."""

    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO

    @classmethod
    def from_settings(cls, settings: Mapping) -> ImageLimits:
        return cls(
            int(settings.get("max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS)),
            float(settings.get("max_aspect_ratio", DEFAULT_MAX_ASPECT_RATIO)),
        )


def decode_image(
    data: bytes, field: str, limits: ImageLimits = ImageLimits(), mode: str = "RGB"
) -> Image.Image:
    """Bytes -> a fully loaded Pillow image in `mode`, EXIF orientation applied.

    The limits are checked on the header, before any pixel is decoded, so a tiny file that
    claims a huge size costs nothing.
    """
    return decode_image_and_format(data, field, limits, mode)[0]


def decode_image_and_format(
    data: bytes, field: str, limits: ImageLimits = ImageLimits(), mode: str = "RGB"
) -> tuple[Image.Image, str]:
    """decode_image, and the file's format ("PNG", "JPEG" or "WEBP"): the default response
    format follows it."""
    try:
        image = Image.open(io.BytesIO(data), formats=ALLOWED_IMAGE_FORMATS)
    except Image.DecompressionBombError:
        raise RequestError(
            "image_too_large", f"'{field}' has too many pixels; the limit is {limits.max_pixels}"
        ) from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise RequestError("invalid_image", f"'{field}' is not a PNG, JPEG or WebP image") from None
    file_format = str(image.format)
    width, height = image.size
    if width < 1 or height < 1 or width * height > limits.max_pixels:
        raise RequestError(
            "image_too_large",
            f"'{field}' is {width}x{height} ({width * height} pixels); the limit is "
            f"{limits.max_pixels} pixels: downscale it first",
        )
    if max(width, height) > limits.max_aspect_ratio * min(width, height):
        raise RequestError(
            "image_aspect_ratio",
            f"'{field}' is {width}x{height}; the long side may be at most "
            f"{limits.max_aspect_ratio:g} times the short one: crop it first",
        )
    try:
        image.load()
        image = _apply_orientation(image)
        if image.mode.startswith("I;16") and mode != "L":  # masks keep "> 0"
            # 16-bit grayscale: scaled to 8 bits (Pillow's convert clips at 255)
            pixels = np.asarray(image).astype(np.uint32)
            image = Image.fromarray(((pixels * 255 + 32767) // 65535).astype(np.uint8))
        return (image if image.mode == mode else image.convert(mode)), file_format
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        raise RequestError(
            "invalid_image", f"'{field}' could not be decoded (truncated or corrupt image)"
        ) from None


_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _apply_orientation(image: Image.Image) -> Image.Image:
    """EXIF orientation applied to the pixels. Unlike ImageOps.exif_transpose, the EXIF block
    is never re-serialised (that raises TypeError, struct.error, ... on mistyped tags)."""
    try:
        orientation = image.getexif().get(0x0112)
    except Exception:  # an unreadable EXIF block: the pixels as stored
        return image
    method = _ORIENTATION_TRANSPOSE.get(orientation) if type(orientation) is int else None
    return image if method is None else image.transpose(method)


def read_image(
    payload: Mapping, field: str, limits: ImageLimits = ImageLimits(), mode: str = "RGB"
) -> Image.Image:
    return decode_image(decode_base64(require(payload, field), field), field, limits, mode)


def read_mask(
    payload: Mapping, field: str, size: tuple[int, int], limits: ImageLimits = ImageLimits()
) -> np.ndarray:
    """A mask image -> bool array (True = edit here), binarised at > 0; must match `size`."""
    mask = read_image(payload, field, limits, mode="L")
    if mask.size != size:
        raise RequestError(
            "mask_size_mismatch",
            f"'{field}' is {mask.size[0]}x{mask.size[1]} but the image is {size[0]}x{size[1]}: "
            "send a mask of the same size",
        )
    return np.asarray(mask) > 0


def encode_image(image: Image.Image, image_format: str = "PNG", png_level: int = 6) -> str:
    """base64 of the image as PNG (zlib level `png_level`), JPEG or lossless WebP."""
    data = _encode_within(image, image_format, None, png_level=png_level)
    assert data is not None  # no budget: always encoded
    return base64.b64encode(data).decode("ascii")


class _OverBudget(Exception):
    """Raised from inside Pillow's encoder: the file passed its byte budget."""


class _BudgetBuffer(io.BytesIO):
    """A buffer that stops the encoder once its output passes `budget` bytes. Pillow writes PNG
    and baseline JPEG in chunks, so a result that cannot fit costs a fraction of its encode
    (a 12 MP photo's PNG: ~2 s up to the 4.7 MB that fits, not 7 s for all 13 MB)."""

    def __init__(self, budget: int) -> None:
        super().__init__()
        self.budget = budget

    def write(self, data: Any) -> int:
        if self.tell() + len(data) > self.budget:
            raise _OverBudget
        return super().write(data)


def _encode_within(
    image: Image.Image, image_format: str, budget: int | None, quality: int = 95, png_level: int = 6
) -> bytes | None:
    """The encoded file, or None when it would pass `budget` bytes."""
    buffer = io.BytesIO() if budget is None else _BudgetBuffer(budget)
    try:
        if image_format == "JPEG":
            image.save(buffer, format="JPEG", quality=quality)
        elif image_format == "WEBP":
            image.save(buffer, format="WEBP", lossless=True)  # keeps unmasked pixels exact
        else:
            image.save(buffer, format=image_format, compress_level=png_level)
    except _OverBudget:
        return None
    return buffer.getvalue()


@dataclass(frozen=True)
class EncodedImage:
    """A result image as it goes into the response: base64, and which format it is."""

    base64: str
    image_format: str  # Pillow's name: PNG, JPEG, WEBP
    quality: int | None = None  # JPEG only

    @property
    def format_name(self) -> str:
        """The response's `format` field: the request's own spelling (png, jpeg, webp)."""
        return self.image_format.lower()


def base64_budget(response_bytes: int) -> int:
    """The largest file whose base64 fits in `response_bytes` of JSON with the other fields."""
    return max(0, (response_bytes - RESPONSE_FIELDS_RESERVE) // 4 * 3)


def response_formats(requested: str | None, source_format: str) -> tuple[str, ...]:
    """The formats to try, in order. Asked for: that one only. Not asked for: the input's own
    (a JPEG gets a JPEG; PNG and WebP get their lossless selves), then a JPEG when the lossless
    file would not fit SageMaker's response limit."""
    if requested is not None:
        return (requested,)
    if source_format == "JPEG":
        return ("JPEG",)
    return ("WEBP" if source_format == "WEBP" else "PNG", "JPEG")


def fit_image(
    image: Image.Image, requested: str | None, source_format: str, response_bytes: int
) -> EncodedImage:
    """The image encoded in the first format (and, for JPEG, the highest quality) whose base64
    fits `response_bytes`; a 400 response_too_large when none does."""
    budget = base64_budget(response_bytes)
    formats = response_formats(requested, source_format)
    for image_format in formats:
        qualities: tuple[int | None, ...] = JPEG_QUALITIES if image_format == "JPEG" else (None,)
        for quality in qualities:
            data = _encode_within(image, image_format, budget, quality=quality or 95)
            if data is not None:
                return EncodedImage(base64.b64encode(data).decode("ascii"), image_format, quality)
    width, height = image.size
    if requested in LOSSLESS_FORMATS:
        advice = 'leave "format" out (a JPEG that fits is sent then) or send a smaller image'
    else:
        advice = f"even a JPEG at quality {JPEG_QUALITIES[-1]} is larger: send a smaller image"
    raise RequestError(
        "response_too_large",
        f"the {width}x{height} result as {'/'.join(f.lower() for f in formats)} does not fit "
        f"the response limit of {response_bytes} bytes (SageMaker's 6 MB): {advice}",
    )


# A JPEG spends at least 2 bits (a DC code and an end-of-block code) on each 8x8 luminance
# block, whatever the picture and the quality: a floor on any result's size, from its size alone.
MIN_JPEG_BITS_PER_BLOCK = 2


def smallest_possible_response(width: int, height: int) -> int:
    """A lower bound on the bytes of any response carrying a width x height image."""
    blocks = -(-width // 8) * -(-height // 8)
    jpeg_floor = blocks * MIN_JPEG_BITS_PER_BLOCK // 8
    return -(-jpeg_floor // 3) * 4 + RESPONSE_FIELDS_RESERVE


def refuse_unfittable(size: tuple[int, int], response_bytes: int) -> None:
    """Before any model work: a result this large cannot fit in any format, so say so now
    instead of after the model ran."""
    width, height = size
    floor = smallest_possible_response(width, height)
    if floor > response_bytes:
        raise RequestError(
            "response_too_large",
            f"a {width}x{height} result needs at least {floor} bytes in any format; the "
            f"response limit is {response_bytes} (SageMaker's 6 MB): send a smaller image",
        )


def encode_mask(mask: np.ndarray, bits: int = 8) -> str:
    """base64 of a bool mask as a one-channel PNG (mask_to_image). A mask is long runs of one
    value: zlib level 1 with run-length matching only (Z_RLE) is as fast as level 1's default
    strategy and a quarter to a half smaller (measured on SAM's masks, README "Measure")."""
    buffer = io.BytesIO()
    mask_to_image(mask, bits).save(buffer, format="PNG", compress_level=1, compress_type=zlib.Z_RLE)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def mask_to_image(mask: np.ndarray, bits: int = 8) -> Image.Image:
    """bool mask -> single-channel image: 8 bits, 0/255 (mode L); or 1 bit (mode 1), which
    shows and converts as 0/255 too, at half the PNG encode time and size."""
    if bits == 1:
        return Image.fromarray(np.ascontiguousarray(mask, dtype=bool))  # a bool array: mode 1
    return Image.fromarray(mask.astype(np.uint8) * 255, mode="L")


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(left, top, right, bottom) of the mask's set pixels, or None when there are none."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask[rows[0] : rows[-1] + 1].any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def dilate_mask(mask: np.ndarray, kernel_size: int) -> np.ndarray:
    """Binary dilation with a kernel_size x kernel_size square, one iteration.

    Matches OpenCV's `cv2.dilate(mask, np.ones((k, k)), iterations=1)` used by the reference
    (anchor at k // 2, so even sizes grow one pixel more to the left/top), without OpenCV.
    A pixel is set when its window holds any mask pixel: a box sum over a summed-area table,
    so the cost does not depend on the kernel size (a max-pool is O(k^2) per pixel: minutes
    for 4096x4096 at k=255, past the response timeout). Only the mask's box grown by k is
    computed: nothing farther can change, and a small mask on a 24 MP photo stays cheap.
    """
    box = mask_box(mask) if kernel_size > 1 else None
    if box is None:
        return mask
    height, width = mask.shape
    left, top = max(0, box[0] - kernel_size), max(0, box[1] - kernel_size)
    right, bottom = min(width, box[2] + kernel_size), min(height, box[3] + kernel_size)
    result = np.zeros_like(mask, dtype=bool)
    result[top:bottom, left:right] = _dilate(mask[top:bottom, left:right], kernel_size)
    return result


def _dilate(mask: np.ndarray, kernel_size: int) -> np.ndarray:
    before = kernel_size // 2
    after = kernel_size - 1 - before
    padded = np.pad(mask, ((before, after), (before, after))).astype(np.int32)
    table = np.zeros((padded.shape[0] + 1, padded.shape[1] + 1), dtype=np.int32)
    np.cumsum(np.cumsum(padded, axis=0), axis=1, out=table[1:, 1:])
    k = kernel_size
    window = table[k:, k:] - table[:-k, k:] - table[k:, :-k] + table[:-k, :-k]
    return window > 0


@dataclass
class InpaintInputs:
    """What LaMa and SD both take: an image, where to edit it, and how to send it back."""

    image: Image.Image  # RGB
    mask: np.ndarray  # H x W bool, True = replace these pixels
    response_format: str | None  # Pillow format name; None: the input's own (fit_image)
    source_format: str = "PNG"  # the input file's format


def read_inpaint_inputs(payload: Mapping, limits: ImageLimits, max_dilate: int) -> InpaintInputs:
    """image + mask_image (same size, binarised > 0), optional dilate_kernel_size and format."""
    data = decode_base64(require(payload, "image"), "image")
    image, source_format = decode_image_and_format(data, "image", limits)
    mask = read_mask(payload, "mask_image", image.size, limits)
    kernel_size = read_int(payload, "dilate_kernel_size", 0, 0, max_dilate)
    return InpaintInputs(
        image, dilate_mask(mask, kernel_size), read_response_format(payload), source_format
    )


Box = tuple[int, int, int, int]  # left, top, right, bottom: pixels [left, right) x [top, bottom)


def context_windows(
    mask: np.ndarray, context_ratio: float, min_context: int, max_windows: int
) -> list[Box]:
    """The regions around the mask that an inpainting model sees, as IOPaint's crop strategy
    chooses them: one per connected part of the mask (8-connected), its box grown on each side
    by max(min_context, context_ratio x the box's longer side) (IOPaint: a fixed 128 px), shifted
    inward at the image's edges to keep that much context, and clipped to the image. Windows
    that overlap are merged (each pixel is inpainted once); more than `max_windows` become one.
    Sorted top-left first; none for an empty mask.
    """
    from scipy import ndimage

    whole = mask_box(mask)
    if whole is None:
        return []
    height, width = mask.shape
    left, top, right, bottom = whole
    labels, count = ndimage.label(mask[top:bottom, left:right], structure=np.ones((3, 3)))
    # a speckled mask (thousands of dots) is one region: merging that many windows costs more
    parts = ndimage.find_objects(labels) if count <= 8 * max_windows else []
    parts = parts or [(slice(0, bottom - top), slice(0, right - left))]
    windows = []
    for rows, cols in parts:
        x0, x1, y0, y1 = cols.start + left, cols.stop + left, rows.start + top, rows.stop + top
        margin = max(min_context, math.ceil(context_ratio * max(x1 - x0, y1 - y0)))
        horizontal = _grow(x0, x1, margin, width)
        vertical = _grow(y0, y1, margin, height)
        windows.append((horizontal[0], vertical[0], horizontal[1], vertical[1]))
    windows = _merge_overlapping(windows)
    if len(windows) > max_windows:
        windows = [_union(windows)]
    return sorted(windows, key=lambda box: (box[1], box[0]))


def _grow(start: int, stop: int, margin: int, limit: int) -> tuple[int, int]:
    """[start, stop) grown by margin each side; what falls off one edge goes to the other side
    (more context near the border, as IOPaint does); clipped to [0, limit)."""
    low, high = start - margin, stop + margin
    if low < 0:
        high -= low
    if high > limit:
        low -= high - limit
    return max(low, 0), min(high, limit)


def _union(boxes: list[Box]) -> Box:
    return (
        min(b[0] for b in boxes),
        min(b[1] for b in boxes),
        max(b[2] for b in boxes),
        max(b[3] for b in boxes),
    )


def _merge_overlapping(boxes: list[Box]) -> list[Box]:
    """Boxes merged (into their union box) until no two overlap; few boxes, so pairwise."""
    merged = list(boxes)
    changed = True
    while changed:
        changed = False
        for i in range(len(merged)):
            for j in range(i + 1, len(merged)):
                a, b = merged[i], merged[j]
                if a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]:
                    merged[i] = _union([a, b])
                    del merged[j]
                    changed = True
                    break
            if changed:
                break
    return merged


def composite(original: np.ndarray, generated: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Generated pixels inside the mask, the original's bytes everywhere else."""
    return np.where(mask[..., None], generated, original)


class LruCache:
    """A small least-recently-used map (SAM's image embeddings, keyed by image hash)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(0, int(capacity))
        self._entries: OrderedDict[str, Any] = OrderedDict()

    def get(self, key: str) -> Any:
        if key not in self._entries:
            return None
        self._entries.move_to_end(key)
        return self._entries[key]

    def put(self, key: str, value: Any) -> None:
        if self.capacity == 0:
            return
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


# --------------------------------------------------------------------------------------------
# Model context


DEVICE_SETTINGS = ("auto", "cpu")  # `device:` under `handler:` in model-config.yaml
# `cuda_dtype:` under `handler:`: the precision a model runs in on a GPU (CPUs run float32).
CUDA_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# `cpu_threads:` under `handler:`: "share" keeps the server's split of the cores between the
# models (OMP_NUM_THREADS); a number gives this model's worker that many (at most every core).
CPU_THREADS_SHARE = "share"


class DeviceUnavailableError(RuntimeError):
    """TorchServe assigned a GPU that torch cannot use. Raised from `initialize`, so the worker
    fails to start (and SageMaker's endpoint with it) instead of serving on the CPU."""


@dataclass(frozen=True)
class HandlerContext:
    """What a handler needs from TorchServe's context: its folder, its settings, its device."""

    model_dir: Path
    settings: dict
    device: torch.device
    device_reason: str = ""  # why this device: the start-up log line says it

    def setting(self, name: str, default: Any = None) -> Any:
        return self.settings.get(name, default)

    def path(self, name: str, default: str) -> Path:
        """A path setting, relative to the model folder; '..' may not lead out of it."""
        relative = Path(os.path.normpath(str(self.settings.get(name, default))))
        if relative.is_absolute() or relative.parts[:1] == ("..",):
            raise ValueError(f"setting {name}={relative} must stay inside the model folder")
        return self.model_dir / relative


SettingsT = TypeVar("SettingsT")
UNION_TYPES = (Union, UnionType)


# The `handler:` knobs read by the shared layer (EditHandler, ImageLimits, handler_context),
# whatever the model: a handler's own knobs are the fields of its Settings dataclass.
COMMON_SETTINGS = frozenset(
    {
        "weights_dir",
        "device",
        "cuda_dtype",
        "cpu_threads",
        "max_image_pixels",
        "max_aspect_ratio",
        "max_response_bytes",
    }
)


def read_settings(cls: type[SettingsT], settings: Mapping) -> SettingsT:
    """The `handler:` knobs that the dataclass `cls` names, type-checked: a mistyped knob stops
    the model at load (naming it), not a request later. A knob without a class default must be
    in the settings (model-config.yaml is then its one source); knobs of other parts of the
    handler (limits, weights_dir) are left to them."""
    hints = get_type_hints(cls)
    values = {}
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        if field.name not in settings:
            required = field.default is dataclasses.MISSING
            if required and field.default_factory is dataclasses.MISSING:
                raise ValueError(f"model-config.yaml has no setting {field.name} under handler:")
            continue
        value, expected = settings[field.name], hints[field.name]
        allowed = get_args(expected) if get_origin(expected) in UNION_TYPES else (expected,)
        if float in allowed and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) not in allowed:  # exact: bool is not an int, and 1.5 is not one either
            names = " or ".join(kind.__name__ for kind in allowed)
            raise ValueError(
                f"setting {field.name}={value!r} in model-config.yaml: expected {names}"
            )
        values[field.name] = value
    instance = cls(**values)
    check = getattr(instance, "check", None)
    if check is not None:
        check()
    return instance


def refuse_unknown_settings(settings: Mapping, own: type) -> None:
    """A knob no part of the handler reads (a typo, or one from another model) stops the model
    at load, naming it: otherwise it would be silently ignored."""
    known = COMMON_SETTINGS | {field.name for field in dataclasses.fields(own)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(
            f"unknown setting(s) {', '.join(unknown)} under handler: in model-config.yaml; "
            f"this model reads {', '.join(sorted(known))}"
        )


def read_device_setting(settings: Mapping) -> str:
    """`device:` from the handler settings: auto (the default: the GPU TorchServe assigns, or
    the CPU when it assigns none) or cpu (a deliberate CPU run, even where a GPU is assigned)."""
    value = settings.get("device", "auto")
    if value not in DEVICE_SETTINGS:
        raise ValueError(f"setting device={value!r}: use one of {', '.join(DEVICE_SETTINGS)}")
    return value


def read_cuda_dtype(
    settings: Mapping, default: str, allowed: tuple[str, ...] = tuple(CUDA_DTYPES)
) -> torch.dtype:
    """`cuda_dtype:` from the handler settings, one of `allowed`; anything else stops the
    model at load, naming the setting."""
    value = settings.get("cuda_dtype", default)
    if value not in allowed:
        raise ValueError(f"setting cuda_dtype={value!r}: use one of {', '.join(allowed)}")
    return CUDA_DTYPES[value]


def run_dtype(device: torch.device, cuda_dtype: torch.dtype) -> torch.dtype:
    """The dtype a model runs in: `cuda_dtype` on a GPU, float32 on a CPU."""
    return cuda_dtype if device.type == "cuda" else torch.float32


def read_cpu_threads(settings: Mapping) -> int | None:
    """`cpu_threads:` from the handler settings: None for share (the default), else a count."""
    value = settings.get("cpu_threads", CPU_THREADS_SHARE)
    if value == CPU_THREADS_SHARE:
        return None
    if type(value) is not int or value < 1:
        raise ValueError(f"setting cpu_threads={value!r}: use share or a whole number >= 1")
    return value


def apply_cpu_threads(wanted: int | None) -> int:
    """Set this worker's intra-op threads (a count is capped at the cores); returns the count."""
    if wanted is not None:
        torch.set_num_threads(max(1, min(wanted, os.cpu_count() or 1)))
    return torch.get_num_threads()


def select_device(gpu_id: Any, wanted: str = "auto") -> tuple[torch.device, str]:
    """The device and why. TorchServe passes gpu_id None on CPU hosts. A gpu_id that torch
    cannot use raises DeviceUnavailableError: never a silent fallback to the CPU, where a
    GPU host's models would run many times slower (SD into the 60 s limit) with no cause shown."""
    if wanted == "cpu":
        assigned = "" if gpu_id is None else f"; GPU {gpu_id} assigned by TorchServe stays unused"
        return torch.device("cpu"), f"device: cpu in model-config.yaml{assigned}"
    if gpu_id is None:
        return torch.device("cpu"), "TorchServe assigned no GPU"
    index = int(gpu_id)
    if not torch.cuda.is_available():
        raise DeviceUnavailableError(cuda_unavailable_message(index))
    if index >= torch.cuda.device_count():
        raise DeviceUnavailableError(
            f"TorchServe assigned GPU {index}, but torch sees {torch.cuda.device_count()} "
            "GPU(s): check NVIDIA_VISIBLE_DEVICES and TorchServe's number_of_gpu"
        )
    return torch.device(f"cuda:{index}"), f"GPU {index} assigned by TorchServe"


def cuda_unavailable_message(gpu_id: int, driver: str | None = None) -> str:
    """What is wrong and how to fix it: the host's driver, torch's CUDA build, the rule."""
    driver = mmekit_cuda.driver_version() if driver is None else driver
    built_for = torch.version.cuda
    head = f"TorchServe assigned GPU {gpu_id}, but torch {torch.__version__} cannot use CUDA: "
    cpu_run = "; for a deliberate CPU run set `device: cpu` under `handler:` in model-config.yaml"
    driver_text = f"NVIDIA driver {driver}" if driver else mmekit_cuda.NO_DRIVER
    if built_for is None:
        return (
            f"{head}{driver_text}, torch is a CPU-only build (torch.version.cuda is None). "
            f"Fix: install a CUDA build of torch{cpu_run}"
        )
    try:
        needed: int | None = mmekit_cuda.min_driver(built_for)
    except ValueError:
        needed = None
    rule = f"torch's CUDA {built_for} build needs driver >= {needed or '?'}"
    if driver is None:
        return (
            f"{head}{driver_text}; {rule}. Fix: run the container with the GPU "
            "visible (NVIDIA_VISIBLE_DEVICES=all, NVIDIA_DRIVER_CAPABILITIES=compute,utility) "
            f"on a host with driver >= {needed or '?'}{cpu_run}"
        )
    if needed is not None and mmekit_cuda.driver_branch(driver) < needed:
        return (
            f"{head}{driver_text}, but {rule}. Fix: a host with driver >= {needed} (on "
            "SageMaker, `make promote` sets InferenceAmiVersion from configs/inference-amis."
            f"yaml), or an image with a torch for an older CUDA: {mmekit_cuda.OLDER_TORCH_HINT}"
            f"{cpu_run}"
        )
    return (
        f"{head}{driver_text} should run torch's CUDA {built_for} build, yet CUDA does not "
        "initialise: libcuda is probably not mounted in the container (set "
        f"NVIDIA_DRIVER_CAPABILITIES=compute,utility; unset means utility only){cpu_run}"
    )


def handler_context(context: Any) -> HandlerContext:
    """TorchServe's context (or any object with the same attributes) -> HandlerContext.

    Settings are the `handler:` section of the archive's model-config.yaml.
    """
    properties = context.system_properties
    yaml_config = getattr(context, "model_yaml_config", None) or {}
    settings = dict(yaml_config.get("handler") or {})
    device, reason = select_device(properties.get("gpu_id"), read_device_setting(settings))
    return HandlerContext(
        model_dir=Path(properties["model_dir"]),
        settings=settings,
        device=device,
        device_reason=reason,
    )


# --------------------------------------------------------------------------------------------
# The handler skeleton


class EditHandler:
    """decode -> validate -> infer -> encode for each request of a batch.

    Subclasses implement `load`, `decode`, `validate`, `infer` and `encode`. `decode` turns the
    JSON object into a request (images decoded), `validate` checks it against the model and its
    limits before any model work, `infer` runs the model, `encode` makes the JSON response.
    """

    @dataclass(frozen=True)
    class Settings:
        """The handler's own `handler:` knobs (a subclass's dataclass, read with read_settings);
        the shared ones are COMMON_SETTINGS."""

    def __init__(self) -> None:
        self.initialized = False
        self.config: HandlerContext | None = None

    def initialize(self, context: Any) -> None:
        self.config = handler_context(context)
        name = getattr(context, "model_name", None) or self.config.model_dir.name
        threads = apply_cpu_threads(read_cpu_threads(self.config.settings))
        logger.info(
            "model %s: running on %s (%s), %d CPU thread(s)",
            name, self.config.device, self.config.device_reason, threads,
        )  # fmt: skip
        self.image_limits = ImageLimits.from_settings(self.config.settings)
        self.max_response_bytes = int(
            self.config.setting("max_response_bytes", DEFAULT_MAX_RESPONSE_BYTES)
        )
        refuse_unknown_settings(self.config.settings, self.Settings)
        self.load(self.config)
        self.initialized = True

    # -- to implement ---------------------------------------------------------------------
    def load(self, config: HandlerContext) -> None:
        raise NotImplementedError

    def decode(self, payload: dict) -> Any:
        raise NotImplementedError

    def validate(self, request: Any) -> None:
        """Checks that need the model or several fields at once; decode did the rest."""

    def infer(self, request: Any) -> Any:
        raise NotImplementedError

    def encode(self, result: Any) -> dict:
        raise NotImplementedError

    # -- shared by the image-returning handlers ---------------------------------------------
    def refuse_unfittable(self, size: tuple[int, int]) -> None:
        """For validate: a result of this size cannot fit the response in any format."""
        refuse_unfittable(size, self.max_response_bytes)

    def fit_image(self, image: Image.Image, inputs: InpaintInputs) -> dict:
        """The response's image fields: the image in a format that fits, and which one."""
        encoded = fit_image(
            image, inputs.response_format, inputs.source_format, self.max_response_bytes
        )
        return {"generated_image": encoded.base64, "format": encoded.format_name}

    # -- the loop ---------------------------------------------------------------------------
    def process(self, row: Any) -> str:
        """One request -> its JSON response text."""
        payload = read_payload(row)
        # opt-in, so the documented responses stay as they are: promote's smoke test asks,
        # to prove the models run on the GPU of a GPU instance
        report_device = read_bool(payload, "report_device", False)
        request = self.decode(payload)
        self.validate(request)
        with torch.inference_mode():
            result = self.infer(request)
        encoded = self.encode(result)
        if report_device:
            encoded["device"] = str(self.config.device)
        response = json.dumps(encoded)
        if len(response) > self.max_response_bytes:
            raise RequestError(
                "response_too_large",
                f"the response would be {len(response)} bytes; the limit is "
                f"{self.max_response_bytes} (SageMaker's 6 MB): send a smaller image",
            )
        return response

    def handle(self, data: list, context: Any) -> list:
        """TorchServe's entry point: one JSON response per request of the batch.

        Each request gets its own status, so one bad request in a batch fails alone. Errors
        are answered with our JSON body and the status set on the request itself: raising
        PredictionException would make the frontend wrap the body as a string inside its own
        {"code", "type", "message"} envelope. Only a context that cannot carry per-request
        status (no TorchServe request processor) falls back to PredictionException.
        """
        responses: list = []
        for index, row in enumerate(data):
            try:
                body, status = self.process(row), 200
            except RequestError as error:
                logger.info("rejected request %d: %s: %s", index, error.code, error.message)
                body, status = error.body(), error.status
            except Exception as error:
                if _out_of_memory(error):
                    raise  # TorchServe answers 507, so SageMaker can free memory for this model
                logger.exception("request %d failed", index)
                body, status = INTERNAL_ERROR.body(), INTERNAL_ERROR.status
            if getattr(context, "request_processor", None) is None:
                if status != 200:
                    from ts.utils.util import PredictionException

                    raise PredictionException(body, status)
            else:
                if status != 200:
                    context.set_response_status(status, HTTPStatus(status).phrase, idx=index)
                context.set_response_content_type(index, "application/json")
            responses.append(body)
        return responses


# A bug or a model failure, not the client's doing: an honest 500, the details in the log only.
INTERNAL_ERROR = RequestError(
    "internal_error", "the model failed on this request; the server log has the details", 500
)


def _out_of_memory(error: Exception) -> bool:
    # TorchServe's own rule: MemoryError, or a message naming CUDA, becomes a 507
    return isinstance(error, (MemoryError, torch.OutOfMemoryError)) or "CUDA" in str(error)
