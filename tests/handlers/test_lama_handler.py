"""LaMa handler on tiny weights, loaded and called the way TorchServe does."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mmekit_common as common
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
    assert reply.json()["format"] == "png"  # a PNG in: a PNG out
    assert set(reply.json()) == {"generated_image", "format"}
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


def test_a_png_too_large_for_the_response_comes_back_as_a_jpeg_that_says_so(lama):
    noise = random_image(1600, 1200, seed=8)  # PNG of noise: about 7.7 MB as base64
    empty = box_mask(1600, 1200, (0, 0, 0, 0))
    reply = lama.predict({"image": b64(noise), "mask_image": b64(empty)})
    assert reply.status == 200 and len(reply.body) <= 6_291_456
    assert reply.json()["format"] == "jpeg"
    assert decode_image(reply.json()["generated_image"]).format == "JPEG"


def test_an_explicit_lossless_format_that_cannot_fit_is_a_400_that_says_what_to_do(lama):
    noise = random_image(1600, 1200, seed=8)
    empty = box_mask(1600, 1200, (0, 0, 0, 0))
    too_large = lama.predict({"image": b64(noise), "mask_image": b64(empty), "format": "png"})
    assert too_large.status == 400
    assert too_large.json()["error"] == "response_too_large"
    assert 'leave "format" out' in too_large.json()["message"]


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


# -- the windows the network sees --------------------------------------------------------------


def windows(width: int, height: int, *boxes, ratio=0.5, minimum=128, most=8) -> list:
    mask = np.zeros((height, width), dtype=bool)
    for left, top, right, bottom in boxes:
        mask[top:bottom, left:right] = True
    return common.context_windows(mask, ratio, minimum, most)


def test_a_window_at_a_corner_keeps_its_context_by_growing_inward():
    # 128 px of context per side; what falls off the left and top goes right and down
    assert windows(2000, 1500, (0, 0, 50, 40)) == [(0, 0, 50 + 256, 40 + 256)]


def test_a_window_at_an_edge_shifts_inward_and_keeps_its_size():
    assert windows(2000, 1500, (1950, 700, 2000, 760)) == [(2000 - 306, 700 - 128, 2000, 888)]


def test_the_margin_grows_with_the_mask():
    (box,) = windows(4000, 3000, (1000, 1000, 1600, 1300))  # 600 px wide: 300 px per side
    assert box == (700, 700, 1900, 1600)


def test_a_mask_covering_most_of_the_image_gets_the_whole_image():
    assert windows(2000, 1500, (100, 100, 1900, 1400)) == [(0, 0, 2000, 1500)]


def test_two_separate_blobs_get_two_windows_and_close_ones_share_one():
    far = windows(2000, 1500, (100, 100, 150, 150), (1500, 1000, 1560, 1050))
    # 128 px of context; the first is shifted off the corner (28 px more to the right/down)
    assert far == [(0, 0, 306, 306), (1372, 872, 1688, 1178)]
    near = windows(2000, 1500, (100, 100, 150, 150), (300, 100, 350, 150))
    assert near == [(0, 0, 478, 306)]  # (0, 0, 306, 306) and (172, 0, 478, 306) overlap: merged


def test_more_parts_than_max_windows_become_one_window():
    dots = [(x, 700, x + 2, 702) for x in range(100, 1900, 400)]  # 5 dots, 400 px apart
    assert len(windows(2000, 1500, *dots)) == 5
    assert windows(2000, 1500, *dots, most=4) == [(0, 700 - 128, 1702 + 128, 702 + 128)]


def test_the_window_follows_the_mask_not_the_photo():
    small = windows(1000, 1000, (400, 400, 500, 480))
    large = windows(6000, 4000, (400, 400, 500, 480))
    assert small == large


def test_the_configured_knobs_are_the_handlers(lama):
    settings = lama.handler.settings
    assert (settings.context_ratio, settings.min_context_px) == (0.5, 128)
    assert settings.max_work_pixels == 2_097_152 and settings.max_windows == 8


def test_a_mistyped_knob_stops_the_model_at_load(serve):
    with pytest.raises(Exception, match="max_work_pixels"):
        serve("lama", max_work_pixels="2M")


def test_only_pixels_in_the_mask_change_on_a_large_image_and_the_network_sees_windows(
    lama, monkeypatch
):
    image = random_image(900, 700, seed=11)  # noise: its PNG still fits the response
    mask = box_mask(900, 700, (100, 100, 160, 150))
    seen = []
    network = lama.handler.network

    def spy(tensor):
        seen.append(tuple(tensor.shape[2:]))
        return network(tensor)

    monkeypatch.setattr(lama.handler, "network", spy)
    result = pixels(lama.predict({"image": b64(image), "mask_image": b64(mask)}))
    inside = np.asarray(mask) > 0
    assert np.array_equal(result[~inside], np.asarray(image)[~inside])
    # the window (0, 0, 316, 306): 128 px of context, shifted off the top-left corner, padded
    # to multiples of 8; not the 900 x 700 image
    assert seen == [(312, 320)]


def test_a_window_over_max_work_pixels_is_downscaled_and_the_outside_stays_exact(serve):
    small_work = serve("lama", max_work_pixels=64 * 64)
    seen = []
    network = small_work.handler.network
    small_work.handler.network = lambda tensor: seen.append(tensor.shape[2:]) or network(tensor)
    mask = box_mask(150, 101, (10, 10, 140, 90))
    result = pixels(small_work.predict({"image": b64(IMAGE), "mask_image": b64(mask)}))
    height, width = seen[0]
    assert height * width <= 72 * 72  # 64 x 64 worth, padded to a multiple of 8
    inside = np.asarray(mask) > 0
    assert np.array_equal(result[~inside], np.asarray(IMAGE)[~inside])
    assert not np.array_equal(result[inside], np.asarray(IMAGE)[inside])


# -- padding as the reference pads -------------------------------------------------------------


def reference_result(network, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """advimman/lama's way: pad image and mask to a multiple of 8 with numpy's symmetric mode,
    feed [image * (1 - mask), mask], crop, and keep the original outside the mask."""
    height, width = mask.shape
    pad = ((0, -height % 8), (0, -width % 8))
    padded_image = np.pad(image.astype(np.float32) / 255, (*pad, (0, 0)), mode="symmetric")
    padded_mask = np.pad(mask.astype(np.float32), pad, mode="symmetric")[..., None]
    features = np.concatenate([padded_image * (1 - padded_mask), padded_mask], axis=2)
    with torch.inference_mode():
        output = network(torch.from_numpy(features).permute(2, 0, 1)[None])
    output = (output[0, :, :height, :width].clamp(0, 1) * 255).round().to(torch.uint8)
    prediction = output.permute(1, 2, 0).numpy()
    return np.where(mask[..., None], prediction, image)


def test_a_small_image_whose_window_is_the_whole_image_matches_the_reference_exactly(lama):
    original, inside = np.asarray(IMAGE), np.asarray(MASK) > 0
    assert lama.handler.windows(inside) == [(0, 0, 150, 101)]
    expected = reference_result(lama.handler.network, original, inside)
    assert np.array_equal(pixels(lama.predict(request())), expected)


def test_padding_is_numpys_symmetric_not_replicate(lama, monkeypatch):
    seen = []
    network = lama.handler.network
    monkeypatch.setattr(lama.handler, "network", lambda t: seen.append(t.clone()) or network(t))
    image = np.asarray(IMAGE)[:99, :147]  # pads 5 rows and 5 columns
    mask = np.asarray(MASK)[:99, :147] > 0
    lama.handler.inpaint(image, mask)
    masked = image.astype(np.float32) / 255 * (1 - mask[..., None])
    symmetric = np.pad(masked, ((0, 5), (0, 5), (0, 0)), mode="symmetric")
    got = seen[0][0, :3].permute(1, 2, 0).numpy()
    assert np.allclose(got, symmetric, atol=1e-6)
    replicate = np.pad(masked, ((0, 5), (0, 5), (0, 0)), mode="edge")
    assert not np.allclose(got, replicate)  # the old padding saw other pixels
    assert np.array_equal(seen[0][0, 3].numpy(), np.pad(mask, ((0, 5), (0, 5)), "symmetric"))
