"""Model weights in three tiers, laid out as weights/<tier>/<model>/ with a mmekit_model.json.

- tiny: random-initialised tiny configurations of the real architectures; seeded, offline, built
  in seconds. Tests and the no-weights dev loop use these; outputs are meaningless.
- synthetic: the full-size architectures with random weights, for footprint and latency.
- full: the real checkpoints, downloaded and pinned by SHA-256 (`fetch`).

Every tier is saved in the format full weights are served from (safetensors; diffusers
`save_pretrained` for SD) and read back by the handlers' own loaders.

    python -m scripts.weights build --tier tiny
    python -m scripts.weights fetch --sam-variant vit_h
    python -m scripts.weights status
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
import zipfile
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import yaml

from . import PROJECT_ROOT
from .cli import tool_parser
from .models import MODELS, RANDOM_TIERS, TIERS, resolve, spec

if TYPE_CHECKING:
    from torch import Tensor


def handler_models() -> ModuleType:
    """handlers/mmekit_models (the builders and loaders serving uses), imported on first use:
    it imports torch, which the tools that only read names and digests (promote's dry run,
    make iam-policy, the archive manifest) never need."""
    import mmekit_models  # handlers/ is on sys.path (scripts/__init__.py)

    return mmekit_models


DEFAULT_ROOT = PROJECT_ROOT / "weights"
FULL_TIER_PINS = PROJECT_ROOT / "configs" / "weights-full.yaml"
# Bump when a builder changes what it writes, so stale random weights get rebuilt.
BUILD_REVISION = 1


def weights_dir(root: Path, tier: str, model: str) -> Path:
    return Path(root) / tier / model


def read_info(folder: Path) -> dict | None:
    path = folder / handler_models().WEIGHTS_INFO_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def write_info(folder: Path, info: dict) -> None:
    """Write the folder's description; a full-tier one also records the SHA-256 of every file
    written so far, so that it is re-verified before it is trusted (`verify_folder`). Random
    tiers are rebuilt from their seed instead."""
    if info.get("tier") == "full":
        info = {**info, "files": folder_digests(folder)}
    (folder / handler_models().WEIGHTS_INFO_FILE).write_text(
        json.dumps(info, indent=2, sort_keys=True) + "\n"
    )


def save_state_dict(state_dict: dict[str, Tensor], folder: Path) -> None:
    from safetensors.torch import save_file

    tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in state_dict.items()}
    save_file(tensors, str(folder / handler_models().SAFETENSORS_FILE))


class StagedFolder:
    """Write a weights folder next to its final place, then swap it in: a crash mid-build
    never leaves a half-written folder that looks complete."""

    def __init__(self, final: Path) -> None:
        self.final = final
        self.staging = final.with_name(final.name + ".partial")

    def __enter__(self) -> Path:
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir(parents=True)
        return self.staging

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            return
        shutil.rmtree(self.final, ignore_errors=True)
        self.staging.rename(self.final)


def sd_tokenizer(variant: str) -> Any:
    """The tiny variant's tokenizer is generated; real-size ones use CLIP's own vocabulary."""
    if variant == "tiny":
        return handler_models().build_clip_tokenizer()
    from open_clip.tokenizer import default_bpe  # the package data file; no model is loaded

    return handler_models().clip_tokenizer_from_bpe(Path(default_bpe()))


def random_sam(variant: str, seed: int, folder: Path) -> None:
    save_state_dict(handler_models().build_sam(variant).state_dict(), folder)


def random_lama(variant: str, seed: int, folder: Path) -> None:
    save_state_dict(handler_models().build_lama_network(variant).state_dict(), folder)


def random_sd(variant: str, seed: int, folder: Path) -> None:
    pipeline = handler_models().build_sd_pipeline(variant, seed, sd_tokenizer(variant))
    pipeline.save_pretrained(str(folder), safe_serialization=True)


def build_random(model: str, variant: str, tier: str, folder: Path, seed: int = 0) -> Path:
    """A seeded random-initialised model of `variant`, saved as served (by the model's own
    builder, scripts/models.py)."""
    info = {
        "model": model,
        "variant": variant,
        "tier": tier,
        "seed": seed,
        "build_revision": BUILD_REVISION,
        "note": "random weights: outputs are meaningless",
    }
    import torch

    with StagedFolder(folder) as staging:
        torch.manual_seed(seed)
        resolve(spec(model).random_weights)(variant, seed, staging)
        write_info(staging, info)
    return folder


def build_tier(
    tier: str,
    root: Path = DEFAULT_ROOT,
    models: tuple[str, ...] = MODELS,
    force: bool = False,
    variants: dict[str, str] | None = None,
) -> list[Path]:
    """Build the random weights of `tier` (tiny or synthetic); up-to-date folders are kept."""
    if tier not in RANDOM_TIERS:
        raise ValueError(f"{tier} weights are fetched, not built: {', '.join(RANDOM_TIERS)}")
    chosen = {model: spec(model).variant(tier) for model in models} | (variants or {})
    built = []
    for model in models:
        folder = weights_dir(root, tier, model)
        info = read_info(folder)
        current = (
            info is not None
            and info.get("variant") == chosen[model]
            and info.get("build_revision") == BUILD_REVISION
        )
        if force or not current:
            print(f"building {tier} {model} ({chosen[model]}) in {folder}", flush=True)
            build_random(model, chosen[model], tier, folder)
        built.append(folder)
    return built


# ---------------------------------------------------------------------------------------------
# The full tier: pinned downloads, converted once to what serving loads


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Digests of converted folders: what `write_info` recorded is re-checked before a folder is
# trusted, through a cache so that an unchanged multi-gigabyte folder is not re-read every time.

# Beside the model folders, not in them: a model folder is archived whole.
DIGEST_CACHE_FILE = ".digests.json"
# A file modified within the file system's timestamp granularity of being hashed could keep
# its (size, mtime_ns, inode): only digests of files older than this are remembered.
DIGEST_CACHE_MIN_AGE_NS = 2_000_000_000


class WeightsChangedError(ValueError):
    """A weights folder whose files are not the ones recorded when it was written."""


def folder_files(folder: Path) -> list[str]:
    """Every file of `folder` but its description, as sorted relative POSIX paths."""
    return sorted(
        path.relative_to(folder).as_posix()
        for path in folder.rglob("*")
        if path.is_file() and path.name != handler_models().WEIGHTS_INFO_FILE
    )


def folder_digests(folder: Path) -> dict[str, str]:
    return {relative: sha256_of(folder / relative) for relative in folder_files(folder)}


def file_stamp(path: Path) -> list[int]:
    """What must not change for a remembered digest to stand."""
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns, stat.st_ino]


def load_digest_cache(cache_file: Path) -> dict[str, dict]:
    try:
        entries = json.loads(cache_file.read_text())
    except (OSError, ValueError):  # none yet, or unreadable: it is only a cache
        return {}
    return entries if isinstance(entries, dict) else {}


def save_digest_cache(cache_file: Path, entries: dict[str, dict]) -> None:
    kept = {path: entry for path, entry in entries.items() if Path(path).is_file()}
    staging = cache_file.with_name(cache_file.name + ".partial")
    staging.write_text(json.dumps(kept, indent=2, sort_keys=True) + "\n")
    staging.replace(cache_file)  # atomic: a concurrent reader sees the old or the new cache


def cached_sha256(path: Path, entries: dict[str, dict]) -> str:
    """sha256_of(path), unless `entries` holds it for the file's current (size, mtime, inode)."""
    key, stamp = str(path.resolve()), file_stamp(path)
    entry = entries.get(key)
    if isinstance(entry, dict) and entry.get("stamp") == stamp:
        return entry["sha256"]
    digest = sha256_of(path)
    if time.time_ns() - stamp[1] >= DIGEST_CACHE_MIN_AGE_NS:
        entries[key] = {"stamp": stamp, "sha256": digest}
    else:
        entries.pop(key, None)
    return digest


def verify_folder(folder: Path, root: Path) -> None:
    """Raise WeightsChangedError naming the first file of `folder` that differs from the
    SHA-256 its mmekit_model.json recorded (or is missing, or was added since)."""
    info_path = folder / handler_models().WEIGHTS_INFO_FILE
    recorded = (read_info(folder) or {}).get("files")
    if not isinstance(recorded, dict) or not recorded:
        raise WeightsChangedError(f"{info_path} records no file digests to verify the folder by")
    added = sorted(set(folder_files(folder)) - set(recorded))
    if added:
        raise WeightsChangedError(f"{folder / added[0]} is not among the files {info_path} lists")
    cache_file = Path(root) / DIGEST_CACHE_FILE
    entries = load_digest_cache(cache_file)
    try:
        for relative, expected in sorted(recorded.items()):
            path = folder / relative
            if not path.is_file():
                raise WeightsChangedError(f"{path} is missing (listed in {info_path})")
            if cached_sha256(path, entries) != expected:
                raise WeightsChangedError(
                    f"{path} has changed: its SHA-256 is not the one recorded in {info_path}"
                )
    finally:
        save_digest_cache(cache_file, entries)


def load_pins(path: Path = FULL_TIER_PINS) -> dict:
    return yaml.safe_load(Path(path).read_text())


def download(pin: dict, downloads: Path, progress: bool) -> Path:
    from .download import fetch_file

    name = pin["url"].rsplit("/", 1)[-1]
    dest = downloads / f"{pin['sha256'][:12]}-{name}"
    return fetch_file(pin["url"], dest, pin["sha256"], size=pin.get("size"), progress=progress)


def source_info(pin: dict) -> dict:
    return {"url": pin["url"], "sha256": pin["sha256"]}


def fetch_sam(pins: dict, variant: str, folder: Path, downloads: Path, progress: bool) -> None:
    pin = pins[variant]
    checkpoint = download(pin, downloads, progress)
    # Meta's .pth is a plain state dict: weights_only refuses anything but tensors
    import torch

    state_dict = torch.load(checkpoint, map_location="cpu", weights_only=True)
    handler_models().build_sam(variant).load_state_dict(state_dict, strict=True)  # layout check
    with StagedFolder(folder) as staging:
        save_state_dict(state_dict, staging)
        write_info(
            staging,
            {"model": "sam", "variant": variant, "tier": "full", "source": source_info(pin)},
        )


def fetch_lama(pins: dict, variant: str, folder: Path, downloads: Path, progress: bool) -> None:
    from .lama_checkpoint import convert_big_lama_state_dict, load_checkpoint_state_dict

    pin = pins[variant]
    archive = download(pin, downloads, progress)
    checkpoint = downloads / f"{pin['member_sha256'][:12]}-{Path(pin['member']).name}"
    if not checkpoint.is_file() or sha256_of(checkpoint) != pin["member_sha256"]:
        with zipfile.ZipFile(archive) as bundle, bundle.open(pin["member"]) as member:
            with open(checkpoint, "wb") as out:
                shutil.copyfileobj(member, out, 1 << 20)
        if sha256_of(checkpoint) != pin["member_sha256"]:
            checkpoint.unlink()
            raise ValueError(f"{pin['member']} inside {archive.name} does not match its pin")
    state_dict = convert_big_lama_state_dict(load_checkpoint_state_dict(checkpoint), variant)
    with StagedFolder(folder) as staging:
        save_state_dict(state_dict, staging)
        write_info(
            staging,
            {"model": "lama", "variant": variant, "tier": "full", "source": source_info(pin)},
        )


def write_sd_folder(variant: str, tensors: dict[str, Path], folder: Path) -> None:
    """A diffusers folder for `variant` from its component tensors: the configs come from the
    registry and the tokenizer from CLIP's vocabulary, so only tensors are ever downloaded."""
    import diffusers
    from transformers import CLIPTextConfig

    configs = handler_models().SD_VARIANTS[variant]
    tokenizer = sd_tokenizer(variant)

    def write_json(relative: str, content: dict) -> None:
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")

    version = diffusers.__version__
    write_json(
        "unet/config.json",
        {"_class_name": "UNet2DConditionModel", "_diffusers_version": version, **configs["unet"]},
    )
    write_json(
        "vae/config.json",
        {"_class_name": "AutoencoderKL", "_diffusers_version": version, **configs["vae"]},
    )
    write_json(
        "scheduler/scheduler_config.json",
        {"_class_name": "PNDMScheduler", "_diffusers_version": version, **configs["scheduler"]},
    )
    text_config = CLIPTextConfig(**handler_models().sd_text_encoder_config(variant, tokenizer))
    text_config.architectures = ["CLIPTextModel"]
    text_config.save_pretrained(str(folder / "text_encoder"))
    tokenizer.save_pretrained(str(folder / "tokenizer"))
    write_json(
        "model_index.json",
        {
            "_class_name": "StableDiffusionInpaintPipeline",
            "_diffusers_version": version,
            "feature_extractor": [None, None],
            "image_encoder": [None, None],
            "requires_safety_checker": False,
            "safety_checker": [None, None],
            "scheduler": ["diffusers", "PNDMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        },
    )
    for component, source in tensors.items():
        target = folder / handler_models().SD_TENSOR_FILES[component]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)


def fetch_sd(pins: dict, variant: str, folder: Path, downloads: Path, progress: bool) -> None:
    files = pins[variant]["files"]
    tensors = {component: download(pin, downloads, progress) for component, pin in files.items()}
    with StagedFolder(folder) as staging:
        write_sd_folder(variant, tensors, staging)
        write_info(
            staging,
            {
                "model": "sd",
                "variant": variant,
                "tier": "full",
                "source": {name: source_info(pin) for name, pin in files.items()},
            },
        )


def is_current(folder: Path, root: Path, variant: str, source: dict) -> bool:
    """Whether `folder` was converted from these pinned files and is unchanged since; a changed
    one is reported and then converted again (from the downloads, which are re-verified)."""
    info = read_info(folder)
    if not (info and info.get("variant") == variant and info.get("source") == source):
        return False
    try:
        verify_folder(folder, root)
    except WeightsChangedError as error:
        print(f"{error}: converting it again", flush=True)
        return False
    return True


def fetch_full(
    root: Path = DEFAULT_ROOT,
    variants: dict[str, str] | None = None,
    models: tuple[str, ...] = MODELS,
    pins_path: Path = FULL_TIER_PINS,
    progress: bool = True,
) -> list[Path]:
    """Download, verify and convert the real checkpoints into weights/full/<model>/.

    A model whose folder already came from the same pinned files, and whose files still have
    the SHA-256 recorded when it was converted, is left alone.
    """
    chosen = {model: spec(model).variant("full") for model in models} | (variants or {})
    pins = load_pins(pins_path)
    downloads = Path(root) / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    fetched = []
    for model in models:
        folder = weights_dir(root, "full", model)
        pin = pins[model][chosen[model]]
        wanted = (
            {name: source_info(file) for name, file in pin["files"].items()}
            if "files" in pin
            else source_info(pin)
        )
        if is_current(folder, root, chosen[model], wanted):
            print(f"full {model} ({chosen[model]}) is up to date", flush=True)
        else:
            print(f"fetching full {model} ({chosen[model]})", flush=True)
            resolve(spec(model).fetcher)(pins[model], chosen[model], folder, downloads, progress)
        fetched.append(folder)
    return fetched


def status(root: Path = DEFAULT_ROOT) -> list[str]:
    lines = []
    for tier in TIERS:
        for model in MODELS:
            info = read_info(weights_dir(root, tier, model))
            state = f"{info['variant']}" if info else "missing"
            lines.append(f"{tier:10} {model:5} {state}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = tool_parser("python -m scripts.weights", __doc__)
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="weights folder")
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="build random weights (tiny or synthetic)")
    build.add_argument("--tier", choices=sorted(RANDOM_TIERS), default="tiny")
    build.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    build.add_argument("--sam-variant", choices=sorted(handler_models().SAM_VARIANTS))
    build.add_argument("--force", action="store_true", help="rebuild even when up to date")
    fetch = commands.add_parser("fetch", help="download the real checkpoints (full tier)")
    fetch.add_argument("--sam-variant", choices=("vit_h", "vit_l", "vit_b"), default="vit_h")
    fetch.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    fetch.add_argument("--pins", type=Path, default=FULL_TIER_PINS, help=argparse.SUPPRESS)
    commands.add_parser("status", help="which tiers are present")
    args = parser.parse_args(argv)

    if args.command == "build":
        variants = {"sam": args.sam_variant} if args.sam_variant else None
        build_tier(args.tier, args.root, tuple(args.models), args.force, variants)
    elif args.command == "fetch":
        from .download import DownloadError

        try:
            fetch_full(args.root, {"sam": args.sam_variant}, tuple(args.models), args.pins)
        except DownloadError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
    elif args.command == "status":
        print("\n".join(status(args.root)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
