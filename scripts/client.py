"""The editing flow from a terminal: click → mask, erase, replace, against any target.

    mmekit [--target local|mme|sagemaker] segment IMAGE --point X,Y [--label 1] -o mask.png
    mmekit erase IMAGE (--mask MASK | --point X,Y ...) -o erased.png
    mmekit replace IMAGE (--mask MASK | --point X,Y ...) --prompt TEXT [--seed N] -o out.png

(`mmekit` is `python -m scripts.client`; `make edit ARGS="..."` runs it too.)

Targets differ only in transport: `local` is TorchServe's inference API (the running
`make serve-local` or `make dev`, from its record in .mmekit/servers/; or MMEKIT_TOKEN), `mme`
the local multi-model endpoint (`make serve-mme`) and `sagemaker` a real endpoint (name and
region from promotion.json, or --endpoint/--region), both through boto3's sagemaker-runtime
with a TargetModel.

`mmekit segment` remembers the image_id SAM answers (in .mmekit/image-ids.json, the last 32,
by target and the bytes sent): run again on the same file, it sends only the id and the clicks,
and the image itself only if the target no longer holds that id.

Exit codes: 0 done, 2 the request cannot be sent as given (e.g. over SageMaker's 6 MB body;
--max-side N downscales and the result comes back at the original size), 3 the target is not
reachable, 4 the model refused the request (its message is shown), 5 the target failed.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import math
import os
import re
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmekit_limits import SAGEMAKER_PAYLOAD_BYTES
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

from . import PROJECT_ROOT
from .cli import tool_parser
from .targets import (
    PROMOTION_FILE,
    CannotSend,
    EditError,
    Target,
    TargetFailed,
    make_target,
)

MAX_BODY_BYTES = SAGEMAKER_PAYLOAD_BYTES  # enforced before sending, for every target
SEND_FORMATS = {"PNG", "JPEG", "WEBP"}  # sent as the file's own bytes when not resized
IMAGE_ID = re.compile(r"[0-9a-f]{64}")  # SAM's image_id: SHA-256 of the pixels it decoded
UNKNOWN_IMAGE_ID = "unknown_image_id"  # SAM no longer holds the id: send the image again
IMAGE_IDS_FILE = PROJECT_ROOT / ".mmekit" / "image-ids.json"
IMAGE_IDS_KEPT = 32  # image_ids `mmekit segment` remembers (the most recent ones)


# ---------------------------------------------------------------------------------------------
# Images: what is sent, and what comes back at the original size


@dataclass
class Picture:
    """An input image as sent: its bytes (the file's own when possible) and its scale."""

    original: Image.Image  # RGB, EXIF orientation applied
    sent: Image.Image
    data: bytes  # the encoded bytes that are base64'd into the request

    @property
    def scale(self) -> float:
        """sent size / original size (1.0 when not downscaled)."""
        return self.sent.width / self.original.width


def open_image(source: Path | bytes, what: str = "image") -> tuple[Image.Image, bytes, str]:
    """(RGB image with EXIF orientation applied, the raw bytes, the format)."""
    raw = source if isinstance(source, bytes) else read_file(source, what)
    try:
        with Image.open(io.BytesIO(raw)) as opened:
            image_format = opened.format or ""
            image = ImageOps.exif_transpose(opened).convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
        raise CannotSend(f"{what}: not an image Pillow can read ({error})") from None
    return image, raw, image_format


def read_file(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise CannotSend(f"{what} {path}: {error.strerror or error}") from None


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def prepare(source: Path | bytes, max_side: int | None = None) -> Picture:
    image, raw, image_format = open_image(source)
    sent = image
    if max_side and max(image.size) > max_side:
        ratio = max_side / max(image.size)
        size = (max(1, round(image.width * ratio)), max(1, round(image.height * ratio)))
        sent = image.resize(size, Image.Resampling.LANCZOS)
    # the file's own bytes keep a JPEG small; re-encode only when resized or EXIF-rotated
    as_is = sent is image and image_format in SEND_FORMATS and not has_orientation(raw)
    return Picture(image, sent, raw if as_is else png_bytes(sent))


def has_orientation(raw: bytes) -> bool:
    with Image.open(io.BytesIO(raw)) as opened:
        return opened.getexif().get(0x0112, 1) != 1


def to_sent_size(mask: Image.Image, picture: Picture) -> Image.Image:
    if mask.size == picture.sent.size:
        return mask
    return mask.resize(picture.sent.size, Image.Resampling.NEAREST)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def encode_request(payload: dict, picture: Picture) -> bytes:
    """The JSON body, refused before sending when over SageMaker's limit."""
    body = json.dumps(payload).encode()
    if len(body) > MAX_BODY_BYTES:
        side = max(picture.sent.size)
        suggestion = max(256, int(side * math.sqrt(MAX_BODY_BYTES / len(body)) * 0.9))
        raise CannotSend(
            f"the request would be {len(body):,} bytes, over SageMaker's {MAX_BODY_BYTES:,}-byte "
            f"limit ({picture.sent.width}x{picture.sent.height} image): pass --max-side "
            f"{suggestion} to downscale it; the result comes back at the original size"
        )
    return body


def decode_image(reply: dict) -> Image.Image:
    try:
        return Image.open(io.BytesIO(base64.b64decode(reply["generated_image"])))
    except (ValueError, UnidentifiedImageError) as error:
        raise TargetFailed(f"the reply's image cannot be read ({error})") from None


def at_original_size(result: Image.Image, mask: Image.Image, picture: Picture) -> Image.Image:
    """A result computed on a downscaled copy, back at the original size: the edited region
    upscaled, every other pixel the original's own."""
    if picture.scale == 1.0:
        return result
    upscaled = result.convert("RGB").resize(picture.original.size, Image.Resampling.LANCZOS)
    region = mask.convert("L").resize(picture.original.size, Image.Resampling.NEAREST)
    grow = 2 * math.ceil(2 / picture.scale) + 1  # cover the server's dilation and resampling
    region = region.point(lambda value: 255 if value else 0).filter(ImageFilter.MaxFilter(grow))
    combined = picture.original.copy()
    combined.paste(upscaled, mask=region)
    return combined


# ---------------------------------------------------------------------------------------------
# The three edits


def parse_point(text: str) -> tuple[float, float]:
    try:
        x, y = (float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a point is X,Y (pixels)") from None
    return x, y


def segment(
    target: Target,
    picture: Picture,
    points: Sequence[tuple[float, float]],
    labels: Sequence[int] = (),
    dilate: int = 0,
    image_id: str | None = None,
) -> tuple[Image.Image, dict]:
    """SAM: the mask (at the original size) for clicks given in original pixels, and the rest of
    the reply (its `image_id` names the picture for the next click)."""
    reply = segment_reply(target, picture, points, labels, dilate, image_id)
    return to_original_size(decode_image(reply), picture), reply_info(reply)


def segment_reply(
    target: Target,
    picture: Picture,
    points: Sequence[tuple[float, float]],
    labels: Sequence[int] = (),
    dilate: int = 0,
    image_id: str | None = None,
) -> dict:
    """SAM's reply for clicks given in original pixels. With `image_id` (from an earlier reply
    for this picture) only the id is sent; a target that no longer holds it (evicted,
    restarted, another instance) is sent the picture instead, once."""
    if not points:
        raise CannotSend("give at least one --point X,Y on the object")
    labels = list(labels) or [1] * len(points)
    if len(labels) not in (1, len(points)):
        raise CannotSend(f"{len(labels)} --label for {len(points)} --point: one per point")
    gen_args = {
        "point_coords": [[x * picture.scale, y * picture.scale] for x, y in points],
        "point_labels": labels if len(labels) > 1 else labels[0],
        "dilate_kernel_size": max(0, round(dilate * picture.scale)),
        # this client only ever reads the mask as > 0: a 1-bit PNG is half the encode (a
        # handler from before mask_bits ignores it and sends 0/255 in 8 bits, which works too)
        "mask_bits": 1,
    }
    if image_id is not None:
        try:
            return target.invoke(
                "sam", json.dumps({"image_id": image_id, "gen_args": gen_args}).encode()
            )
        except EditError as error:
            if error.code != UNKNOWN_IMAGE_ID:
                raise
    payload = {"image": b64(picture.data), "gen_args": gen_args}
    return target.invoke("sam", encode_request(payload, picture))


def to_original_size(mask: Image.Image, picture: Picture) -> Image.Image:
    """SAM's mask (the sent picture's size) at the original size, one channel: to_sent_size's
    way back."""
    mask = mask.convert("L")
    if picture.scale != 1.0:
        mask = mask.resize(picture.original.size, Image.Resampling.NEAREST)
    return mask


def reply_info(reply: dict) -> dict:
    """Everything in a reply but the image: scores, cache state, image_id..."""
    return {key: value for key, value in reply.items() if key != "generated_image"}


def image_id_of(reply: dict) -> str | None:
    """The image_id a SAM reply names its image with, if it names it with a well-formed one."""
    image_id = reply.get("image_id")
    return image_id if isinstance(image_id, str) and IMAGE_ID.fullmatch(image_id) else None


# The image_ids `mmekit segment` was answered, so that running it again on the same file sends
# only the id: keyed by the target and the SHA-256 of the very bytes that would be sent (which
# covers the file, --max-side and EXIF rotation at once).


@dataclass
class ImageIds:
    """A small JSON file of the last IMAGE_IDS_KEPT image_ids, most recent last. Only a cache:
    a missing or unreadable file is an empty one, and one that cannot be written is skipped."""

    path: Path
    capacity: int = IMAGE_IDS_KEPT

    @staticmethod
    def key(target: Target, picture: Picture) -> str:
        return f"{target.describe()} {hashlib.sha256(picture.data).hexdigest()}"

    def get(self, key: str) -> str | None:
        return self.read().get(key)

    def put(self, key: str, image_id: str) -> None:
        entries = self.read()
        entries.pop(key, None)  # most recent last: the oldest go first
        entries[key] = image_id
        kept = dict(list(entries.items())[-self.capacity :])
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            partial = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
            partial.write_text(json.dumps(kept, indent=1) + "\n")
            partial.replace(self.path)  # a reader never sees half a file
        except OSError:
            pass  # a read-only project: the next run sends the image, as it would anyway

    def read(self) -> dict[str, str]:
        try:
            entries = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(entries, dict):
            return {}
        return {
            key: value
            for key, value in entries.items()
            if isinstance(value, str) and IMAGE_ID.fullmatch(value)
        }


def segment_remembered(
    target: Target,
    picture: Picture,
    points: Sequence[tuple[float, float]],
    labels: Sequence[int],
    dilate: int,
    image_ids: ImageIds,
) -> tuple[Image.Image, dict]:
    """segment() with the image_id this target gave for the same bytes last time, if any."""
    key = image_ids.key(target, picture)
    mask, info = segment(target, picture, points, labels, dilate, image_ids.get(key))
    answered = image_id_of(info)
    if answered is not None:
        image_ids.put(key, answered)
    return mask, info


def mask_of(
    target: Target,
    picture: Picture,
    mask: Path | bytes | None,
    points: Sequence[tuple[float, float]],
    labels: Sequence[int],
) -> Image.Image:
    """The mask to edit: the given file, or SAM's for the clicks (at the original size)."""
    if mask is not None and points:
        raise CannotSend("give --mask or --point, not both")
    if mask is not None:
        image, _, _ = open_image(mask, "mask")
        if image.size != picture.original.size:
            raise CannotSend(
                f"the mask is {image.width}x{image.height} but the image is "
                f"{picture.original.width}x{picture.original.height}: they must match"
            )
        return image.convert("L")
    return segment(target, picture, points, labels)[0]


def erase(target: Target, picture: Picture, mask: Image.Image, dilate: int = 15) -> Image.Image:
    """LaMa: the masked object removed."""
    payload = {
        "image": b64(picture.data),
        "mask_image": b64(png_bytes(to_sent_size(mask, picture))),
        "dilate_kernel_size": max(0, round(dilate * picture.scale)),
    }
    reply = target.invoke("lama", encode_request(payload, picture))
    return at_original_size(decode_image(reply), mask, picture)


def replace(
    target: Target,
    picture: Picture,
    mask: Image.Image,
    prompt: str,
    negative_prompt: str = "",
    seed: int | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    dilate: int = 15,
) -> tuple[Image.Image, int | None]:
    """SD2 inpainting: the masked object replaced by what the prompt says. Returns the seed."""
    if not prompt.strip():
        raise CannotSend("--prompt says what should be there instead")
    # what is not given is left to the model: its defaults live in its model-config.yaml
    given = {"num_inference_steps": steps, "guidance_scale": guidance, "seed": seed}
    gen_args: dict[str, Any] = {name: value for name, value in given.items() if value is not None}
    payload = {
        "image": b64(picture.data),
        "mask_image": b64(png_bytes(to_sent_size(mask, picture))),
        "prompt": prompt,
        "negative_prompt": negative_prompt,
        "dilate_kernel_size": max(0, round(dilate * picture.scale)),
        "gen_args": gen_args,
    }
    reply = target.invoke("sd", encode_request(payload, picture))
    return at_original_size(decode_image(reply), mask, picture), reply.get("seed")


# ---------------------------------------------------------------------------------------------
# Command line


@contextmanager
def progress(label: str) -> Iterator[None]:
    """Seconds ticking on a terminal while a slow call runs (SD: tens of seconds on a GPU)."""
    if not sys.stderr.isatty():
        yield
        return
    done = threading.Event()
    started = time.monotonic()

    def tick() -> None:
        spinner = "|/-\\"
        for step in range(10**6):  # bounded; ends with the call
            if done.wait(0.2):
                break
            elapsed = time.monotonic() - started
            sys.stderr.write(f"\r{label} {spinner[step % 4]} {elapsed:.0f} s ")
            sys.stderr.flush()
        sys.stderr.write("\r" + " " * (len(label) + 12) + "\r")

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(timeout=2)


def save(image: Image.Image, output: Path) -> None:
    try:
        image.save(output)
    except (OSError, ValueError) as error:
        raise CannotSend(f"cannot write {output}: {error}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = tool_parser("mmekit", __doc__)
    parser.add_argument(
        "--target",
        choices=("local", "mme", "sagemaker"),
        default=os.environ.get("MMEKIT_TARGET") or "local",
        help="where the models run (MMEKIT_TARGET; default local)",
    )
    parser.add_argument("--url", help="local: TorchServe's inference URL; mme: the emulator's")
    parser.add_argument("--endpoint", help="mme/sagemaker: endpoint name")
    parser.add_argument("--region", help="sagemaker: AWS region")
    parser.add_argument("--promotion", type=Path, default=PROMOTION_FILE, help=argparse.SUPPRESS)
    parser.add_argument("--image-ids", type=Path, default=IMAGE_IDS_FILE, help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True)

    def common(sub: argparse.ArgumentParser, with_mask: bool) -> None:
        sub.add_argument("image", type=Path)
        sub.add_argument("-o", "--output", type=Path, required=True)
        sub.add_argument(
            "--point", type=parse_point, action="append", default=[], metavar="X,Y",
            help="a click on the object, in pixels (repeatable)",
        )  # fmt: skip
        sub.add_argument(
            "--label", type=int, choices=(0, 1), action="append", default=[],
            help="1 foreground, 0 background: one per --point, or one for all",
        )  # fmt: skip
        sub.add_argument(
            "--max-side", type=int, default=None, metavar="N",
            help="downscale so the long side is N pixels (results come back at the original size)",
        )  # fmt: skip
        if with_mask:
            sub.add_argument("--mask", type=Path, help="a mask file instead of clicks")
            sub.add_argument("--dilate", type=int, default=15, help="grow the mask (pixels)")
        else:
            sub.add_argument("--dilate", type=int, default=0, help="grow the mask (pixels)")

    common(commands.add_parser("segment", help="clicks -> a mask (SAM)"), with_mask=False)
    common(commands.add_parser("erase", help="remove the object (SAM, then LaMa)"), True)
    replace_parser = commands.add_parser("replace", help="replace it (SAM, then SD2 inpainting)")
    common(replace_parser, with_mask=True)
    replace_parser.add_argument("--prompt", required=True)
    replace_parser.add_argument("--negative", default="", help="what should not be there")
    replace_parser.add_argument("--seed", type=int, default=None)
    replace_parser.add_argument(
        "--steps", type=int, default=None, help="denoising steps (default: the model's)"
    )
    replace_parser.add_argument(
        "--guidance", type=float, default=None, help="guidance scale (default: the model's)"
    )
    return parser


def run(args: argparse.Namespace) -> str:
    target = make_target(args.target, args.url, args.endpoint, args.region, args.promotion)
    picture = prepare(args.image, args.max_side)
    if args.command == "segment":
        image_ids = ImageIds(args.image_ids)
        mask, info = segment_remembered(
            target, picture, args.point, args.label, args.dilate, image_ids
        )
        save(mask, args.output)
        return f"wrote {args.output} (mask {mask.width}x{mask.height}) {json.dumps(info)}"
    with progress("segmenting"):
        mask = mask_of(target, picture, args.mask, args.point, args.label)
    if args.command == "erase":
        with progress("erasing"):
            result = erase(target, picture, mask, args.dilate)
        save(result, args.output)
        return f"wrote {args.output} ({result.width}x{result.height})"
    with progress("replacing"):
        result, seed = replace(
            target, picture, mask, args.prompt, args.negative, args.seed, args.steps,
            args.guidance, args.dilate,
        )  # fmt: skip
    save(result, args.output)
    return f"wrote {args.output} ({result.width}x{result.height}, seed {seed})"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        print(run(args))
        return 0
    except EditError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code


if __name__ == "__main__":
    sys.exit(main())
