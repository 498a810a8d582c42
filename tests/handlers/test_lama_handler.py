"""LaMa handler on tiny weights, loaded and called the way TorchServe does."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.support import b64, box_mask, decode_image, random_image

IMAGE = random_image(150, 101, seed=5)  # neither side a multiple of 8: padded, then cropped
MASK = box_mask(150, 101, (30, 20, 90, 70))


def request(**overrides) -> dict:
    return {"image": b64(IMAGE), "mask_image": b64(MASK), **overrides}


def pixels(reply) -> np.ndarray:
    assert reply.status == 200, reply.body
    return np.asarray(decode_image(reply.json()["generated_image"]))


def test_contract_keeps_size_and_every_pixel_outside_the_mask(lama):
    reply = lama.predict(request())
    assert set(reply.json()) == {"generated_image"}
    assert decode_image(reply.json()["generated_image"]).format == "PNG"
    result, original, inside = pixels(reply), np.asarray(IMAGE), np.asarray(MASK) > 0
    assert result.shape == original.shape
    assert np.array_equal(result[~inside], original[~inside])
    assert not np.array_equal(result[inside], original[inside])  # the hole was filled


def test_any_nonzero_mask_value_counts(lama):
    faint = np.asarray(MASK).copy()
    faint[faint > 0] = 1
    from PIL import Image

    assert np.array_equal(
        pixels(lama.predict(request(mask_image=b64(Image.fromarray(faint))))),
        pixels(lama.predict(request())),
    )


def test_dilation_widens_what_is_replaced(lama):
    result = pixels(lama.predict(request(dilate_kernel_size=11)))
    grown = np.zeros(MASK.size[::-1], dtype=bool)
    grown[15:75, 25:95] = True  # 5 px more on each side
    original = np.asarray(IMAGE)
    assert np.array_equal(result[~grown], original[~grown])
    ring = grown & ~(np.asarray(MASK) > 0)
    assert not np.array_equal(result[ring], original[ring])


def test_bytes_and_dict_requests_match(lama):
    assert lama.predict(request(), raw=True).json() == lama.predict(request()).json()


@pytest.mark.parametrize("fmt, pillow_format", [("jpeg", "JPEG"), ("webp", "WEBP"), ("PNG", "PNG")])
def test_response_format(lama, fmt, pillow_format):
    reply = lama.predict(request(format=fmt))
    result = decode_image(reply.json()["generated_image"])
    assert result.format == pillow_format
    if pillow_format != "JPEG":  # lossless formats keep the unmasked pixels exactly
        outside = ~(np.asarray(MASK) > 0)
        assert np.array_equal(np.asarray(result)[outside], np.asarray(IMAGE)[outside])


def test_empty_mask_returns_the_image_unchanged(lama):
    empty = box_mask(150, 101, (0, 0, 0, 0))
    assert np.array_equal(pixels(lama.predict(request(mask_image=b64(empty)))), np.asarray(IMAGE))


@pytest.mark.parametrize(
    "overrides, code",
    [
        ({"mask_image": b64(box_mask(150, 100, (0, 0, 9, 9)))}, "mask_size_mismatch"),
        ({"mask_image": None}, "missing_field"),
        ({"image": None}, "missing_field"),
        ({"mask_image": "////"}, "invalid_image"),
        ({"mask_image": "not base64"}, "invalid_base64"),
        ({"dilate_kernel_size": -1}, "out_of_range"),
        ({"dilate_kernel_size": "5"}, "invalid_field"),
        ({"format": "tiff"}, "invalid_field"),
    ],
)
def test_bad_input_is_400(lama, overrides, code):
    reply = lama.predict(request(**overrides))
    assert reply.status == 400
    assert reply.json()["error"] == code


def test_weights_come_from_the_tiny_tier(lama):
    assert lama.handler.weights_info["variant"] == "tiny"


@pytest.mark.parametrize("size", [(1, 1), (5, 7), (8, 8), (9, 16)])
def test_tiny_images_are_inpainted(lama, size):
    image, mask = random_image(*size, seed=2), box_mask(*size, (0, 0, 1, 1))
    result = pixels(lama.predict({"image": b64(image), "mask_image": b64(mask)}))
    assert result.shape == (size[1], size[0], 3)


def test_a_response_over_sagemakers_limit_is_a_400_that_says_what_to_do(lama):
    noise = random_image(1600, 1200, seed=8)  # PNG of noise: about 7.7 MB as base64
    empty = box_mask(1600, 1200, (0, 0, 0, 0))
    too_large = lama.predict({"image": b64(noise), "mask_image": b64(empty)})
    assert too_large.status == 400
    assert too_large.json()["error"] == "response_too_large"
    assert '"format": "jpeg"' in too_large.json()["message"]
    fits = lama.predict({"image": b64(noise), "mask_image": b64(empty), "format": "jpeg"})
    assert fits.status == 200


def test_a_failure_inside_the_model_is_an_honest_500_and_the_worker_serves_on(lama, monkeypatch):
    def broken(request):
        raise RuntimeError("a bug")

    monkeypatch.setattr(lama.handler, "infer", broken)
    reply = lama.predict(request())
    assert reply.status == 500 and reply.json()["error"] == "internal_error"
    assert "a bug" not in reply.body.decode()  # details stay in the server log
    monkeypatch.undo()
    assert lama.predict(request()).status == 200


def test_out_of_memory_is_left_to_torchserve_which_answers_507(lama, monkeypatch):
    def out_of_memory(request):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(lama.handler, "infer", out_of_memory)
    assert lama.predict(request()).status == 507
