"""`make serve-local RUNTIME=compose DETACH=1` on this engine (the CPU: no NVIDIA runtime here),
as a user runs it: the printed curl lines, a bad request, the token, the health check, the
non-root user, then `make stop`.

The Make target runs `scripts.serve start` after `make setup`; this runs the same tool with the
same environment (RUNTIME=compose, DETACH=1) with this interpreter, so no setup step rewrites
the virtual environment under the test.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from scripts import PROJECT_ROOT, image
from scripts.archive import DEFAULT_STORE
from scripts.torchserve import RUN_DIR
from scripts.torchserve.client import TorchServeClient, loopback_url, read_token
from scripts.torchserve.profile import Ports, free_ports
from scripts.torchserve.runtime import COMPOSE_PROJECT, ComposeRuntime
from tests.container.conftest import processes, timed

OUTPUTS = ("mask.png", "erased.png", "replaced.png")


def make_like(target: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """What `make <target>` runs after set-up, with the variables it reads from `env`."""
    commands = {
        "serve-local": ["-m", "scripts.serve", "start"],
        "token": ["-m", "scripts.serve", "token"],
        "stop": ["-m", "scripts.serve", "stop"],
    }
    return subprocess.run(
        [sys.executable, *commands[target]], cwd=PROJECT_ROOT, env=env, capture_output=True,
        text=True, timeout=timeout,
    )  # fmt: skip


@pytest.fixture(scope="module")
def composed(serving_image, archives, docker_client) -> Iterator[tuple[Ports, str, dict]]:
    ports = Ports(*free_ports(5))
    env = {**os.environ, "RUNTIME": "compose", "DETACH": "1"}
    env.update({f"{field.upper()}_PORT": str(port) for field, port in vars(ports).items()})
    started = time.monotonic()
    done = make_like("serve-local", env, timeout=1800)
    timed("compose: make serve-local RUNTIME=compose DETACH=1 until all three answer",
          time.monotonic() - started)  # fmt: skip
    try:
        assert done.returncode == 0, done.stdout + done.stderr
        yield ports, done.stdout, env
    except BaseException:
        print(done.stdout[-4000:], done.stderr[-4000:])
        for log in sorted((PROJECT_ROOT / ".mmekit" / "compose" / "logs").glob("*.log")):
            print(f"--- {log.name} ---\n{log.read_text(errors='replace')[-4000:]}")
        raise
    finally:
        make_like("stop", env, timeout=120)  # a no-op when the test stopped it already


def the_container(docker_client):
    found = ComposeRuntime(RUN_DIR, DEFAULT_STORE).container()
    assert found is not None, "no running compose container"
    return docker_client.containers.get(found.id)


def test_compose_serves_on_the_cpu_and_says_so(composed):
    _, out, _ = composed
    assert "compose on the CPU" in out and "compose.cpu.yaml" in out
    assert image.available() is False  # this engine has no NVIDIA runtime


def test_the_printed_curl_lines_work_as_printed(composed, tmp_path):
    ports, out, env = composed
    curl = [line.strip() for line in out.splitlines() if line.strip().startswith("curl")]
    assert len(curl) == 3
    assert all(f"http://127.0.0.1:{ports.inference}/predictions/" in line for line in curl)
    token = make_like("token", env, timeout=60)
    assert token.returncode == 0, token.stderr
    for line, output in zip(curl, OUTPUTS, strict=True):
        command = line.replace("$(make -s token)", token.stdout.strip())
        command = command.replace(f" {output}", f" {tmp_path / output}")
        started = time.monotonic()
        done = subprocess.run(
            ["bash", "-c", f"set -o pipefail; {command}"], cwd=PROJECT_ROOT,
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        timed(f"compose: curl {output}", time.monotonic() - started)
        assert done.returncode == 0, done.stdout + done.stderr
        assert (tmp_path / output).read_bytes().startswith(b"\x89PNG"), done.stdout


def test_a_bad_request_is_400_json(composed):
    ports, _, _ = composed
    torchserve = TorchServeClient(loopback_url(ports.inference))
    token = read_token(RUN_DIR / "compose")
    reply = torchserve.predict("sam", b'{"image": 5}', token=token, timeout=60)
    assert reply.status_code == 400 and isinstance(reply.json()["message"], str)
    unauthorised = torchserve.predict("sam", b"{}", timeout=60)
    assert unauthorised.status_code in (400, 401)  # token auth is on in the container too


def test_the_container_runs_as_a_non_root_user(composed, docker_client):
    found = the_container(docker_client)
    uid = found.exec_run(["id", "-u"]).output.decode().strip()
    assert uid.isdigit() and int(uid) != 0, uid
    listed = processes(found)  # PID 1, the launcher, Java, a worker per model (and psutil's)
    assert len(listed) >= 6 and all(uid != 0 for _, uid, _ in listed), listed
    assert [name for pid, _, name in listed if pid == 1] == ["python"]  # scripts/container.py


def test_the_health_check_becomes_healthy(composed, docker_client, container_engine):
    found = the_container(docker_client)
    started = time.monotonic()
    status = ""
    for _ in range(40):  # bounded: each check is one SAM inference
        if container_engine.kind == "podman":  # no systemd timer runs podman's checks
            subprocess.run(
                ["podman", "healthcheck", "run", found.id], env=container_engine.environment(),
                capture_output=True, check=False,
            )  # fmt: skip
        found.reload()
        status = found.attrs["State"].get("Health", {}).get("Status", "")
        if status == "healthy":
            break
        time.sleep(3)
    timed("compose: health check until healthy", time.monotonic() - started)
    assert status == "healthy", found.attrs["State"].get("Health")


def test_make_stop_ends_the_container_cleanly(composed, docker_client):
    ports, _, env = composed
    found = the_container(docker_client)
    exit_status: dict = {}
    waiter = threading.Thread(target=lambda: exit_status.update(found.wait(timeout=120)))
    waiter.start()
    started = time.monotonic()
    done = make_like("stop", env, timeout=120)
    took = time.monotonic() - started
    waiter.join(timeout=120)
    timed("compose: make stop until the container is gone", took, "(grace period 40 s)")
    assert done.returncode == 0 and done.stdout.strip() == "stopped", done.stdout + done.stderr
    # 0: PID 1 stopped TorchServe itself; 137 would be the engine's SIGKILL after the grace
    assert exit_status.get("StatusCode") == 0, exit_status
    assert ComposeRuntime(RUN_DIR, DEFAULT_STORE).container() is None
    assert not docker_client.containers.list(all=True, filters={"id": found.id})
    with pytest.raises(requests.ConnectionError):
        TorchServeClient(loopback_url(ports.inference)).ping(timeout=5)


def test_nothing_is_left_running(composed, docker_client):
    labels = [f"com.docker.compose.project={COMPOSE_PROJECT}"]
    assert docker_client.containers.list(all=True, filters={"label": labels}) == []
    assert Path(PROJECT_ROOT / ".mmekit" / "runtime").read_text().strip() == "compose"
