"""SAM's prompt -> mask path, doing only the work a click needs.

segment-anything's `SamPredictor.predict` recomputes, on every click, everything that depends
only on the image (positional encodings, the first transformer layer's image projections), walks
the image tokens in a transposed (strided) layout, runs the two mask upscaling convolutions as
transposed convolutions, and upsamples all three masks to full size. This module runs the same
mask decoder with the same weights, but:

- `prepare` computes the image-only tensors once per image; they are cached with its embedding;
- the image tokens stay contiguous, and image -> token attention takes its softmax over a
  contiguous axis (mathematically the same softmax, ~20x faster for its 7-wide rows on a CPU);
- each kernel-2/stride-2 transposed convolution is one matrix product over channels-last
  pixels (each input pixel owns its 2x2 output block), so no layout is rearranged until the
  few mask logits are;
- `predict_tokens` yields the predicted IoUs before any mask exists, so a handler picks its
  mask first; `mask_logits` computes only the masks asked for, and `upscale` turns one
  256x256 low-resolution mask into a full-size one.

A prepared image holds the embedding plus its first-layer projections: about 14 MB (256
channels at 64x64, float32) per cached image, where the embedding alone was 4 MB.

The result matches `SamPredictor` to float rounding (tests/handlers/test_sam_decoder.py checks
logits, scores and masks against it). The image encoder path (`encode`) is SamPredictor's
`set_image`, with an optional reduced-precision encoder on CUDA.

Ships inside the SAM archive (imported as a top-level module).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

# `encoder_dtype:` under `handler:` in model-config.yaml; reduced precision is CUDA-only.
ENCODER_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class PreparedImage:
    """Everything the decoder needs from one image, computed once (`ClickDecoder.prepare`)."""

    features: Tensor  # 1 x C x h x w, the image encoder's output (float32)
    original_size: tuple[int, int]  # (height, width) of the input image
    input_size: tuple[int, int]  # (height, width) after resizing the long side to img_size
    keys: Tensor  # 1 x hw x C: features + the no-mask embedding, token-major (contiguous)
    first_keys: Tensor  # layer 0's token -> image key projection of keys + positions
    first_values: Tensor  # layer 0's token -> image value projection of keys
    first_queries: Tensor  # layer 0's image -> token query projection of keys + positions


@dataclass
class ClickTokens:
    """The two-way transformer's output for one click: what every mask is computed from."""

    queries: Tensor  # 1 x tokens x C: the IoU token, the 4 mask tokens, the prompt tokens
    keys: Tensor  # 1 x hw x C: the image tokens after attending to the prompt


class ClickDecoder:
    """SAM's prompt encoder + mask decoder for one image at a time, without redundant work."""

    def __init__(self, sam: torch.nn.Module, encoder_dtype: torch.dtype = torch.float32) -> None:
        from segment_anything.utils.transforms import ResizeLongestSide

        self.sam = sam
        self.decoder = sam.mask_decoder
        self.transformer = sam.mask_decoder.transformer
        self.transform = ResizeLongestSide(sam.image_encoder.img_size)
        self.device = next(sam.parameters()).device
        self.encoder_dtype = encoder_dtype
        if encoder_dtype != torch.float32:
            sam.image_encoder.to(encoder_dtype)  # half the encoder's memory, and its time
        with torch.inference_mode():
            # the image's positional encoding depends on the model only
            self.key_pe = self._tokens(sam.prompt_encoder.get_dense_pe())
            self.no_mask = sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
            self.upscale_weights = [
                _block_weights(sam.mask_decoder.output_upscaling[index]) for index in (0, 3)
            ]

    # -- once per image ----------------------------------------------------------------------
    @torch.inference_mode()
    def encode(self, image: np.ndarray) -> PreparedImage:
        """H x W x 3 uint8 RGB -> the prepared image (SamPredictor.set_image, then prepare)."""
        resized = self.transform.apply_image(image)
        pixels = torch.as_tensor(resized, device=self.device).permute(2, 0, 1).contiguous()[None]
        model_input = self.sam.preprocess(pixels)  # normalised and padded, float32
        features = self.sam.image_encoder(model_input.to(self.encoder_dtype)).float()
        return self.prepare(features, image.shape[:2], tuple(pixels.shape[-2:]))

    @torch.inference_mode()
    def prepare(
        self, features: Tensor, original_size: tuple[int, int], input_size: tuple[int, int]
    ) -> PreparedImage:
        layer = self.transformer.layers[0]
        keys = self._tokens(features + self.no_mask.expand_as(features))
        positioned = keys + self.key_pe
        return PreparedImage(
            features=features,
            original_size=(int(original_size[0]), int(original_size[1])),
            input_size=(int(input_size[0]), int(input_size[1])),
            keys=keys,
            first_keys=layer.cross_attn_token_to_image.k_proj(positioned),
            first_values=layer.cross_attn_token_to_image.v_proj(keys),
            first_queries=layer.cross_attn_image_to_token.q_proj(positioned),
        )

    # -- every click -------------------------------------------------------------------------
    @torch.inference_mode()
    def predict(
        self, image: PreparedImage, point_coords: np.ndarray, point_labels: np.ndarray
    ) -> tuple[Tensor, Tensor]:
        """Clicks in input pixels -> (3 x h' x w' low-resolution mask logits, 3 predicted IoUs),
        as SamPredictor.predict(multimask_output=True) computes them before upsampling."""
        tokens, scores = self.predict_tokens(image, point_coords, point_labels)
        return self.mask_logits(image, tokens, [0, 1, 2]), scores

    @torch.inference_mode()
    def predict_tokens(
        self, image: PreparedImage, point_coords: np.ndarray, point_labels: np.ndarray
    ) -> tuple[ClickTokens, Tensor]:
        """The transformer's part of predict, and the 3 predicted IoUs: enough to choose a
        mask before any mask is computed."""
        coords = self.transform.apply_coords(point_coords, image.original_size)
        points = torch.as_tensor(coords, dtype=torch.float, device=self.device)[None]
        labels = torch.as_tensor(point_labels, dtype=torch.int, device=self.device)[None]
        sparse, _ = self.sam.prompt_encoder(points=(points, labels), boxes=None, masks=None)
        decoder = self.decoder
        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
        tokens = torch.cat((output_tokens[None], sparse), dim=1)
        queries, keys = self._transformer(image, tokens)
        scores = decoder.iou_prediction_head(queries[:, 0, :])[0, 1:4]
        return ClickTokens(queries, keys), scores

    @torch.inference_mode()
    def mask_logits(self, image: PreparedImage, tokens: ClickTokens, masks: list[int]) -> Tensor:
        """The low-resolution logits of the multimask outputs numbered in `masks` (0-2)."""
        # output token 0 is the single-mask one; the three multimask ones follow it
        hypernetworks = self.decoder.output_hypernetworks_mlps
        hyper_in = torch.stack(
            [hypernetworks[1 + k](tokens.queries[:, 2 + k, :]) for k in masks], dim=1
        )[0]
        return self._mask_logits(tokens.keys[0], hyper_in, image.features.shape[-2:])

    def upscale(self, logits: Tensor, image: PreparedImage) -> np.ndarray:
        """One low-resolution mask -> the H x W bool mask of the input image
        (Sam.postprocess_masks on this mask alone, thresholded)."""
        with torch.inference_mode():
            size = self.sam.image_encoder.img_size
            mask = F.interpolate(logits[None, None], (size, size), mode="bilinear",
                                 align_corners=False)  # fmt: skip
            mask = mask[..., : image.input_size[0], : image.input_size[1]]
            if image.original_size != image.input_size:  # (at the same size it is the identity)
                mask = F.interpolate(
                    mask, image.original_size, mode="bilinear", align_corners=False
                )
            return (mask[0, 0] > self.sam.mask_threshold).cpu().numpy()

    # -- the mask decoder's parts ------------------------------------------------------------
    @staticmethod
    def _tokens(grid: Tensor) -> Tensor:
        """1 x C x h x w -> 1 x hw x C, contiguous."""
        return grid.flatten(2).permute(0, 2, 1).contiguous()

    def _transformer(self, image: PreparedImage, point_embedding: Tensor) -> tuple[Tensor, Tensor]:
        """TwoWayTransformer.forward, with layer 0's image projections taken from `image`."""
        keys, key_pe = image.keys, self.key_pe
        queries = point_embedding
        for index, layer in enumerate(self.transformer.layers):
            if layer.skip_first_layer_pe:
                queries = layer.self_attn(q=queries, k=queries, v=queries)
            else:
                q = queries + point_embedding
                queries = queries + layer.self_attn(q=q, k=q, v=queries)
            queries = layer.norm1(queries)
            to_image = layer.cross_attn_token_to_image
            to_tokens = layer.cross_attn_image_to_token
            q = queries + point_embedding
            if index == 0:
                image_keys, image_values = image.first_keys, image.first_values
                image_queries = image.first_queries
            else:
                positioned = keys + key_pe  # both attentions of the layer see the same keys
                image_keys, image_values = to_image.k_proj(positioned), to_image.v_proj(keys)
                image_queries = to_tokens.q_proj(positioned)
            queries = queries + _attend(to_image, to_image.q_proj(q), image_keys, image_values)
            queries = layer.norm2(queries)
            queries = queries + layer.mlp(queries)
            queries = layer.norm3(queries)
            q = queries + point_embedding
            keys = keys + _attend_to_few(
                to_tokens, image_queries, to_tokens.k_proj(q), to_tokens.v_proj(queries)
            )
            keys = layer.norm4(keys)
        final = self.transformer.final_attn_token_to_image
        q = queries + point_embedding
        queries = queries + final(q=q, k=keys + key_pe, v=keys)
        return self.transformer.norm_final_attn(queries), keys

    def _mask_logits(self, keys: Tensor, hyper_in: Tensor, size: torch.Size) -> Tensor:
        """output_upscaling, then each mask token's dot product with every upscaled pixel,
        all in channels-last pixel blocks; only the n x 4h x 4w logits are rearranged."""
        upscaling = self.decoder.output_upscaling
        norm, first_gelu, second_gelu = upscaling[1], upscaling[2], upscaling[4]
        (weight_1, bias_1), (weight_2, bias_2) = self.upscale_weights
        pixels = torch.addmm(bias_1, keys, weight_1).reshape(-1, bias_1.numel() // 4)
        pixels = first_gelu(_layer_norm_channels_last(norm, pixels))
        pixels = torch.addmm(bias_2, pixels, weight_2).reshape(-1, bias_2.numel() // 4)
        pixels = second_gelu(pixels)
        logits = pixels @ hyper_in.T  # (h w 2 2 2 2) x masks
        height, width = int(size[0]), int(size[1])
        logits = logits.reshape(height, width, 2, 2, 2, 2, -1)
        # block order (i, j, a, b, a', b') -> row 4i + 2a + a', column 4j + 2b + b'
        return logits.permute(6, 0, 2, 4, 1, 3, 5).reshape(-1, 4 * height, 4 * width)


def _block_weights(deconv: torch.nn.ConvTranspose2d) -> tuple[Tensor, Tensor]:
    """A kernel-2, stride-2 ConvTranspose2d as (weight, bias) of one matrix product per input
    pixel: C_in -> (2 x 2 x C_out), the output block in row-major order, channels last."""
    assert deconv.kernel_size == (2, 2) and deconv.stride == (2, 2), deconv
    c_in, c_out = deconv.weight.shape[:2]
    weight = deconv.weight.permute(0, 2, 3, 1).reshape(c_in, 4 * c_out).contiguous()
    return weight, deconv.bias.repeat(4).contiguous()


def _layer_norm_channels_last(norm: torch.nn.Module, pixels: Tensor) -> Tensor:
    """segment_anything's LayerNorm2d (the same biased variance and eps) over the channels of
    pixels x channels rows: one fused kernel instead of its seven passes."""
    return F.layer_norm(pixels, pixels.shape[-1:], norm.weight, norm.bias, norm.eps)


def _separate_heads(x: Tensor, heads: int) -> Tensor:
    batch, tokens, channels = x.shape
    return x.reshape(batch, tokens, heads, channels // heads).transpose(1, 2)


def _attend(attention: torch.nn.Module, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """segment_anything's Attention.forward after its q/k/v projections."""
    heads = attention.num_heads
    q, k, v = (_separate_heads(x, heads) for x in (q, k, v))
    weights = torch.softmax(q @ k.transpose(2, 3) / math.sqrt(q.shape[-1]), dim=-1)
    out = (weights @ v).transpose(1, 2)
    return attention.out_proj(out.reshape(out.shape[0], out.shape[1], -1))


def _attend_to_few(attention: torch.nn.Module, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """_attend for thousands of queries over a few keys (image -> tokens): the weights are
    computed transposed, keys x queries, so the softmax runs along a contiguous axis."""
    heads = attention.num_heads
    q, k, v = (_separate_heads(x, heads) for x in (q, k, v))
    weights = torch.softmax(k @ q.transpose(2, 3) / math.sqrt(q.shape[-1]), dim=-2)
    out = (weights.transpose(2, 3) @ v).transpose(1, 2)
    return attention.out_proj(out.reshape(out.shape[0], out.shape[1], -1))
