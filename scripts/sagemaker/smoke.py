"""Step 6, smoke: every promoted model invoked through sagemaker-runtime, its reply checked
against the response contract, and each required to report a CUDA device."""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Callable, Mapping
from typing import Any

from ..models import spec
from .errors import error_code
from .gate import Artifact
from .settings import PromoteError, Settings


class Smoke:
    """The Promoter's smoke step (a mixin of scripts.sagemaker.promoter.Promoter)."""

    # from the Promoter (scripts/sagemaker/promoter.py)
    settings: Settings
    say: Callable[[str], None]
    client: Callable[[str], Any]
    sleep: Callable[[float], None]

    def smoke(self, artifacts: list[Artifact], requests: Mapping[str, dict]) -> dict[str, str]:
        """Every promoted model through sagemaker-runtime, its reply checked against the
        contract and its device: each must run on CUDA (a GPU instance's CPU is many times
        slower, SD past the 60 s limit). ModelNotReadyException (a model still loading) is
        retried with back-off."""
        runtime = self.client("sagemaker-runtime")
        results = {}
        devices: dict[str, str | None] = {}
        for artifact in artifacts:
            request = {**requests[artifact.model], "report_device": True}
            body = json.dumps(request).encode()
            deadline = time.monotonic() + self.settings.smoke_timeout_s
            delay = 1.0
            while True:
                try:
                    reply = runtime.invoke_endpoint(
                        EndpointName=self.settings.endpoint_name,
                        TargetModel=artifact.target_model,
                        ContentType="application/json",
                        Body=body,
                    )
                    break
                except Exception as error:
                    if error_code(error) != "ModelNotReadyException":
                        raise PromoteError(
                            f"smoke: {artifact.target_model} failed: {error}"
                        ) from None
                    if time.monotonic() + delay > deadline:
                        raise PromoteError(
                            f"smoke: {artifact.target_model} still not ready after "
                            f"{self.settings.smoke_timeout_s:.0f} s"
                        ) from None
                    self.say(f"smoke: {artifact.target_model} loading; retry in {delay:.0f} s")
                    self.sleep(delay)
                    delay = min(delay * 2, 30.0)
            device = check_reply(artifact.model, reply["Body"].read())
            self.say(f"smoke: {artifact.target_model} answered as the contract says, on {device}")
            devices[artifact.target_model] = device
            results[artifact.model] = "ok"
        check_devices(devices, self.settings)
        return results


def check_reply(model: str, body: bytes) -> str | None:
    """The response contract: JSON with a decodable image, plus the keys the model's spec
    adds (SAM's scores). Returns the device the model reported (asked for with
    report_device), None if it gave none."""
    from PIL import Image

    try:
        reply = json.loads(body)
        image = Image.open(io.BytesIO(base64.b64decode(reply["generated_image"])))
        image.verify()
    except Exception as error:
        raise PromoteError(f"smoke: {model} answered outside the contract ({error})") from None
    missing = [key for key in spec(model).reply_keys if key not in reply]
    if missing:
        raise PromoteError(f"smoke: {model} answered without {', '.join(missing)}")
    device = reply.get("device")
    return device if isinstance(device, str) else None


def check_devices(devices: Mapping[str, str | None], settings: Settings) -> None:
    """Every model on CUDA, or the promotion fails naming each model and what it ran on."""
    silent = sorted(name for name, device in devices.items() if device is None)
    if silent:
        raise PromoteError(
            f"smoke: {', '.join(silent)} did not report its device (archives from before "
            "report_device): `make archive`, `make test-handlers`, and promote again"
        )
    off_gpu = {name: device for name, device in devices.items() if not device.startswith("cuda")}
    if off_gpu:
        listed = ", ".join(f"{name} on {device}" for name, device in sorted(off_gpu.items()))
        raise PromoteError(
            f"smoke: not on the GPU of {settings.instance_type}: {listed}. The archive's "
            "model-config.yaml says `device: cpu`, or TorchServe assigned no GPU (the "
            "container sees none: NVIDIA_VISIBLE_DEVICES=all, number_of_gpu); fix it and "
            f"promote again (endpoint {settings.endpoint_name} stays as deployed; "
            "`make teardown` removes it)"
        )
