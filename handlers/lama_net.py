"""LaMa's big-lama generator: a ResNet of fast Fourier convolutions (FFC).

Our own implementation of the architecture described in "Resolution-robust Large Mask
Inpainting with Fourier Convolutions" (Suvorov et al., 2022), for inference. Module names and
parameter shapes follow the official generator, so the published `best.ckpt` loads after
stripping its `generator.` prefix (scripts/lama_checkpoint.py does that, once, at fetch time).

An FFC splits channels into a local part (ordinary convolutions) and a global part whose
spectral transform convolves in the Fourier domain, so every output pixel sees the whole image.

Ships inside the LaMa archive and imports nothing but torch.
"""

from __future__ import annotations

import torch
from torch import nn

# The published big-lama training config (configs/training/big-lama.yaml) and a tiny one of the
# same structure for tests. n_downsampling 3 in both: inputs are padded to multiples of 8.
LAMA_VARIANTS: dict[str, dict] = {
    "big-lama": {
        "input_nc": 4,
        "output_nc": 3,
        "ngf": 64,
        "n_downsampling": 3,
        "n_blocks": 18,
        "resnet_ratio": 0.75,
    },
    "tiny": {
        "input_nc": 4,
        "output_nc": 3,
        "ngf": 8,
        "n_downsampling": 3,
        "n_blocks": 2,
        "resnet_ratio": 0.75,
    },
}


class FourierUnit(nn.Module):
    """1x1 convolution in the frequency domain: real FFT, conv + BN + ReLU, inverse FFT."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        # real and imaginary parts are interleaved as channels: [c0.re, c0.im, c1.re, ...]
        self.conv_layer = nn.Conv2d(channels * 2, channels * 2, kernel_size=1, bias=False)
        self.bn = nn.BatchNorm2d(channels * 2)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        spectrum = torch.fft.rfftn(x.float(), dim=(-2, -1), norm="ortho")
        stacked = torch.stack((spectrum.real, spectrum.imag), dim=2)  # B, C, 2, H, W/2+1
        stacked = stacked.reshape(batch, channels * 2, *stacked.shape[-2:]).to(x.dtype)
        stacked = self.relu(self.bn(self.conv_layer(stacked)))
        stacked = stacked.float().reshape(batch, channels, 2, *stacked.shape[-2:])
        spectrum = torch.complex(stacked[:, :, 0], stacked[:, :, 1])
        return torch.fft.irfftn(spectrum, s=(height, width), dim=(-2, -1), norm="ortho").to(x.dtype)


class SpectralTransform(nn.Module):
    """The global branch: squeeze channels, Fourier unit with a residual, expand again."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        hidden = out_channels // 2
        self.downsample = nn.Identity()  # stride 1 everywhere in the generator's global path
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_channels, hidden, kernel_size=1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
        )
        self.fu = FourierUnit(hidden)
        self.conv2 = nn.Conv2d(hidden, out_channels, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(self.downsample(x))
        return self.conv2(x + self.fu(x))


class FFC(nn.Module):
    """Four paths between local (l) and global (g) channels: l->l, l->g, g->l are spatial
    convolutions, g->g is the spectral transform. A path with no channels is an Identity."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        ratio_gin: float,
        ratio_gout: float,
        stride: int = 1,
        padding: int = 0,
    ) -> None:
        super().__init__()
        in_global = int(in_channels * ratio_gin)
        in_local = in_channels - in_global
        out_global = int(out_channels * ratio_gout)
        out_local = out_channels - out_global
        self.has_local_out = out_local > 0
        self.has_global_out = out_global > 0

        def conv(source: int, target: int) -> nn.Module:
            if source == 0 or target == 0:
                return nn.Identity()
            return nn.Conv2d(
                source, target, kernel_size, stride, padding, bias=False, padding_mode="reflect"
            )

        self.convl2l = conv(in_local, out_local)
        self.convl2g = conv(in_local, out_global)
        self.convg2l = conv(in_global, out_local)
        self.convg2g = (
            SpectralTransform(in_global, out_global) if in_global and out_global else nn.Identity()
        )

    def forward(self, x: tuple[torch.Tensor, torch.Tensor | None]) -> tuple:
        x_local, x_global = x
        out_local = out_global = None
        if self.has_local_out:
            out_local = self.convl2l(x_local)
            if x_global is not None:
                out_local = out_local + self.convg2l(x_global)
        if self.has_global_out:
            out_global = self.convl2g(x_local)
            if x_global is not None:
                out_global = out_global + self.convg2g(x_global)
        return out_local, out_global


class FFC_BN_ACT(nn.Module):  # noqa: N801 - the official module name, kept for the key names
    """FFC, then batch norm and ReLU on each branch that has channels."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        ratio_gin: float,
        ratio_gout: float,
        stride: int = 1,
        padding: int = 0,
    ) -> None:
        super().__init__()
        self.ffc = FFC(
            in_channels, out_channels, kernel_size, ratio_gin, ratio_gout, stride, padding
        )
        global_channels = int(out_channels * ratio_gout)
        local_channels = out_channels - global_channels
        self.bn_l = nn.BatchNorm2d(local_channels) if local_channels else nn.Identity()
        self.bn_g = nn.BatchNorm2d(global_channels) if global_channels else nn.Identity()
        self.act_l = nn.ReLU(inplace=True) if local_channels else nn.Identity()
        self.act_g = nn.ReLU(inplace=True) if global_channels else nn.Identity()

    def forward(self, x: torch.Tensor | tuple) -> tuple:
        if isinstance(x, torch.Tensor):
            x = (x, None)
        x_local, x_global = self.ffc(x)
        if x_local is not None:
            x_local = self.act_l(self.bn_l(x_local))
        if x_global is not None:
            x_global = self.act_g(self.bn_g(x_global))
        return x_local, x_global


class FFCResnetBlock(nn.Module):
    def __init__(self, channels: int, ratio: float) -> None:
        super().__init__()
        self.conv1 = FFC_BN_ACT(channels, channels, 3, ratio, ratio, padding=1)
        self.conv2 = FFC_BN_ACT(channels, channels, 3, ratio, ratio, padding=1)

    def forward(self, x: tuple) -> tuple:
        x_local, x_global = self.conv2(self.conv1(x))
        return x[0] + x_local, x[1] + x_global


class ConcatTupleLayer(nn.Module):
    def forward(self, x: tuple) -> torch.Tensor:
        x_local, x_global = x
        return x_local if x_global is None else torch.cat((x_local, x_global), dim=1)


class FFCResNetGenerator(nn.Module):
    """The masked image (RGB in [0, 1]) and its mask in, the inpainted RGB in [0, 1] out.

    Layout of `model` (so of the checkpoint's keys): reflection pad + 7x7 FFC (local only);
    n_downsampling strided FFCs, the last one splitting into local/global channels; n_blocks
    FFC residual blocks; concatenation; transposed-conv upsampling with BN + ReLU; reflection
    pad + 7x7 conv; sigmoid.
    """

    def __init__(
        self,
        input_nc: int = 4,
        output_nc: int = 3,
        ngf: int = 64,
        n_downsampling: int = 3,
        n_blocks: int = 18,
        resnet_ratio: float = 0.75,
        max_features: int = 1024,
    ) -> None:
        super().__init__()
        self.pad_multiple = 2**n_downsampling
        layers: list[nn.Module] = [
            nn.ReflectionPad2d(3),
            FFC_BN_ACT(input_nc, ngf, kernel_size=7, ratio_gin=0, ratio_gout=0),
        ]
        for i in range(n_downsampling):
            last = i == n_downsampling - 1
            layers.append(
                FFC_BN_ACT(
                    min(max_features, ngf * 2**i),
                    min(max_features, ngf * 2 ** (i + 1)),
                    kernel_size=3,
                    ratio_gin=0,
                    ratio_gout=resnet_ratio if last else 0,
                    stride=2,
                    padding=1,
                )
            )
        bottleneck = min(max_features, ngf * 2**n_downsampling)
        layers += [FFCResnetBlock(bottleneck, resnet_ratio) for _ in range(n_blocks)]
        layers.append(ConcatTupleLayer())
        for i in range(n_downsampling):
            channels = min(max_features, ngf * 2 ** (n_downsampling - i))
            layers += [
                nn.ConvTranspose2d(
                    channels,
                    min(max_features, channels // 2),
                    kernel_size=3,
                    stride=2,
                    padding=1,
                    output_padding=1,
                ),
                nn.BatchNorm2d(min(max_features, channels // 2)),
                nn.ReLU(inplace=True),
            ]
        layers += [
            nn.ReflectionPad2d(3),
            nn.Conv2d(ngf, output_nc, kernel_size=7),
            nn.Sigmoid(),
        ]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        if height % self.pad_multiple or width % self.pad_multiple:
            raise ValueError(
                f"input is {width}x{height}; both sides must be multiples of {self.pad_multiple} "
                "(pad before calling)"
            )
        return self.model(x)


def build_lama(variant: str) -> FFCResNetGenerator:
    """A randomly initialised generator of the named variant, in eval mode."""
    if variant not in LAMA_VARIANTS:
        raise ValueError(f"unknown LaMa variant {variant!r}; known: {', '.join(LAMA_VARIANTS)}")
    return FFCResNetGenerator(**LAMA_VARIANTS[variant]).eval()
