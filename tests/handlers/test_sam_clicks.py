"""Interactive clicks: the image sent once (image_id), only the returned mask upsampled, and the
fast decoder against segment-anything's own SamPredictor. Counts calls, never time."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
import torch

from tests.support import b64, decode_image, random_image

IMAGE = random_image(160, 120, seed=21)
OTHER = random_image(160, 120, seed=22)


def click(image=IMAGE, **gen_args) -> dict:
    return {"image": b64(image), "gen_args": {"point_coords": [80, 60], **gen_args}}


def by_id(image_id: str, **gen_args) -> dict:
    return {"image_id": image_id, "gen_args": {"point_coords": [80, 60], **gen_args}}


def pixels(encoded: str) -> np.ndarray:
    return np.asarray(decode_image(encoded))


@pytest.fixture
def threads_restored():
    """cpu_threads changes the whole process's torch threads: put them back afterwards."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_the_response_names_the_image_and_a_later_click_can_send_just_that(serve, monkeypatch):
    model = serve("sam")
    first = model.predict(click()).json()
    assert re.fullmatch(r"[0-9a-f]{64}", first["image_id"]) and first["embedding_cache"] == "miss"
    reads = []
    real_read = model.handler._read_image
    monkeypatch.setattr(
        model.handler, "_read_image", lambda data: reads.append(1) or real_read(data)
    )
    again = model.predict(by_id(first["image_id"]))
    assert again.status == 200, again.body
    body = again.json()
    # no upload to decode and nothing to hash: the id is the cache key
    assert reads == [] and body["embedding_cache"] == "hit"
    assert body["image_id"] == first["image_id"]
    assert np.array_equal(pixels(body["generated_image"]), pixels(first["generated_image"]))
    assert body["scores"] == first["scores"]
    moved = model.predict(by_id(first["image_id"], point_coords=[500, 5]))
    assert moved.status == 400 and "outside the 160x120 image" in moved.json()["message"]


@pytest.mark.parametrize(
    "gen_args",
    [
        {"point_coords": [20, 30]},
        {"point_coords": [[20, 30], [120, 90]], "point_labels": [1, 0]},
        {"point_coords": [70, 50], "dilate_kernel_size": 9},
        {"point_coords": [70, 50], "multimask": True},
        {"point_coords": [70, 50], "mask_index": 2},
    ],
)
def test_masks_are_identical_with_the_image_or_its_id(serve, gen_args):
    model = serve("sam")
    with_image = model.predict(click(**gen_args)).json()
    with_id = model.predict(by_id(with_image["image_id"], **gen_args)).json()
    for field in ("mask_index", "scores", "image_id"):
        assert with_id[field] == with_image[field]
    assert np.array_equal(pixels(with_id["generated_image"]), pixels(with_image["generated_image"]))
    for ours, theirs in zip(with_id.get("masks", []), with_image.get("masks", []), strict=True):
        assert np.array_equal(pixels(ours), pixels(theirs))


def test_an_unknown_id_asks_for_the_image_again(sam):
    reply = sam.predict(by_id("0" * 64))
    assert reply.status == 400
    assert reply.json()["error"] == "unknown_image_id"
    assert "send the image again" in reply.json()["message"]


def test_an_evicted_id_is_unknown_and_resending_the_image_brings_it_back(serve):
    model = serve("sam", embedding_cache_size=1)
    first_id = model.predict(click(IMAGE)).json()["image_id"]
    model.predict(click(OTHER))  # the cache holds one embedding: IMAGE's is evicted
    evicted = model.predict(by_id(first_id))
    assert evicted.status == 400 and evicted.json()["error"] == "unknown_image_id"
    resent = model.predict(click(IMAGE)).json()
    assert resent["image_id"] == first_id  # the id is the pixels' hash: stable across resends
    assert model.predict(by_id(first_id)).json()["embedding_cache"] == "hit"


def test_without_a_cache_no_id_is_ever_known(serve):
    model = serve("sam", embedding_cache_size=0)
    image_id = model.predict(click()).json()["image_id"]
    assert model.predict(by_id(image_id)).json()["error"] == "unknown_image_id"


def test_an_id_and_an_image_together_are_refused(sam):
    image_id = sam.predict(click()).json()["image_id"]
    reply = sam.predict({**click(), "image_id": image_id})
    assert reply.status == 400 and reply.json()["error"] == "conflicting_fields"


@pytest.mark.parametrize("image_id", ["xyz", "A" * 64, "0" * 63, "0" * 65, 12, ["0" * 64], ""])
def test_a_malformed_id_is_a_400_naming_the_field(sam, image_id):
    reply = sam.predict({"image_id": image_id, "gen_args": {"point_coords": [1, 1]}})
    assert reply.status == 400 and reply.json()["error"] == "invalid_image_id"
    assert "image_id" in reply.json()["message"]


def test_neither_image_nor_id_says_which_fields_work(sam):
    reply = sam.predict({"gen_args": {"point_coords": [1, 1]}})
    assert reply.status == 400 and reply.json()["error"] == "missing_field"
    assert "'image'" in reply.json()["message"] and "image_id" in reply.json()["message"]


@pytest.mark.parametrize(("multimask", "upsampled"), [(False, 1), (True, 3)])
def test_only_the_returned_masks_are_upsampled(serve, monkeypatch, multimask, upsampled):
    model = serve("sam")
    calls = []
    real_upscale = model.handler.decoder.upscale
    monkeypatch.setattr(
        model.handler.decoder, "upscale", lambda *a: calls.append(1) or real_upscale(*a)
    )
    body = model.predict(click(multimask=multimask)).json()
    assert len(calls) == upsampled
    assert len(body["scores"]) == 3  # every mask is still scored
    assert len(body.get("masks", [])) == (3 if multimask else 0)


@pytest.mark.parametrize(
    "points", [[[80, 60]], [[20, 30], [140, 100]], [[5, 5], [60, 70], [150, 10]]]
)
def test_the_click_decoder_matches_segment_anythings_predictor(sam, points):
    """Same weights, same clicks: the fast decoder's logits, scores and masks are
    SamPredictor's up to float rounding."""
    from segment_anything import SamPredictor

    decoder = sam.handler.decoder
    image = np.asarray(IMAGE)
    labels = np.array([1] + [0] * (len(points) - 1))
    coords = np.asarray(points, dtype=np.float64)
    predictor = SamPredictor(decoder.sam)
    predictor.set_image(image)
    masks, scores, low_res = predictor.predict(coords, labels, multimask_output=True)
    prepared = decoder.encode(image)
    assert torch.equal(prepared.features, predictor.features)  # the same encoder path
    logits, our_scores = decoder.predict(prepared, coords, labels)
    reference = torch.as_tensor(low_res)
    assert torch.allclose(logits, reference, rtol=1e-4, atol=1e-4 * float(reference.abs().max()))
    assert np.allclose(our_scores.numpy(), scores, atol=1e-5)
    for index in range(3):
        ours = decoder.upscale(logits[index], prepared)
        # a pixel whose logit sits within rounding of the threshold may fall either way
        assert (ours != masks[index]).mean() < 1e-4


# ---------------------------------------------------------------------------------------------
# Precision and threads: knobs in model-config.yaml, read strictly at load


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_a_reduced_precision_encoder_is_cuda_only_so_the_cpu_runs_float32(serve, dtype):
    model = serve("sam", cuda_dtype=dtype)
    assert next(model.handler.decoder.sam.image_encoder.parameters()).dtype == torch.float32
    assert model.predict(click()).status == 200


@pytest.mark.parametrize(
    ("model", "value"), [("sam", "float64"), ("sam", "half"), ("sd", "int8"), ("lama", "float16")]
)
def test_an_unsupported_cuda_dtype_stops_the_model_at_load(serve, model, value):
    with pytest.raises(ValueError, match="cuda_dtype"):
        serve(model, cuda_dtype=value)


@pytest.mark.usefixtures("threads_restored")
def test_cpu_threads_sets_the_workers_intra_op_threads(serve):
    torch.set_num_threads(2)
    serve("sam", cpu_threads=1)
    assert torch.get_num_threads() == 1
    serve("sam", cpu_threads=10_000)  # at most every core
    assert torch.get_num_threads() == (os.cpu_count() or 1)
    torch.set_num_threads(1)
    serve("sam", cpu_threads="share")  # the server's split (OMP_NUM_THREADS) stays
    assert torch.get_num_threads() == 1


@pytest.mark.usefixtures("threads_restored")
@pytest.mark.parametrize("value", [0, -1, "all", 1.5, True])
def test_a_wrong_cpu_threads_stops_the_model_at_load(serve, value):
    with pytest.raises(ValueError, match="cpu_threads"):
        serve("lama", cpu_threads=value)


# ---------------------------------------------------------------------------------------------
# mask_bits: a 1-bit PNG for interactive clients, the same mask once converted


@pytest.mark.parametrize("multimask", [False, True])
def test_a_1_bit_mask_is_the_8_bit_mask(sam, multimask):
    eight = sam.predict(click(multimask=multimask)).json()
    one = sam.predict(click(multimask=multimask, mask_bits=1)).json()
    image = decode_image(one["generated_image"])
    assert image.mode == "1"  # a PNG of bit depth 1, one channel
    assert np.array_equal(np.asarray(image.convert("L")), pixels(eight["generated_image"]))
    for ours, theirs in zip(one.get("masks", []), eight.get("masks", []), strict=True):
        assert np.array_equal(np.asarray(decode_image(ours).convert("L")), pixels(theirs))


@pytest.mark.parametrize("value", [0, 2, 16, "1", True, 1.0])
def test_other_mask_bits_are_a_400(sam, value):
    reply = sam.predict(click(mask_bits=value))
    assert reply.status == 400 and "mask_bits" in reply.json()["message"]
