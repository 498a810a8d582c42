"""Segment Anything: a click (or a few) on an image -> an object mask.

Request  {"image": b64, "gen_args": {"point_coords": [x, y] | [[x, y], ...],
          "point_labels": 1 | [1, 0, ...], "dilate_kernel_size": 0, "mask_index": 0-2,
          "multimask": false}}   (gen_args may also be a JSON string, as the AWS sample sends)
Response {"generated_image": b64 PNG (0/255, one channel, input size), "scores": [3 floats],
          "mask_index": k, "embedding_cache": "hit" | "miss", "masks": [3 x b64] if multimask}
Without mask_index, the mask is the highest-scoring of the three, or `default_mask_index` in
model-config.yaml (1 is the AWS sample's masks[1]).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from mmekit_common import (
    EditHandler,
    HandlerContext,
    LruCache,
    RequestError,
    decode_base64,
    decode_image,
    dilate_mask,
    encode_image,
    mask_to_image,
    read_bool,
    read_int,
    read_json_object,
    require,
)
from mmekit_models import load_sam


class SamHandler(EditHandler):
    # Request/result types live inside the class: TorchServe wants exactly one class per
    # handler module.

    @dataclass
    class Request:
        image: np.ndarray | None  # H x W x 3 uint8, RGB; None when `embedding` is known
        image_key: str  # SHA-256 of the decoded pixels: the embedding cache's key
        image_size: tuple[int, int]  # (height, width)
        embedding: object | None  # SamHandler.Embedding from the cache, taken at decode
        point_coords: np.ndarray  # N x 2 float, (x, y) in input pixels
        point_labels: np.ndarray  # N int, 1 foreground / 0 background
        dilate_kernel_size: int
        mask_index: int | None
        multimask: bool

    @dataclass
    class Result:
        masks: np.ndarray  # 3 x H x W bool
        scores: list[float]
        mask_index: int
        cache_hit: bool
        multimask: bool

    @dataclass
    class Embedding:
        """What SamPredictor.set_image computes: all the decoder needs to answer more clicks."""

        features: object
        original_size: tuple[int, int]
        input_size: tuple[int, int]

    def load(self, config: HandlerContext) -> None:
        from segment_anything import SamPredictor

        sam, self.weights_info = load_sam(config.path("weights_dir", "weights"), config.device)
        self.predictor = SamPredictor(sam)
        self.embedding_cache = LruCache(config.setting("embedding_cache_size", 8))
        # the same file again (a repeat click) -> its pixel key and size, without decoding it
        self.known_files = LruCache(4 * int(config.setting("embedding_cache_size", 8)))
        self.max_points = int(config.setting("max_points", 16))
        self.max_dilate_kernel_size = int(config.setting("max_dilate_kernel_size", 255))
        self.default_mask_index = read_default_mask_index(config.setting("default_mask_index"))

    # -- decode -----------------------------------------------------------------------------
    def decode(self, payload: dict) -> SamHandler.Request:
        data = decode_base64(require(payload, "image"), "image")
        image, image_key, image_size, embedding = self._read_image(data)
        gen_args = read_json_object(payload.get("gen_args"), "gen_args")
        if "point_coords" not in gen_args:
            raise RequestError(
                "missing_field", "gen_args needs 'point_coords': [x, y] or [[x, y], ...]"
            )
        point_coords = _read_points(gen_args["point_coords"], self.max_points)
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
                gen_args, "dilate_kernel_size", 0, 0, self.max_dilate_kernel_size
            ),
            mask_index=None if mask_index is None else read_int(gen_args, "mask_index", 0, 0, 2),
            multimask=read_bool(gen_args, "multimask", False),
        )

    def _read_image(self, data: bytes) -> tuple[np.ndarray | None, str, tuple[int, int], object]:
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
        cache_hit = self._set_image(request)
        masks, scores, _ = self.predictor.predict(
            point_coords=request.point_coords,
            point_labels=request.point_labels,
            multimask_output=True,
        )
        index = request.mask_index
        if index is None:
            index = self.default_mask_index
        if index is None:
            index = int(np.argmax(scores))
        wanted = range(len(masks)) if request.multimask else [index]
        masks = masks.copy()
        for k in wanted:
            masks[k] = dilate_mask(masks[k], request.dilate_kernel_size)
        return self.Result(
            masks=masks,
            scores=[float(score) for score in scores],
            mask_index=index,
            cache_hit=cache_hit,
            multimask=request.multimask,
        )

    def _set_image(self, request: SamHandler.Request) -> bool:
        """Point the predictor at the image, from the embedding cache when it has seen it."""
        key = request.image_key
        cached = request.embedding or self.embedding_cache.get(key)
        if cached is not None:
            self.embedding_cache.put(key, cached)  # most recently used again
            self.predictor.features = cached.features
            self.predictor.original_size = cached.original_size
            self.predictor.input_size = cached.input_size
            self.predictor.is_image_set = True
            return True
        self.predictor.set_image(request.image)
        self.embedding_cache.put(
            key,
            self.Embedding(
                self.predictor.features, self.predictor.original_size, self.predictor.input_size
            ),
        )
        return False

    # -- encode -----------------------------------------------------------------------------
    def encode(self, result: SamHandler.Result) -> dict:
        response = {
            # masks are long runs of 0 and 255: zlib level 1 is ~4x faster and as small
            "generated_image": encode_image(
                mask_to_image(result.masks[result.mask_index]), png_level=1
            ),
            "scores": result.scores,
            "mask_index": result.mask_index,
            "embedding_cache": "hit" if result.cache_hit else "miss",
        }
        if result.multimask:
            response["masks"] = [
                encode_image(mask_to_image(mask), png_level=1) for mask in result.masks
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
