"""What the image must not carry: no key file, credential or CA bundle in any layer (the
layers' file lists, walked as the engine exports them), and no secret in its history."""

from __future__ import annotations

import hashlib
import re
import tarfile
import time

from scripts import image
from tests.container.conftest import timed

FORBIDDEN_NAMES = re.compile(
    r"(^|/)(key_file\.json|\.netrc|\.pypirc|credentials|id_rsa|id_ed25519|\.git-credentials)$"
    r"|(^|/)\.aws/|(^|/)\.docker/config\.json$|^run/secrets/"
)
PRIVATE_KEY = re.compile(rb"-----BEGIN (RSA |EC |OPENSSH |ENCRYPTED )?PRIVATE KEY-----")
KEYISH = (".pem", ".key", ".json", ".crt", ".env", ".cfg", ".conf", ".ini")


class Stream:
    """A read-only, forward-only file object for tarfile's stream mode."""

    def __init__(self, chunks) -> None:  # noqa: ANN001 - the SDK's generator
        self.chunks, self.buffer = iter(chunks), b""

    def read(self, size: int = -1) -> bytes:
        while size < 0 or len(self.buffer) < size:
            try:
                self.buffer += next(self.chunks)
            except StopIteration:
                break
        if size < 0:
            size = len(self.buffer)
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data


def host_bundle() -> tuple[int, str] | None:
    bundle = image.ca_bundle({})
    if bundle is None:
        return None
    data = bundle.read_bytes()
    return len(data), hashlib.sha256(data).hexdigest()


def test_no_key_credential_or_ca_bundle_in_any_layer(serving_image, docker_client):
    bundle = host_bundle()
    found, layers, files = [], 0, 0
    started = time.monotonic()
    exported = docker_client.api.get_image(serving_image.image_id, chunk_size=1 << 20)
    with tarfile.open(fileobj=Stream(exported), mode="r|") as outer:
        for member in outer:
            if not member.isfile() or not member.name.endswith(("layer.tar", ".tar")):
                continue
            layers += 1
            with tarfile.open(fileobj=outer.extractfile(member), mode="r|*") as layer:
                for entry in layer:
                    files += 1
                    name = entry.name.lstrip("./")
                    if FORBIDDEN_NAMES.search(name):
                        found.append(f"{member.name}: {name}")
                    if not entry.isfile():
                        continue
                    same_size = bundle is not None and entry.size == bundle[0]
                    small_keyish = entry.size < 65536 and name.endswith(KEYISH)
                    if not (same_size or small_keyish):
                        continue
                    data = layer.extractfile(entry).read()
                    if same_size and hashlib.sha256(data).hexdigest() == bundle[1]:
                        found.append(f"{member.name}: {name} is the host's CA bundle")
                    if small_keyish and PRIVATE_KEY.search(data):
                        found.append(f"{member.name}: {name} holds a private key")
    timed("hygiene: walk every layer's files", time.monotonic() - started,
          f"({layers} layers, {files} entries)")  # fmt: skip
    assert layers >= 5 and files > 1000, (layers, files)
    assert found == []


def test_the_history_and_labels_carry_no_secret(serving_image, docker_client):
    history = docker_client.api.history(serving_image.image_id)
    text = " ".join(str(step.get("CreatedBy", "")) for step in history)
    assert "ca_bundle" in text  # the secret mount is named in the step ...
    bundle = image.ca_bundle({})
    if bundle is not None:  # ... but neither its path on this host nor its content is
        assert str(bundle) not in text
        first_cert = bundle.read_text(errors="replace").split("-----BEGIN CERTIFICATE-----")
        if len(first_cert) > 1:
            assert first_cert[1][:64] not in text
    labels = docker_client.images.get(serving_image.image_id).labels
    assert not [key for key in labels if re.search(r"KEY|TOKEN|SECRET|PASSW", key, re.I)]
    env = docker_client.images.get(serving_image.image_id).attrs["Config"].get("Env") or []
    assert not [item for item in env if re.search(r"KEY|TOKEN|SECRET|PASSW|CERT", item, re.I)]
