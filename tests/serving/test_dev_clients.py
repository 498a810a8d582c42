"""`make dev` is a server like the others: in a copy of the project, with `make dev` running on
free ports, `make -s token`, the curl line it prints, the `mmekit` client (`make edit`) and the
editor's backend all reach it, before and after a handler edit reloads SAM, with one token. With
nothing running, each of them says which command starts a server."""

from __future__ import annotations

import base64
import io
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from scripts import PROJECT_ROOT, ui
from scripts.examples import BALL_CENTRE, scene
from scripts.polling import poll_until
from scripts.targets import LocalTarget
from scripts.torchserve.client import read_token
from scripts.torchserve.profile import Ports, free_ports
from scripts.torchserve.runtime import NativeRuntime

START_TIMEOUT_S = 300
RELOAD_TIMEOUT_S = 120
COMMAND_TIMEOUT_S = 300
MARKER_LINE = '"embedding_cache": "hit" if result.cache_hit else "miss",'
LOOPBACK = "http://127.0.0.1:8095"
CLICK = f"{BALL_CENTRE[0]},{BALL_CENTRE[1]}"


def copy_project(destination: Path, weights_root: Path) -> Path:
    """The project's files (tracked, and new ones git does not ignore), sharing this
    checkout's .venv (so that `make` finds it set up) and the tiny weights."""
    tracked = (
        subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=PROJECT_ROOT,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, tracked):
        source = PROJECT_ROOT / name
        if source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read_bytes())
            target.chmod(source.stat().st_mode)
    (destination / ".venv").symlink_to(PROJECT_ROOT / ".venv")
    (destination / "weights").symlink_to(weights_root)
    return destination


@dataclass
class Project:
    root: Path
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen | None = None

    def make(self, *arguments: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["make", "-s", *arguments], cwd=self.root, env=self.env, capture_output=True,
            text=True, timeout=COMMAND_TIMEOUT_S, check=False,
        )  # fmt: skip

    def shell(self, line: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", "-c", f"set -o pipefail; {line}"], cwd=self.root, env=self.env,
            capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False,
        )  # fmt: skip

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for(self, pattern: str, after: int = 0) -> re.Match:
        def found() -> re.Match | None:
            return re.search(pattern, self.output()[after:])

        return poll_until(
            found, what=f"make dev to print {pattern!r}", timeout=START_TIMEOUT_S,
            process=self.process,
        )  # fmt: skip

    def edit_sam(self, old: str, new: str) -> None:
        handler = self.root / "handlers" / "sam_handler.py"
        text = handler.read_text()
        assert old in text
        handler.write_text(text.replace(old, new, 1))

    def editor(self) -> TestClient:
        """The editor's backend (`make ui`'s app), its `local` target read from this copy's
        record of the running server."""
        target = LocalTarget.from_environment(records=self.root / ".mmekit" / "servers")
        return TestClient(ui.create_app(target), base_url=LOOPBACK)


@pytest.fixture
def project(tmp_path: Path, weights_root: Path) -> Iterator[Project]:
    root = copy_project(tmp_path / "project", weights_root)
    ports = Ports(*free_ports(5))
    env = {k: v for k, v in os.environ.items() if k not in ("MMEKIT_TOKEN", "MAKEFLAGS")}
    env.update({f"{name.upper()}_PORT": str(port) for name, port in vars(ports).items()})
    env["PYTHONUNBUFFERED"] = "1"
    project = Project(root, env, tmp_path / "dev.log")
    try:
        yield project
    except BaseException:
        print(f"--- make dev output ---\n{project.output()[-6000:]}")
        raise
    finally:
        if project.process is not None and project.process.poll() is None:
            os.killpg(project.process.pid, signal.SIGINT)  # as Ctrl-C in its terminal
            try:
                project.process.wait(timeout=180)
            except subprocess.TimeoutExpired:
                os.killpg(project.process.pid, signal.SIGKILL)
        run_dir = root / ".mmekit" / "dev"  # its TorchServe does not outlive the test
        NativeRuntime(run_dir, run_dir / "store").stop()


def start_dev(project: Project) -> None:
    with open(project.log_path, "wb") as log:
        project.process = subprocess.Popen(
            ["make", "dev"], cwd=project.root, env=project.env, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    project.wait_for(r"\[dev\] watching")


def test_with_nothing_running_each_client_names_the_commands(project: Project):
    token = project.make("token")
    assert token.returncode != 0 and "make serve-local" in token.stderr, token.stderr
    assert "make dev" in token.stderr
    picture = project.root / "scene.png"
    scene().save(picture)
    edit = project.make("edit", f"ARGS=segment {picture} --point {CLICK} -o mask.png")
    assert edit.returncode != 0 and "Error 3" in edit.stderr, edit.stderr  # 3: unreachable
    assert "make serve-local" in edit.stderr and "make dev" in edit.stderr
    # `make ui` refuses to start against nothing, and says so
    project.env["UI_PORT"] = str(free_ports(1)[0])
    editor = project.make("ui")
    assert editor.returncode != 0 and "make dev" in editor.stderr, editor.stdout + editor.stderr


def test_token_curl_cli_and_editor_reach_make_dev_before_and_after_a_reload(
    project: Project, tmp_path: Path
):
    start_dev(project)
    token = project.make("token")
    assert token.returncode == 0, token.stderr
    dev_key = read_token(project.root / ".mmekit" / "dev")
    assert token.stdout.strip() == dev_key

    curl = [line.strip() for line in project.output().splitlines() if "curl -s" in line]
    assert len(curl) == 3 and all("$(make -s token)" in line for line in curl)
    sam_curl = next(line for line in curl if "/predictions/sam" in line)
    answered = project.shell(sam_curl)
    assert answered.returncode == 0, answered.stdout + answered.stderr
    assert (project.root / "mask.png").read_bytes().startswith(b"\x89PNG")
    assert "dev_marker" not in answered.stdout

    picture = project.root / "scene.png"
    scene().save(picture)
    segment_args = f"ARGS=segment {picture} --point {CLICK} -o {tmp_path / 'mask.png'}"
    segmented = project.make("edit", segment_args)
    assert segmented.returncode == 0, segmented.stderr
    assert "dev_marker" not in segmented.stdout
    erased = project.make("edit", f"ARGS=erase {picture} --point {CLICK} -o {tmp_path / 'e.png'}")
    assert erased.returncode == 0, erased.stderr
    assert (tmp_path / "e.png").read_bytes().startswith(b"\x89PNG")

    buffer = io.BytesIO()
    scene().save(buffer, format="PNG")
    click = {"image": base64.b64encode(buffer.getvalue()).decode(), "points": [list(BALL_CENTRE)]}
    editor = project.editor()
    first = editor.post("/api/segment", json=click)
    assert first.status_code == 200, first.text
    assert "mask" in first.json() and "dev_marker" not in first.json()

    # a handler edit reloads SAM; the token stays, and every client sees the new code
    seen = len(project.output())
    project.edit_sam(MARKER_LINE, MARKER_LINE + '\n            "dev_marker": 1,')
    project.wait_for(r"sam reloaded in [\d.]+ s", seen)
    again = project.make("token")
    assert again.returncode == 0 and again.stdout.strip() == dev_key
    assert '"dev_marker": 1' in project.shell(sam_curl).stdout
    segmented = project.make("edit", segment_args)
    assert segmented.returncode == 0 and '"dev_marker": 1' in segmented.stdout, segmented.stderr
    after = editor.post("/api/segment", json=click)  # the same editor, as a user keeps it open
    assert after.status_code == 200 and after.json()["dev_marker"] == 1, after.text
