"""Stable Diffusion 2 inpainting: image + mask + prompt -> the masked object replaced.

Request  {"image": b64, "mask_image": b64, "prompt": "a red vase", "negative_prompt": "...",
          "gen_args": {"seed": 0-4294967295, "num_inference_steps": 1-100,
                       "guidance_scale": 0-30},   (object or JSON string, all optional)
          "dilate_kernel_size": 0, "format": "png" | "jpeg" | "webp"}   (format: the input's own
          by default)
Response {"generated_image": b64, "format": "png" | "jpeg" | "webp", "seed": n} — the input
size; pixels outside the mask are unchanged. Only a window around the mask goes through the
model: the mask's box plus a margin, at least window_size (512) px, scaled to 512 px on its
longer side (the AWS sample crops exactly 512x512).
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import numpy as np
import torch
from mmekit_limits import MAX_SEED
from PIL import Image

from mmekit_common import (
    EditHandler,
    HandlerContext,
    InpaintInputs,
    RequestError,
    composite,
    read_cuda_dtype,
    read_float,
    read_inpaint_inputs,
    read_int,
    read_json_object,
    read_settings,
    read_text,
    run_dtype,
)
from mmekit_models import load_sd


class SdHandler(EditHandler):
    # Request/result types live inside the class: TorchServe wants one class per handler module.

    @dataclass
    class Request:
        inputs: InpaintInputs
        prompt: str
        negative_prompt: str
        seed: int
        num_inference_steps: int
        guidance_scale: float

    @dataclass
    class Result:
        image: Image.Image
        seed: int
        inputs: InpaintInputs

    @dataclass(frozen=True)
    class Settings:
        """SD's knobs under `handler:` in model-config.yaml, their one source (no defaults
        here): the editor and the client read the same file."""

        window_size: int  # the model's native size: the window around the mask
        context_margin: float  # extra context around the mask box, per side
        default_num_inference_steps: int
        max_num_inference_steps: int
        default_guidance_scale: float
        max_guidance_scale: float
        max_prompt_chars: int  # refused before tokenizing; tokens are capped at 77 too
        max_dilate_kernel_size: int

        def check(self) -> None:
            if not 1 <= self.default_num_inference_steps <= self.max_num_inference_steps:
                raise ValueError("setting default_num_inference_steps must be 1 to the maximum")
            if not 0 <= self.default_guidance_scale <= self.max_guidance_scale:
                raise ValueError("setting default_guidance_scale must be 0 to the maximum")
            if self.window_size < 8 or self.context_margin < 0 or self.max_prompt_chars < 1:
                raise ValueError("settings window_size, context_margin, max_prompt_chars too small")

    def load(self, config: HandlerContext) -> None:
        self.device = config.device
        # fp16 halves memory and time on a GPU; CPUs run fp32
        dtype = run_dtype(config.device, read_cuda_dtype(config.settings, "float16"))
        self.pipeline, self.weights_info = load_sd(
            config.path("weights_dir", "weights"), config.device, dtype
        )
        self.settings = read_settings(self.Settings, config.settings)

    # -- decode -----------------------------------------------------------------------------
    def decode(self, payload: dict) -> SdHandler.Request:
        inputs = read_inpaint_inputs(
            payload, self.image_limits, self.settings.max_dilate_kernel_size
        )
        gen_args = read_json_object(payload.get("gen_args"), "gen_args")
        seed = gen_args.get("seed")
        return self.Request(
            inputs=inputs,
            prompt=read_text(payload, "prompt", self.settings.max_prompt_chars, required=True),
            negative_prompt=read_text(payload, "negative_prompt", self.settings.max_prompt_chars),
            seed=secrets.randbits(32)
            if seed is None
            else read_int(gen_args, "seed", 0, 0, MAX_SEED),
            num_inference_steps=read_int(
                gen_args,
                "num_inference_steps",
                self.settings.default_num_inference_steps,
                1,
                self.settings.max_num_inference_steps,
            ),
            guidance_scale=read_float(
                gen_args,
                "guidance_scale",
                self.settings.default_guidance_scale,
                0.0,
                self.settings.max_guidance_scale,
            ),
        )

    # -- validate ---------------------------------------------------------------------------
    def validate(self, request: SdHandler.Request) -> None:
        """A result that fits the response; prompts that fit CLIP's context (refused, never
        silently truncated)."""
        self.refuse_unfittable(request.inputs.image.size)
        tokenizer = self.pipeline.tokenizer
        limit = tokenizer.model_max_length
        for field, text in (
            ("prompt", request.prompt),
            ("negative_prompt", request.negative_prompt),
        ):
            count = len(tokenizer(text, truncation=False).input_ids)
            if count > limit:
                raise RequestError(
                    "prompt_too_long",
                    f"'{field}' is {count} tokens; the limit is {limit} (including the start "
                    "and end tokens): shorten it",
                )

    # -- infer ------------------------------------------------------------------------------
    def infer(self, request: SdHandler.Request) -> SdHandler.Result:
        inputs = request.inputs
        if not inputs.mask.any():  # nothing to replace
            return self.Result(inputs.image, request.seed, inputs)
        left, top, right, bottom = box = self.window_box(inputs.mask)
        # only the window is converted and copied: a 24 MP photo is never a float array here
        window = inputs.image.crop(box)
        window_mask = inputs.mask[top:bottom, left:right]
        model_size = self.model_size(window.size)
        generator = torch.Generator(device=self.device).manual_seed(request.seed)
        generated = self.pipeline(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt or None,
            image=window.resize(model_size, Image.Resampling.LANCZOS),
            mask_image=Image.fromarray(window_mask.astype(np.uint8) * 255).resize(
                model_size, Image.Resampling.NEAREST
            ),
            height=model_size[1],
            width=model_size[0],
            num_inference_steps=request.num_inference_steps,
            guidance_scale=request.guidance_scale,
            generator=generator,
        ).images[0]
        generated = generated.convert("RGB").resize(window.size, Image.Resampling.LANCZOS)
        pasted = composite(np.asarray(window), np.asarray(generated), window_mask)
        inputs.image.paste(Image.fromarray(pasted), (left, top))  # in place: no full-size copy
        return self.Result(inputs.image, request.seed, inputs)

    def window_box(self, mask: np.ndarray) -> tuple[int, int, int, int]:
        """The region around the mask that goes through the model: at least window_size wide
        (clipped to the image), larger when the mask's box plus margin is larger, and always
        containing the whole mask."""
        height, width = mask.shape
        rows = np.flatnonzero(mask.any(axis=1))
        cols = np.flatnonzero(mask.any(axis=0))
        y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        side = max(
            self.settings.window_size,
            math.ceil(max(x1 - x0, y1 - y0) * (1 + 2 * self.settings.context_margin)),
        )
        box_width, box_height = min(side, width), min(side, height)
        left = _place(x0, x1, box_width, width)
        top = _place(y0, y1, box_height, height)
        return left, top, left + box_width, top + box_height

    def model_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """Scale a window so its longer side is window_size, both sides multiples of 8 (the
        VAE's downscale), so small and large windows alike run at the model's native size."""
        scale = self.settings.window_size / max(size)
        return tuple(max(8, round(side * scale / 8) * 8) for side in size)

    # -- encode -----------------------------------------------------------------------------
    def encode(self, result: SdHandler.Result) -> dict:
        return {**self.fit_image(result.image, result.inputs), "seed": result.seed}


def _place(start: int, stop: int, length: int, limit: int) -> int:
    """Offset of a span of `length` centred on [start, stop), inside [0, limit), covering it."""
    centred = (start + stop - length) // 2
    return int(min(max(centred, stop - length, 0), start, limit - length))
