"""Handlers loaded and called exactly as TorchServe's worker does, in this process.

`ServedModel` loads a handler from a folder laid out like an extracted archive (MAR-INF/
MANIFEST.json, model-config.yaml, weights/) with TorchServe's own `TsModelLoader` (which insists
on one class per handler module) and sends requests through `Service.predict`, whose binary
reply is decoded the way the frontend reads it: a status and a body per request. The tests and
`make bench` (the in-process side of its A/B) both use it.
"""

from __future__ import annotations

import json
import shutil
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .models import spec


@dataclass
class Reply:
    status: int
    content_type: str
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def parse_predict_response(message: bytes) -> tuple[int, str, list[Reply]]:
    """Decode the worker's reply frame (ts/protocol/otf_message_handler.create_predict_response)."""
    offset = 0

    def read_int() -> int:
        nonlocal offset
        (value,) = struct.unpack_from("!i", message, offset)
        offset += 4
        return value

    def read_bytes() -> bytes:
        nonlocal offset
        length = read_int()
        data = bytes(message[offset : offset + length])
        offset += length
        return data

    code = read_int()
    text = read_bytes().decode()
    replies = []
    while True:
        length = read_int()
        if length == -1:
            break
        offset += length  # request id
        content_type = read_bytes().decode()
        status = read_int()
        read_bytes()  # reason phrase
        for _ in range(read_int()):  # response headers
            read_bytes()
            read_bytes()
        replies.append(Reply(status, content_type, read_bytes()))
    return code, text, replies


def make_model_dir(
    folder: Path, model: str, weights: Path, handler_settings: dict | None = None
) -> Path:
    """A folder shaped like the extracted archive: manifest, model-config.yaml, the handler,
    weights/."""
    model_spec = spec(model)
    folder.mkdir(parents=True, exist_ok=True)
    config = yaml.safe_load(model_spec.config_file.read_text())
    config["handler"].update(handler_settings or {})
    (folder / "model-config.yaml").write_text(yaml.safe_dump(config))
    shutil.copy(model_spec.handler_path, folder / model_spec.handler_file)
    (folder / "MAR-INF").mkdir(exist_ok=True)
    manifest = {
        "runtime": "python",
        "model": {
            "modelName": model,
            "handler": model_spec.handler_file,
            "modelVersion": "1.0",
            "configFile": "model-config.yaml",
        },
        "archiverVersion": "0.12.0",
    }
    (folder / "MAR-INF" / "MANIFEST.json").write_text(json.dumps(manifest))
    target = folder / config["handler"]["weights_dir"]
    if target.exists() or target.is_symlink():
        target.unlink() if target.is_symlink() else shutil.rmtree(target)
    target.symlink_to(weights, target_is_directory=True)
    return folder


class ServedModel:
    """A handler loaded by TorchServe's model loader, called through its Service."""

    def __init__(self, model_dir: Path, batch_size: int = 1, gpu_id: int | None = None) -> None:
        import ts
        from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
        from ts.model_loader import TsModelLoader

        manifest = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())
        # TorchServe's worker imports the handler from the model's folder; appended, so that
        # handlers/ (on the path first, scripts/__init__.py) serves the project's models as
        # the tests edit them
        if str(model_dir) not in sys.path:
            sys.path.append(str(model_dir))
        metrics = MetricsCacheYamlImpl(str(Path(ts.__file__).parent / "configs" / "metrics.yaml"))
        metrics.initialize_cache()
        self.service = TsModelLoader().load(
            manifest["model"]["modelName"],
            str(model_dir),
            manifest["model"]["handler"],
            gpu_id,  # None: CPU, as TorchServe passes on a host without GPUs
            batch_size,
            metrics_cache=metrics,
        )
        self.service.set_cl_socket(None)  # the worker sets its socket; nothing streams here
        self.handler = self.service._entry_point.__self__

    def predict_batch(self, requests: list[Any], raw: bool = False) -> tuple[int, str, list[Reply]]:
        """raw=True sends each body as bytes (SageMaker's decode_input_request=false);
        otherwise as TorchServe's default decoding gives it (a dict for a JSON object)."""
        batch = []
        for index, request in enumerate(requests):
            value = request
            if raw and not isinstance(request, (bytes, bytearray)):
                value = json.dumps(request).encode()
            batch.append(
                {
                    "requestId": str(index).encode(),
                    "parameters": [
                        {"name": "body", "contentType": "application/json", "value": value}
                    ],
                    "headers": [],
                }
            )
        return parse_predict_response(self.service.predict(batch))

    def predict(self, request: Any, raw: bool = False) -> Reply:
        code, text, replies = self.predict_batch([request], raw=raw)
        if code != 200:  # the whole batch failed (what the frontend turns into an error)
            return Reply(code, "text/plain", text.encode())
        return replies[0]
