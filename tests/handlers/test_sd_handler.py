"""SD2 inpainting handler on a tiny pipeline, loaded and called the way TorchServe does."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.support import b64, box_mask, decode_image, random_image

IMAGE = random_image(200, 150, seed=4)
MASK = box_mask(200, 150, (60, 40, 110, 90))


def request(**overrides) -> dict:
    body = {
        "image": b64(IMAGE),
        "mask_image": b64(MASK),
        "prompt": "a red vase",
        "gen_args": {"seed": 7, "num_inference_steps": 2, "guidance_scale": 7.5},
    }
    body.update(overrides)
    return body


def pixels(reply) -> np.ndarray:
    assert reply.status == 200, reply.body
    return np.asarray(decode_image(reply.json()["generated_image"]))


def test_contract_keeps_size_and_every_pixel_outside_the_mask(sd):
    reply = sd.predict(request())
    assert set(reply.json()) == {"generated_image", "format", "seed"}
    assert reply.json()["format"] == "png"
    assert reply.json()["seed"] == 7
    result, original, inside = pixels(reply), np.asarray(IMAGE), np.asarray(MASK) > 0
    assert result.shape == original.shape
    assert np.array_equal(result[~inside], original[~inside])
    assert not np.array_equal(result[inside], original[inside])  # the mask was repainted


def test_same_seed_same_output_and_other_seed_other_output(sd):
    first = pixels(sd.predict(request()))
    again = pixels(sd.predict(request()))
    other = pixels(sd.predict(request(gen_args={"seed": 8, "num_inference_steps": 2})))
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_no_seed_picks_one_and_reports_it_so_the_result_can_be_reproduced(sd):
    chosen = sd.predict(request(gen_args={"num_inference_steps": 2}))
    seed = chosen.json()["seed"]
    assert 0 <= seed < 2**32
    replay = sd.predict(request(gen_args={"seed": seed, "num_inference_steps": 2}))
    assert np.array_equal(pixels(chosen), pixels(replay))


def test_gen_args_as_json_string_and_bytes_body_match_dict(sd):
    as_dict = sd.predict(request())
    as_string = sd.predict(request(gen_args=json.dumps(request()["gen_args"])), raw=True)
    assert as_dict.json() == as_string.json()


def test_negative_prompt_and_response_formats(sd):
    reply = sd.predict(request(negative_prompt="blurry", format="jpeg"))
    assert decode_image(reply.json()["generated_image"]).format == "JPEG"
    assert reply.json()["format"] == "jpeg"
    reply = sd.predict(request(format="webp"))
    assert decode_image(reply.json()["generated_image"]).format == "WEBP"
    assert reply.json()["format"] == "webp"


def test_empty_mask_returns_the_image_untouched(sd):
    empty = box_mask(200, 150, (0, 0, 0, 0))
    result = pixels(sd.predict(request(mask_image=b64(empty))))
    assert np.array_equal(result, np.asarray(IMAGE))


def test_large_image_only_the_window_changes(sd):
    image = random_image(1100, 700, seed=9)
    mask = box_mask(1100, 700, (1000, 600, 1090, 690))  # near a corner
    result = pixels(sd.predict(request(image=b64(image), mask_image=b64(mask))))
    inside = np.asarray(mask) > 0
    assert result.shape == (700, 1100, 3)
    assert np.array_equal(result[~inside], np.asarray(image)[~inside])


@pytest.mark.parametrize(
    "overrides, code",
    [
        ({"gen_args": {"num_inference_steps": 0}}, "out_of_range"),
        ({"gen_args": {"num_inference_steps": 10**6}}, "out_of_range"),
        ({"gen_args": {"guidance_scale": 31}}, "out_of_range"),
        ({"gen_args": {"guidance_scale": -1}}, "out_of_range"),
        ({"gen_args": {"seed": -1}}, "out_of_range"),
        ({"gen_args": {"seed": 2**32}}, "out_of_range"),
        ({"gen_args": {"seed": "7"}}, "invalid_field"),
        ({"gen_args": "[]"}, "invalid_field"),
        ({"prompt": "x" * 10_000}, "too_long"),
        ({"prompt": None}, "missing_field"),
        ({"prompt": 5}, "invalid_field"),
        ({"negative_prompt": "y" * 10_000}, "too_long"),
        ({"mask_image": b64(box_mask(200, 151, (0, 0, 5, 5)))}, "mask_size_mismatch"),
        ({"mask_image": None}, "missing_field"),
        ({"image": "@@@"}, "invalid_base64"),
        ({"format": "gif"}, "invalid_field"),
    ],
)
def test_bad_input_is_400_before_any_model_work(sd, overrides, code, monkeypatch):
    class ModelMustNotRun:
        tokenizer = sd.handler.pipeline.tokenizer

        def __call__(self, *args, **kwargs):
            raise AssertionError("the model ran on a bad request")

    monkeypatch.setattr(sd.handler, "pipeline", ModelMustNotRun())
    reply = sd.predict(request(**overrides))
    assert reply.status == 400
    assert reply.json()["error"] == code


def test_nan_guidance_is_a_400(sd):
    body = json.dumps(request(gen_args={"num_inference_steps": 2})).replace(
        '"num_inference_steps": 2', '"num_inference_steps": 2, "guidance_scale": NaN'
    )
    reply = sd.predict(body.encode())
    assert reply.status == 400 and reply.json()["error"] == "invalid_field"


def test_prompt_over_77_tokens_is_refused_not_truncated(sd):
    tokenizer = sd.handler.pipeline.tokenizer
    assert tokenizer.model_max_length == 77
    fits = " ".join(["cat"] * 75)  # 75 words + start and end tokens = 77
    assert len(tokenizer(fits).input_ids) == 77
    assert sd.predict(request(prompt=fits)).status == 200
    reply = sd.predict(request(prompt=fits + " cat"))
    assert reply.status == 400
    assert reply.json()["error"] == "prompt_too_long"
    assert "78 tokens" in reply.json()["message"]


# -- the window around the mask --------------------------------------------------------------


def window(handler, width, height, box):
    mask = np.asarray(box_mask(width, height, box)) > 0
    return handler.window_box(mask)


def test_window_is_the_native_size_around_a_small_mask(sd):
    left, top, right, bottom = window(sd.handler, 2000, 1500, (900, 700, 950, 760))
    assert (right - left, bottom - top) == (512, 512)
    assert left <= 900 and right >= 950 and top <= 700 and bottom >= 760


def test_window_grows_with_a_large_mask_and_stays_inside_the_image(sd):
    left, top, right, bottom = window(sd.handler, 2000, 1500, (100, 100, 1300, 400))
    assert right - left >= 1200 and bottom - top >= 1200
    assert 0 <= left and right <= 2000 and 0 <= top and bottom <= 1500
    assert left <= 100 and right >= 1300 and top <= 100 and bottom >= 400


def test_window_is_clipped_to_a_small_image(sd):
    assert window(sd.handler, 300, 200, (10, 10, 20, 20)) == (0, 0, 300, 200)


def test_window_at_the_edge_shifts_inward(sd):
    left, top, right, bottom = window(sd.handler, 1000, 1000, (990, 0, 1000, 10))
    assert (left, top, right, bottom) == (488, 0, 1000, 512)


def test_model_size_is_native_and_a_multiple_of_8(sd):
    assert sd.handler.model_size((512, 512)) == (512, 512)
    assert sd.handler.model_size((300, 200)) == (512, 344)
    assert sd.handler.model_size((1440, 1000)) == (512, 352)


def test_a_thin_image_within_the_aspect_limit_is_inpainted(sd):
    image, mask = random_image(400, 20, seed=3), box_mask(400, 20, (100, 5, 140, 15))
    result = pixels(sd.predict(request(image=b64(image), mask_image=b64(mask))))
    assert result.shape == (20, 400, 3)
