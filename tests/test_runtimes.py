"""Which runtime `make serve-local` picks, and how the compose runtime drives compose.

The engine (scripts/engine.py), the image build (scripts/image.py) and the Compose CLI are
replaced by fakes: a fake `docker-compose` logs its arguments and environment, so the choices
and the exact commands are checked without a container engine (tests/container runs the real
ones: `make test-container`).
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import pytest

from scripts import PROJECT_ROOT, engine, image, serve
from scripts.archive import DEFAULT_STORE
from scripts.torchserve import RUN_DIR, ServeError
from scripts.torchserve import runtime as torchserve_runtime
from scripts.torchserve.profile import Ports
from scripts.torchserve.running import RECORDS, RunningServer, write
from scripts.torchserve.runtime import (
    ACTIVE_RUNTIME,
    ComposeRuntime,
    NativeRuntime,
    active_runtime,
    choose_runtime,
)

NVIDIA = {"nvidia": {"path": "nvidia-container-runtime"}, "runc": {"path": "runc"}}
RUNC_ONLY = {"runc": {"path": "runc"}}
FAKE_ENGINE = engine.Engine("unix:///nonexistent/engine.sock", "podman", managed=False)


def fake_compose(folder: Path) -> Path:
    """A `docker-compose` that logs its arguments (one JSON object per line)."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "docker-compose"
    script.write_text(
        textwrap.dedent(
            f"""\
            #!{sys.executable}
            import json, os, sys
            with open({str(folder / "calls.jsonl")!r}, "a") as log:
                log.write(json.dumps({{"args": sys.argv[1:],
                    "uid": os.environ.get("MMEKIT_UID"),
                    "image": os.environ.get("MMEKIT_IMAGE"),
                    "host": os.environ.get("DOCKER_HOST"),
                    "port": os.environ.get("INFERENCE_PORT")}}) + "\\n")
            """
        )
    )
    script.chmod(0o755)
    return folder


def calls(folder: Path) -> list[dict]:
    log = folder / "calls.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


@pytest.fixture
def engines(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """install(found=..., runtimes=..., container=...): the engine the code sees."""
    state: dict = {"ensured": 0}

    def install(found: bool = True, runtimes: dict | None = None, container=None) -> Path:
        def ensure() -> engine.Engine:
            state["ensured"] += 1
            if not found:
                raise engine.EngineError("apt-get install podman failed")
            return FAKE_ENGINE

        monkeypatch.setattr(engine, "find", lambda environ=None: FAKE_ENGINE if found else None)
        monkeypatch.setattr(engine, "ensure", ensure)
        monkeypatch.setattr(image, "available", lambda: found and "nvidia" in (runtimes or {}))
        monkeypatch.setattr(ComposeRuntime, "container", lambda self: container)
        built = image.Built("sha256:1", ["mmekit:ctx-abc"], 1, 0.0, "2.14.1", "13.0", True)
        monkeypatch.setattr(image, "build_image", lambda **kwargs: built)
        folder = fake_compose(tmp_path / "bin")
        monkeypatch.setattr(
            torchserve_runtime, "compose_cli", lambda: [str(folder / "docker-compose")]
        )
        return folder

    install.state = state
    return install


class FakeContainer:
    def __init__(self, pid: int) -> None:
        self.attrs = {"State": {"Pid": pid}}


def test_auto_takes_compose_where_an_engine_has_nvidias_runtime(engines, capsys):
    engines(runtimes=NVIDIA)
    assert choose_runtime("auto") == "compose"
    assert "runtime: compose" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("answers", "reason"),
    [
        ({"found": False}, "no Docker engine"),
        ({"runtimes": RUNC_ONLY}, "without NVIDIA's runtime"),
    ],
)
def test_auto_falls_back_to_native_and_says_why(engines, capsys, answers, reason):
    engines(**answers)
    assert choose_runtime("auto") == "native"
    out = capsys.readouterr().out
    assert "runtime: native" in out and reason in out and "RUNTIME=compose|native" in out
    assert engines.state["ensured"] == 0  # auto only looks: it installs and starts nothing


def test_native_is_taken_as_asked_without_asking_the_engine(engines):
    engines(runtimes=NVIDIA)
    assert choose_runtime("native") == "native"
    assert engines.state["ensured"] == 0


def test_compose_sets_up_an_engine_where_none_answers(engines):
    engines(found=True, runtimes=RUNC_ONLY)
    assert choose_runtime("compose") == "compose"
    assert engines.state["ensured"] == 1


def test_compose_without_an_engine_is_one_line_saying_what_to_do(engines, capsys):
    engines(found=False)
    with pytest.raises(ServeError, match="RUNTIME=compose: no Docker engine"):
        choose_runtime("compose")
    # the same through the CLI: exit 1, one line on stderr, nothing started
    assert serve.main(["--run-dir", "/nonexistent-run", "start", "--runtime", "compose"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: RUNTIME=compose") and "\n" not in err


def test_runtime_comes_from_the_environment(monkeypatch, engines, capsys):
    engines(found=False)
    monkeypatch.setenv("RUNTIME", "compose")
    assert serve.main(["--run-dir", "/nonexistent-run", "start"]) == 1
    assert "RUNTIME=compose" in capsys.readouterr().err


@pytest.mark.parametrize("gpu", [True, False])
def test_compose_up_runs_the_built_image_on_the_native_ports(engines, tmp_path, monkeypatch, gpu,
                                                              capsys):  # fmt: skip
    folder = engines(runtimes=NVIDIA if gpu else RUNC_ONLY)
    monkeypatch.delenv("MMEKIT_UID", raising=False)
    monkeypatch.delenv("MMEKIT_GID", raising=False)
    monkeypatch.setattr(os, "chown", lambda *args: None)
    runtime = ComposeRuntime(RUN_DIR, DEFAULT_STORE)  # what compose.yaml mounts
    ports = Ports(18080, 18081, 18082, 17070, 17071)
    process = runtime.start(tmp_path / "unused.properties", ["sam"], foreground=False, ports=ports)
    assert process.wait(timeout=30) == 0
    (call,) = calls(folder)
    files = ["--file", str(PROJECT_ROOT / "compose.yaml")]
    if not gpu:
        files += ["--file", str(PROJECT_ROOT / "compose.cpu.yaml")]
    assert call["args"] == [
        "--project-directory", str(PROJECT_ROOT), *files, "up", "--no-build", "--detach",
    ]  # fmt: skip
    assert call["port"] == "18080" and call["image"] == "mmekit:ctx-abc"
    assert call["host"] == FAKE_ENGINE.host
    assert call["uid"] == str(os.getuid() or ComposeRuntime.IMAGE_UID) != "0"
    assert ("compose on the CPU" in capsys.readouterr().out) is not gpu
    # the run folder compose.yaml mounts exists before compose starts (create_host_path: false)
    assert runtime.key_dir.is_dir() and runtime.key_dir == PROJECT_ROOT / ".mmekit" / "compose"


def test_compose_in_the_foreground_stays_attached(tmp_path):
    command = ComposeRuntime(tmp_path, DEFAULT_STORE).command(tmp_path, [], True)
    assert command[-2:] == ["up", "--no-build"]


def test_compose_refuses_a_store_or_run_folder_it_does_not_mount(engines, tmp_path):
    folder = engines()
    for runtime in (
        ComposeRuntime(RUN_DIR, tmp_path / "elsewhere"),
        ComposeRuntime(tmp_path / "run", DEFAULT_STORE),
    ):
        with pytest.raises(ServeError, match="RUNTIME=native"):
            runtime.start(tmp_path / "unused.properties", [], foreground=True)
    assert calls(folder) == []  # nothing started


def test_compose_running_pid_is_the_containers_and_stop_is_compose_down(engines, tmp_path):
    folder = engines(container=FakeContainer(4242))
    runtime = ComposeRuntime(tmp_path, DEFAULT_STORE)
    assert runtime.running_pid() == 4242
    assert runtime.stop() is True
    assert calls(folder)[-1]["args"][-1] == "down"


def test_compose_with_nothing_running_has_no_pid_and_stop_says_so(engines, tmp_path):
    engines(container=None)
    runtime = ComposeRuntime(tmp_path, DEFAULT_STORE)
    assert runtime.running_pid() is None
    assert runtime.stop() is False


def test_compose_without_an_engine_is_not_running(monkeypatch, tmp_path):
    monkeypatch.setattr(engine, "find", lambda environ=None: None)
    runtime = ComposeRuntime(tmp_path, DEFAULT_STORE)
    assert runtime.container() is None and runtime.running_pid() is None


def test_token_reads_the_compose_record_and_stop_follows_the_runtime_last_started(
    engines, tmp_path, capsys
):
    folder = engines(container=None)
    (tmp_path / ACTIVE_RUNTIME).write_text("compose\n")
    keys = {"inference": {"key": "from-compose"}, "management": {"key": "m"}}
    (tmp_path / "compose").mkdir()
    (tmp_path / "compose" / "key_file.json").write_text(json.dumps(keys))
    # as serve start records a compose server once it answers (its pid: one that is alive)
    server = RunningServer.started("compose", os.getpid(), Ports(), tmp_path, tmp_path / "compose")
    write(server, tmp_path / RECORDS)
    assert serve.main(["--run-dir", str(tmp_path), "token"]) == 0
    assert capsys.readouterr().out.strip() == "from-compose"
    assert serve.main(["--run-dir", str(tmp_path), "stop"]) == 0
    assert capsys.readouterr().out.strip() == "no mmekit server was running"
    assert calls(folder)[-1]["args"][-1] == "down"
    assert not (tmp_path / RECORDS / "compose.json").exists()  # stopped: no longer recorded


def test_without_a_record_the_runtime_is_native(tmp_path):
    assert isinstance(active_runtime(tmp_path), NativeRuntime)
