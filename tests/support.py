"""Test support: images, and (from scripts.inprocess) handlers called as TorchServe's worker
calls them."""

from __future__ import annotations

import base64
import io
import socketserver
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from PIL import Image

from scripts.examples import photo_like, photo_request
from scripts.inprocess import Reply, ServedModel, make_model_dir, parse_predict_response

__all__ = [
    "Reply",
    "ServedModel",
    "make_model_dir",
    "parse_predict_response",
    "photo_like",
    "photo_request",
]


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


# ---------------------------------------------------------------------------------------------
# Stand-in servers


@contextmanager
def serving(server: socketserver.BaseServer) -> Iterator[socketserver.BaseServer]:
    """`server` (bound to loopback by the caller) answering from a thread, then shut down."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
