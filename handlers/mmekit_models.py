"""Name -> builder registries for the three architectures, and the loaders the handlers use.

Every weights folder (tiny, synthetic or full tier) holds a `mmekit_model.json` naming its model
and architecture variant; the loaders read it, build that architecture from the registry and
load the tensors (safetensors only: serving never unpickles). The tiny builders sit next to the
real ones, like segment-anything's `sam_model_registry`, so tests load tiny weights through the
very code path that serves real ones.

Ships inside the model archives (imported as a top-level module).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

WEIGHTS_INFO_FILE = "mmekit_model.json"
SAFETENSORS_FILE = "model.safetensors"


def read_weights_info(weights_dir: Path, expected_model: str) -> dict:
    """The weights folder's own description: {"model", "variant", "tier", ...}."""
    info_path = Path(weights_dir) / WEIGHTS_INFO_FILE
    if not info_path.is_file():
        raise FileNotFoundError(
            f"{info_path} is missing: build weights with `make weights` (tiny) or fetch them"
        )
    info = json.loads(info_path.read_text())
    if info.get("model") != expected_model:
        raise ValueError(
            f"{info_path} describes model {info.get('model')!r}, not {expected_model!r}"
        )
    return info


def load_state_dict(weights_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(weights_dir) / SAFETENSORS_FILE))


# ---------------------------------------------------------------------------------------------
# Segment Anything


@dataclass(frozen=True)
class SamArchitecture:
    encoder_embed_dim: int
    encoder_depth: int
    encoder_num_heads: int
    encoder_global_attn_indexes: tuple[int, ...]
    image_size: int = 1024
    patch_size: int = 16
    window_size: int = 14
    prompt_embed_dim: int = 256
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    iou_head_hidden_dim: int = 256
    mask_in_chans: int = 16


# The three official sizes (segment_anything/build_sam.py) and a tiny one for tests.
SAM_VARIANTS: dict[str, SamArchitecture] = {
    "vit_h": SamArchitecture(1280, 32, 16, (7, 15, 23, 31)),
    "vit_l": SamArchitecture(1024, 24, 16, (5, 11, 17, 23)),
    "vit_b": SamArchitecture(768, 12, 12, (2, 5, 8, 11)),
    "tiny": SamArchitecture(
        encoder_embed_dim=32,
        encoder_depth=2,
        encoder_num_heads=2,
        encoder_global_attn_indexes=(1,),
        image_size=128,
        window_size=4,
        prompt_embed_dim=32,
        decoder_mlp_dim=64,
        decoder_num_heads=4,
        iou_head_hidden_dim=32,
        mask_in_chans=8,
    ),
}


def build_sam(variant: str) -> torch.nn.Module:
    """A randomly initialised SAM of the named architecture, in eval mode."""
    from segment_anything.modeling import (
        ImageEncoderViT,
        MaskDecoder,
        PromptEncoder,
        Sam,
        TwoWayTransformer,
    )

    arch = _lookup(SAM_VARIANTS, variant, "SAM")
    embedding_size = arch.image_size // arch.patch_size
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=arch.encoder_depth,
            embed_dim=arch.encoder_embed_dim,
            img_size=arch.image_size,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=arch.encoder_num_heads,
            patch_size=arch.patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=arch.encoder_global_attn_indexes,
            window_size=arch.window_size,
            out_chans=arch.prompt_embed_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=arch.prompt_embed_dim,
            image_embedding_size=(embedding_size, embedding_size),
            input_image_size=(arch.image_size, arch.image_size),
            mask_in_chans=arch.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=2,
                embedding_dim=arch.prompt_embed_dim,
                mlp_dim=arch.decoder_mlp_dim,
                num_heads=arch.decoder_num_heads,
            ),
            transformer_dim=arch.prompt_embed_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=arch.iou_head_hidden_dim,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    return sam.eval()


def load_sam(weights_dir: Path, device: torch.device) -> tuple[torch.nn.Module, dict]:
    info = read_weights_info(weights_dir, "sam")
    sam = build_sam(info["variant"])
    sam.load_state_dict(load_state_dict(weights_dir), strict=True)
    return sam.to(device).eval(), info


# ---------------------------------------------------------------------------------------------
# LaMa


def build_lama_network(variant: str) -> torch.nn.Module:
    import lama_net

    return lama_net.build_lama(variant).eval()


def load_lama(weights_dir: Path, device: torch.device) -> tuple[torch.nn.Module, dict]:
    info = read_weights_info(weights_dir, "lama")
    network = build_lama_network(info["variant"])
    network.load_state_dict(load_state_dict(weights_dir), strict=True)
    return network.to(device).eval(), info


# ---------------------------------------------------------------------------------------------
# Stable Diffusion 2 inpainting (diffusers layout: model_index.json + one folder per component)

# Component configs of stabilityai/stable-diffusion-2-inpainting (same architecture as the
# sd2-community mirror), used to build the full-size random "synthetic" tier.
SD2_INPAINTING = {
    "unet": {
        "act_fn": "silu",
        "attention_head_dim": [5, 10, 20, 20],
        "block_out_channels": [320, 640, 1280, 1280],
        "center_input_sample": False,
        "cross_attention_dim": 1024,
        "down_block_types": [
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ],
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": 9,
        "layers_per_block": 2,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-05,
        "norm_num_groups": 32,
        "out_channels": 4,
        "sample_size": 64,
        "up_block_types": [
            "UpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
        ],
        "use_linear_projection": True,
    },
    "vae": {
        "act_fn": "silu",
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "in_channels": 3,
        "latent_channels": 4,
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "out_channels": 3,
        "sample_size": 512,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
    },
    "text_encoder": {
        "hidden_act": "gelu",
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "max_position_embeddings": 77,
        "num_attention_heads": 16,
        "num_hidden_layers": 23,
        "projection_dim": 512,
        "vocab_size": 49408,
        # the original config's ids; eos 2 makes transformers pool at the highest id (49407)
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
    },
    "scheduler": {
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "num_train_timesteps": 1000,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
    },
}

# Same structure, tiny sizes (the diffusers test suite's approach). Four VAE blocks keep the
# real model's 8x latent downscale, so the 512 px window stays a 64x64 latent as in production.
SD_TINY = {
    "unet": {
        "attention_head_dim": [2, 4],
        "block_out_channels": [32, 64],
        "cross_attention_dim": 32,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "in_channels": 9,
        "layers_per_block": 1,
        "norm_num_groups": 32,
        "out_channels": 4,
        "sample_size": 64,
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "use_linear_projection": True,
    },
    "vae": {
        "block_out_channels": [8, 8, 16, 16],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "in_channels": 3,
        "latent_channels": 4,
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "out_channels": 3,
        "sample_size": 512,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
    },
    "text_encoder": {
        "hidden_act": "gelu",
        "hidden_size": 32,
        "intermediate_size": 37,
        "max_position_embeddings": 77,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "projection_dim": 32,
        "vocab_size": 1000,
    },
    "scheduler": SD2_INPAINTING["scheduler"],
}

SD_VARIANTS: dict[str, dict] = {"sd2-inpainting": SD2_INPAINTING, "tiny": SD_TINY}

# CLIP's context length: prompts longer than this are refused, never silently truncated.
CLIP_MAX_TOKENS = 77


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte -> printable character table, in CLIP's vocabulary order
    (printable bytes first, then the rest mapped above U+0100)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {byte: chr(byte) for byte in printable}
    others = [byte for byte in range(256) if byte not in table]
    table.update({byte: chr(256 + n) for n, byte in enumerate(others)})
    return table


def clip_tokenizer_from_bpe(bpe_path: Path) -> Any:
    """The real CLIP tokenizer (49,408 tokens), derived from CLIP's BPE merges file exactly as
    OpenAI's SimpleTokenizer derives it (the file ships in the open-clip-torch package)."""
    import gzip

    from transformers import CLIPTokenizer

    lines = gzip.decompress(Path(bpe_path).read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    byte_tokens = list(_bytes_to_unicode().values())
    tokens = byte_tokens + [token + "</w>" for token in byte_tokens]
    tokens += ["".join(merge) for merge in merges] + ["<|startoftext|>", "<|endoftext|>"]
    # SD2's tokenizer pads with "!" (id 0), as OpenCLIP did in training, not with <|endoftext|>
    return CLIPTokenizer(
        vocab={token: index for index, token in enumerate(tokens)},
        merges=merges,
        model_max_length=CLIP_MAX_TOKENS,
        pad_token="!",
    )


def build_clip_tokenizer() -> Any:
    """A CLIP BPE tokenizer whose vocabulary and merges are generated here, offline.

    Every byte is a token (so any prompt tokenizes), plus a few merges so BPE really merges.
    The real tokenizer has 49,408 entries; token counts differ, the code path does not.
    """
    from transformers import CLIPTokenizer

    characters = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in characters + [c + "</w>" for c in characters]:
        vocab.setdefault(token, len(vocab))
    merges = []
    for word in ("the", "a", "photo", "of", "cat", "dog", "on", "bench", "red", "vase"):
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append((pieces[0], pieces[1]))
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            vocab.setdefault(pieces[0], len(vocab))
    merges = list(dict.fromkeys(merges))
    return CLIPTokenizer(
        vocab=vocab, merges=merges, model_max_length=CLIP_MAX_TOKENS, pad_token="<|endoftext|>"
    )


def sd_text_encoder_config(variant: str, tokenizer: Any) -> dict:
    """The text encoder's config; token ids from the tokenizer unless the variant pins them."""
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    return {**ids, **_lookup(SD_VARIANTS, variant, "Stable Diffusion")["text_encoder"]}


def build_sd_pipeline(variant: str, seed: int = 0, tokenizer: Any = None) -> Any:
    """A randomly initialised StableDiffusionInpaintPipeline of the named architecture
    (with the generated tiny tokenizer unless one is given)."""
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionInpaintPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    configs = _lookup(SD_VARIANTS, variant, "Stable Diffusion")
    tokenizer = tokenizer or build_clip_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**configs["unet"])
    torch.manual_seed(seed)
    vae = AutoencoderKL(**configs["vae"])
    torch.manual_seed(seed)
    text_config = CLIPTextConfig(**sd_text_encoder_config(variant, tokenizer))
    text_encoder = CLIPTextModel(text_config)
    return StableDiffusionInpaintPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=PNDMScheduler(**configs["scheduler"]),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


# The diffusers folder's tensor files, by component (what `fetch` downloads, `build` saves).
SD_TENSOR_FILES = {
    "unet": "unet/diffusion_pytorch_model.safetensors",
    "vae": "vae/diffusion_pytorch_model.safetensors",
    "text_encoder": "text_encoder/model.safetensors",
}


class WeightsMismatchError(ValueError):
    """A weights file whose tensor names are not those of the architecture it is loaded into."""


def _some(names: list[str], limit: int = 5) -> str:
    """A few names, not thousands: a wrong layout can miss every tensor."""
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_tensor_names(module: torch.nn.Module, loading: dict, where: str) -> None:
    """Refuse a loaded component whose file named a tensor its architecture lacks, or lacked one
    of its parameters (transformers re-initialises it at random, with a warning only; diffusers
    leaves it on the meta device and fails later, naming neither).

    `loading` is the library's own report (`output_loading_info=True`), not a raw comparison of
    the safetensors header with `state_dict()`: it is taken after the libraries' key conversions
    that genuine checkpoints need (transformers 5 strips CLIPTextModel's `text_model.` prefix,
    diffusers renames the VAE's pre-0.15 attention keys) and without the keys they ignore by
    design. A missing key matters only when it names a parameter: a missing buffer (e.g. an old
    checkpoint's position_ids) is one the model computes itself.
    """
    parameters = dict(module.named_parameters(remove_duplicate=False))
    missing = sorted(name for name in loading["missing_keys"] if name in parameters)
    unexpected = sorted(loading["unexpected_keys"])
    if missing or unexpected:
        problems = []
        if unexpected:
            problems.append(f"unexpected tensors {_some(unexpected)}")
        if missing:
            problems.append(f"missing tensors {_some(missing)}")
        raise WeightsMismatchError(
            f"{where}: tensor names do not match {type(module).__name__}: {'; '.join(problems)}"
        )


def load_sd(weights_dir: Path, device: torch.device, dtype: torch.dtype) -> tuple[Any, dict]:
    from diffusers import AutoencoderKL, StableDiffusionInpaintPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    info = read_weights_info(weights_dir, "sd")
    # The tensor-holding components are loaded here, one by one (smallest first, so a bad file
    # fails fast), to check each against its library's loading report; the pipeline takes them
    # as they are and loads only the tokenizer and scheduler itself.
    classes = {"text_encoder": CLIPTextModel, "vae": AutoencoderKL, "unet": UNet2DConditionModel}
    components = {}
    for component, cls in classes.items():
        module, loading = cls.from_pretrained(
            str(Path(weights_dir) / component),
            dtype=dtype,
            use_safetensors=True,
            local_files_only=True,
            output_loading_info=True,
        )
        where = f"SD {component} ({Path(weights_dir) / SD_TENSOR_FILES[component]})"
        check_tensor_names(module, loading, where)
        components[component] = module
    pipeline = StableDiffusionInpaintPipeline.from_pretrained(
        str(weights_dir),
        **components,
        dtype=dtype,
        use_safetensors=True,
        local_files_only=True,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device), info


# ---------------------------------------------------------------------------------------------


def _lookup(registry: dict[str, Any], variant: str, what: str) -> Any:
    if variant not in registry:
        raise ValueError(f"unknown {what} variant {variant!r}; known: {', '.join(registry)}")
    return registry[variant]


MODEL_BUILDERS: dict[str, Callable[[str], Any]] = {
    "sam": build_sam,
    "lama": build_lama_network,
    "sd": build_sd_pipeline,
}
