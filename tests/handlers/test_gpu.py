"""The handlers on a CUDA device (skipped where there is none): TorchServe passes gpu_id 0."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.support import b64, box_mask, decode_image, random_image

pytestmark = pytest.mark.gpu

IMAGE = random_image(160, 120, seed=11)
MASK = box_mask(160, 120, (40, 30, 90, 80))


def test_sam_runs_on_the_gpu_and_caches_embeddings(serve):
    model = serve("sam", gpu_id=0)
    assert model.handler.decoder.sam.device.type == "cuda"
    request = {"image": b64(IMAGE), "gen_args": {"point_coords": [50, 40]}}
    first, second = model.predict(request), model.predict(request)
    assert [first.status, second.status] == [200, 200]
    assert second.json()["embedding_cache"] == "hit"


def test_sd_runs_in_fp16_on_the_gpu_deterministically(serve):
    model = serve("sd", gpu_id=0)
    assert model.handler.pipeline.unet.dtype == torch.float16
    request = {
        "image": b64(IMAGE),
        "mask_image": b64(MASK),
        "prompt": "a cat",
        "gen_args": {"seed": 3, "num_inference_steps": 2},
    }
    results = [
        np.asarray(decode_image(model.predict(request).json()["generated_image"])) for _ in range(2)
    ]
    assert np.array_equal(results[0], results[1])
    inside = np.asarray(MASK) > 0
    assert np.array_equal(results[0][~inside], np.asarray(IMAGE)[~inside])
    # fp16 overflow shows as NaN, decoded to a flat black patch
    assert results[0][inside].std() > 0 and not np.array_equal(
        results[0][inside], np.asarray(IMAGE)[inside]
    )


def test_lama_runs_on_the_gpu(serve):
    model = serve("lama", gpu_id=0)
    reply = model.predict({"image": b64(IMAGE), "mask_image": b64(MASK)})
    assert reply.status == 200


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_sam_reduced_precision_encoder_masks_stay_close_to_float32(serve, dtype):
    """The stated tolerance for `cuda_dtype` on SAM: masks within IoU 0.9 of float32's
    (mean over clicks) on the same inputs; the decoder stays float32."""
    reduced, full = serve("sam", gpu_id=0, cuda_dtype=dtype), serve("sam", gpu_id=0)
    encoder = reduced.handler.decoder.sam.image_encoder
    assert next(encoder.parameters()).dtype == getattr(torch, dtype)
    ious = []
    for point in ([50, 40], [120, 90], [20, 100], [140, 20]):
        request = {"image": b64(IMAGE), "gen_args": {"point_coords": point, "mask_index": 0}}
        masks = [np.asarray(decode_image(m.predict(request).json()["generated_image"])) > 0
                 for m in (reduced, full)]  # fmt: skip
        union = (masks[0] | masks[1]).sum()
        ious.append(1.0 if union == 0 else (masks[0] & masks[1]).sum() / union)
    assert np.mean(ious) >= 0.9, ious
