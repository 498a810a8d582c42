"""Weights tiers: seeded, deterministic, saved and reloaded through the serving loaders."""

from __future__ import annotations

import hashlib
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
    tensors = {name: saved / relative for name, relative in weights.SD_TENSOR_FILES.items()}
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
