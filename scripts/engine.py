"""The container engine the image tools drive: a Docker engine where one answers, otherwise the
project's own podman (installed with apt and started here, settings in files under .mmekit/).

    python -m scripts.engine start     # find an engine, or set up and start podman's service
    python -m scripts.engine status    # which engine answers, and where
    python -m scripts.engine stop      # stop the podman service this project started

Everything talks to the engine over the Docker API (the `docker` SDK; compose is a CLI and gets
DOCKER_HOST). Where the engine is podman, `podman system service` serves that API on a socket
in .mmekit/podman/; podman itself reads .mmekit/podman/containers.conf (CONTAINERS_CONF):
no default ulimits (raising RLIMIT_NOFILE/NPROC is not permitted in this kind of sandbox),
runc with cgroupfs (crun refuses cgroups in hybrid mode; there is no systemd to manage them).

No registry may be reachable (this machine reaches only package registries): a base image the
Dockerfile names that is neither present nor pullable is built as a stand-in from Debian's
packages with mmdebstrap and imported under the very reference `FROM` names (`base_image`).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from . import PROJECT_ROOT
from .cli import tool_parser
from .polling import PollTimeout, poll_until

PODMAN_DIR = PROJECT_ROOT / ".mmekit" / "podman"
PODMAN_SOCKET = PODMAN_DIR / "podman.sock"
PODMAN_PID = PODMAN_DIR / "service.pid"
SERVICE_POLL_S = 0.3  # between looks at a starting podman service
CONTAINERS_CONF = PODMAN_DIR / "containers.conf"
DOCKER_SOCKET = Path("/var/run/docker.sock")
T = TypeVar("T")
# As root, podman needs no uidmap/slirp4netns/fuse-overlayfs (kernel overlay, CNI bridge);
# mmdebstrap builds a stand-in base image where no registry answers.
PODMAN_PACKAGES = ("podman", "runc", "mmdebstrap")
API_VERSION = "1.41"  # podman 4.3's Docker API; a newer Docker engine still speaks it
CONTAINERS_CONF_TEXT = """\
# Written by scripts/engine.py; podman reads it through CONTAINERS_CONF.
[containers]
# podman's default ulimits (nofile, nproc) cannot be raised here: runc would fail with
# `setrlimit RLIMIT_NOFILE: Operation not permitted`. Containers inherit the host's limits.
default_ulimits = []

[engine]
# crun fails here with `cgroups in hybrid mode not supported`; no systemd to own cgroups.
runtime = "runc"
cgroup_manager = "cgroupfs"
"""
# What Debian's own bookworm-slim image leaves out (debuerreotype's --slim): the stand-in
# should be no richer than the image it stands in for, so the Dockerfile installs what it needs.
SLIM_EXCLUDES = (
    "/usr/share/doc/*",
    "/usr/share/info/*",
    "/usr/share/linda/*",
    "/usr/share/lintian/overrides/*",
    "/usr/share/locale/*",
    "/usr/share/man/*",
)
DEBIAN_SUITES = {  # the sources a debian:<suite>-slim image carries
    "bookworm": (
        "deb http://deb.debian.org/debian bookworm main",
        "deb http://deb.debian.org/debian bookworm-updates main",
        "deb http://deb.debian.org/debian-security bookworm-security main",
    ),
}


class EngineError(Exception):
    """Something the user has to fix; printed as one line."""


def say(message: str) -> None:
    print(f"[engine] {message}", flush=True)


@dataclass(frozen=True)
class Engine:
    host: str  # DOCKER_HOST form: unix:///path/to/socket
    kind: str  # "docker" or "podman"
    managed: bool  # the podman service this project started

    def environment(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """What a docker/compose/podman CLI needs to reach this engine."""
        env = dict(os.environ if base is None else base)
        env["DOCKER_HOST"] = self.host
        if self.managed:
            env["CONTAINERS_CONF"] = str(CONTAINERS_CONF)
        return env

    def client(self, timeout: float = 600.0) -> Any:
        import docker

        return docker.DockerClient(base_url=self.host, version=API_VERSION, timeout=timeout)

    def cli(self) -> list[str]:
        """The engine's own CLI, for what the Docker API cannot do (builds with secrets)."""
        return ["podman"] if self.kind == "podman" else ["docker"]


def answers(host: str, timeout: float = 5.0) -> str | None:
    """The engine's kind if the Docker API at `host` answers /_ping and /version, else None."""
    import docker

    try:
        client = docker.DockerClient(base_url=host, version=API_VERSION, timeout=timeout)
        try:
            client.ping()
            components = client.version().get("Components") or []
        finally:
            client.close()
    except Exception:  # connection refused, no socket, a stale socket, a foreign server
        return None
    names = " ".join(str(component.get("Name", "")) for component in components)
    return "podman" if "podman" in names.lower() else "docker"


def find(environ: dict[str, str] | None = None) -> Engine | None:
    """An engine that answers now; changes nothing. DOCKER_HOST first (the user's choice), then
    Docker's default socket, then the podman service this project runs."""
    environ = os.environ if environ is None else environ
    candidates = []
    if environ.get("DOCKER_HOST"):
        candidates.append(environ["DOCKER_HOST"])
    candidates += [f"unix://{DOCKER_SOCKET}", f"unix://{PODMAN_SOCKET}"]
    for host in dict.fromkeys(candidates):
        if host.startswith("unix://") and not Path(host.removeprefix("unix://")).exists():
            continue
        kind = answers(host)
        if kind is not None:
            return Engine(host, kind, managed=host == f"unix://{PODMAN_SOCKET}")
    return None


def ask(question: Callable[[Any], T], timeout: float = 30.0) -> T | None:
    """`question(client)` put to the engine that answers now; None when none answers, or when
    it fails meanwhile (the engine went away, the image is not there). For read-only questions:
    which runtimes, an image's labels, the running containers."""
    found = find()
    if found is None:
        return None
    try:
        client = found.client(timeout=timeout)
        try:
            return question(client)
        finally:
            client.close()
    except Exception:  # the Docker SDK's errors, and requests' beneath it
        return None


def apt_install(packages: tuple[str, ...]) -> None:
    if shutil.which("apt-get") is None:
        raise EngineError(f"no Docker engine answers and there is no apt-get: install Docker or "
                          f"{' '.join(packages)} yourself")  # fmt: skip
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    say(f"no Docker engine answers: installing {' '.join(packages)} with apt")
    for command in (
        [*sudo, "apt-get", "update", "-q"],
        [*sudo, "apt-get", "install", "-y", "-q", "--no-install-recommends", *packages],
    ):
        if subprocess.run(command, env=env, check=False).returncode != 0:
            raise EngineError(f"`{' '.join(command)}` failed: install {' '.join(packages)} "
                              "yourself, or start a Docker engine")  # fmt: skip


def podman_service_pid() -> int | None:
    """The pid of the podman service this project started, if it still runs."""
    import psutil

    try:
        pid = int(PODMAN_PID.read_text().strip())
        cmdline = psutil.Process(pid).cmdline()
    except (OSError, ValueError, psutil.Error):
        return None
    return pid if "service" in cmdline and f"unix://{PODMAN_SOCKET}" in cmdline else None


def start_podman(timeout: float = 60.0) -> Engine:
    """Set up and start `podman system service` on .mmekit/podman/podman.sock (idempotent)."""
    missing = tuple(package for package in PODMAN_PACKAGES if shutil.which(package) is None)
    if missing:
        apt_install(missing)
    PODMAN_DIR.mkdir(parents=True, exist_ok=True)
    PODMAN_DIR.chmod(0o700)  # the socket is root's engine: owner only
    if not CONTAINERS_CONF.exists() or CONTAINERS_CONF.read_text() != CONTAINERS_CONF_TEXT:
        CONTAINERS_CONF.write_text(CONTAINERS_CONF_TEXT)
    host = f"unix://{PODMAN_SOCKET}"
    if podman_service_pid() is None:
        PODMAN_SOCKET.unlink(missing_ok=True)  # a stale socket from a killed service
        log = open(PODMAN_DIR / "service.log", "ab")  # noqa: SIM115 - the service owns it
        env = {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}
        # --time=0: no idle exit (compose's and the tests' calls come minutes apart);
        # `python -m scripts.engine stop` ends it.
        process = subprocess.Popen(
            ["podman", "system", "service", "--time=0", host],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
            start_new_session=True,  # outlives this command, like a daemon
        )  # fmt: skip
        PODMAN_PID.write_text(f"{process.pid}\n")
        say(f"started podman's Docker API on {host} (pid {process.pid}; log "
            f"{os.path.relpath(PODMAN_DIR / 'service.log', PROJECT_ROOT)})")  # fmt: skip
    try:
        poll_until(
            lambda: answers(host) is not None,
            what=f"podman's service to answer on {host}",
            timeout=timeout,
            interval=SERVICE_POLL_S,
        )
    except PollTimeout as failure:
        raise EngineError(f"{failure}; see {PODMAN_DIR / 'service.log'}") from None
    return Engine(host, "podman", managed=True)


def ensure() -> Engine:
    """An engine that answers: the one found, else the project's podman, set up and started."""
    return find() or start_podman()


def stop_podman(timeout: float = 20.0) -> bool:
    """Stop the service this project started (its containers keep running: conmon holds them).
    True if one was running."""
    import psutil

    pid = podman_service_pid()
    if pid is None:
        return False
    process = psutil.Process(pid)
    process.terminate()
    try:
        process.wait(timeout)
    except psutil.TimeoutExpired:
        process.kill()
    PODMAN_SOCKET.unlink(missing_ok=True)
    PODMAN_PID.unlink(missing_ok=True)
    return True


# ---------------------------------------------------------------------------------------------
# The base image where no registry can serve it


def base_image(reference: str, engine: Engine, pull_timeout: float = 120.0) -> str:
    """Make `reference` present: already there, pulled, or (a Debian slim reference on podman)
    built as a stand-in with mmdebstrap. Says which; raises EngineError when none works."""
    import docker

    client = engine.client()
    try:
        try:
            client.images.get(reference)
            return "present"
        except docker.errors.ImageNotFound:
            pass
        say(f"pulling {reference}")
        why = pull(client, reference)
        if why is None:
            return "pulled"
        suite = debian_slim_suite(reference)
        if suite is None or engine.kind != "podman":
            raise EngineError(f"cannot pull {reference} ({why}) and no stand-in is known for it")
        say(f"no registry serves {reference} ({why}): building a stand-in with mmdebstrap")
        import_debian_rootfs(reference, suite, engine)
        return "stand-in"
    finally:
        client.close()


def pull(client: Any, reference: str) -> str | None:
    """None once `reference` is pulled, else why not (the engine reports a failed pull in the
    stream, not as an HTTP error)."""
    import docker

    try:
        for event in client.api.pull(reference, stream=True, decode=True):
            if event.get("error"):
                return str(event["error"])[:300]
    except docker.errors.APIError as error:
        return str(error).splitlines()[0][:300]
    try:
        client.images.get(reference)
        return None
    except docker.errors.ImageNotFound:
        return "the engine reported no error, but the image is not there"


def debian_slim_suite(reference: str) -> str | None:
    """`bookworm` for docker.io/library/debian:bookworm-slim (or debian:bookworm-slim)."""
    match = re.fullmatch(r"(?:docker\.io/)?(?:library/)?debian:([a-z]+)-slim", reference)
    return match.group(1) if match and match.group(1) in DEBIAN_SUITES else None


def import_debian_rootfs(reference: str, suite: str, engine: Engine) -> None:
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mmekit-rootfs-") as scratch:
        rootfs = Path(scratch) / "rootfs.tar"
        command = [
            "mmdebstrap", "--variant=minbase", "--quiet",
            *[f"--dpkgopt=path-exclude={path}" for path in SLIM_EXCLUDES],
            "--dpkgopt=path-include=/usr/share/doc/*/copyright",  # licences stay, as in slim
            suite, str(rootfs), *DEBIAN_SUITES[suite],
        ]  # fmt: skip
        if subprocess.run(command, check=False).returncode != 0:
            raise EngineError(f"`{' '.join(command)}` failed")
        size_mb = rootfs.stat().st_size / 1e6
        imported = subprocess.run(
            [
                *engine.cli(), "import",
                "--change", 'CMD ["bash"]',
                "--change", "LABEL org.mmekit.stand-in=mmdebstrap",
                "--message", f"mmdebstrap --variant=minbase {suite} (stand-in for {reference})",
                str(rootfs), reference,
            ],
            env=engine.environment(), capture_output=True, text=True, check=False,
        )  # fmt: skip
        if imported.returncode != 0:
            raise EngineError(f"importing the stand-in failed: {imported.stderr.strip()}")
    say(f"stand-in {reference}: {size_mb:.0f} MB root file system, "
        f"{time.monotonic() - started:.0f} s")  # fmt: skip


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = tool_parser("python -m scripts.engine", __doc__)
    parser.add_argument("command", choices=("start", "status", "stop"))
    args = parser.parse_args(argv)
    try:
        if args.command == "start":
            engine = ensure()
            print(f"{engine.kind} engine at {engine.host}")
            print(f"export DOCKER_HOST={engine.host}")
            return 0
        if args.command == "status":
            engine = find()
            print(f"{engine.kind} engine at {engine.host}" if engine else "no engine answers")
            return 0 if engine else 1
        print("stopped podman's service" if stop_podman() else "no podman service of ours ran")
        return 0
    except EngineError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
