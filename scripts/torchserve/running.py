"""The local server that is running: one record that every client reads.

`make serve-local` (native or compose) and `make dev` each write a record once their server
answers, `<run folder>/servers/<runtime>.json`, and remove it when they stop it. `make token`,
the curl lines both print, the `mmekit` client's `local` target and `make ui` read it: the
inference URL, the management URL and the folder of the key file. With more than one server
up (a `make dev` on other ports beside a `make serve-local`) the one started last is "the
local server"; a server of another kind (`make serve-mme`'s TorchServe) writes none. A record
whose server has gone (killed, machine restarted) is passed over, and the error names it.

Standard library only (and psutil), so the HTTP-only `mmekit` client reads it without torch.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from .. import PROJECT_ROOT
from ..models import MODELS, spec
from . import RUN_DIR, ServeError
from .client import TorchServeClient, loopback_url, read_token
from .profile import Ports

RECORDS = "servers"  # in a run folder: one record per runtime
RECORDS_DIR = RUN_DIR / RECORDS  # where the clients look
START_COMMANDS = "`make serve-local` (the archives as promoted) or `make dev` (reloads on edit)"
RUNTIME_COMMANDS = {"native": "make serve-local", "compose": "make serve-local", "dev": "make dev"}


class NoLocalServer(ServeError):
    """No local server answers: the message says which command starts one."""


@dataclass(frozen=True)
class RunningServer:
    runtime: str  # native, compose or dev
    pid: int | None  # TorchServe's frontend, or the container's PID 1 seen from the host
    inference_port: int
    management_port: int
    run_dir: str  # the server's run folder: its config, logs and requests/
    key_dir: str  # where its key_file.json is
    started_at: str  # ISO 8601, UTC

    @classmethod
    def started(
        cls, runtime: str, pid: int | None, ports: Ports, run_dir: Path, key_dir: Path
    ) -> RunningServer:
        """The record of a server that answers now on `ports` (where a profile serves both
        APIs on one port, as sagemaker does, `ports.management` is that port)."""
        return cls(
            runtime=runtime,
            pid=pid,
            inference_port=ports.inference,
            management_port=ports.management,
            run_dir=str(run_dir),
            key_dir=str(key_dir),
            started_at=datetime.now(UTC).isoformat(timespec="microseconds"),
        )

    @property
    def inference_url(self) -> str:
        return loopback_url(self.inference_port)

    @property
    def management_url(self) -> str:
        return loopback_url(self.management_port)

    @property
    def command(self) -> str:
        return RUNTIME_COMMANDS.get(self.runtime, self.runtime)

    def describe(self) -> str:
        return f"`{self.command}`'s server ({self.runtime}, {self.inference_url})"

    def token(self, api: str = "inference") -> str:
        return read_token(Path(self.key_dir), api)

    def alive(self) -> bool:
        """Its process still runs; where the host cannot see it (pid unknown), its inference
        port still takes connections."""
        if self.pid is not None:
            import psutil

            try:
                return psutil.Process(self.pid).status() != psutil.STATUS_ZOMBIE
            except psutil.Error:
                return False
        try:
            with socket.create_connection(("127.0.0.1", self.inference_port), timeout=1.0):
                return True
        except OSError:
            return False


def record_path(records_dir: Path, runtime: str) -> Path:
    return records_dir / f"{runtime}.json"


def write(server: RunningServer, records_dir: Path) -> Path:
    """Record `server` as running (atomically: a reader never sees half a record)."""
    records_dir.mkdir(parents=True, exist_ok=True)
    path = record_path(records_dir, server.runtime)
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    partial.write_text(json.dumps(asdict(server), indent=2) + "\n")
    partial.replace(path)
    return path


def clear(records_dir: Path, runtime: str, run_dir: Path) -> None:
    """Remove the record of the server run from `run_dir`, and no other's."""
    path = record_path(records_dir, runtime)
    try:
        recorded = json.loads(path.read_text()).get("run_dir")
    except (OSError, ValueError, AttributeError):
        return
    if recorded == str(run_dir):
        path.unlink(missing_ok=True)


def recorded(records_dir: Path) -> list[RunningServer]:
    """Every readable record, the most recently started first."""
    servers = []
    for path in sorted(records_dir.glob("*.json")):
        try:
            servers.append(RunningServer(**json.loads(path.read_text())))
        except (OSError, ValueError, TypeError):
            continue  # half written by an older tool, or not ours
    return sorted(servers, key=lambda server: server.started_at, reverse=True)


def current(records_dir: Path = RECORDS_DIR) -> RunningServer:
    """The local server: the running one started last. NoLocalServer, naming the commands
    that start one (and a recorded server that has gone), when none runs."""
    servers = recorded(records_dir)
    for server in servers:
        if server.alive():
            return server
    gone = f" ({servers[0].describe()} has stopped)" if servers else ""
    raise NoLocalServer(f"no local server is running{gone}: start one with {START_COMMANDS}")


def curl_lines(inference_url: str, requests_dir: Path, project_root: Path = PROJECT_ROOT) -> str:
    """What `make serve-local` and `make dev` print once ready: one curl line per model, run
    as printed from the project folder (the key from `make -s token`, i.e. this record)."""
    relative = os.path.relpath(requests_dir, project_root)
    torchserve = TorchServeClient(inference_url)
    auth = '-H "Authorization: Bearer $(make -s token)"'
    lines = ["", "Try it (from the project folder):"]
    for model in MODELS:
        lines.append(
            f"  curl -s {torchserve.predictions_url(model)} {auth} "
            "-H 'Content-Type: application/json' "
            f"--data-binary @{relative}/{model}.json "
            f"| python3 -m scripts.save_image {spec(model).curl_output}"
        )
    return "\n".join(lines)
