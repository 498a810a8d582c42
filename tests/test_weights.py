"""Weights tiers: seeded, deterministic, saved and reloaded through the serving loaders."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mmekit_models
from scripts import weights


def folder_digest(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def test_tiny_tier_is_byte_for_byte_reproducible(tmp_path, tiny_weights):
    rebuilt = weights.build_tier("tiny", root=tmp_path)
    for folder in rebuilt:
        assert folder_digest(folder) == folder_digest(tiny_weights(folder.name)), folder.name


def test_build_is_a_no_op_when_up_to_date(tmp_path):
    (folder,) = weights.build_tier("tiny", root=tmp_path, models=("sam",))
    before = (folder / "model.safetensors").stat().st_mtime_ns
    weights.build_tier("tiny", root=tmp_path, models=("sam",))
    assert (folder / "model.safetensors").stat().st_mtime_ns == before
    weights.build_tier("tiny", root=tmp_path, models=("sam",), force=True)
    assert (folder / "model.safetensors").stat().st_mtime_ns != before


@pytest.mark.parametrize(
    "model, loader", [("sam", mmekit_models.load_sam), ("lama", mmekit_models.load_lama)]
)
def test_saved_weights_reload_through_the_serving_loader(tiny_weights, model, loader):
    torch.manual_seed(0)
    expected = mmekit_models.MODEL_BUILDERS[model]("tiny").state_dict()
    loaded, info = loader(tiny_weights(model), torch.device("cpu"))
    assert info == {**info, "model": model, "variant": "tiny", "tier": "tiny"}
    actual = loaded.state_dict()
    assert actual.keys() == expected.keys()
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name


def test_loader_refuses_a_folder_without_its_description(tmp_path):
    with pytest.raises(FileNotFoundError, match="make weights"):
        mmekit_models.load_sam(tmp_path, torch.device("cpu"))


def test_loader_refuses_another_models_weights(tiny_weights):
    with pytest.raises(ValueError, match="describes model 'sam'"):
        mmekit_models.load_lama(tiny_weights("sam"), torch.device("cpu"))


def test_unknown_variant_names_the_known_ones():
    with pytest.raises(ValueError, match="vit_h, vit_l, vit_b, tiny"):
        mmekit_models.build_sam("vit_x")


def test_official_sam_sizes_have_the_published_architecture():
    vit_b = mmekit_models.build_sam("vit_b")
    assert sum(p.numel() for p in vit_b.parameters()) == 93_735_472
    assert vit_b.image_encoder.img_size == 1024
    # names as in Meta's checkpoints, so their state dicts load with strict=True
    assert "image_encoder.blocks.11.attn.rel_pos_h" in vit_b.state_dict()


def test_sd_folder_assembled_from_tensors_serves_like_save_pretrained(tmp_path, tiny_weights):
    """The full tier downloads only tensors and writes the rest; prove that folder loads and
    generates exactly what the diffusers-saved one does."""
    saved = tiny_weights("sd")
    tensors = {name: saved / relative for name, relative in mmekit_models.SD_TENSOR_FILES.items()}
    assembled = tmp_path / "sd"
    assembled.mkdir()
    weights.write_sd_folder("tiny", tensors, assembled)
    weights.write_info(assembled, weights.read_info(saved))

    def generate(folder: Path) -> np.ndarray:
        pipeline, _ = mmekit_models.load_sd(folder, torch.device("cpu"), torch.float32)
        image = Image.new("RGB", (64, 64), (120, 30, 60))
        mask = Image.new("L", (64, 64), 255)
        result = pipeline(
            prompt="a cat",
            image=image,
            mask_image=mask,
            height=64,
            width=64,
            num_inference_steps=1,
            generator=torch.Generator().manual_seed(0),
        )
        return np.asarray(result.images[0])

    assert np.array_equal(generate(assembled), generate(saved))


def test_real_clip_tokenizer_matches_openai_clip_tokenization():
    from open_clip.tokenizer import SimpleTokenizer

    tokenizer = weights.sd_tokenizer("sd2-inpainting")
    reference = SimpleTokenizer()
    assert len(tokenizer) == 49408 and tokenizer.model_max_length == 77
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    for prompt in [
        "A futuristic VASE on a bench",
        "naïve café 日本語 🐱",
        "it's  don't\tyou'll",
        "hamster, sitting on a bench - 4k, ultra-detailed",
    ]:
        assert tokenizer(prompt).input_ids == [49406, *reference.encode(prompt), 49407], prompt
    assert tokenizer.pad_token_id == 0  # SD2 pads with "!" as OpenCLIP trained it


@pytest.mark.slow
def test_synthetic_tier_builds_full_size_sam_and_lama(tmp_path):
    built = weights.build_tier("synthetic", root=tmp_path, models=("sam", "lama"))
    sam, _ = mmekit_models.load_sam(built[0], torch.device("cpu"))
    assert sam.image_encoder.img_size == 1024
    lama, info = mmekit_models.load_lama(built[1], torch.device("cpu"))
    assert info["variant"] == "big-lama"


# -- the full tier's recorded digests ---------------------------------------------------------


@pytest.fixture
def full_folder(tmp_path: Path) -> Path:
    """A small full-tier folder, its digests recorded, its files a minute old (so cacheable)."""
    folder = tmp_path / "weights" / "full" / "sam"
    (folder / "config").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    (folder / "config" / "settings.json").write_text("{}\n")
    weights.write_info(folder, {"model": "sam", "variant": "tiny", "tier": "full"})
    for path in folder.rglob("*"):
        age(path, 60)
    return folder


def age(path: Path, seconds: int) -> None:
    then = time.time_ns() - seconds * 1_000_000_000
    os.utime(path, ns=(then, then))


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the files weights.sha256_of reads, in order."""
    calls: list[str] = []
    original = weights.sha256_of

    def counting(path: Path) -> str:
        calls.append(Path(path).name)
        return original(path)

    monkeypatch.setattr(weights, "sha256_of", counting)
    return calls


def test_full_tier_info_records_every_files_digest(full_folder):
    files = weights.read_info(full_folder)["files"]
    assert files == {
        "config/settings.json": hashlib.sha256(b"{}\n").hexdigest(),
        "model.safetensors": hashlib.sha256(bytes(range(256)) * 64).hexdigest(),
    }


def test_an_unchanged_folder_is_hashed_once(full_folder, hashed):
    root = full_folder.parent.parent
    weights.verify_folder(full_folder, root)
    assert sorted(hashed) == ["model.safetensors", "settings.json"]
    hashed.clear()
    weights.verify_folder(full_folder, root)
    assert hashed == []  # from the cache beside the model folders
    assert (root / weights.DIGEST_CACHE_FILE).is_file()


def test_a_touched_file_is_hashed_again(full_folder, hashed):
    root = full_folder.parent.parent
    weights.verify_folder(full_folder, root)
    hashed.clear()
    age(full_folder / "model.safetensors", 30)  # same bytes, another mtime
    weights.verify_folder(full_folder, root)
    assert hashed == ["model.safetensors"]


def test_a_file_written_just_now_is_not_remembered(full_folder, hashed):
    root = full_folder.parent.parent
    os.utime(full_folder / "model.safetensors")  # within the timestamp granularity of now
    weights.verify_folder(full_folder, root)
    weights.verify_folder(full_folder, root)
    assert hashed.count("model.safetensors") == 2


def test_a_changed_file_is_named_even_after_it_was_cached(full_folder):
    root = full_folder.parent.parent
    weights.verify_folder(full_folder, root)
    tensors = full_folder / "model.safetensors"
    data = bytearray(tensors.read_bytes())
    data[-1] ^= 0x40  # same size, same inode
    tensors.write_bytes(bytes(data))
    with pytest.raises(weights.WeightsChangedError, match=re.escape(f"{tensors} has changed")):
        weights.verify_folder(full_folder, root)


def test_a_missing_or_added_file_is_named(full_folder):
    root = full_folder.parent.parent
    (full_folder / "extra.bin").write_bytes(b"pickle?")
    with pytest.raises(weights.WeightsChangedError, match="extra.bin is not among the files"):
        weights.verify_folder(full_folder, root)
    (full_folder / "extra.bin").unlink()
    (full_folder / "config" / "settings.json").unlink()
    with pytest.raises(weights.WeightsChangedError, match="settings.json is missing"):
        weights.verify_folder(full_folder, root)


def test_a_folder_without_digests_is_not_trusted(full_folder):
    info = weights.read_info(full_folder)
    del info["files"]
    (full_folder / mmekit_models.WEIGHTS_INFO_FILE).write_text(json.dumps(info))
    with pytest.raises(weights.WeightsChangedError, match="records no file digests"):
        weights.verify_folder(full_folder, full_folder.parent.parent)


def test_random_tiers_record_no_digests(tiny_weights):
    assert "files" not in weights.read_info(tiny_weights("sam"))


# -- the SD loader and the published checkpoints' key layouts ---------------------------------


def test_sd_loader_accepts_checkpoints_in_their_published_key_layout(tmp_path, tiny_weights):
    """Genuine SD2 files predate transformers 5 and diffusers 0.15: the text encoder's keys
    carry `text_model.` and a persistent position_ids, the VAE's attention uses query/key/
    value/proj_attn. The tensor-name check must take the libraries' conversions into account."""
    from safetensors.torch import load_file, save_file

    folder = Path(shutil.copytree(tiny_weights("sd"), tmp_path / "sd"))
    text_encoder = folder / mmekit_models.SD_TENSOR_FILES["text_encoder"]
    tensors = {f"text_model.{name}": t for name, t in load_file(str(text_encoder)).items()}
    tensors["text_model.embeddings.position_ids"] = torch.arange(77).unsqueeze(0)
    save_file(tensors, str(text_encoder), metadata={"format": "pt"})
    vae = folder / mmekit_models.SD_TENSOR_FILES["vae"]
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    pattern = re.compile(r"(mid_block\.attentions\.0)\.(to_q|to_k|to_v|to_out\.0)\.")
    tensors = {
        pattern.sub(lambda m: f"{m[1]}.{old_names[m[2]]}.", name): t
        for name, t in load_file(str(vae)).items()
    }
    assert any(".proj_attn." in name for name in tensors)
    save_file(tensors, str(vae), metadata={"format": "pt"})

    expected, _ = mmekit_models.load_sd(tiny_weights("sd"), torch.device("cpu"), torch.float32)
    loaded, _ = mmekit_models.load_sd(folder, torch.device("cpu"), torch.float32)
    for component in ("text_encoder", "vae"):
        want = getattr(expected, component).state_dict()
        got = getattr(loaded, component).state_dict()
        assert got.keys() == want.keys(), component
        assert all(torch.equal(got[k], want[k]) for k in want), component
