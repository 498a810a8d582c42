"""Our big-lama generator: the official checkpoint layout, the safe converter, the numerics."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import lama_net
from scripts import lama_checkpoint

TRIPWIRE: list[str] = []


def _tripwire(message: str) -> str:
    TRIPWIRE.append(message)
    return message


class TrainingConfig:
    """Stands for the training code's objects a Lightning checkpoint carries."""

    def __reduce__(self):
        return (_tripwire, ("unpickling ran training code",))


def official_checkpoint(variant: str = "big-lama") -> dict:
    """A Lightning checkpoint in big-lama's key layout, made from our own module."""
    torch.manual_seed(0)
    generator = lama_net.build_lama(variant).state_dict()
    state_dict = {f"generator.{name}": tensor for name, tensor in generator.items()}
    state_dict.update(
        {
            "discriminator.model0.0.ffc.convl2l.weight": torch.zeros(64, 3, 3, 3),
            "loss_resnet_pl.impl.conv1.weight": torch.zeros(8, 3, 3, 3),
            "val_evaluator.scores.ssim.window": torch.zeros(1, 1, 11, 11),
        }
    )
    return {"state_dict": state_dict, "epoch": 40, "hyper_parameters": TrainingConfig()}


def test_official_key_names_and_shapes():
    state = lama_net.build_lama("big-lama").state_dict()
    assert state["model.1.ffc.convl2l.weight"].shape == (64, 4, 7, 7)
    assert state["model.4.ffc.convl2g.weight"].shape == (384, 256, 3, 3)  # last downsample
    assert state["model.5.conv1.ffc.convg2g.conv1.0.weight"].shape == (192, 384, 1, 1)
    assert state["model.5.conv1.ffc.convg2g.fu.conv_layer.weight"].shape == (384, 384, 1, 1)
    assert state["model.22.conv2.bn_g.running_var"].shape == (384,)  # the 18th block
    assert state["model.24.weight"].shape == (512, 256, 3, 3)  # ConvTranspose2d
    assert state["model.34.weight"].shape == (3, 64, 7, 7)
    assert "model.23.weight" not in state  # ConcatTupleLayer has no parameters
    parameters = sum(p.numel() for p in lama_net.build_lama("big-lama").parameters())
    assert parameters == 50_975_875  # "big LaMa": 51M parameters


def test_converter_maps_every_generator_key_and_drops_the_rest():
    checkpoint = official_checkpoint()
    converted = lama_checkpoint.convert_big_lama_state_dict(checkpoint["state_dict"])
    ours = lama_net.build_lama("big-lama").state_dict()
    assert converted.keys() == ours.keys()
    for name, tensor in converted.items():
        assert torch.equal(tensor, checkpoint["state_dict"][f"generator.{name}"])
    lama_net.build_lama("big-lama").load_state_dict(converted, strict=True)


def test_converter_names_what_is_missing_or_misshapen():
    state_dict = official_checkpoint("tiny")["state_dict"]
    del state_dict["generator.model.1.bn_l.running_mean"]
    state_dict["generator.model.18.weight"] = torch.zeros(3, 8, 5, 5)  # tiny's output conv
    state_dict["generator.model.99.weight"] = torch.zeros(1)
    with pytest.raises(ValueError) as raised:
        lama_checkpoint.convert_big_lama_state_dict(state_dict, "tiny")
    message = str(raised.value)
    assert "1 missing: model.1.bn_l.running_mean" in message
    assert "1 unexpected: model.99.weight" in message
    assert "model.18.weight (3, 8, 5, 5) != (3, 8, 7, 7)" in message


def test_lightning_checkpoint_is_read_without_running_its_code(tmp_path):
    path = tmp_path / "best.ckpt"
    torch.save(official_checkpoint("tiny"), path)
    TRIPWIRE.clear()
    tensors = lama_checkpoint.load_checkpoint_state_dict(path)
    assert TRIPWIRE == []
    assert "generator.model.1.ffc.convl2l.weight" in tensors

    out = tmp_path / "model.safetensors"
    lama_checkpoint.convert_file(path, out, "tiny")
    network = lama_net.build_lama("tiny")
    network.load_state_dict(load_file(str(out)), strict=True)


def test_plain_state_dict_checkpoints_load_too(tmp_path):
    path = tmp_path / "plain.pth"
    torch.save(official_checkpoint("tiny")["state_dict"], path)
    assert "generator.model.18.bias" in lama_checkpoint.load_checkpoint_state_dict(path)


def test_tiny_forward_keeps_size_stays_in_range_and_is_deterministic():
    network = lama_net.build_lama("tiny")
    torch.manual_seed(1)
    image = torch.rand(1, 4, 40, 56)
    with torch.inference_mode():
        first, second = network(image), network(image)
    assert first.shape == (1, 3, 40, 56)
    assert 0 <= first.min() and first.max() <= 1
    assert torch.equal(first, second)


def test_input_sides_must_be_multiples_of_eight():
    with pytest.raises(ValueError, match="multiples of 8"):
        lama_net.build_lama("tiny")(torch.rand(1, 4, 40, 50))


def test_fourier_unit_matches_a_longhand_spectral_convolution():
    torch.manual_seed(2)
    unit = lama_net.FourierUnit(3).eval()
    with torch.no_grad():
        unit.bn.running_mean.uniform_(-0.1, 0.1)
        unit.bn.running_var.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 8, 10)
    # longhand: per input channel c the conv sees [c.real, c.imag] as channels 2c, 2c+1
    spectrum = torch.fft.rfft2(x, norm="ortho")
    channels = []
    for c in range(3):
        channels += [spectrum[:, c].real, spectrum[:, c].imag]
    mixed = torch.nn.functional.conv2d(torch.stack(channels, 1), unit.conv_layer.weight)
    bn = unit.bn
    mixed = (mixed - bn.running_mean[None, :, None, None]) / torch.sqrt(
        bn.running_var[None, :, None, None] + bn.eps
    ) * bn.weight[None, :, None, None] + bn.bias[None, :, None, None]
    mixed = mixed.relu()
    expected = torch.fft.irfft2(
        torch.complex(mixed[:, 0::2], mixed[:, 1::2]), s=(8, 10), norm="ortho"
    )
    with torch.no_grad():
        assert torch.allclose(unit(x), expected, atol=1e-5)
