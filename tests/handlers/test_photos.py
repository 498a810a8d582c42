"""Phone photos, 12 and 24 MP, in the AWS sample's payload shapes (image + mask_image; SD's
gen_args as a JSON string), sent as SageMaker sends them (raw bytes), in-process.

What a user of the blog's flow needs: a 200, an image of the input's size in a response that
fits SageMaker's 6,291,456 bytes, and every pixel outside the (dilated) mask as it was, within
JPEG's tolerance when the answer is a JPEG.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from mmekit_limits import SAGEMAKER_PAYLOAD_BYTES
from PIL import Image

from tests.support import b64, box_mask, decode_image, photo_like, photo_request

RESPONSE_LIMIT = SAGEMAKER_PAYLOAD_BYTES
PHOTOS = {"12MP": (4032, 3024), "24MP": (6000, 4000)}
OBJECT = (2600, 1400, 3200, 1900)  # a 600 x 500 object to erase or replace
DILATE = 15
# JPEG at quality >= 90 of a noisy photo, against the JPEG that was sent: small on average,
# a few dozen levels at worst; 16 px (two blocks) beyond the dilated mask, where no 8x8 block
# sees the changed pixels
MEAN_TOLERANCE, MAX_TOLERANCE, BLOCK_RING = 2.0, 48, 16


@pytest.fixture(scope="module")
def photos() -> dict:
    cache: dict = {}

    def photo(name: str) -> tuple[dict, np.ndarray]:
        if name not in cache:
            width, height = PHOTOS[name]
            body = photo_request(photo_like(width, height), box_mask(width, height, OBJECT))
            sent = np.asarray(Image.open(io.BytesIO(_b64decode(body["image"]))).convert("RGB"))
            cache[name] = (body, sent)
        return cache[name]

    return photo


def _b64decode(text: str) -> bytes:
    import base64

    return base64.b64decode(text)


def far_outside(shape: tuple[int, int]) -> np.ndarray:
    left, top, right, bottom = OBJECT
    margin = DILATE // 2 + BLOCK_RING
    outside = np.ones(shape, dtype=bool)
    outside[top - margin : bottom + margin, left - margin : right + margin] = False
    return outside


def check_photo_reply(reply, sent: np.ndarray) -> None:
    assert reply.status == 200, reply.body[:300]
    assert len(reply.body) <= RESPONSE_LIMIT
    body = reply.json()
    assert body["format"] == "jpeg"  # a JPEG in: a JPEG out
    result = decode_image(body["generated_image"])
    assert result.format == "JPEG" and result.size == (sent.shape[1], sent.shape[0])
    outside = far_outside(sent.shape[:2])
    difference = np.abs(np.asarray(result).astype(np.int16) - sent.astype(np.int16))[outside]
    assert difference.mean() <= MEAN_TOLERANCE and difference.max() <= MAX_TOLERANCE


@pytest.mark.parametrize("name", list(PHOTOS))
def test_lama_erases_an_object_on_a_phone_photo(lama, photos, name):
    body, sent = photos(name)
    request = {**body, "dilate_kernel_size": DILATE}
    check_photo_reply(lama.predict(json.dumps(request).encode(), raw=True), sent)


@pytest.mark.parametrize("name", list(PHOTOS))
def test_sd_replaces_an_object_on_a_phone_photo(sd, photos, name):
    body, sent = photos(name)
    gen_args = json.dumps({"seed": 1, "num_inference_steps": 2})  # a string, as the sample sends
    request = {**body, "prompt": "a red vase", "gen_args": gen_args, "dilate_kernel_size": DILATE}
    check_photo_reply(sd.predict(json.dumps(request).encode(), raw=True), sent)


def png_photo() -> tuple[Image.Image, Image.Image, dict]:
    image, mask = photo_like(1024, 768, seed=3), box_mask(1024, 768, (400, 300, 600, 450))
    return image, mask, {"image": b64(image), "mask_image": b64(mask)}


def test_a_png_photo_comes_back_as_a_png_exact_outside_the_mask(lama):
    image, mask, request = png_photo()
    reply = lama.predict(request)
    assert reply.status == 200 and reply.json()["format"] == "png"
    result = decode_image(reply.json()["generated_image"])
    assert result.format == "PNG"
    outside = ~(np.asarray(mask) > 0)
    assert np.array_equal(np.asarray(result)[outside], np.asarray(image)[outside])


def test_a_png_photo_whose_png_cannot_fit_comes_back_as_a_jpeg_that_says_so(serve):
    image, mask, request = png_photo()
    png_bytes = len(request["image"])
    small_limit = serve("lama", max_response_bytes=png_bytes // 2)  # its PNG cannot fit
    reply = small_limit.predict(request)
    assert reply.status == 200 and len(reply.body) <= png_bytes // 2
    assert reply.json()["format"] == "jpeg"
    result = decode_image(reply.json()["generated_image"])
    assert result.format == "JPEG" and result.size == image.size


# -- refused before any model work ---------------------------------------------------------------


def flat_photo_request() -> dict:
    width, height = PHOTOS["12MP"]
    image = Image.new("RGB", (width, height), (120, 130, 140))
    return {"image": b64(image, "JPEG"), "mask_image": b64(box_mask(width, height, OBJECT))}


def test_a_lama_result_that_cannot_fit_in_any_format_is_a_400_before_inference(serve):
    # a 12 MP JPEG needs at least 63.5 kB of base64 (2 bits per 8x8 block); allow 50 kB
    tight = serve("lama", max_response_bytes=50_000)
    calls = []
    tight.handler.network = lambda tensor: calls.append(tensor) or 1 / 0
    reply = tight.predict(flat_photo_request())
    assert reply.status == 400 and reply.json()["error"] == "response_too_large"
    assert "send a smaller image" in reply.json()["message"]
    assert calls == []  # the model never ran


def test_an_sd_result_that_cannot_fit_in_any_format_is_a_400_before_inference(serve):
    tight = serve("sd", max_response_bytes=50_000)

    class ModelMustNotRun:
        tokenizer = tight.handler.pipeline.tokenizer

        def __call__(self, *args, **kwargs):
            raise AssertionError("the model ran")

    tight.handler.pipeline = ModelMustNotRun()
    reply = tight.predict({**flat_photo_request(), "prompt": "a red vase"})
    assert reply.status == 400 and reply.json()["error"] == "response_too_large"


def test_a_result_that_can_fit_is_not_refused_early(serve):
    # far below 6 MB: a flat 12 MP JPEG is ~150 kB, plus the object the tiny network paints
    roomy = serve("lama", max_response_bytes=1_000_000)
    reply = roomy.predict(flat_photo_request())
    assert reply.status == 200 and reply.json()["format"] == "jpeg"
