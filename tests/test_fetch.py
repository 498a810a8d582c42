"""The full tier's fetch path, against a loopback server publishing tiny checkpoints in the
official formats (Meta's .pth, big-lama's zip with a Lightning .ckpt, diffusers tensors)."""

from __future__ import annotations

import functools
import hashlib
import socket
import threading
import zipfile
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import yaml

import mmekit_models
from scripts import download, weights
from scripts.download import DownloadError


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib's name
        self.server.requests.append(self.path)  # type: ignore[attr-defined]


@pytest.fixture
def published(tmp_path: Path) -> Iterator[tuple[str, Path, list[str]]]:
    """(base URL, folder it serves, request log) on 127.0.0.1, shut down afterwards."""
    folder = tmp_path / "published"
    folder.mkdir()
    httpd = ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(folder))
    )
    httpd.requests = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", folder, httpd.requests  # type: ignore[attr-defined]
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)
        print("requests:", httpd.requests)  # type: ignore[attr-defined]


def pin(base: str, folder: Path, relative: str) -> dict:
    data = (folder / relative).read_bytes()
    return {
        "url": f"{base}/{relative}",
        "sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data),
    }


def publish_tiny_checkpoints(base: str, folder: Path, tiny_weights) -> dict:
    """Tiny models saved the way their authors publish the real ones; returns the pins."""
    sam_state = mmekit_models.load_state_dict(tiny_weights("sam"))
    torch.save(sam_state, folder / "sam_tiny.pth")

    lama_state = mmekit_models.load_state_dict(tiny_weights("lama"))
    checkpoint = {
        "state_dict": {
            **{f"generator.{name}": tensor for name, tensor in lama_state.items()},
            "discriminator.model0.0.weight": torch.zeros(2, 2),
        },
        "epoch": 40,
        "hyper_parameters": {"kind": "default"},
    }
    torch.save(checkpoint, folder / "best.ckpt")
    with zipfile.ZipFile(folder / "big-lama.zip", "w") as bundle:
        bundle.write(folder / "best.ckpt", "big-lama/models/best.ckpt")
        bundle.writestr("big-lama/config.yaml", "generator:\n  kind: ffc_resnet\n")
    lama_pin = pin(base, folder, "big-lama.zip")
    member = pin(base, folder, "best.ckpt")
    lama_pin.update(
        member="big-lama/models/best.ckpt",
        member_sha256=member["sha256"],
        member_size=member["size"],
    )

    sd_files = {}
    for component, relative in mmekit_models.SD_TENSOR_FILES.items():
        target = folder / "sd" / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((tiny_weights("sd") / relative).read_bytes())
        sd_files[component] = pin(base, folder, f"sd/{relative}")
    return {
        "sam": {"tiny": pin(base, folder, "sam_tiny.pth")},
        "lama": {"tiny": lama_pin},
        "sd": {"tiny": {"files": sd_files}},
    }


TINY = {"sam": "tiny", "lama": "tiny", "sd": "tiny"}


def test_fetch_converts_every_model_and_the_loaders_serve_it(tmp_path, published, tiny_weights):
    base, folder, requests = published
    pins_path = tmp_path / "pins.yaml"
    pins_path.write_text(yaml.safe_dump(publish_tiny_checkpoints(base, folder, tiny_weights)))
    root = tmp_path / "weights"

    fetched = weights.fetch_full(root, TINY, pins_path=pins_path, progress=False)

    assert [path.name for path in fetched] == ["sam", "lama", "sd"]
    for model in ("sam", "lama"):
        converted = mmekit_models.load_state_dict(root / "full" / model)
        original = mmekit_models.load_state_dict(tiny_weights(model))
        assert converted.keys() == original.keys()
        assert all(torch.equal(converted[k], original[k]) for k in original)
        info = weights.read_info(root / "full" / model)
        assert info["tier"] == "full" and info["source"]["url"].startswith(base)
    mmekit_models.load_sam(root / "full" / "sam", torch.device("cpu"))
    mmekit_models.load_lama(root / "full" / "lama", torch.device("cpu"))
    pipeline, _ = mmekit_models.load_sd(root / "full" / "sd", torch.device("cpu"), torch.float32)
    assert pipeline.tokenizer.model_max_length == 77
    # serving never unpickles: the converted folders hold safetensors and JSON only
    for path in (root / "full").rglob("*"):
        assert path.suffix not in (".pth", ".ckpt", ".bin", ".pt"), path

    # the same pins again: nothing is requested, nothing rewritten
    count = len(requests)
    weights.fetch_full(root, TINY, pins_path=pins_path, progress=False)
    assert len(requests) == count


def test_a_file_that_does_not_match_its_pin_is_refused(tmp_path, published, tiny_weights):
    base, folder, _ = published
    pins = publish_tiny_checkpoints(base, folder, tiny_weights)
    pins["sam"]["tiny"]["sha256"] = "0" * 64
    pins_path = tmp_path / "pins.yaml"
    pins_path.write_text(yaml.safe_dump(pins))
    with pytest.raises(DownloadError, match="checksum mismatch"):
        weights.fetch_full(
            tmp_path / "w", TINY, models=("sam",), pins_path=pins_path, progress=False
        )
    assert not (tmp_path / "w" / "full" / "sam").exists()


def test_offline_fetch_says_so_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(download, "RETRY_BACKOFF_S", 0.01)
    with socket.socket() as probe:  # a loopback port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    pins = {
        "sam": {
            "vit_b": {
                "url": f"http://127.0.0.1:{port}/sam_vit_b.pth",
                "sha256": "1" * 64,
                "size": 10,
            }
        }
    }
    pins_path = tmp_path / "pins.yaml"
    pins_path.write_text(yaml.safe_dump(pins))
    code = weights.main(
        [
            "--root",
            str(tmp_path),
            "fetch",
            "--models",
            "sam",
            "--sam-variant",
            "vit_b",
            "--pins",
            str(pins_path),
        ]
    )
    assert code == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: cannot reach 127.0.0.1") and "\n" not in error
