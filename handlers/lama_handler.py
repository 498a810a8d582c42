"""LaMa: an image and a mask -> the masked object erased (filled from its surroundings).

Request  {"image": b64, "mask_image": b64 (same size; > 0 = erase), "dilate_kernel_size": 0,
          "format": "png" | "jpeg" | "webp"}
Response {"generated_image": b64} — the input size; pixels outside the mask are unchanged.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from mmekit_common import (
    EditHandler,
    HandlerContext,
    InpaintInputs,
    composite,
    encode_image,
    read_inpaint_inputs,
)
from mmekit_models import load_lama


class LamaHandler(EditHandler):
    def load(self, config: HandlerContext) -> None:
        self.device = config.device
        self.network, self.weights_info = load_lama(
            config.path("weights_dir", "weights"), config.device
        )
        # the generator downsamples 2**n times; inputs are padded to that multiple
        self.pad_multiple = int(config.setting("pad_multiple", 8))
        self.max_dilate_kernel_size = int(config.setting("max_dilate_kernel_size", 255))

    def decode(self, payload: dict) -> InpaintInputs:
        return read_inpaint_inputs(payload, self.image_limits, self.max_dilate_kernel_size)

    def infer(self, request: InpaintInputs) -> InpaintInputs:
        original = np.asarray(request.image)
        if not request.mask.any():
            return request  # nothing to erase
        generated = self.inpaint(original, request.mask)
        image = Image.fromarray(composite(original, generated, request.mask))
        return InpaintInputs(image, request.mask, request.response_format)

    def inpaint(self, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """H x W x 3 uint8 + H x W bool -> the network's H x W x 3 uint8 prediction."""
        height, width = mask.shape
        image_tensor = torch.tensor(image, device=self.device).permute(2, 0, 1)[None].float() / 255
        mask_tensor = torch.tensor(mask, device=self.device)[None, None].float()
        # LaMa sees the image with the hole blanked out, and the hole itself as a 4th channel.
        network_input = torch.cat([image_tensor * (1 - mask_tensor), mask_tensor], dim=1)
        pad_bottom = padded_side(height, self.pad_multiple) - height
        pad_right = padded_side(width, self.pad_multiple) - width
        network_input = torch.nn.functional.pad(
            network_input, (0, pad_right, 0, pad_bottom), mode="replicate"
        )
        prediction = self.network(network_input)[:, :, :height, :width]
        prediction = (prediction.clamp(0, 1) * 255).round().to(torch.uint8)
        return prediction[0].permute(1, 2, 0).cpu().numpy()

    def encode(self, result: InpaintInputs) -> dict:
        return {"generated_image": encode_image(result.image, result.response_format)}


def padded_side(side: int, multiple: int) -> int:
    """The next multiple, and at least two of them: the bottleneck's reflection padding needs
    two pixels, so an 8 px image would fail at 1 px there."""
    return max(-(-side // multiple) * multiple, 2 * multiple)
