"""Which runtime `make serve-local` picks, and how the compose runtime drives docker compose.

A fake `docker` on PATH answers `info`, `compose ps` and `inspect` from a small script and logs
every call, so the choices and the exact commands are checked without a Docker engine.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import pytest

from scripts import PROJECT_ROOT, serve
from scripts.archive import DEFAULT_STORE

NVIDIA = '{"nvidia":{"path":"nvidia-container-runtime"},"runc":{"path":"runc"}}'
RUNC_ONLY = '{"runc":{"path":"runc"}}'


def fake_docker(
    folder: Path,
    engine: bool = True,
    runtimes: str = NVIDIA,
    running_container: str = "",
    container_pid: int = 4242,
) -> Path:
    """A `docker` that logs its arguments (one JSON list per line) and answers like an engine."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "docker"
    script.write_text(
        textwrap.dedent(
            f"""\
            #!{sys.executable}
            import json, os, sys
            args = sys.argv[1:]
            with open({str(folder / "calls.jsonl")!r}, "a") as log:
                log.write(json.dumps({{"args": args, "uid": os.environ.get("MMEKIT_UID"),
                    "port": os.environ.get("INFERENCE_PORT")}}) + "\\n")
            if not {engine}:
                print("Cannot connect to the Docker daemon", file=sys.stderr)
                sys.exit(1)
            if args[:1] == ["info"]:
                print({runtimes!r} if "--format" in args else "Server: fake")
            elif args[:1] == ["compose"] and "ps" in args:
                print({running_container!r})
            elif args[:1] == ["inspect"]:
                print({container_pid})
            """
        )
    )
    script.chmod(0o755)
    return folder


def calls(folder: Path) -> list[dict]:
    log = folder / "calls.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


@pytest.fixture
def docker_on_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    def install(**answers) -> Path:
        folder = fake_docker(tmp_path / "bin", **answers)
        monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
        return folder

    return install


def test_auto_takes_compose_where_an_engine_has_nvidias_runtime(docker_on_path, capsys):
    docker_on_path(runtimes=NVIDIA)
    assert serve.choose_runtime("auto") == "compose"
    assert "runtime: compose" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("answers", "reason"),
    [
        ({"engine": False}, "no Docker engine"),
        ({"runtimes": RUNC_ONLY}, "without NVIDIA's runtime"),
    ],
)
def test_auto_falls_back_to_native_and_says_why(docker_on_path, capsys, answers, reason):
    docker_on_path(**answers)
    assert serve.choose_runtime("auto") == "native"
    out = capsys.readouterr().out
    assert "runtime: native" in out and reason in out and "RUNTIME=compose|native" in out


def test_auto_without_any_docker_cli_is_native(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert serve.choose_runtime("auto") == "native"


def test_native_is_taken_as_asked_without_asking_docker(docker_on_path):
    folder = docker_on_path(runtimes=NVIDIA)
    assert serve.choose_runtime("native") == "native"
    assert calls(folder) == []


def test_compose_without_an_engine_is_one_line_saying_what_to_do(docker_on_path, capsys):
    docker_on_path(engine=False)
    with pytest.raises(serve.ServeError, match="RUNTIME=compose: no Docker engine"):
        serve.choose_runtime("compose")
    # the same through the CLI: exit 1, one line on stderr, nothing started
    assert serve.main(["--run-dir", "/nonexistent-run", "start", "--runtime", "compose"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: RUNTIME=compose") and "\n" not in err


def test_runtime_comes_from_the_environment(monkeypatch, docker_on_path, capsys):
    docker_on_path(engine=False)
    monkeypatch.setenv("RUNTIME", "compose")
    assert serve.main(["--run-dir", "/nonexistent-run", "start"]) == 1
    assert "RUNTIME=compose" in capsys.readouterr().err


def test_compose_up_publishes_the_native_ports_and_runs_as_this_user(
    docker_on_path, tmp_path, monkeypatch
):
    folder = docker_on_path()
    monkeypatch.delenv("MMEKIT_UID", raising=False)
    runtime = serve.ComposeRuntime(serve.RUN_DIR, DEFAULT_STORE)  # what compose.yaml mounts
    ports = serve.Ports(18080, 18081, 18082, 17070, 17071)
    process = runtime.start(tmp_path / "unused.properties", ["sam"], foreground=False, ports=ports)
    assert process.wait(timeout=30) == 0
    (call,) = calls(folder)
    assert call["args"] == [
        "compose", "--project-directory", str(PROJECT_ROOT),
        "--file", str(PROJECT_ROOT / "compose.yaml"), "up", "--build", "--detach",
    ]  # fmt: skip
    assert call["port"] == "18080" and call["uid"] == str(os.getuid())
    # the run folder compose.yaml mounts exists before compose starts (create_host_path: false)
    assert runtime.key_dir.is_dir() and runtime.key_dir == PROJECT_ROOT / ".mmekit" / "compose"


def test_compose_in_the_foreground_stays_attached(tmp_path):
    command = serve.ComposeRuntime(tmp_path, DEFAULT_STORE).command(tmp_path, [], True)
    assert command[-2:] == ["up", "--build"]


def test_compose_refuses_a_store_or_run_folder_it_does_not_mount(docker_on_path, tmp_path):
    folder = docker_on_path()
    for runtime in (
        serve.ComposeRuntime(serve.RUN_DIR, tmp_path / "elsewhere"),
        serve.ComposeRuntime(tmp_path / "run", DEFAULT_STORE),
    ):
        with pytest.raises(serve.ServeError, match="RUNTIME=native"):
            runtime.start(tmp_path / "unused.properties", [], foreground=True)
    assert calls(folder) == []  # nothing started


def test_compose_running_pid_is_the_containers_and_stop_is_compose_down(docker_on_path, tmp_path):
    folder = docker_on_path(running_container="0123abcd", container_pid=4242)
    runtime = serve.ComposeRuntime(tmp_path, DEFAULT_STORE)
    assert runtime.running_pid() == 4242
    assert runtime.stop() is True
    logged = [call["args"] for call in calls(folder)]
    assert ["inspect", "--format", "{{.State.Pid}}", "0123abcd"] in logged
    assert logged[-1][-1] == "down"


def test_compose_with_nothing_running_has_no_pid_and_stop_says_so(docker_on_path, tmp_path):
    docker_on_path(running_container="")
    runtime = serve.ComposeRuntime(tmp_path, DEFAULT_STORE)
    assert runtime.running_pid() is None
    assert runtime.stop() is False


def test_compose_without_a_docker_cli_is_not_running(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    runtime = serve.ComposeRuntime(tmp_path, DEFAULT_STORE)
    assert runtime.running_pid() is None and runtime.stop() is False


def test_token_and_stop_follow_the_runtime_last_started(docker_on_path, tmp_path, capsys):
    folder = docker_on_path(running_container="")
    (tmp_path / serve.ACTIVE_RUNTIME).write_text("compose\n")
    keys = {"inference": {"key": "from-compose"}, "management": {"key": "m"}}
    (tmp_path / "compose").mkdir()
    (tmp_path / "compose" / "key_file.json").write_text(json.dumps(keys))
    assert serve.main(["--run-dir", str(tmp_path), "token"]) == 0
    assert capsys.readouterr().out.strip() == "from-compose"
    assert serve.main(["--run-dir", str(tmp_path), "stop"]) == 0
    assert capsys.readouterr().out.strip() == "no mmekit server was running"
    assert calls(folder)[-1]["args"][-1] == "down"


def test_without_a_record_the_runtime_is_native(tmp_path):
    assert isinstance(serve.active_runtime(tmp_path), serve.NativeRuntime)
