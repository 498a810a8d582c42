"""Model archives: model_store/<model>.tar.gz, byte-for-byte reproducible, plus manifest.json.

For each model, torch-model-archiver packs (no-archive layout) the handler, the shared handler
modules, configs/<model>/model-config.yaml and the chosen tier's weights (as `weights/`), where
its entry in scripts/models.py says they are. The
folder is then written as a deterministic tarball with one root directory — sorted entries,
mtime 0, owner 0/0, gzip header mtime 0 — which SageMaker's multi-model endpoint and TorchServe
(directly from its model store) both load. Same inputs, same bytes; unchanged inputs are not
rebuilt.

    python -m scripts.archive                 # every model, tier "auto"
    python -m scripts.archive --tier tiny --models sam
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import HANDLERS_DIR, PROJECT_ROOT
from .cli import tool_parser
from .models import MODELS, TIERS, spec
from .weights import (
    DEFAULT_ROOT,
    WeightsChangedError,
    build_tier,
    read_info,
    sha256_of,
    verify_folder,
    weights_dir,
)

DEFAULT_STORE = PROJECT_ROOT / "model_store"
MANIFEST_NAME = "manifest.json"
# Shipped in every archive beside the handler (TorchServe imports them from the archive root).
SHARED_MODULES = (
    "mmekit_common.py",
    "mmekit_cuda.py",
    "mmekit_models.py",
    "lama_net.py",
    "sam_decoder.py",
    "mmekit_limits.py",
)
MODEL_VERSION = "1.0"
# Level 0 ("stored" deflate blocks: still a valid .tar.gz), by measurement on full-size weights
# (README, "Archives"): deflate saves only 8-11 % on weights but makes every cold load's
# extraction about 5x slower (SageMaker extracts each tarball when a model is first invoked).
GZIP_LEVEL = 0
# torch-model-archiver stamps the build time into MANIFEST.json; a fixed stamp keeps the bytes
# a function of the inputs only.
FIXED_CREATED_ON = "01/01/2000 00:00:00"
# Bump when this file changes what it writes, so old archives are rebuilt.
FORMAT_REVISION = 1


@dataclass(frozen=True)
class ArchiveInputs:
    model: str
    tier: str
    weights: Path
    config: Path
    handler: Path
    shared: tuple[Path, ...]

    def files(self) -> list[tuple[str, Path]]:
        """(name in the archive, source) for every input file, sorted."""
        entries = [(self.handler.name, self.handler), ("model-config.yaml", self.config)]
        entries += [(path.name, path) for path in self.shared]
        entries += [
            (f"weights/{path.relative_to(self.weights).as_posix()}", path)
            for path in self.weights.rglob("*")
            if path.is_file()
        ]
        return sorted(entries)

    def fingerprint(self, gzip_level: int) -> str:
        digest = hashlib.sha256()
        digest.update(f"format={FORMAT_REVISION};gzip={gzip_level};".encode())
        digest.update(f"archiver={archiver_version()};version={MODEL_VERSION};".encode())
        for name, path in self.files():
            digest.update(f"{name}\0{sha256_of(path)}\0".encode())
        return digest.hexdigest()


def archiver_version() -> str:
    from model_archiver import __version__

    return __version__


def resolve_tier(model: str, tier: str, weights_root: Path) -> str:
    """`auto`: the real weights when they were fetched, otherwise tiny ones (built if needed)."""
    if tier != "auto":
        return tier
    return "full" if read_info(weights_dir(weights_root, "full", model)) else "tiny"


def archive_inputs(model: str, tier: str, weights_root: Path = DEFAULT_ROOT) -> ArchiveInputs:
    folder = weights_dir(weights_root, tier, model)
    if tier in ("tiny", "synthetic"):
        build_tier(tier, weights_root, (model,))
    elif read_info(folder) is None:
        raise FileNotFoundError(
            f"no {tier} weights for {model} in {folder}: run `make fetch-weights` first"
        )
    else:
        # fetched weights against the digests recorded when they were converted: a changed
        # file must not be archived (the archive's own digests would then vouch for it)
        try:
            verify_folder(folder, weights_root)
        except WeightsChangedError as error:
            raise WeightsChangedError(f"{error}: run `make fetch-weights` again") from error
    return ArchiveInputs(
        model=model,
        tier=tier,
        weights=folder,
        config=spec(model).config_file,
        handler=spec(model).handler_path,
        shared=tuple(HANDLERS_DIR / name for name in SHARED_MODULES),
    )


def link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def run_archiver(inputs: ArchiveInputs, workdir: Path, version: str = MODEL_VERSION) -> Path:
    """torch-model-archiver, no-archive layout; returns the archive folder. (`make dev` gives
    each reload its own version, so TorchServe can hold the old and the new side by side.)"""
    extra = workdir / "extra"
    extra.mkdir()
    for path in inputs.shared:
        shutil.copy(path, extra / path.name)
    # the archiver copies a folder's contents into the archive root: extra/weights -> weights/
    # (hard links where the file system allows: weights run to gigabytes)
    shutil.copytree(inputs.weights, extra / "weights", copy_function=link_or_copy)
    private_tmp = workdir / "tmp"  # the archiver stages in $TMPDIR/<model>: keep builds apart
    private_tmp.mkdir()
    command = [
        str(Path(sys.executable).with_name("torch-model-archiver")),
        "--model-name",
        inputs.model,
        "--version",
        version,
        "--handler",
        str(inputs.handler),
        "--extra-files",
        str(extra),
        "--config-file",
        str(inputs.config),
        "--archive-format",
        "no-archive",
        "--export-path",
        str(workdir),
        "--force",
    ]
    subprocess.run(command, check=True, env={**os.environ, "TMPDIR": str(private_tmp)})
    folder = workdir / inputs.model
    manifest_path = folder / "MAR-INF" / "MANIFEST.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["createdOn"] = FIXED_CREATED_ON
    manifest_path.write_text(json.dumps(manifest, indent=2))
    return folder


def write_deterministic_tar(folder: Path, destination: Path, root: str, gzip_level: int) -> None:
    """folder -> .tar.gz whose bytes depend only on the files' names, contents and modes."""

    def info(name: str, path: Path) -> tarfile.TarInfo:
        entry = tarfile.TarInfo(name)
        entry.mtime = 0
        entry.uid = entry.gid = 0
        entry.uname = entry.gname = ""
        if path.is_dir():
            entry.type, entry.mode = tarfile.DIRTYPE, 0o755
        else:
            entry.size, entry.mode = path.stat().st_size, 0o644
        return entry

    paths = sorted(folder.rglob("*"), key=lambda p: p.relative_to(folder).as_posix())
    with open(destination, "wb") as raw:
        with gzip.GzipFile(
            filename="", mode="wb", compresslevel=gzip_level, mtime=0, fileobj=raw
        ) as compressed:
            with tarfile.open(fileobj=compressed, mode="w", format=tarfile.GNU_FORMAT) as tar:
                tar.addfile(info(root, folder))
                for path in paths:
                    entry = info(f"{root}/{path.relative_to(folder).as_posix()}", path)
                    if entry.isdir():
                        tar.addfile(entry)
                    else:
                        with open(path, "rb") as stream:
                            tar.addfile(entry, stream)


def read_manifest(store: Path) -> dict:
    path = store / MANIFEST_NAME
    return json.loads(path.read_text()) if path.is_file() else {"models": {}}


def write_manifest(store: Path, manifest: dict) -> None:
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    staging = store / (MANIFEST_NAME + ".partial")
    staging.write_text(text)
    staging.replace(store / MANIFEST_NAME)


def build_archive(
    inputs: ArchiveInputs, store: Path = DEFAULT_STORE, gzip_level: int = GZIP_LEVEL
) -> tuple[dict, bool]:
    """Archive one model unless the manifest says these inputs were already archived.

    Returns its manifest entry and whether it was (re)built.
    """
    store.mkdir(parents=True, exist_ok=True)
    fingerprint = inputs.fingerprint(gzip_level)
    target = store / f"{inputs.model}.tar.gz"
    entry = read_manifest(store)["models"].get(inputs.model)
    if (
        entry
        and entry["inputs_sha256"] == fingerprint
        and target.is_file()
        and target.stat().st_size == entry["size"]
        and sha256_of(target) == entry["sha256"]  # what gets promoted must be what was built
    ):
        return entry, False
    # the build folder sits in the store so the weights can be hard-linked into it
    with tempfile.TemporaryDirectory(prefix=f".build-{inputs.model}-", dir=store) as workdir:
        folder = run_archiver(inputs, Path(workdir))
        staging = Path(workdir) / target.name
        write_deterministic_tar(folder, staging, inputs.model, gzip_level)
        staging.replace(target)
    info = read_info(inputs.weights) or {}
    entry = {
        "file": target.name,
        "size": target.stat().st_size,
        "sha256": sha256_of(target),
        "tier": inputs.tier,
        "variant": info.get("variant"),
        "inputs_sha256": fingerprint,
        "gzip_level": gzip_level,
    }
    manifest = read_manifest(store)
    manifest["models"][inputs.model] = entry
    manifest["archiver_version"] = archiver_version()
    write_manifest(store, manifest)
    return entry, True


def archive_models(
    models: tuple[str, ...] = MODELS,
    tier: str = "auto",
    store: Path = DEFAULT_STORE,
    weights_root: Path = DEFAULT_ROOT,
    gzip_level: int = GZIP_LEVEL,
) -> dict[str, dict]:
    entries = {}
    for model in models:
        inputs = archive_inputs(model, resolve_tier(model, tier, weights_root), weights_root)
        entry, built = build_archive(inputs, store, gzip_level)
        state = "built" if built else "up to date"
        print(
            f"{entry['file']}: {state} ({entry['tier']} {entry['variant']}, "
            f"{entry['size'] / 1e6:.1f} MB, sha256 {entry['sha256'][:12]})",
            flush=True,
        )
        entries[model] = entry
    return entries


def main(argv: list[str] | None = None) -> int:
    parser = tool_parser("python -m scripts.archive", __doc__)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--tier", choices=("auto", *TIERS), default="auto")
    parser.add_argument("--store", type=Path, default=DEFAULT_STORE)
    parser.add_argument("--weights", type=Path, default=DEFAULT_ROOT, help="weights root")
    parser.add_argument(
        "--gzip-level", type=int, choices=range(0, 10), default=GZIP_LEVEL, metavar="0-9"
    )
    args = parser.parse_args(argv)
    try:
        archive_models(tuple(args.models), args.tier, args.store, args.weights, args.gzip_level)
    except (FileNotFoundError, WeightsChangedError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
