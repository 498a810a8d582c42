"""LaMa: an image and a mask -> the masked object erased (filled from its surroundings).

Request  {"image": b64, "mask_image": b64 (same size; > 0 = erase), "dilate_kernel_size": 0,
          "format": "png" | "jpeg" | "webp"}   (format optional: the input's own by default)
Response {"generated_image": b64, "format": "png" | "jpeg" | "webp"} — the input size; pixels
outside the mask are unchanged.

The network sees windows around the mask (each part's box plus context), not the whole photo:
memory and time follow the mask's size. A window over `max_work_pixels` is downscaled for the
network and its result scaled back; only pixels inside the mask are replaced.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from mmekit_common import (
    Box,
    EditHandler,
    HandlerContext,
    InpaintInputs,
    composite,
    context_windows,
    read_cuda_dtype,
    read_inpaint_inputs,
    read_settings,
)
from mmekit_models import load_lama


class LamaHandler(EditHandler):
    # Settings live inside the class: TorchServe wants one class per handler module.

    @dataclass(frozen=True)
    class Settings:
        """LaMa's knobs under `handler:` in model-config.yaml, their one source (no defaults
        here)."""

        pad_multiple: int  # big-lama downsamples 3 times: inputs padded to a multiple of 8
        max_dilate_kernel_size: int
        context_ratio: float  # context per side, as a share of the mask part's longer side
        min_context_px: int  # ... and at least this (IOPaint's crop margin)
        max_work_pixels: int  # a larger window is downscaled to this for the network
        max_windows: int  # more separate mask parts than this: one window around them all

        def check(self) -> None:
            for name in ("pad_multiple", "min_context_px", "max_work_pixels", "max_windows"):
                if getattr(self, name) < 1:
                    raise ValueError(f"setting {name} must be at least 1")
            if self.context_ratio < 0:
                raise ValueError("setting context_ratio must be 0 or more")

    def load(self, config: HandlerContext) -> None:
        self.device = config.device
        self.settings = read_settings(self.Settings, config.settings)
        # float32 only, on a GPU too: LaMa's Fourier convolutions have no reduced-precision path
        # measured within tolerance yet (the knob exists so that the choice is visible)
        read_cuda_dtype(config.settings, "float32", allowed=("float32",))
        self.network, self.weights_info = load_lama(
            config.path("weights_dir", "weights"), config.device
        )

    def decode(self, payload: dict) -> InpaintInputs:
        return read_inpaint_inputs(payload, self.image_limits, self.settings.max_dilate_kernel_size)

    def validate(self, request: InpaintInputs) -> None:
        self.refuse_unfittable(request.image.size)

    def infer(self, request: InpaintInputs) -> InpaintInputs:
        image = request.image
        for box in self.windows(request.mask):
            window = np.asarray(image.crop(box))
            left, top, right, bottom = box
            mask = request.mask[top:bottom, left:right]
            generated = composite(window, self.inpaint_window(window, mask), mask)
            image.paste(Image.fromarray(generated), box[:2])  # windows are disjoint
        return request

    def windows(self, mask: np.ndarray) -> list[Box]:
        settings = self.settings
        return context_windows(
            mask, settings.context_ratio, settings.min_context_px, settings.max_windows
        )

    def inpaint_window(self, window: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """A window, downscaled to max_work_pixels when larger, through the network."""
        height, width = mask.shape
        scale = math.sqrt(self.settings.max_work_pixels / (width * height))
        if scale >= 1:
            return self.inpaint(window, mask)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        small = np.asarray(Image.fromarray(window).resize(size, Image.Resampling.BOX))
        # a work pixel is part of the hole when any pixel it covers is: the hole never shrinks
        small_mask = Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.Resampling.BOX)
        generated = self.inpaint(small, np.asarray(small_mask) > 0)
        return np.asarray(
            Image.fromarray(generated).resize((width, height), Image.Resampling.BICUBIC)
        )

    def inpaint(self, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """H x W x 3 uint8 + H x W bool -> the network's H x W x 3 uint8 prediction."""
        height, width = mask.shape
        multiple = self.settings.pad_multiple
        # padded as advimman/lama's dataset pads (numpy's symmetric mode: the edge pixel is
        # repeated), so the network sees the borders it was trained on
        padding = (
            (0, padded_side(height, multiple) - height),
            (0, padded_side(width, multiple) - width),
        )
        image = np.pad(image, (*padding, (0, 0)), mode="symmetric")
        mask = np.pad(mask, padding, mode="symmetric")
        image_tensor = torch.from_numpy(image).to(self.device).permute(2, 0, 1)[None].float() / 255
        mask_tensor = torch.from_numpy(mask).to(self.device)[None, None].float()
        # LaMa sees the image with the hole blanked out, and the hole itself as a 4th channel.
        network_input = torch.cat([image_tensor * (1 - mask_tensor), mask_tensor], dim=1)
        prediction = self.network(network_input)[:, :, :height, :width]
        prediction = (prediction.clamp(0, 1) * 255).round().to(torch.uint8)
        return prediction[0].permute(1, 2, 0).cpu().numpy()

    def encode(self, result: InpaintInputs) -> dict:
        return self.fit_image(result.image, result)


def padded_side(side: int, multiple: int) -> int:
    """The next multiple, and at least two of them: the bottleneck's reflection padding needs
    two pixels, so an 8 px image would fail at 1 px there."""
    return max(-(-side // multiple) * multiple, 2 * multiple)
