"""The serving image, built and run on a real engine (`make test-container`).

The engine is scripts/engine.py's: a Docker engine where one answers, else the project's
podman, set up and started here (and stopped at the end if this session started it). The
image is built once per content of its inputs (scripts/image.py's digest): a run whose inputs
did not change reuses it. Every step's duration is printed at the end; nothing asserts on time.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from scripts import engine, image
from scripts.archive import DEFAULT_STORE, archive_models

TIMINGS: list[tuple[str, float, str]] = []


def timed(label: str, seconds: float, note: str = "") -> None:
    TIMINGS.append((label, seconds, note))
    print(f"[time] {label}: {seconds:.1f} s {note}".rstrip(), flush=True)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(pytest.mark.container)


def pytest_terminal_summary(terminalreporter) -> None:  # noqa: ANN001 - pytest's own type
    if not TIMINGS:
        return
    terminalreporter.section("container: how long each step took (this machine, shared)")
    for label, seconds, note in TIMINGS:
        terminalreporter.write_line(f"{seconds:8.1f} s  {label} {note}".rstrip())


@pytest.fixture(scope="session")
def container_engine() -> Iterator[engine.Engine]:
    already = engine.find()
    started = time.monotonic()
    found = already or engine.ensure()
    if already is None:
        timed("engine: podman set up and its service started", time.monotonic() - started)
    print(f"[engine] {found.kind} at {found.host}", flush=True)
    try:
        yield found
    finally:
        if already is None and found.managed:
            engine.stop_podman()


@pytest.fixture(scope="session")
def serving_image(container_engine: engine.Engine) -> image.Built:
    started = time.monotonic()
    built = image.build_image(reuse=True)
    print(image.report(built), flush=True)
    note = "(reused: same inputs)" if built.cached else f"({built.size_bytes / 1e9:.2f} GB)"
    timed("image: build from these inputs", time.monotonic() - started, note)
    return built


@pytest.fixture(scope="session")
def archives() -> Path:
    """model_store/'s tarballs, built as `make archive` builds them (tiny weights here)."""
    started = time.monotonic()
    archive_models()
    timed("archives: make archive", time.monotonic() - started)
    return DEFAULT_STORE


PROCESSES = (
    "import json, psutil; print(json.dumps([[p.pid, p.uids().real, p.name()] "
    "for p in psutil.process_iter()]))"
)


def processes(container) -> list[tuple[int, int, str]]:  # noqa: ANN001 - an SDK Container
    """(pid, uid, name) of every process in the container, seen from inside (podman 4.3's
    Docker-API `top` answers an empty body; the slim image has no `ps`, the venv has psutil)."""
    import json

    ran = container.exec_run(["/opt/mmekit/venv/bin/python", "-c", PROCESSES])
    assert ran.exit_code == 0, ran.output
    return [tuple(row) for row in json.loads(ran.output.decode().strip().splitlines()[-1])]


@pytest.fixture(scope="session")
def docker_client(container_engine: engine.Engine):
    client = container_engine.client()
    yield client
    client.close()
