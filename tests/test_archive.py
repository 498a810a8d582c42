"""model_store/ tarballs: reproducible bytes, a manifest that tells what was built from what."""

from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
from pathlib import Path

import pytest

from scripts import archive, weights


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def store(tmp_path_factory, weights_root) -> Path:
    folder = tmp_path_factory.mktemp("store")
    archive.archive_models(("sam", "lama"), "tiny", folder, weights_root)
    return folder


def test_archiving_twice_gives_identical_bytes(store, tmp_path, weights_root):
    archive.archive_models(("sam", "lama"), "tiny", tmp_path, weights_root)
    for model in ("sam", "lama"):
        assert digest(tmp_path / f"{model}.tar.gz") == digest(store / f"{model}.tar.gz")


def test_unchanged_inputs_are_not_rebuilt(store, weights_root):
    before = (store / "sam.tar.gz").stat().st_mtime_ns
    inputs = archive.archive_inputs("sam", "tiny", weights_root)
    entry, built = archive.build_archive(inputs, store)
    assert not built
    assert (store / "sam.tar.gz").stat().st_mtime_ns == before
    assert entry == archive.read_manifest(store)["models"]["sam"]


def test_a_tampered_tarball_is_rebuilt_even_at_the_same_size(tmp_path, weights_root):
    inputs = archive.archive_inputs("sam", "tiny", weights_root)
    entry, _ = archive.build_archive(inputs, tmp_path)
    tarball = tmp_path / "sam.tar.gz"
    data = bytearray(tarball.read_bytes())
    data[-100] ^= 0xFF
    tarball.write_bytes(bytes(data))
    rebuilt, built = archive.build_archive(inputs, tmp_path)
    assert built and digest(tarball) == entry["sha256"] == rebuilt["sha256"]
    assert not list(tmp_path.glob(".build-*"))  # the build folder is gone


def test_changed_inputs_are_rebuilt(tmp_path, weights_root):
    inputs = archive.archive_inputs("sam", "tiny", weights_root)
    first, _ = archive.build_archive(inputs, tmp_path, gzip_level=1)
    second, built = archive.build_archive(inputs, tmp_path, gzip_level=6)
    assert built and second["inputs_sha256"] != first["inputs_sha256"]


def test_manifest_describes_each_tarball(store):
    manifest = json.loads((store / "manifest.json").read_text())
    for model in ("sam", "lama"):
        entry = manifest["models"][model]
        tarball = store / entry["file"]
        assert entry["size"] == tarball.stat().st_size
        assert entry["sha256"] == digest(tarball)
        assert entry["tier"] == "tiny" and entry["variant"] == "tiny"
        assert len(entry["inputs_sha256"]) == 64
    assert manifest["archiver_version"] == "0.12.0"


def test_tarball_layout_is_what_torchserve_and_sagemaker_load(store):
    with tarfile.open(store / "lama.tar.gz") as bundle:
        members = bundle.getmembers()
        names = [member.name for member in members]
        manifest = json.load(bundle.extractfile("lama/MAR-INF/MANIFEST.json"))
    assert {name.split("/")[0] for name in names} == {"lama"}  # one root folder
    for expected in (
        "lama/lama_handler.py",
        "lama/mmekit_common.py",
        "lama/mmekit_models.py",
        "lama/lama_net.py",
        "lama/model-config.yaml",
        "lama/weights/model.safetensors",
        "lama/weights/mmekit_model.json",
    ):
        assert expected in names
    assert names == sorted(names)
    assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.uname == "" for m in members)
    assert manifest["model"]["handler"] == "lama_handler.py"
    assert manifest["model"]["configFile"] == "model-config.yaml"
    assert manifest["createdOn"] == archive.FIXED_CREATED_ON
    assert not any("__pycache__" in name or name.endswith(".pyc") for name in names)


def test_gzip_header_carries_no_timestamp(store):
    header = (store / "sam.tar.gz").read_bytes()[:10]
    assert header[:2] == b"\x1f\x8b" and header[4:8] == b"\x00\x00\x00\x00"


def test_full_tier_without_fetched_weights_says_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="make fetch-weights"):
        archive.archive_inputs("sam", "full", tmp_path)


def test_auto_tier_prefers_fetched_weights(tmp_path):
    assert archive.resolve_tier("sam", "auto", tmp_path) == "tiny"
    full = tmp_path / "full" / "sam"
    full.mkdir(parents=True)
    (full / "mmekit_model.json").write_text('{"model": "sam", "variant": "vit_h"}')
    assert archive.resolve_tier("sam", "auto", tmp_path) == "full"


def test_a_changed_full_tier_file_is_not_archived(tmp_path, tiny_weights, capsys):
    folder = Path(shutil.copytree(tiny_weights("sam"), tmp_path / "full" / "sam"))
    weights.write_info(folder, {**weights.read_info(folder), "tier": "full"})
    assert archive.archive_inputs("sam", "full", tmp_path).weights == folder
    tensors = folder / "model.safetensors"
    data = bytearray(tensors.read_bytes())
    data[-1] ^= 0x01
    tensors.write_bytes(bytes(data))
    code = archive.main(["--tier", "full", "--models", "sam", "--weights", str(tmp_path)])
    error = capsys.readouterr().err
    assert code == 1
    assert f"{tensors} has changed" in error and "make fetch-weights" in error
