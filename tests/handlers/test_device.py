"""The device a handler runs on: the GPU TorchServe assigns, or a start-up failure that says why
(never a silent CPU fallback); the CPU when no GPU is assigned or `device: cpu` asks for it."""

from __future__ import annotations

import logging

import pytest
import torch

import mmekit_common as common
import mmekit_cuda
from tests.support import b64, box_mask, random_image

IMAGE = random_image(48, 40, seed=5)
MASK = box_mask(48, 40, (10, 10, 30, 30))
LAMA_REQUEST = {"image": b64(IMAGE), "mask_image": b64(MASK)}


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA unusable, as on this CPU machine or a g5 on driver 470 (also where a GPU is)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_an_assigned_gpu_that_torch_cannot_use_fails_initialize(serve, no_cuda):
    with pytest.raises(common.DeviceUnavailableError) as raised:
        serve("lama", gpu_id=0)
    message = str(raised.value)
    driver = mmekit_cuda.driver_version()
    assert (f"NVIDIA driver {driver}" if driver else "no NVIDIA driver found") in message
    assert f"torch {torch.__version__}" in message
    if torch.version.cuda:
        assert f"CUDA {torch.version.cuda}" in message
        assert f">= {mmekit_cuda.min_driver(torch.version.cuda)}" in message
    assert "device: cpu" in message  # how to mean the CPU on purpose


def test_the_message_names_the_driver_the_rule_and_both_fixes(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    message = common.cuda_unavailable_message(0, driver="470.256.02")
    assert "NVIDIA driver 470.256.02" in message and "CUDA 13.0" in message
    assert "driver >= 580" in message
    assert "InferenceAmiVersion" in message and "TORCH_INDEX_URL=" in message
    # a driver new enough: then libcuda is what is missing
    message = common.cuda_unavailable_message(0, driver="580.65.06")
    assert "NVIDIA_DRIVER_CAPABILITIES=compute,utility" in message
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "CPU-only build" in common.cuda_unavailable_message(0, driver="535.1")


def test_without_a_gpu_id_it_serves_on_the_cpu_and_says_so_once(serve, caplog):
    with caplog.at_level(logging.INFO, logger="mmekit_common"):
        model = serve("lama")
    started = [r.getMessage() for r in caplog.records if "running on" in r.getMessage()]
    assert len(started) == 1 and "running on cpu" in started[0]
    assert "no GPU" in started[0]
    reply = model.predict({**LAMA_REQUEST, "report_device": True})
    assert reply.status == 200 and reply.json()["device"] == "cpu"
    assert "device" not in model.predict(LAMA_REQUEST).json()  # only when asked


def test_device_cpu_runs_on_the_cpu_even_with_a_gpu_assigned(serve, no_cuda, caplog):
    with caplog.at_level(logging.INFO, logger="mmekit_common"):
        model = serve("lama", gpu_id=0, device="cpu")
    assert model.handler.device.type == "cpu"
    started = [r.getMessage() for r in caplog.records if "running on" in r.getMessage()]
    assert len(started) == 1 and "device: cpu" in started[0] and "GPU 0" in started[0]
    assert model.predict({**LAMA_REQUEST, "report_device": True}).json()["device"] == "cpu"


def test_device_setting_is_strict(tmp_path):
    class Context:
        system_properties = {"model_dir": str(tmp_path), "gpu_id": None}
        model_yaml_config = {"handler": {"device": "gpu"}}

    with pytest.raises(ValueError, match="device='gpu'.*auto, cpu"):
        common.handler_context(Context())


def test_report_device_must_be_a_boolean(serve):
    reply = serve("lama").predict({**LAMA_REQUEST, "report_device": "yes"})
    assert reply.status == 400 and reply.json()["error"] == "invalid_field"


@pytest.mark.parametrize(
    ("text", "version"),
    [
        (
            "NVRM version: NVIDIA UNIX x86_64 Kernel Module  470.256.02  Thu May  2 14:37:44 "
            "UTC 2024\nGCC version:  gcc version 10.2.1\n",
            "470.256.02",
        ),
        (
            "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build"
            "  (dvs-builder@U16-I3-B03-4-3)  Sun Jul 27 07:09:14 UTC 2025\n",
            "580.65.06",
        ),
    ],
)
def test_the_driver_version_is_read_from_proc(tmp_path, text, version):
    proc = tmp_path / "version"
    proc.write_text(text)
    assert mmekit_cuda.driver_version(proc) == version


def test_the_driver_rule():
    assert mmekit_cuda.min_driver("12.4") == 525 and mmekit_cuda.min_driver("13.0") == 580
    assert mmekit_cuda.driver_supports("535.183.01", "12.8")
    assert not mmekit_cuda.driver_supports("535.183.01", "13.0")
    assert not mmekit_cuda.driver_supports(470, "12.1")
    for bad in ("13", "cu130", "99.0"):
        with pytest.raises(ValueError):
            mmekit_cuda.min_driver(bad)
