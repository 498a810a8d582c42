"""Segment Anything: a click (or a few) on an image -> an object mask.

Request  {"image": b64 | "image_id": id from an earlier response,
          "gen_args": {"point_coords": [x, y] | [[x, y], ...], "point_labels": 1 | [1, 0, ...],
          "dilate_kernel_size": 0, "mask_index": 0-2, "multimask": false, "mask_bits": 8}}
          (gen_args may also be a JSON string, as the AWS sample sends)
Response {"generated_image": b64 PNG (0/255, one channel, input size), "scores": [3 floats],
          "mask_index": k, "embedding_cache": "hit" | "miss", "image_id": id,
          "masks": [3 x b64] if multimask}
Without mask_index, the mask is the highest-scoring of the three, or `default_mask_index` in
model-config.yaml (1 is the AWS sample's masks[1]). "mask_bits": 1 asks for 1-bit PNGs: the
same 0/255 mask once converted (Pillow opens it in mode "1"), about half the encode time; the
editor asks for them.

`image_id` names the image's embedding in this worker's cache: a later click may send it
instead of the image (no upload, decode or hash). The cache is per worker and bounded, so an
id can be unknown (evicted, restarted, another instance of an endpoint): that is a 400
`unknown_image_id`, and the client sends the image again.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import numpy as np
import torch
from sam_decoder import ClickDecoder, PreparedImage

from mmekit_common import (
    EditHandler,
    HandlerContext,
    LruCache,
    RequestError,
    decode_base64,
    decode_image,
    dilate_mask,
    encode_mask,
    read_bool,
    read_cuda_dtype,
    read_int,
    read_json_object,
    read_settings,
    run_dtype,
)
from mmekit_models import load_sam

IMAGE_ID = re.compile(r"[0-9a-f]{64}")  # the SHA-256 of the decoded pixels, as hex


class SamHandler(EditHandler):
    # Request/result types live inside the class: TorchServe wants exactly one class per
    # handler module.

    @dataclass(frozen=True)
    class Settings:
        """SAM's knobs under `handler:` in model-config.yaml, their one source (no defaults
        here)."""

        embedding_cache_size: int  # image embeddings kept for repeat clicks (LRU); 0: none
        max_points: int
        max_dilate_kernel_size: int
        default_mask_index: str | int  # best, or 0-2 (read_default_mask_index)

        def check(self) -> None:
            if self.max_points < 1:
                raise ValueError("setting max_points must be at least 1")
            if self.embedding_cache_size < 0:  # 0: no cache (every click encodes)
                raise ValueError("setting embedding_cache_size must be 0 or more")

    @dataclass
    class Request:
        image: np.ndarray | None  # H x W x 3 uint8, RGB; None when `embedding` is known
        image_key: str  # SHA-256 of the decoded pixels: the embedding cache's key, the image_id
        image_size: tuple[int, int]  # (height, width)
        embedding: PreparedImage | None  # from the cache, taken at decode
        point_coords: np.ndarray  # N x 2 float, (x, y) in input pixels
        point_labels: np.ndarray  # N int, 1 foreground / 0 background
        dilate_kernel_size: int
        mask_index: int | None
        multimask: bool
        mask_bits: int  # the PNG's bit depth: 8 (0/255) or 1

    @dataclass
    class Result:
        masks: dict[int, np.ndarray]  # mask number -> H x W bool: only the ones returned
        scores: list[float]
        mask_index: int
        cache_hit: bool
        multimask: bool
        image_id: str
        mask_bits: int

    def load(self, config: HandlerContext) -> None:
        self.settings = read_settings(self.Settings, config.settings)
        # the image encoder is SAM's cost and memory; the decoder stays float32 everywhere
        encoder_dtype = run_dtype(config.device, read_cuda_dtype(config.settings, "float32"))
        sam, self.weights_info = load_sam(config.path("weights_dir", "weights"), config.device)
        self.decoder = ClickDecoder(sam, encoder_dtype)
        self.embedding_cache = LruCache(self.settings.embedding_cache_size)
        # the same file again (a repeat click) -> its pixel key and size, without decoding it
        self.known_files = LruCache(4 * self.settings.embedding_cache_size)
        self.default_mask_index = read_default_mask_index(self.settings.default_mask_index)

    # -- decode -----------------------------------------------------------------------------
    def decode(self, payload: dict) -> SamHandler.Request:
        if payload.get("image_id") is not None:
            if payload.get("image") is not None:
                raise RequestError(
                    "conflicting_fields",
                    "send either 'image' or 'image_id' (from an earlier response), not both",
                )
            image, image_key, image_size, embedding = self._known_image(payload["image_id"])
        elif payload.get("image") is not None:
            data = decode_base64(payload["image"], "image")
            image, image_key, image_size, embedding = self._read_image(data)
        else:
            raise RequestError(
                "missing_field",
                "the request needs the field 'image' (or 'image_id' from an earlier response)",
            )
        gen_args = read_json_object(payload.get("gen_args"), "gen_args")
        if "point_coords" not in gen_args:
            raise RequestError(
                "missing_field", "gen_args needs 'point_coords': [x, y] or [[x, y], ...]"
            )
        point_coords = _read_points(gen_args["point_coords"], self.settings.max_points)
        point_labels = _read_labels(gen_args.get("point_labels", 1), len(point_coords))
        mask_index = gen_args.get("mask_index")
        return self.Request(
            image=image,
            image_key=image_key,
            image_size=image_size,
            embedding=embedding,
            point_coords=point_coords,
            point_labels=point_labels,
            dilate_kernel_size=read_int(
                gen_args, "dilate_kernel_size", 0, 0, self.settings.max_dilate_kernel_size
            ),
            mask_index=None if mask_index is None else read_int(gen_args, "mask_index", 0, 0, 2),
            multimask=read_bool(gen_args, "multimask", False),
            mask_bits=_read_mask_bits(gen_args),
        )

    def _known_image(self, image_id: object) -> tuple[None, str, tuple[int, int], PreparedImage]:
        """An image_id from an earlier response -> its cached embedding: nothing to upload,
        decode or hash. An id this worker no longer holds is the client's cue to resend."""
        if not isinstance(image_id, str) or not IMAGE_ID.fullmatch(image_id):
            raise RequestError(
                "invalid_image_id",
                "'image_id' must be the 64-character hex id an earlier SAM response returned",
            )
        embedding = self.embedding_cache.get(image_id)
        if embedding is None:
            raise RequestError(
                "unknown_image_id",
                f"image_id {image_id[:12]}... is not in this server's embedding cache (evicted, "
                "restarted, or answered by another instance): send the image again",
            )
        return None, image_id, embedding.original_size, embedding

    def _read_image(
        self, data: bytes
    ) -> tuple[np.ndarray | None, str, tuple[int, int], PreparedImage | None]:
        """Pixels (or the cached embedding), their key and size. A file seen before whose
        embedding is still cached is not decoded again: a repeat click costs a hash of the
        bytes, not an image decode."""
        file_key = hashlib.sha256(data).hexdigest()
        known = self.known_files.get(file_key)
        if known is not None:
            embedding = self.embedding_cache.get(known[0])
            if embedding is not None:
                return None, known[0], known[1], embedding
        image = np.asarray(decode_image(data, "image", self.image_limits))
        image_key = hashlib.sha256(
            np.ascontiguousarray(image).tobytes() + repr(image.shape).encode()
        ).hexdigest()
        self.known_files.put(file_key, (image_key, image.shape[:2]))
        return image, image_key, image.shape[:2], self.embedding_cache.get(image_key)

    # -- validate ---------------------------------------------------------------------------
    def validate(self, request: SamHandler.Request) -> None:
        height, width = request.image_size
        if not np.isfinite(request.point_coords).all():
            raise RequestError("invalid_point", "point_coords must be finite numbers")
        xs, ys = request.point_coords[:, 0], request.point_coords[:, 1]
        outside = (xs < 0) | (xs >= width) | (ys < 0) | (ys >= height)
        if outside.any():
            x, y = request.point_coords[int(np.argmax(outside))]
            raise RequestError(
                "point_out_of_bounds",
                f"point ({x:g}, {y:g}) is outside the {width}x{height} image: "
                f"x must be in [0, {width}) and y in [0, {height})",
            )

    # -- infer ------------------------------------------------------------------------------
    def infer(self, request: SamHandler.Request) -> SamHandler.Result:
        embedding, cache_hit = self._embedding(request)
        tokens, scores = self.decoder.predict_tokens(
            embedding, request.point_coords, request.point_labels
        )
        index = request.mask_index
        if index is None:
            index = self.default_mask_index
        if index is None:
            index = int(torch.argmax(scores))
        # only the masks the response carries are computed and upsampled to full size
        wanted = [0, 1, 2] if request.multimask else [index]
        logits = self.decoder.mask_logits(embedding, tokens, wanted)
        masks = {
            k: dilate_mask(self.decoder.upscale(mask, embedding), request.dilate_kernel_size)
            for k, mask in zip(wanted, logits, strict=True)
        }
        return self.Result(
            masks=masks,
            scores=[float(score) for score in scores],
            mask_index=index,
            cache_hit=cache_hit,
            multimask=request.multimask,
            image_id=request.image_key,
            mask_bits=request.mask_bits,
        )

    def _embedding(self, request: SamHandler.Request) -> tuple[PreparedImage, bool]:
        """The image's prepared embedding, from the cache when it has seen the image."""
        key = request.image_key
        cached = request.embedding or self.embedding_cache.get(key)
        if cached is not None:
            self.embedding_cache.put(key, cached)  # most recently used again
            return cached, True
        embedding = self.decoder.encode(request.image)
        self.embedding_cache.put(key, embedding)
        return embedding, False

    # -- encode -----------------------------------------------------------------------------
    def encode(self, result: SamHandler.Result) -> dict:
        response = {
            "generated_image": encode_mask(result.masks[result.mask_index], result.mask_bits),
            "scores": result.scores,
            "mask_index": result.mask_index,
            "embedding_cache": "hit" if result.cache_hit else "miss",
            "image_id": result.image_id,
        }
        if result.multimask:
            response["masks"] = [
                encode_mask(result.masks[k], result.mask_bits) for k in sorted(result.masks)
            ]
        return response


def read_default_mask_index(value: object) -> int | None:
    """`default_mask_index`: best (or absent): the highest predicted IoU; 0-2: that mask always
    (the AWS sample returns masks[1]). Anything else stops the model at load."""
    if value is None or value == "best":
        return None
    if type(value) is int and 0 <= value <= 2:
        return value
    raise ValueError(f"setting default_mask_index={value!r}: use best, 0, 1 or 2")


def _read_mask_bits(gen_args: dict) -> int:
    """mask_bits: 8 (the default: 0/255 in 8 bits) or 1 (a 1-bit PNG)."""
    value = gen_args.get("mask_bits", 8)
    if value is None:
        return 8
    if type(value) is not int or value not in (1, 8):
        raise RequestError("invalid_field", "'mask_bits' must be 8 (0/255) or 1 (a 1-bit PNG)")
    return value


def _read_points(value: object, max_points: int) -> np.ndarray:
    """[x, y] or [[x, y], ...] -> N x 2 float array (values checked in validate)."""
    usage = "point_coords must be [x, y] or a list of [x, y] pairs"
    if not isinstance(value, list) or not value:
        raise RequestError("invalid_point", usage)
    pairs = value if isinstance(value[0], list) else [value]
    if len(pairs) > max_points:
        raise RequestError(
            "too_many_points", f"{len(pairs)} points given; the limit is {max_points}"
        )
    for pair in pairs:
        if (
            not isinstance(pair, list)
            or len(pair) != 2
            or any(isinstance(c, bool) or not isinstance(c, (int, float)) for c in pair)
        ):
            raise RequestError("invalid_point", usage)
    try:
        return np.asarray(pairs, dtype=np.float64)
    except OverflowError:  # an integer beyond float range
        raise RequestError("invalid_point", "point_coords must be finite numbers") from None


def _read_labels(value: object, count: int) -> np.ndarray:
    """point_labels: one int for every point, or a list with one per point; each 0 or 1."""
    labels = value if isinstance(value, list) else [value] * count
    if len(labels) != count:
        raise RequestError(
            "invalid_point_labels",
            f"point_labels has {len(labels)} entries but point_coords has {count} points",
        )
    if any(label not in (0, 1) or isinstance(label, (bool, float)) for label in labels):
        raise RequestError(
            "invalid_point_labels", "point_labels must be 1 (foreground) or 0 (background)"
        )
    return np.asarray(labels, dtype=np.int64)
