"""Malformed input over HTTP: a corpus of bad requests against the real TorchServe (`local_server`).

Every malformed request must be answered with a 4xx JSON error (a handler's 400
{"error", "message"}, or the frontend's 413 for a body over max_request_size), never a 5xx, and
without a worker restarting; afterwards each model still serves a good request. Inputs that are
unusual but valid (EXIF-rotated JPEG, 16-bit and palette PNG, grayscale, RGBA, CMYK, 1x1, 20:1)
are served with 200 and the contract's sizes.

The corpus is data: CORPUS is a list of Case(model, id, body, ...), built from small generated
images (no files, no downloads). Cases whose 5xx is a known handler bug carry `known_bug`: they
run as strict xfails, so the figures count the 5xx and the marker must go when the fix lands.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import time
import zlib
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import psutil
import pytest
import requests
from mmekit_limits import SAGEMAKER_PAYLOAD_BYTES
from PIL import Image

from tests.servers import Server
from tests.support import box_mask, image_bytes, random_image

BODY_LIMIT = SAGEMAKER_PAYLOAD_BYTES  # max_request_size in the local profile
WIDTH, HEIGHT = 64, 48
DROP = object()  # an override that removes the field


class Case(NamedTuple):
    model: str
    id: str
    body: bytes
    status: tuple[int, ...] = (400,)  # what an answer may be
    code: str | None = None  # the handler's error code, when it must be this one
    content_type: str = "application/json"
    known_bug: str | None = None  # a 5xx today: the handler fix is in the reason


# --------------------------------------------------------------------------------------------
# Images and bytes


def encode(data: bytes | Image.Image, image_format: str = "PNG", **options: object) -> str:
    if isinstance(data, Image.Image):
        buffer = io.BytesIO()
        data.save(buffer, format=image_format, **options)
        data = buffer.getvalue()
    return base64.b64encode(data).decode("ascii")


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def raw_png(width: int, height: int, depth: int, color: int, rows: bytes, *extra: bytes) -> bytes:
    """A PNG written by hand: IHDR, extra chunks, one IDAT of `rows` (filter bytes included)."""
    header = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + b"".join(extra)
        + png_chunk(b"IDAT", zlib.compress(rows, 9))
        + png_chunk(b"IEND", b"")
    )


def png_claiming(width: int, height: int) -> bytes:
    """A 1x1 grayscale PNG whose header claims width x height: nothing behind it."""
    return raw_png(1, 1, 8, 0, b"\x00\x00").replace(
        png_chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)),
        png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)),
    )


def png_zlib_bomb(width: int = 6500, height: int = 4000) -> bytes:
    """A real PNG of 26 M zero pixels (over the 25.2 M limit) in ~26 KB."""
    return raw_png(width, height, 8, 0, bytes((width + 1) * height))


def png_text_bomb() -> bytes:
    """A valid 4x4 PNG with a zTXt chunk that inflates to 16 MB (Pillow caps text at 1 MB)."""
    text = b"Comment\x00\x00" + zlib.compress(b"a" * (16 << 20), 9)
    return raw_png(4, 4, 8, 0, bytes(5 * 4), png_chunk(b"zTXt", text))


def png_16bit(width: int, height: int, gray: bool) -> tuple[bytes, np.ndarray]:
    """A 16-bit PNG (grayscale or RGB) of a ramp, and its 16-bit pixels."""
    channels = 1 if gray else 3
    values = np.linspace(0, 65535, width * height * channels).astype(">u2")
    pixels = values.reshape(height, width * channels)
    rows = b"".join(b"\x00" + row.tobytes() for row in pixels)
    data = raw_png(width, height, 16, 0 if gray else 2, rows)
    return data, pixels.astype(np.uint16).reshape(height, width, channels)


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small baseline JPEG whose SOF0 frame header claims width x height."""
    data = bytearray(image_bytes(random_image(16, 16, seed=3), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def webp_claiming(width: int, height: int) -> bytes:
    """An extended (VP8X) WebP whose canvas claims width x height around a 16x16 image."""
    inner = image_bytes(random_image(16, 16, seed=3), "WEBP")[12:]  # the VP8 chunk
    vp8x = b"VP8X" + struct.pack("<I", 10) + bytes(4)
    vp8x += (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    body = b"WEBP" + vp8x + inner
    return b"RIFF" + struct.pack("<I", len(body)) + body


def tiff_ifd(*entries: tuple[int, int, int, bytes]) -> bytes:
    """A little-endian TIFF block with one IFD; each value fits in its 4-byte slot."""
    out = b"II*\x00" + struct.pack("<IH", 8, len(entries))
    for tag, kind, count, value in entries:
        out += struct.pack("<HHI", tag, kind, count) + value.ljust(4, b"\x00")
    return out + struct.pack("<I", 0)


def with_exif(image: Image.Image, orientation: int, image_format: str = "JPEG") -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, exif=exif)
    return buffer.getvalue()


def with_broken_exif(image: Image.Image, image_format: str) -> bytes:
    """Orientation 6 next to an XResolution stored as text instead of a rational: Pillow reads
    it, and its exif_transpose then fails re-serialising the block (TypeError)."""
    block = b"Exif\x00\x00" + tiff_ifd(
        (0x0112, 3, 1, struct.pack("<H", 6)),  # Orientation SHORT 6
        (0x011A, 2, 4, b"abc\x00"),  # XResolution as ASCII
    )
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, exif=block)
    return buffer.getvalue()


IMAGE = random_image(WIDTH, HEIGHT, seed=11)
MASK = box_mask(WIDTH, HEIGHT, (20, 12, 44, 36))
IMAGE_B64 = encode(IMAGE)
MASK_B64 = encode(MASK)

GOOD = {
    "sam": {"image": IMAGE_B64, "gen_args": {"point_coords": [32, 24], "point_labels": 1}},
    "lama": {"image": IMAGE_B64, "mask_image": MASK_B64},
    "sd": {
        "image": IMAGE_B64,
        "mask_image": MASK_B64,
        "prompt": "a small vase",
        "gen_args": {"seed": 1, "num_inference_steps": 1, "guidance_scale": 7.5},
    },
}


def body(model: str, **overrides: object) -> bytes:
    """The model's good request with fields replaced (DROP removes one), as JSON bytes."""
    payload = json.loads(json.dumps(GOOD[model]))
    for name, value in overrides.items():
        if value is DROP:
            payload.pop(name, None)
        else:
            payload[name] = value
    return json.dumps(payload).encode()


def gen(model: str, **gen_args: object) -> bytes:
    """The model's good request with gen_args fields replaced."""
    return body(model, gen_args={**GOOD[model]["gen_args"], **gen_args})


def raw_gen(model: str, field: str, literal: bytes) -> bytes:
    """gen_args[field] as a raw JSON literal that json.dumps would not write (NaN, 1e400, ...)."""
    marker = "__raw__"
    return gen(model, **{field: marker}).replace(json.dumps(marker).encode(), literal)


def at_size(model: str, size: int) -> bytes:
    """A request of exactly `size` bytes whose image is '%' padding (not base64)."""
    template = body(model, image="")
    return template.replace(b'"image": ""', b'"image": "' + b"%" * (size - len(template)) + b'"')


def exif_case_image() -> Image.Image:
    return random_image(40, 20, seed=12)  # stored 40x20; orientation 6 displays it 20x40


def noise_jpeg(width: int = 1600, height: int = 1200) -> str:
    """~1.5 MB of JPEG whose PNG response (~7.7 MB as base64) exceeds SageMaker's 6 MB (asked
    for explicitly: by default a JPEG in gets a JPEG that fits)."""
    return encode(random_image(width, height, seed=8), "JPEG", quality=75)


# --------------------------------------------------------------------------------------------
# The corpus


def build_corpus() -> list[Case]:
    m = "sam", "lama", "sd"
    sam, lama, sd = m
    good_json = {model: body(model) for model in m}
    urlsafe = base64.urlsafe_b64encode(image_bytes(IMAGE)).decode()
    assert "-" in urlsafe or "_" in urlsafe
    # base64 whose length is not a multiple of 4 once its padding is stripped
    padded = next(e for h in range(8, 20) if (e := encode(random_image(8, h))).endswith("="))
    unpadded = padded.rstrip("=")
    broken_crc = bytearray(image_bytes(IMAGE))
    idat = broken_crc.index(b"IDAT")
    broken_crc[idat + 8] ^= 0xFF
    exif_raw = exif_case_image()
    exif_jpeg = encode(with_exif(exif_raw, 6))
    rotated_mask = encode(with_exif(box_mask(WIDTH, HEIGHT, (1, 1, 9, 9)).convert("RGB"), 6))
    noise = noise_jpeg()
    empty_large_mask = encode(box_mask(1600, 1200, (0, 0, 0, 0)))

    def c(model, id_, data, status=(400,), code=None, **kw) -> Case:
        return Case(model, id_, data, status, code, **kw)

    return [
        # -- not a JSON object --------------------------------------------------------------
        c(sam, "not-json", b"not json at all", code="invalid_json"),
        c(lama, "truncated-json", good_json[lama][:-7], code="invalid_json"),
        c(sd, "utf16-json", json.dumps(GOOD[sd]).encode("utf-16"), code="invalid_json"),
        c(sam, "latin1-bytes", b'{"image": "\xff\xfe"}', code="invalid_json"),
        c(lama, "utf8-bom", b"\xef\xbb\xbf" + good_json[lama], code="invalid_json"),
        c(sd, "json-array", b"[1, 2, 3]", code="invalid_request"),
        c(sam, "json-string", b'"image"', code="invalid_request"),
        c(lama, "json-null", b"null", code="invalid_request"),
        c(sd, "json-number", b"42", code="invalid_request"),
        c(sam, "empty-body", b"", code="invalid_json"),
        c(lama, "whitespace-body", b" \n\t ", code="invalid_json"),
        c(sd, "nested-200k", b"[" * 100_000 + b"]" * 100_000, code="invalid_json"),
        c(sam, "number-5000-digits", b'{"image": ' + b"9" * 5000 + b"}", code="invalid_json"),
        c(lama, "nan-image", b'{"image": NaN, "mask_image": NaN}', code="invalid_field"),
        c(
            sd,
            "form-encoded",
            good_json[sd],
            code="empty_request",
            content_type="application/x-www-form-urlencoded",
        ),
        c(
            sam,
            "text-plain-garbage",
            b"\x00\x01\x02",
            code="invalid_json",
            content_type="text/plain",
        ),
        # -- base64 --------------------------------------------------------------------------
        c(sam, "b64-bad-padding", body(sam, image="abc"), code="invalid_base64"),
        c(lama, "b64-urlsafe-alphabet", body(lama, image=urlsafe), code="invalid_base64"),
        c(sd, "b64-padding-stripped", body(sd, image=unpadded), code="invalid_base64"),
        c(sam, "b64-empty", body(sam, image=""), code="invalid_base64"),
        c(lama, "b64-whitespace-only", body(lama, image=" \r\n\t "), code="invalid_base64"),
        c(sd, "b64-data-uri-only", body(sd, image="data:image/png;base64,"), code="invalid_base64"),
        c(sam, "b64-non-ascii", body(sam, image="ÿÿÿÿ" + IMAGE_B64), code="invalid_base64"),
        c(
            lama,
            "b64-lone-surrogate",
            body(lama, image="\ud800" + IMAGE_B64),
            code="invalid_base64",
        ),
        c(
            sd,
            "b64-nul-inside",
            body(sd, image=IMAGE_B64[:8] + "\x00" + IMAGE_B64[8:]),
            code="invalid_base64",
        ),
        c(
            sam,
            "b64-html-data-uri",
            body(sam, image="data:text/html,<b>x</b>"),
            code="invalid_base64",
        ),
        c(lama, "b64-padding-midway", body(lama, image="QQ==" + IMAGE_B64), code="invalid_base64"),
        c(sd, "b64-of-text", body(sd, image=encode(b"hello, not an image")), code="invalid_image"),
        c(sam, "image-number", body(sam, image=12345), code="invalid_field"),
        c(lama, "image-list", body(lama, image=[IMAGE_B64]), code="invalid_field"),
        c(sd, "image-object", body(sd, image={"b64": IMAGE_B64}), code="invalid_field"),
        c(sam, "image-null", body(sam, image=None), code="missing_field"),
        c(lama, "mask-missing", body(lama, mask_image=DROP), code="missing_field"),
        # -- formats, bombs and sizes ---------------------------------------------------------
        c(
            sam,
            "png-claims-100000x100000",
            body(sam, image=encode(png_claiming(100_000, 100_000))),
            code="image_too_large",
        ),
        c(
            lama,
            "png-zlib-bomb-26mpx",
            body(lama, image=encode(png_zlib_bomb())),
            code="image_too_large",
        ),
        c(
            sd,
            "jpeg-claims-65500x65500",
            body(sd, image=encode(jpeg_claiming(65500, 65500))),
            code="image_too_large",
        ),
        c(
            sam,
            "webp-claims-16384x16384",
            body(sam, image=encode(webp_claiming(16384, 16384))),
            code="image_too_large",
        ),
        c(
            lama,
            "mask-png-claims-huge",
            body(lama, mask_image=encode(png_claiming(60_000, 60_000))),
            code="image_too_large",
        ),
        c(sd, "png-ztxt-bomb", body(sd, image=encode(png_text_bomb())), code="invalid_image"),
        c(
            sam,
            "png-6145x4096-1bit",  # one column over max_image_pixels (6144 x 4096)
            body(sam, image=encode(Image.new("1", (6145, 4096)))),
            code="image_too_large",
        ),
        c(lama, "png-0x0", body(lama, image=encode(png_claiming(0, 0))), code="invalid_image"),
        c(
            sd,
            "png-truncated",
            body(sd, image=encode(image_bytes(IMAGE)[:300])),
            code="invalid_image",
        ),
        c(
            sam,
            "png-idat-crc-broken",
            body(sam, image=encode(bytes(broken_crc))),
            code="invalid_image",
        ),
        c(
            lama,
            "aspect-1x21",
            body(
                lama,
                image=encode(random_image(1, 21)),
                mask_image=encode(box_mask(1, 21, (0, 0, 1, 1))),
            ),
            code="image_aspect_ratio",
        ),
        c(sd, "gif", body(sd, image=encode(IMAGE.convert("P"), "GIF")), code="invalid_image"),
        c(sam, "bmp", body(sam, image=encode(IMAGE, "BMP")), code="invalid_image"),
        c(lama, "tiff", body(lama, image=encode(IMAGE, "TIFF")), code="invalid_image"),
        c(
            sd,
            "svg-text",
            body(sd, image=encode(b"<svg xmlns='http://www.w3.org/2000/svg'/>")),
            code="invalid_image",
        ),
        c(
            lama,
            "response-too-large",
            body(lama, image=noise, mask_image=empty_large_mask, format="png"),
            code="response_too_large",
        ),
        c(
            sd,
            "response-too-large",
            body(sd, image=noise, mask_image=empty_large_mask, format="png"),
            code="response_too_large",
        ),
        # -- EXIF ------------------------------------------------------------------------------
        c(
            sam,
            "exif-point-outside-displayed",
            json.dumps({"image": exif_jpeg, "gen_args": {"point_coords": [30, 5]}}).encode(),
            code="point_out_of_bounds",
        ),
        c(
            lama,
            "exif-mask-of-stored-size",
            json.dumps(
                {"image": exif_jpeg, "mask_image": encode(box_mask(40, 20, (1, 1, 5, 5)))}
            ).encode(),
            code="mask_size_mismatch",
        ),
        c(sd, "exif-rotated-mask", body(sd, mask_image=rotated_mask), code="mask_size_mismatch"),
        c(
            sam,
            "exif-mistyped-tag-jpeg",
            body(sam, image=encode(with_broken_exif(IMAGE, "JPEG"))),
            status=(200, 400),
        ),
        c(
            lama,
            "exif-mistyped-tag-png",
            body(lama, image=encode(with_broken_exif(IMAGE, "PNG"))),
            status=(200, 400),
        ),
        # -- masks -------------------------------------------------------------------------------
        c(
            lama,
            "mask-transposed",
            body(lama, mask_image=encode(box_mask(HEIGHT, WIDTH, (0, 0, 4, 4)))),
            code="mask_size_mismatch",
        ),
        c(
            sd,
            "mask-one-px-narrower",
            body(sd, mask_image=encode(box_mask(WIDTH - 1, HEIGHT, (0, 0, 4, 4)))),
            code="mask_size_mismatch",
        ),
        c(
            lama,
            "mask-not-an-image",
            body(lama, mask_image=encode(b"\x00" * 64)),
            code="invalid_image",
        ),
        c(sd, "mask-bad-base64", body(sd, mask_image="mask!"), code="invalid_base64"),
        c(
            lama,
            "mask-gif",
            body(lama, mask_image=encode(MASK.convert("P"), "GIF")),
            code="invalid_image",
        ),
        c(sd, "mask-number", body(sd, mask_image=0), code="invalid_field"),
        # -- SAM prompts -----------------------------------------------------------------------
        c(sam, "point-object", gen(sam, point_coords={"x": 1, "y": 2}), code="invalid_point"),
        c(sam, "point-3-deep", gen(sam, point_coords=[[[1, 2]]]), code="invalid_point"),
        c(sam, "point-string", gen(sam, point_coords="[1, 2]"), code="invalid_point"),
        c(sam, "point-null", gen(sam, point_coords=None), code="invalid_point"),
        c(sam, "point-bool", gen(sam, point_coords=[True, 1]), code="invalid_point"),
        c(sam, "point-mixed-pairs", gen(sam, point_coords=[[1, 2], 3]), code="invalid_point"),
        c(
            sam,
            "point-at-width-height",
            gen(sam, point_coords=[WIDTH, HEIGHT]),
            code="point_out_of_bounds",
        ),
        c(sam, "point-1e308", gen(sam, point_coords=[1e308, 1]), code="point_out_of_bounds"),
        c(
            sam,
            "point-minus-infinity",
            raw_gen(sam, "point_coords", b"[-Infinity, 1]"),
            code="invalid_point",
        ),
        c(sam, "point-1000-points", gen(sam, point_coords=[[1, 1]] * 1000), code="too_many_points"),
        c(sam, "labels-string", gen(sam, point_labels="1"), code="invalid_point_labels"),
        c(sam, "labels-null", gen(sam, point_labels=None), code="invalid_point_labels"),
        c(sam, "labels-float", gen(sam, point_labels=1.0), code="invalid_point_labels"),
        c(sam, "labels-nested", gen(sam, point_labels=[[1]]), code="invalid_point_labels"),
        c(
            sam,
            "labels-too-few",
            gen(sam, point_coords=[[1, 1], [2, 2]], point_labels=[1]),
            code="invalid_point_labels",
        ),
        c(sam, "mask-index-negative", gen(sam, mask_index=-1), code="out_of_range"),
        c(sam, "mask-index-string", gen(sam, mask_index="1"), code="invalid_field"),
        c(sam, "mask-index-fraction", gen(sam, mask_index=1.5), code="invalid_field"),
        c(sam, "multimask-int", gen(sam, multimask=1), code="invalid_field"),
        c(sam, "dilate-256", gen(sam, dilate_kernel_size=256), code="out_of_range"),
        c(sam, "gen-args-missing", body(sam, gen_args=DROP), code="missing_field"),
        c(sam, "gen-args-list", body(sam, gen_args=[32, 24]), code="invalid_field"),
        c(
            sam,
            "gen-args-double-encoded",
            body(sam, gen_args=json.dumps(json.dumps(GOOD[sam]["gen_args"]))),
            code="invalid_field",
        ),
        c(
            sam,
            "gen-args-string-nested-100k",
            body(sam, gen_args="[" * 100_000),
            code="invalid_field",
        ),
        # -- diffusion parameters ------------------------------------------------------------
        c(sd, "steps-101", gen(sd, num_inference_steps=101), code="out_of_range"),
        c(sd, "steps-1e9", gen(sd, num_inference_steps=10**9), code="out_of_range"),
        c(sd, "steps-negative", gen(sd, num_inference_steps=-5), code="out_of_range"),
        c(sd, "steps-fraction", gen(sd, num_inference_steps=2.5), code="invalid_field"),
        c(sd, "steps-bool", gen(sd, num_inference_steps=True), code="invalid_field"),
        c(sd, "steps-string", gen(sd, num_inference_steps="30"), code="invalid_field"),
        c(sd, "steps-1e400", raw_gen(sd, "num_inference_steps", b"1e400"), code="invalid_field"),
        c(sd, "guidance-above-30", gen(sd, guidance_scale=30.000001), code="out_of_range"),
        c(sd, "guidance-1e400", raw_gen(sd, "guidance_scale", b"1e400"), code="invalid_field"),
        c(
            sd,
            "guidance-minus-infinity",
            raw_gen(sd, "guidance_scale", b"-Infinity"),
            code="invalid_field",
        ),
        c(sd, "guidance-string", gen(sd, guidance_scale="7.5"), code="invalid_field"),
        c(sd, "seed-2**64", gen(sd, seed=2**64), code="out_of_range"),
        c(sd, "seed-1e20", gen(sd, seed=1e20), code="out_of_range"),
        c(sd, "seed-fraction", gen(sd, seed=-0.5), code="invalid_field"),
        c(sd, "seed-400-digits", gen(sd, seed=10**400), code="out_of_range"),
        c(sd, "gen-args-unquoted-keys", body(sd, gen_args="{seed: 1}"), code="invalid_field"),
        c(sd, "prompt-missing", body(sd, prompt=DROP), code="missing_field"),
        c(sd, "prompt-list", body(sd, prompt=["a", "vase"]), code="invalid_field"),
        c(sd, "prompt-2001-chars", body(sd, prompt="v" * 2001), code="too_long"),
        c(sd, "prompt-90-tokens", body(sd, prompt=" ".join(["cat"] * 90)), code="prompt_too_long"),
        c(sd, "negative-prompt-number", body(sd, negative_prompt=7), code="invalid_field"),
        c(
            sd,
            "prompt-lone-surrogate",
            body(sd, prompt="a vase \ud800"),
            code="invalid_field",
        ),
        c(
            sd,
            "negative-prompt-lone-surrogate",
            body(sd, negative_prompt="\udfff"),
            code="invalid_field",
        ),
        c(sd, "dilate-1e6", body(sd, dilate_kernel_size=10**6), code="out_of_range"),
        c(lama, "dilate-fraction", body(lama, dilate_kernel_size=2.5), code="invalid_field"),
        c(lama, "dilate-bool", body(lama, dilate_kernel_size=True), code="invalid_field"),
        c(lama, "format-list", body(lama, format=["png"]), code="invalid_field"),
        c(lama, "format-jpeg2000", body(lama, format="jpeg2000"), code="invalid_field"),
        # -- the 6 MB body limit ------------------------------------------------------------
        c(sam, "at-limit-6291456-bad-image", at_size(sam, BODY_LIMIT), code="invalid_base64"),
        c(lama, "at-limit-6291456-bad-image", at_size(lama, BODY_LIMIT), code="invalid_base64"),
        c(sam, "over-limit-6291457", at_size(sam, BODY_LIMIT + 1), status=(413,)),
        c(lama, "over-limit-6291457", at_size(lama, BODY_LIMIT + 1), status=(413,)),
        c(sd, "over-limit-6291457", at_size(sd, BODY_LIMIT + 1), status=(413,)),
        c(sd, "over-limit-8mb", at_size(sd, 8 << 20), status=(413,)),
    ]


CORPUS = build_corpus()


def corpus_params() -> Iterator[object]:
    for case in CORPUS:
        marks = [pytest.mark.xfail(reason=case.known_bug, strict=True)] if case.known_bug else []
        yield pytest.param(case, id=f"{case.model}-{case.id}", marks=marks)


# --------------------------------------------------------------------------------------------
# Sending


def send(server: Server, model: str, data: bytes, content_type: str) -> requests.Response:
    return server.client.predict(
        model, data, content_type=content_type, token=server.token, timeout=120
    )


def workers(server: Server) -> set[tuple[int, float]]:
    """(pid, start time) of every process under TorchServe's frontend: the model workers."""
    pid = server.runtime.running_pid()
    assert pid is not None, "TorchServe is not running"
    found = set()
    for child in psutil.Process(pid).children(recursive=True):
        try:
            found.add((child.pid, child.create_time()))
        except psutil.NoSuchProcess:
            pass
    return found


warmup_sent = [0]  # requests the baseline needed, added to the figures at the end


@pytest.fixture(scope="module")
def workers_before(local_server: Server) -> set[tuple[int, float]]:
    """The worker processes before the corpus runs (captured once, by its first case), once
    every model answers: a module that ran before may have left a worker restarting."""
    deadline = time.monotonic() + 180
    for model in ("sam", "lama", "sd"):
        while True:
            warmup_sent[0] += 1
            if local_server.predict(model, body(model)).status_code == 200:
                break
            assert time.monotonic() < deadline, f"{model} does not answer a good request"
            time.sleep(1)
    found = workers(local_server)
    assert len(found) >= 3, f"expected a worker per model, found {found}"
    return found


def test_corpus_is_large_and_covers_every_model():
    assert len(CORPUS) >= 60
    assert {case.model for case in CORPUS} == {"sam", "lama", "sd"}
    ids = [(case.model, case.id) for case in CORPUS]
    assert len(ids) == len(set(ids))
    assert len(at_size("sam", BODY_LIMIT)) == BODY_LIMIT
    assert len(at_size("sd", BODY_LIMIT + 1)) == BODY_LIMIT + 1


@pytest.mark.parametrize("case", list(corpus_params()))
def test_malformed_request_is_a_4xx_json_error(
    local_server: Server, workers_before: set, figures, case: Case
):
    reply = send(local_server, case.model, case.body, case.content_type)
    figures.add(inputs_tried=1, requests_sent=1, server_errors=int(reply.status_code >= 500))
    assert reply.status_code in case.status, f"{reply.status_code}: {reply.text[:300]}"
    if reply.status_code == 200:
        return  # a case that may be served (a broken EXIF tag the decoder can ignore)
    if reply.status_code == 413:
        # TorchServe's frontend refuses a body over max_request_size before any handler runs:
        # Netty's bare 413, no body (as tests/serving/test_torchserve.py's boundary test sees)
        assert reply.content == b"" or reply.json()["code"] == 413, reply.text[:300]
        return
    error = reply.json()  # every handler refusal is our JSON error body
    assert reply.headers["content-type"].startswith("application/json")
    assert set(error) == {"error", "message"} and error["message"], error
    if case.code is not None:
        assert error["error"] == case.code, error


# --------------------------------------------------------------------------------------------
# Unusual but valid: served, with the contract's sizes


def lama_body(image: bytes | str, mask: Image.Image | bytes | str, **extra: object) -> bytes:
    image = image if isinstance(image, str) else encode(image)
    mask = mask if isinstance(mask, str) else encode(mask)
    return json.dumps({"image": image, "mask_image": mask, **extra}).encode()


def sam_body(image: bytes | str, point: list[int]) -> bytes:
    image = image if isinstance(image, str) else encode(image)
    return json.dumps({"image": image, "gen_args": {"point_coords": point}}).encode()


def sd_body(image: bytes | str, mask: Image.Image | str) -> bytes:
    payload = json.loads(lama_body(image, mask))
    payload |= {"prompt": "a vase", "gen_args": {"seed": 3, "num_inference_steps": 1}}
    return json.dumps(payload).encode()


def decoded(reply: requests.Response, field: str = "generated_image") -> Image.Image:
    assert reply.status_code == 200, reply.text[:300]
    image = Image.open(io.BytesIO(base64.b64decode(reply.json()[field])))
    image.load()
    return image


def pillow_rgb(data: bytes) -> np.ndarray:
    """What the contract compares with: the input after Pillow's conversion to 8-bit RGB."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_exif_rotated_jpeg_is_served_as_displayed(local_server: Server, figures):
    stored = exif_case_image()  # 40x20 stored, 20x40 displayed
    data = with_exif(stored, 6)
    mask = decoded(local_server.predict("sam", sam_body(data, [15, 35])))  # only valid rotated
    assert mask.size == (20, 40) and mask.mode == "L"
    erased = decoded(local_server.predict("lama", lama_body(data, box_mask(20, 40, (2, 2, 8, 8)))))
    assert erased.size == (20, 40)
    ignored = with_exif(stored, 9)  # not an orientation: the stored pixels as they are
    assert decoded(local_server.predict("sam", sam_body(ignored, [35, 15]))).size == (40, 20)
    figures.add(requests_sent=3)


def test_sixteen_bit_pngs_are_served(local_server: Server, figures):
    gray, _ = png_16bit(WIDTH, HEIGHT, gray=True)
    rgb, _ = png_16bit(WIDTH, HEIGHT, gray=False)
    assert decoded(local_server.predict("sam", sam_body(gray, [5, 5]))).size == (WIDTH, HEIGHT)
    result = np.asarray(decoded(local_server.predict("lama", lama_body(rgb, MASK))))
    outside = ~(np.asarray(MASK) > 0)
    assert np.array_equal(result[outside], pillow_rgb(rgb)[outside])  # exact outside the mask
    sixteen_bit_mask, _ = png_16bit(WIDTH, HEIGHT, gray=True)  # > 0 almost everywhere
    assert decoded(local_server.predict("lama", lama_body(IMAGE, sixteen_bit_mask))).size == (
        WIDTH,
        HEIGHT,
    )
    figures.add(requests_sent=3)


UNUSUAL_MODES = {
    "palette-png": lambda: image_bytes(IMAGE.convert("P")),
    "palette-png-transparency": lambda: encode(IMAGE.convert("P"), "PNG", transparency=0),
    "grayscale-png": lambda: image_bytes(IMAGE.convert("L")),
    "grayscale-alpha-png": lambda: image_bytes(IMAGE.convert("LA")),
    "one-bit-png": lambda: image_bytes(IMAGE.convert("1")),
    "rgba-png": lambda: image_bytes(IMAGE.convert("RGBA")),
    "grayscale-jpeg": lambda: image_bytes(IMAGE.convert("L"), "JPEG"),
    "cmyk-jpeg": lambda: image_bytes(IMAGE.convert("CMYK"), "JPEG"),
    "progressive-jpeg": lambda: encode(IMAGE, "JPEG", progressive=True),
    "rgba-webp-lossless": lambda: encode(IMAGE.convert("RGBA"), "WEBP", lossless=True),
    "data-uri-wrapped": lambda: (
        "data:image/png;base64,\n"
        + "\n".join(IMAGE_B64[i : i + 76] for i in range(0, len(IMAGE_B64), 76))
    ),
}


@pytest.mark.parametrize("name", list(UNUSUAL_MODES))
def test_image_mode_matrix_is_served_at_input_size(local_server: Server, figures, name: str):
    made = UNUSUAL_MODES[name]()
    data = made if isinstance(made, str) else encode(made)
    raw = made if isinstance(made, bytes) else base64.b64decode(data.split(",")[-1])
    mask = decoded(local_server.predict("sam", sam_body(data, [32, 24])))
    assert mask.size == (WIDTH, HEIGHT) and set(np.unique(np.asarray(mask))) <= {0, 255}
    # png: exact pixels show the conversion to RGB (a JPEG in would get a JPEG by default)
    reply = local_server.predict("lama", lama_body(data, MASK_B64, format="png"))
    result = np.asarray(decoded(reply))
    outside = ~(np.asarray(MASK) > 0)
    assert np.array_equal(result[outside], pillow_rgb(raw)[outside])
    figures.add(requests_sent=2)


@pytest.mark.parametrize("size", [(1, 1), (20, 1), (1, 20), (200, 10)])
def test_edge_sizes_are_served_by_every_model(local_server: Server, figures, size):
    image, mask = random_image(*size, seed=4), box_mask(*size, (0, 0, 1, 1))
    assert decoded(local_server.predict("sam", sam_body(image, [0, 0]))).size == size
    assert decoded(local_server.predict("lama", lama_body(image, mask))).size == size
    replaced = local_server.predict("sd", sd_body(encode(image), mask))
    assert decoded(replaced).size == size and replaced.json()["seed"] == 3
    figures.add(requests_sent=3)


def test_json_sent_as_text_plain_or_octet_stream_is_served(local_server: Server, figures):
    for content_type in ("text/plain", "application/octet-stream"):
        reply = send(local_server, "sam", body("sam"), content_type)
        assert reply.status_code == 200, reply.text[:300]
    figures.add(requests_sent=2)


# --------------------------------------------------------------------------------------------
# Afterwards: same workers, still serving


def test_no_worker_restarted_and_every_model_still_serves(
    local_server: Server, workers_before: set, figures
):
    for model in ("sam", "lama", "sd"):
        reply = local_server.predict(model, body(model))
        assert reply.status_code == 200, f"{model}: {reply.status_code} {reply.text[:300]}"
        assert "generated_image" in reply.json()
    figures.add(requests_sent=3 + warmup_sent[0])
    after = workers(local_server)
    assert after == workers_before, f"workers changed: {workers_before} -> {after}"
