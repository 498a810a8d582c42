"""The TorchServe behind the emulator: a native one in a private run folder (the `mme`
profile), or the serving image in a container exactly as SageMaker runs it."""

from __future__ import annotations

import logging
import subprocess
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Any

from ..torchserve import ServeError
from ..torchserve.client import TorchServeClient, loopback_url
from ..torchserve.profile import Ports, free_ports, render_profile
from ..torchserve.readiness import accepts_calls, wait_until

if TYPE_CHECKING:
    from ..torchserve.runtime import NativeRuntime

logger = logging.getLogger("mmekit.mme")

READY_POLL_S = 0.2  # how often an invocation that arrived early looks at TorchServe again
CONTAINER_POLL_S = 0.5  # each look at a container is a docker API call


# ---------------------------------------------------------------------------------------------
# The TorchServe behind the emulator, called as SageMaker's agent calls it
# (scripts/torchserve/client.py: TorchServeClient)


@dataclass
class Backend:
    """The TorchServe behind the emulator, as start_torchserve started it."""

    runtime: NativeRuntime
    process: subprocess.Popen
    ports: Ports
    models_dir: Path  # SageMaker's /opt/ml/models: TorchServe's model store
    client: TorchServeClient

    def wait_until_accepting(self, timeout: float = 120.0) -> None:
        """Until TorchServe takes calls with its keys (what the emulator's /ping looks for)."""
        wait_until(
            lambda: accepts_calls(self.client, management=True),
            "TorchServe to accept calls",
            timeout,
            READY_POLL_S,
            self.process,
        )

    def stop(self) -> None:
        from ..torchserve.runtime import shut_down

        shut_down(self.runtime, self.process)


def start_torchserve(root: Path, log: IO[bytes] | None = None) -> Backend:
    """TorchServe as `make serve-mme` runs it, not waited for: the `mme` profile (SageMaker's,
    with a key on every API: scripts/torchserve/profile.py PROFILE_CHANGES) on free loopback
    ports, with <root>/opt/ml/models as its store and <root>/torchserve, owner only, as its run
    folder."""
    from ..torchserve.runtime import NativeRuntime  # imports yaml: only when started

    ports = Ports(*free_ports(5))  # internal: any free loopback ports will do
    run_dir = root / "torchserve"
    models_dir = root / "opt" / "ml" / "models"
    models_dir.mkdir(parents=True, exist_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    config = run_dir / "config.properties"
    config.write_text(render_profile("mme", ports, models_dir))
    runtime = NativeRuntime(run_dir, models_dir)
    (runtime.key_dir / "key_file.json").unlink(missing_ok=True)  # no stale keys are read
    process = runtime.start(config, [], foreground=True, log=log)
    client = TorchServeClient(
        loopback_url(ports.inference), loopback_url(ports.management), key_dir=runtime.key_dir
    )
    return Backend(runtime, process, ports, models_dir, client)


CONTAINER_MODELS_DIR = PurePosixPath("/opt/ml/models")  # where SageMaker mounts the models
CONTAINER_STOP_TIMEOUT_S = 30  # SageMaker's SIGTERM -> SIGKILL


@dataclass
class ContainerBackend:
    """The serving image behind the emulator, run as SageMaker runs it: `docker run <image>
    serve`, the extracted models under /opt/ml/models/<hash>/model (a read-only bind mount of
    <root>/opt/ml/models), SAGEMAKER_BIND_TO_PORT set. Its API has no key, as on SageMaker,
    where only SageMaker's agent reaches the container: here it is published on 127.0.0.1 only,
    for the emulator's run."""

    container: Any  # a Docker SDK Container
    ports: Ports
    models_dir: Path
    client: TorchServeClient
    engine_client: Any  # the Docker SDK client the container was started with

    def running(self) -> bool:
        try:
            self.container.reload()
        except Exception:  # removed, or the engine went away
            return False
        return self.container.status in ("created", "running")

    def wait_until_accepting(self, timeout: float = 180.0) -> None:
        def accepting() -> bool:
            if accepts_calls(self.client):
                return True
            if not self.running():  # no process to watch here: the container's state
                raise ServeError(f"the container exited; its log:\n{self.logs()}")
            return False

        wait_until(accepting, "the container to accept calls", timeout, CONTAINER_POLL_S)

    def logs(self, tail: int = 200) -> str:
        try:
            return self.container.logs(tail=tail).decode(errors="replace")
        except Exception as error:  # already removed
            return f"(no log: {error})"

    def stop(self) -> None:
        try:
            self.container.stop(timeout=CONTAINER_STOP_TIMEOUT_S)
            self.container.remove(force=True)
        except Exception as error:  # already gone
            logger.info("container stop: %s", error)
        finally:
            self.engine_client.close()


def start_container(root: Path, image_tag: str, name: str | None = None) -> ContainerBackend:
    """The image in SageMaker's mode on a free loopback port, not waited for."""
    from .. import engine

    port = free_ports(1)[0]
    models_dir = root / "opt" / "ml" / "models"
    models_dir.mkdir(parents=True, exist_ok=True)
    docker_client = engine.ensure().client()
    container = docker_client.containers.run(
        image_tag,
        command=["serve"],
        name=name,
        detach=True,
        environment={"SAGEMAKER_BIND_TO_PORT": str(port)},  # as on a multi-container endpoint
        ports={f"{port}/tcp": ("127.0.0.1", port)},
        volumes={str(models_dir): {"bind": str(CONTAINER_MODELS_DIR), "mode": "ro"}},
        stop_signal="SIGTERM",
        labels={"org.mmekit.role": "mme-backend"},
    )
    return ContainerBackend(
        container, Ports(port, port), models_dir, TorchServeClient(loopback_url(port)),
        docker_client,
    )  # fmt: skip
