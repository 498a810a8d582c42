"""Example requests for the three models, built from a small generated scene (no downloads).

The scene has a red ball on a table: the SAM click lands on the ball, and the LaMa/SD mask is
the ball's disc, so with real weights the examples erase or replace it.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

from PIL import Image, ImageDraw

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


def requests(sd_steps: int = 30) -> dict[str, dict]:
    image, mask = encode(scene()), encode(ball_mask())
    return {
        "sam": {
            "image": image,
            # a JSON string, as the AWS sample's client sends it
            "gen_args": json.dumps(
                {"point_coords": list(BALL_CENTRE), "point_labels": 1, "dilate_kernel_size": 15}
            ),
        },
        "lama": {"image": image, "mask_image": mask, "dilate_kernel_size": 15},
        "sd": {
            "image": image,
            "mask_image": mask,
            "prompt": "a small potted cactus on a wooden table",
            "negative_prompt": "blurry, low quality",
            "gen_args": {"seed": 42, "num_inference_steps": sd_steps, "guidance_scale": 7.5},
        },
    }


def write_requests(folder: Path, sd_steps: int = 30) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for model, body in requests(sd_steps).items():
        path = folder / f"{model}.json"
        path.write_text(json.dumps(body))
        written[model] = path
    return written
