"""SAM handler on tiny weights, loaded and called the way TorchServe's worker does."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from tests.support import b64, decode_image, image_bytes, random_image

IMAGE = random_image(160, 120, seed=1)


def request(**gen_args) -> dict:
    gen_args = {"point_coords": [80, 60], "point_labels": 1, **gen_args}
    return {"image": b64(IMAGE), "gen_args": json.dumps(gen_args)}


def mask_of(reply) -> np.ndarray:
    image = decode_image(reply.json()["generated_image"])
    assert image.mode == "L"
    return np.asarray(image)


def test_contract_mask_is_single_channel_0_255_at_input_size(sam):
    reply = sam.predict(request(dilate_kernel_size=0))
    assert reply.status == 200 and reply.content_type == "application/json"
    body = reply.json()
    assert set(body) == {"generated_image", "scores", "mask_index", "embedding_cache", "image_id"}
    mask = mask_of(reply)
    assert mask.shape == (120, 160)
    assert set(np.unique(mask)) <= {0, 255}
    assert len(body["scores"]) == 3
    assert body["mask_index"] == int(np.argmax(body["scores"]))  # default: best predicted IoU


def test_reference_payload_shape_works_unchanged(sam):
    # the AWS sample's client: gen_args as a JSON string, a single point, an int label
    gen_args = json.dumps(dict(point_coords=[75, 50], point_labels=1, dilate_kernel_size=15))
    payload = json.dumps({"image": b64(IMAGE), "gen_args": gen_args}).encode()
    reply = sam.predict(payload)
    assert reply.status == 200
    assert mask_of(reply).shape == (120, 160)


def test_repeat_click_hits_the_embedding_cache_and_gives_the_same_mask(serve):
    model = serve("sam")
    first = model.predict(request())
    second = model.predict(request())
    assert first.json()["embedding_cache"] == "miss"
    assert second.json()["embedding_cache"] == "hit"
    assert np.array_equal(mask_of(first), mask_of(second))
    assert first.json()["scores"] == second.json()["scores"]
    # a different click on the cached image still hits, and answers for that click
    moved = model.predict(request(point_coords=[10, 10]))
    assert moved.json()["embedding_cache"] == "hit"


def test_the_same_file_again_is_not_decoded_again(serve, monkeypatch):
    import sam_handler

    model = serve("sam")
    decoded = []
    real_decode = sam_handler.decode_image
    monkeypatch.setattr(
        sam_handler, "decode_image", lambda *a, **k: decoded.append(1) or real_decode(*a, **k)
    )
    assert model.predict(request()).json()["embedding_cache"] == "miss"
    repeat = model.predict(request(point_coords=[5, 5]))
    assert repeat.json()["embedding_cache"] == "hit" and len(decoded) == 1
    assert mask_of(repeat).shape == (120, 160)  # the size came from the first decode
    outside = model.predict(request(point_coords=[500, 5]))  # validated without decoding too
    assert outside.status == 400 and "outside the 160x120 image" in outside.json()["message"]
    assert len(decoded) == 1


def test_wrapped_and_data_uri_base64_still_decode(sam):
    encoded = b64(IMAGE)
    wrapped = "\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76))
    for image in (wrapped, "data:image/png;base64," + encoded):
        reply = sam.predict({"image": image, "gen_args": {"point_coords": [80, 60]}})
        assert reply.status == 200, reply.body[:200]


def test_cache_is_keyed_by_pixels_not_by_encoding(serve):
    model = serve("sam")
    model.predict(request())
    buffer = io.BytesIO()
    IMAGE.save(buffer, format="PNG", compress_level=1)  # other bytes, same pixels
    assert buffer.getvalue() != image_bytes(IMAGE)
    same_pixels = {"image": b64(buffer.getvalue()), "gen_args": {"point_coords": [80, 60]}}
    assert model.predict(same_pixels).json()["embedding_cache"] == "hit"
    other = {"image": b64(random_image(160, 120, seed=2)), "gen_args": {"point_coords": [8, 6]}}
    assert model.predict(other).json()["embedding_cache"] == "miss"


def test_cache_size_comes_from_the_model_config(serve):
    model = serve("sam", embedding_cache_size=1)
    images = [random_image(64, 48, seed=s) for s in (5, 6)]
    calls = [{"image": b64(img), "gen_args": {"point_coords": [5, 5]}} for img in images]
    assert model.predict(calls[0]).json()["embedding_cache"] == "miss"
    assert model.predict(calls[1]).json()["embedding_cache"] == "miss"  # evicts the first
    assert model.predict(calls[0]).json()["embedding_cache"] == "miss"
    assert model.handler.embedding_cache.capacity == 1


def test_bytes_and_dict_requests_give_the_same_answer(serve):
    model = serve("sam", embedding_cache_size=0)
    as_dict = model.predict(request(), raw=False)
    as_bytes = model.predict(request(), raw=True)
    assert as_dict.status == as_bytes.status == 200
    assert as_dict.json() == as_bytes.json()


def test_several_points_and_labels(sam):
    reply = sam.predict(request(point_coords=[[20, 20], [100, 90]], point_labels=[1, 0]))
    assert reply.status == 200
    reply = sam.predict(request(point_coords=[[20, 20], [100, 90]], point_labels=1))
    assert reply.status == 200  # one label applies to every point


def test_multimask_returns_three_masks_and_mask_index_selects(sam):
    body = sam.predict(request(multimask=True, mask_index=0)).json()
    assert len(body["masks"]) == 3 and body["mask_index"] == 0
    masks = [np.asarray(decode_image(m)) for m in body["masks"]]
    assert np.array_equal(masks[0], np.asarray(decode_image(body["generated_image"])))


def test_dilation_grows_the_mask(sam):
    plain = mask_of(sam.predict(request(mask_index=1, dilate_kernel_size=0)))
    dilated = mask_of(sam.predict(request(mask_index=1, dilate_kernel_size=9)))
    assert plain.any() and not plain.all()  # seeded tiny weights: a partial mask
    assert (dilated >= plain).all() and dilated.sum() > plain.sum()


@pytest.mark.parametrize(
    "gen_args, code",
    [
        ({"point_coords": [160, 10]}, "point_out_of_bounds"),
        ({"point_coords": [-1, 10]}, "point_out_of_bounds"),
        ({"point_coords": [10, 120]}, "point_out_of_bounds"),
        ({"point_coords": [float("inf"), 10]}, "invalid_point"),
        ({"point_coords": [1, 2, 3]}, "invalid_point"),
        ({"point_coords": ["1", 2]}, "invalid_point"),
        ({"point_coords": []}, "invalid_point"),
        ({"point_coords": [[1, 2], [3]]}, "invalid_point"),
        ({"point_coords": [[1, 2]] * 17}, "too_many_points"),
        ({"point_coords": [1, 2], "point_labels": 2}, "invalid_point_labels"),
        ({"point_coords": [1, 2], "point_labels": -1}, "invalid_point_labels"),
        ({"point_coords": [1, 2], "point_labels": [1, 0]}, "invalid_point_labels"),
        ({"point_coords": [1, 2], "point_labels": True}, "invalid_point_labels"),
        ({"point_coords": [1, 2], "dilate_kernel_size": -3}, "out_of_range"),
        ({"point_coords": [1, 2], "dilate_kernel_size": 10_000}, "out_of_range"),
        ({"point_coords": [1, 2], "mask_index": 3}, "out_of_range"),
        ({"point_coords": [1, 2], "multimask": "yes"}, "invalid_field"),
        ({"point_labels": 1}, "missing_field"),
    ],
)
def test_bad_gen_args_are_400_with_a_json_body(sam, gen_args, code):
    reply = sam.predict({"image": b64(IMAGE), "gen_args": gen_args})
    assert reply.status == 400
    assert reply.content_type == "application/json"
    body = reply.json()
    assert body["error"] == code and body["message"]


@pytest.mark.parametrize("coordinate", [b"NaN", b"1e999", b"9" * 400])
def test_non_finite_or_huge_point_sent_as_raw_json_is_a_400(sam, coordinate):
    # Python's json (and so TorchServe's decoding) accepts NaN and reads 1e999 as infinity
    payload = b'{"image": "%s", "gen_args": {"point_coords": [%s, 3]}}' % (
        b64(IMAGE).encode(),
        coordinate,
    )
    reply = sam.predict(payload)
    assert reply.status == 400 and reply.json()["error"] == "invalid_point"


def test_an_image_too_thin_for_sam_is_refused(sam):
    thin = random_image(2100, 1)
    reply = sam.predict({"image": b64(thin), "gen_args": {"point_coords": [5, 0]}})
    assert reply.status == 400 and reply.json()["error"] == "image_aspect_ratio"


@pytest.mark.parametrize(
    "payload, code",
    [
        ({"gen_args": {"point_coords": [1, 1]}}, "missing_field"),
        ({"image": "%%%", "gen_args": {"point_coords": [1, 1]}}, "invalid_base64"),
        ({"image": b64(b"just text"), "gen_args": {"point_coords": [1, 1]}}, "invalid_image"),
        ({"image": b64(IMAGE), "gen_args": "[1, 2]"}, "invalid_field"),
        ({"image": b64(IMAGE), "gen_args": "{oops"}, "invalid_field"),
        (b"[1, 2]", "invalid_request"),
        (b"not json at all", "invalid_json"),
    ],
)
def test_bad_requests_are_400(sam, payload, code):
    reply = sam.predict(payload)
    assert reply.status == 400 and reply.json()["error"] == code


def test_in_a_batch_only_the_bad_request_fails(serve):
    model = serve("sam", batch_size=2)
    code, _, replies = model.predict_batch([request(), {"image": "bad"}])
    assert code == 200
    assert [reply.status for reply in replies] == [200, 400]
    assert replies[1].json()["error"] == "invalid_base64"
    assert "generated_image" in replies[0].json()


def test_weights_come_from_the_tiny_tier(sam):
    assert sam.handler.weights_info["variant"] == "tiny"
    assert sam.handler.decoder.sam.image_encoder.img_size == 128


def test_the_aws_samples_masks_1_is_one_setting_away(serve):
    like_the_sample = serve("sam", default_mask_index=1)
    for point in ([40, 30], [120, 90], [80, 60]):
        body = like_the_sample.predict(request(point_coords=point)).json()
        assert body["mask_index"] == 1  # whatever the scores say
    asked = like_the_sample.predict(request(mask_index=2)).json()
    assert asked["mask_index"] == 2  # the request still decides when it says


@pytest.mark.parametrize("value", ["1", 3, True, "first"])
def test_a_wrong_default_mask_index_stops_the_model_at_load(serve, value):
    with pytest.raises(Exception, match="default_mask_index"):
        serve("sam", default_mask_index=value)
