"""Example requests for the models, built from a small generated scene (no downloads).

The scene has a red ball on a table: the SAM click lands on the ball, and the LaMa/SD mask is
the ball's disc, so with real weights the examples erase or replace it. Each model's entry in
scripts/models.py names its example builder: (image, mask, steps) -> the request body.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
from mmekit_limits import SAGEMAKER_PAYLOAD_BYTES
from PIL import Image, ImageDraw

from .models import names, resolve, spec

SCENE_SIZE = (640, 480)
BALL_CENTRE = (400, 300)
BALL_RADIUS = 60


def scene() -> Image.Image:
    width, height = SCENE_SIZE
    image = Image.new("RGB", SCENE_SIZE)
    draw = ImageDraw.Draw(image)
    for y in range(height):  # a wall fading into a table top
        shade = 200 - y * 80 // height if y < 320 else 120 - (y - 320) // 4
        draw.line([(0, y), (width, y)], fill=(shade, shade - 10, shade - 30))
    x, y = BALL_CENTRE
    draw.ellipse(
        [x - BALL_RADIUS, y - BALL_RADIUS, x + BALL_RADIUS, y + BALL_RADIUS], fill=(200, 30, 30)
    )
    draw.rectangle([120, 200, 260, 330], fill=(40, 90, 160))  # a blue box beside it
    return image


def ball_mask() -> Image.Image:
    mask = Image.new("L", SCENE_SIZE, 0)
    x, y = BALL_CENTRE
    ImageDraw.Draw(mask).ellipse(
        [x - BALL_RADIUS, y - BALL_RADIUS, x + BALL_RADIUS, y + BALL_RADIUS], fill=255
    )
    return mask


def encode(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def sam_example(image: str, mask: str, steps: int | None) -> dict:
    return {
        "image": image,
        # a JSON string, as the AWS sample's client sends it
        "gen_args": json.dumps(
            {"point_coords": list(BALL_CENTRE), "point_labels": 1, "dilate_kernel_size": 15}
        ),
    }


def lama_example(image: str, mask: str, steps: int | None) -> dict:
    return {"image": image, "mask_image": mask, "dilate_kernel_size": 15}


def sd_example(image: str, mask: str, steps: int | None) -> dict:
    gen_args: dict = {"seed": 42}  # guidance, and steps unless asked: the config's defaults
    if steps is not None:
        gen_args["num_inference_steps"] = steps
    return {
        "image": image,
        "mask_image": mask,
        "prompt": "a small potted cactus on a wooden table",
        "negative_prompt": "blurry, low quality",
        "gen_args": gen_args,
    }


def requests(sd_steps: int | None = None) -> dict[str, dict]:
    """Every registered model's example request; `sd_steps`: denoising steps, for a model
    that takes them (a readiness probe asks for 1; None: the model's default)."""
    image, mask = encode(scene()), encode(ball_mask())
    return {model: resolve(spec(model).example)(image, mask, sd_steps) for model in names()}


def write_requests(folder: Path, sd_steps: int | None = None) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for model, body in requests(sd_steps).items():
        path = folder / f"{model}.json"
        path.write_text(json.dumps(body))
        written[model] = path
    return written


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


def photo_request(
    image: Image.Image, mask: Image.Image, limit: int = SAGEMAKER_PAYLOAD_BYTES
) -> dict:
    """The AWS sample's erase/replace payload (image + mask_image) with the image as the
    highest-quality JPEG (90 down to 70) whose request fits `limit` bytes, as a client does."""
    mask_b64 = encode(mask)
    for quality in (90, 85, 80, 75, 70):
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality)
        image_b64 = base64.b64encode(buffer.getvalue()).decode("ascii")
        if len(image_b64) + len(mask_b64) + 512 <= limit:
            return {"image": image_b64, "mask_image": mask_b64}
    raise ValueError(f"a {image.size[0]}x{image.size[1]} JPEG does not fit {limit} bytes")
