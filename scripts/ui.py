"""The editing flow in a browser: open an image, click the object, erase or replace it.

    python -m scripts.ui [--target local|mme|sagemaker] [--url URL] [--endpoint NAME]
                         [--region REGION] [--port N] [--max-side N]      (or `make ui`)

It serves one page on http://127.0.0.1:PORT/ (UI_PORT, default 8095) and a small JSON API that
calls the same client as `mmekit` (scripts/client.py). The server holds the TorchServe token and
the AWS credentials; the browser only ever sees images and masks.

    GET  /api/samples              ["chelsea", "astronaut"] (skimage.data, offline)
    GET  /api/samples/{name}       the sample as PNG
    POST /api/segment {"image": b64 | "image_id": id, "points": [[x, y], ...],
                       "labels": [1, 0, ...], "dilate": n}
                   -> {"mask": b64 PNG, "image_id": id, "embedding_cache": "hit" | "miss", ...}
    POST /api/erase   {"image": b64, "mask": b64, "dilate": n} -> {"image": b64 PNG}
    POST /api/replace {"image", "mask", "prompt", "negative_prompt", "seed", "steps", "dilate"}
                   -> {"image": b64 PNG, "seed": n}

A click sends the image once: the reply's `image_id` (SAM's name for it) is what later clicks on
it send instead. The server keeps the last RECENT_PICTURES pictures by id, forwards the id, and
sends the picture itself when the target no longer holds the id; when this server no longer holds
it either, /api/segment answers 400 `unknown_image_id` and the page sends the image again.

Errors are JSON {"error": code, "message": what to fix}: 400 for a request that cannot work as
sent (or that the model refused), 502 when the target is unreachable or failed. Only the
loopback names are answered (another Host is a 400 `bad_host`: DNS-rebinding protection), and a
POST from another origin's page is a 403 `cross_origin` (scripts/loopback.py).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import math
import os
import socket
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

from mmekit_limits import MAX_SEED
from PIL import Image
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from . import client, targets
from .cli import tool_parser
from .client import Picture
from .loopback import LoopbackGuard
from .models import spec
from .targets import EditError, Target

STATIC_DIR = Path(__file__).resolve().parent / "ui_static"
HOST = "127.0.0.1"
DEFAULT_PORT = 8095
# A browser sends the image (and a mask) base64'd: 12 MB covers a ~6 MB photo, and anything
# larger could not reach SageMaker anyway (6 MB per invocation).
MAX_REQUEST_BYTES = 12 * 1024 * 1024
SAMPLES = ("chelsea", "astronaut")
# Pictures kept for clicks that send an image_id: as many as SAM's embedding cache holds by
# default (embedding_cache_size), past which the target would have to see the image again anyway.
RECENT_PICTURES = 8


class BadRequest(Exception):
    """A request the page (or a script) has to send differently: 400 with this message."""

    def __init__(self, error: str, message: str) -> None:
        super().__init__(message)
        self.error = error
        self.message = message


def error_response(status: int, error: str, message: str) -> JSONResponse:
    return JSONResponse({"error": error, "message": message}, status_code=status)


def edit_error_response(error: EditError) -> JSONResponse:
    message = str(error)
    # the client's advice is for its command line; here the server is what takes the flag
    message = message.replace("pass --max-side", "start the editor with --max-side")
    # each kind carries its status: the request as sent or the model's refusal is the user's to
    # fix (400); an unreachable or failing target is a bad gateway (502)
    return error_response(error.http_status, error.kind, message)


# ---------------------------------------------------------------------------------------------
# Reading requests


async def read_json(request: Request) -> dict:
    """The body as a JSON object, refused past MAX_REQUEST_BYTES without reading it all."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    # Only application/json: a cross-site form or no-cors fetch cannot send it without a CORS
    # preflight, which this server never grants, so other sites cannot spend the user's target.
    if content_type != "application/json":
        raise BadRequest("not_json", "send the request as JSON (Content-Type: application/json)")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_REQUEST_BYTES:
        raise too_large()
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_REQUEST_BYTES:
            raise too_large()
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("not_json", "the body is not valid JSON") from None
    if not isinstance(payload, dict):
        raise BadRequest("not_json", "the body must be a JSON object")
    return payload


def too_large() -> BadRequest:
    limit = MAX_REQUEST_BYTES // (1024 * 1024)
    return BadRequest("too_large", f"the request is over {limit} MB: use a smaller image")


def decode_base64(payload: dict, field: str) -> bytes:
    """A base64 field; a data URL (data:image/png;base64,...) is accepted as well."""
    text = payload.get(field)
    if not isinstance(text, str) or not text:
        raise BadRequest(f"missing_{field}", f"'{field}' is required, as base64")
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("invalid_base64", f"'{field}' is not valid base64") from None


def read_int(payload: dict, field: str, default: int | None, low: int, high: int) -> int | None:
    value = payload.get(field)
    if value is None:
        return default
    # is_number: bool is an int in Python, and json.loads accepts NaN and Infinity
    if not is_number(value) or value != int(value):
        raise BadRequest(f"invalid_{field}", f"'{field}' must be a whole number")
    if not low <= value <= high:
        raise BadRequest(f"invalid_{field}", f"'{field}' must be between {low} and {high}")
    return int(value)


def read_text(payload: dict, field: str, required: bool = False) -> str:
    value = payload.get(field, "")
    if not isinstance(value, str):
        raise BadRequest(f"invalid_{field}", f"'{field}' must be text")
    if required and not value.strip():
        raise BadRequest(f"missing_{field}", f"'{field}' is required")
    return value


def read_points(payload: dict) -> tuple[list[tuple[float, float]], list[int]]:
    points = payload.get("points")
    if not isinstance(points, list) or not points:
        raise BadRequest("missing_points", "'points' is required: [[x, y], ...] in image pixels")
    parsed = []
    for point in points:
        if not (isinstance(point, list) and len(point) == 2 and all(map(is_number, point))):
            raise BadRequest("invalid_points", "each point is [x, y] in image pixels")
        parsed.append((float(point[0]), float(point[1])))
    labels = payload.get("labels") or [1] * len(parsed)
    if not isinstance(labels, list) or len(labels) != len(parsed):
        raise BadRequest("invalid_labels", "'labels' needs one 1 (object) or 0 (background) each")
    if any(isinstance(label, bool) or label not in (0, 1) for label in labels):
        raise BadRequest("invalid_labels", "each label is 1 (object) or 0 (background)")
    return parsed, [int(label) for label in labels]


@cache
def model_settings(model: str) -> dict:
    """The `handler:` knobs of configs/<model>/model-config.yaml: the editor checks what a page
    sends against the model's own limits, so a request it lets through is one the model takes."""
    return spec(model).handler_settings()


def read_dilate(payload: dict, model: str) -> int:
    return read_int(payload, "dilate", 0, 0, model_settings(model)["max_dilate_kernel_size"])


def read_image_id(payload: dict) -> str | None:
    """`image_id` from an earlier /api/segment reply, sent instead of `image`; None if absent."""
    image_id = payload.get("image_id")
    if image_id is None:
        return None
    if payload.get("image") is not None:
        raise BadRequest("conflicting_fields", "send either 'image' or 'image_id', not both")
    if not isinstance(image_id, str) or not client.IMAGE_ID.fullmatch(image_id):
        raise BadRequest(
            "invalid_image_id",
            "'image_id' must be the 64-character hex id an earlier /api/segment reply returned",
        )
    return image_id


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def png_base64(image: Image.Image) -> str:
    """PNG as plain base64 (the page makes its own data URL)."""
    return base64.b64encode(client.png_bytes(image)).decode("ascii")


def mask_for_page(reply: dict, picture: Picture) -> tuple[str, tuple[int, int]]:
    """SAM's mask as base64 PNG at the original size, and that size. When SAM's PNG is that
    already (the picture was not downscaled) it is passed through: decoding and encoding it
    again costs milliseconds a click on a photo. Opening it reads only its header."""
    mask = client.decode_image(reply)
    if mask.format == "PNG" and mask.mode in ("1", "L") and mask.size == picture.original.size:
        return reply["generated_image"], mask.size
    mask = client.to_original_size(mask, picture)
    return png_base64(mask), mask.size


# ---------------------------------------------------------------------------------------------
# The edits: plain functions of (target, payload), run in a worker thread


class RecentPictures:
    """The pictures clicked on lately, by the image_id SAM named them with (least recently used
    first out): what a click that sends only the id needs for its scale, and to send the
    picture again should the target have forgotten the id."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._pictures: OrderedDict[str, Picture] = OrderedDict()
        self._lock = threading.Lock()  # edits run in Starlette's thread pool

    def get(self, image_id: str) -> Picture | None:
        with self._lock:
            picture = self._pictures.get(image_id)
            if picture is not None:
                self._pictures.move_to_end(image_id)
            return picture

    def put(self, image_id: str, picture: Picture) -> None:
        with self._lock:
            self._pictures[image_id] = picture
            self._pictures.move_to_end(image_id)
            while len(self._pictures) > self.capacity:
                self._pictures.popitem(last=False)


class Editor:
    """The target, how large an image is sent to it, and the pictures clicked on lately."""

    def __init__(self, target: Target, max_side: int | None = None) -> None:
        self.target = target
        self.max_side = max_side
        self.recent = RecentPictures(RECENT_PICTURES)

    def picture(self, payload: dict) -> Picture:
        return client.prepare(decode_base64(payload, "image"), self.max_side)

    def known_picture(self, image_id: str) -> Picture:
        picture = self.recent.get(image_id)
        if picture is None:
            raise BadRequest(
                "unknown_image_id",
                f"image_id {image_id[:12]}... is not one this editor holds (evicted, or the "
                "editor restarted): send the image again",
            )
        return picture

    def mask(self, payload: dict, picture: Picture) -> Image.Image:
        mask_bytes = decode_base64(payload, "mask")
        return client.mask_of(self.target, picture, mask_bytes, [], [])

    def segment(self, payload: dict) -> dict:
        points, labels = read_points(payload)
        dilate = read_dilate(payload, "sam")
        image_id = read_image_id(payload)
        picture = self.picture(payload) if image_id is None else self.known_picture(image_id)
        reply = client.segment_reply(self.target, picture, points, labels, dilate, image_id)
        named = client.image_id_of(reply)
        if named is not None:
            self.recent.put(named, picture)
        mask, (width, height) = mask_for_page(reply, picture)
        return {**client.reply_info(reply), "mask": mask, "width": width, "height": height}

    def erase(self, payload: dict) -> dict:
        dilate = read_dilate(payload, "lama")
        picture = self.picture(payload)
        result = client.erase(self.target, picture, self.mask(payload, picture), dilate)
        return {"image": png_base64(result)}

    def replace(self, payload: dict) -> dict:
        prompt = read_text(payload, "prompt", required=True)
        negative_prompt = read_text(payload, "negative_prompt")
        sd = model_settings("sd")
        seed = read_int(payload, "seed", None, 0, MAX_SEED)
        # steps and guidance not given are the model's defaults (its model-config.yaml)
        steps = read_int(payload, "steps", None, 1, sd["max_num_inference_steps"])
        guidance = payload.get("guidance")
        if guidance is not None and not (
            is_number(guidance) and 0 <= guidance <= sd["max_guidance_scale"]
        ):
            raise BadRequest(
                "invalid_guidance",
                f"'guidance' must be a number from 0 to {sd['max_guidance_scale']}",
            )
        dilate = read_dilate(payload, "sd")
        picture = self.picture(payload)
        mask = self.mask(payload, picture)
        result, used_seed = client.replace(
            self.target, picture, mask, prompt, negative_prompt, seed, steps, guidance, dilate
        )
        return {"image": png_base64(result), "seed": used_seed}


def api(work: Callable[[dict], dict]) -> Callable[[Request], Any]:
    """An endpoint: JSON in, `work` in a thread (the server keeps answering), JSON out."""

    async def endpoint(request: Request) -> Response:
        try:
            payload = await read_json(request)
            return JSONResponse(await run_in_threadpool(work, payload))
        except BadRequest as error:
            return error_response(400, error.error, error.message)
        except EditError as error:
            return edit_error_response(error)

    return endpoint


# ---------------------------------------------------------------------------------------------
# Samples and the page


@lru_cache(maxsize=len(SAMPLES))
def sample_png(name: str) -> bytes:
    import skimage.data  # slow to import; only the sample routes need it

    return client.png_bytes(Image.fromarray(getattr(skimage.data, name)()))


async def list_samples(request: Request) -> Response:
    return JSONResponse(list(SAMPLES))


async def get_sample(request: Request) -> Response:
    name = request.path_params["name"]
    if name not in SAMPLES:
        return error_response(404, "no_sample", f"no sample {name!r}: one of {', '.join(SAMPLES)}")
    data = await run_in_threadpool(sample_png, name)
    return Response(data, media_type="image/png", headers={"Cache-Control": "max-age=3600"})


async def page(request: Request) -> Response:
    return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


async def internal_error(request: Request, error: Exception) -> Response:
    # JSON the page can show, instead of Starlette's plain-text 500
    return error_response(500, "internal", f"the editor failed: {type(error).__name__}: {error}")


def create_app(target: Target, max_side: int | None = None) -> Starlette:
    """The page and its API, calling `target` (any targets.Target) for every edit."""
    editor = Editor(target, max_side)
    routes = [
        Route("/", page, methods=["GET"]),
        Route("/api/samples", list_samples, methods=["GET"]),
        Route("/api/samples/{name}", get_sample, methods=["GET"]),
        Route("/api/segment", api(editor.segment), methods=["POST"]),
        Route("/api/erase", api(editor.erase), methods=["POST"]),
        Route("/api/replace", api(editor.replace), methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
    ]
    # Loopback names only (a DNS-rebinding page under another name gets a 400), and no edit
    # from another site's page (403): the server spends the user's target and credentials.
    middleware = [
        Middleware(LoopbackGuard, bind_address=HOST, check_origin=True, refusal=error_response)
    ]
    return Starlette(
        routes=routes, middleware=middleware, exception_handlers={Exception: internal_error}
    )


# ---------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = tool_parser("python -m scripts.ui", __doc__)
    parser.add_argument(
        "--target",
        choices=("local", "mme", "sagemaker"),
        default=os.environ.get("UI_TARGET") or os.environ.get("MMEKIT_TARGET") or "local",
        help="where the models run (UI_TARGET, else MMEKIT_TARGET; default local)",
    )
    parser.add_argument("--url", help="local: TorchServe's inference URL; mme: the emulator's")
    parser.add_argument("--endpoint", help="mme/sagemaker: endpoint name")
    parser.add_argument("--region", help="sagemaker: AWS region")
    parser.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get("UI_PORT") or DEFAULT_PORT),
        help=f"port on 127.0.0.1 (UI_PORT; default {DEFAULT_PORT})",
    )
    parser.add_argument(
        "--max-side",
        type=int,
        default=None,
        metavar="N",
        help="downscale images so the long side is N pixels before sending (results come back "
        "at the original size): for photos over SageMaker's 6 MB request limit",
    )
    return parser


def port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((HOST, port))
        except OSError:
            return True
    return False


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    args = build_parser().parse_args(argv)
    try:
        target = targets.make_target(args.target, args.url, args.endpoint, args.region)
    except EditError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    if not 0 < args.port < 65536 or port_in_use(args.port):
        print(
            f"error: port {args.port} is in use on {HOST} (or not a port): "
            "pass --port N or set UI_PORT=N",
            file=sys.stderr,
        )
        return 2
    print(f"mmekit editor: open http://{HOST}:{args.port}/", flush=True)
    print(f"  target: {target.name}, {target.describe()}", flush=True)
    uvicorn.run(create_app(target, args.max_side), host=HOST, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
