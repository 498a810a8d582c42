"""TorchServe's config profiles (configs/*.properties), rendered for a set of ports and a model
store, and the loopback ports a server may take."""

from __future__ import annotations

import os
import socket
import string
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from mmekit_limits import SAGEMAKER_PAYLOAD_BYTES

from .. import PROJECT_ROOT
from . import ServeError

PROFILES = {
    "local": "local.properties",
    "sagemaker": "sagemaker.properties",
    "dev": "dev.properties",  # make dev only (scripts/dev.py): the model API on
    "mme": "sagemaker.properties",  # make serve-mme only (scripts/sagemaker/): with PROFILE_CHANGES
}
# `make serve-mme` runs SageMaker's profile on a machine where any local process can reach
# loopback. TorchServe 0.12 registers a plain path from anywhere (allowed_urls checks URLs only)
# and its gRPC management API cannot be turned off or bound to a Unix socket, so a key must
# guard every API: token authorization on, which needs the management API on a port of its
# own (on one port the inference and management checks run in series and refuse every key).
# The keys live in key_file.json (0600, in a 0700 run folder: NativeRuntime.start) and are read
# for every call; they last the emulator's run instead of 60 minutes, since whoever can read the
# file also holds the API key that mints fresh ones. The container's `sagemaker` stays as is.
PROFILE_CHANGES: dict[str, dict[str, str]] = {
    "mme": {
        "management_address": "http://${bind_address}:${management_port}",
        "disable_token_authorization": "false",
        "token_expiration_min": "525600",  # a year: the run's, never renewed
    },
}


@dataclass(frozen=True)
class Ports:
    inference: int = 8080
    management: int = 8081
    metrics: int = 8082
    grpc_inference: int = 7070
    grpc_management: int = 7071

    @classmethod
    def from_env(cls, environ: dict | None = None) -> Ports:
        environ = os.environ if environ is None else environ
        values = {}
        for field, default in asdict(cls()).items():
            name = f"{field.upper()}_PORT"
            text = environ.get(name, str(default))
            if not text.isdigit() or not 0 < int(text) < 65536:
                raise ServeError(f"{name}={text!r} is not a port number")
            values[field] = int(text)
        return cls(**values)


def render_profile(
    profile: str, ports: Ports, model_store: Path | str, bind_address: str = "127.0.0.1"
) -> str:
    """A TorchServe config.properties. Listeners bind loopback; only inside a container, whose
    ports are published on the host's loopback (or reached by SageMaker), is 0.0.0.0 right."""
    text = (PROJECT_ROOT / "configs" / PROFILES[profile]).read_text()
    if profile in PROFILE_CHANGES:
        text = (
            f"# profile `{profile}`: as below, with scripts/torchserve/profile.py's "
            "PROFILE_CHANGES\n" + with_changes(text, PROFILE_CHANGES[profile])
        )
    return string.Template(text).substitute(
        bind_address=bind_address,
        inference_port=ports.inference,
        management_port=ports.management,
        metrics_port=ports.metrics,
        grpc_inference_port=ports.grpc_inference,
        grpc_management_port=ports.grpc_management,
        model_store=str(model_store),
        payload_limit=SAGEMAKER_PAYLOAD_BYTES,
    )


def with_changes(text: str, changes: Mapping[str, str]) -> str:
    """A config.properties with each key of `changes` set in place (appended where absent), so
    the rendered file holds one value per key."""
    lines = text.splitlines()
    for key, value in changes.items():
        found = [i for i, line in enumerate(lines) if line.split("=", 1)[0].strip() == key]
        for i in found:
            lines[i] = f"{key}={value}"
        if not found:
            lines.append(f"{key}={value}")
    return "\n".join(lines) + "\n"


def free_ports(count: int) -> list[int]:
    """Ports nothing listens on now, on 127.0.0.1 (held together so they differ)."""
    probes = []
    try:
        for _ in range(count):
            probe = socket.socket()
            probe.bind(("127.0.0.1", 0))
            probes.append(probe)
        return [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()


def check_port_free(port: int, label: str, variable: str) -> None:
    """A one-line error naming the port when something already listens on it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            raise ServeError(
                f"port {port} ({label}) is already in use on 127.0.0.1: stop what holds it "
                f"(`make stop` if it is mmekit) or set {variable}=<another port>"
            ) from None


def check_ports_free(ports: Ports, profile: str) -> None:
    used = asdict(ports)
    if profile == "sagemaker":
        used.pop("management")  # one port for both APIs, as on SageMaker
    for name, port in used.items():
        check_port_free(port, name.replace("_", " "), f"{name.upper()}_PORT")
