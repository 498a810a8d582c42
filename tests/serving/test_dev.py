"""`make dev`: edit a handler in a copy of the project and watch it swap in while requests keep
being answered; a broken edit leaves the old code serving and says why; reverting recovers."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from scripts import PROJECT_ROOT
from scripts.examples import requests as example_requests
from scripts.polling import poll_until
from scripts.torchserve.client import TorchServeClient, loopback_url, read_token
from scripts.torchserve.profile import Ports, free_ports
from scripts.torchserve.runtime import NativeRuntime

START_TIMEOUT_S = 300
RELOAD_TIMEOUT_S = 120
MARKER_LINE = '"embedding_cache": "hit" if result.cache_hit else "miss",'


@dataclass
class Dev:
    process: subprocess.Popen
    log_path: Path
    root: Path
    run_dir: Path
    ports: Ports
    statuses: list[int] = field(default_factory=list)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def dev_lines(self) -> list[str]:
        return [line for line in self.output().splitlines() if line.startswith("[dev]")]

    def wait_for(self, pattern: str, after: int, timeout: float) -> re.Match:
        """The first [dev] line past the first `after` ones matching `pattern`."""

        def first_match() -> re.Match | None:
            matches = (re.search(pattern, line) for line in self.dev_lines()[after:])
            return next((match for match in matches if match), None)

        return poll_until(
            first_match, what=f"a [dev] line {pattern!r}", timeout=timeout, process=self.process
        )

    def predict_sam(self) -> requests.Response:
        token = read_token(self.run_dir)
        torchserve = TorchServeClient(loopback_url(self.ports.inference))
        try:
            body = json.dumps(example_requests()["sam"])
            return torchserve.predict("sam", body, token=token, timeout=60)
        finally:
            torchserve.close()

    def edit(self, old: str, new: str) -> None:
        handler = self.root / "handlers" / "sam_handler.py"
        text = handler.read_text()
        assert old in text
        handler.write_text(text.replace(old, new, 1))


@pytest.fixture
def dev(tmp_path: Path, weights_root: Path) -> Iterator[Dev]:
    root = tmp_path / "project"
    for folder in ("handlers", "configs"):
        shutil.copytree(PROJECT_ROOT / folder, root / folder)
    ports = Ports(*free_ports(5))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.update({f"{name.upper()}_PORT": str(port) for name, port in vars(ports).items()})
    log_path = tmp_path / "dev.log"
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "scripts.dev", "--root", str(root), "--run-dir",
               str(run_dir), "--weights", str(weights_root), "--tier", "tiny",
               "--records", str(tmp_path / "servers")]  # fmt: skip
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, cwd=PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    session = Dev(process, log_path, root, run_dir, ports)
    try:
        session.wait_for(r"watching", 0, START_TIMEOUT_S)
        yield session
    except BaseException:
        print(f"--- make dev output ---\n{session.output()[-6000:]}")
        raise
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)  # as Ctrl-C: the summary, then a clean stop
            try:
                process.wait(timeout=180)
            except subprocess.TimeoutExpired:
                process.kill()
        # whatever happened to make dev, its TorchServe does not outlive the test
        NativeRuntime(run_dir, run_dir / "store").stop()


def test_edits_swap_in_while_requests_keep_being_answered(dev: Dev):
    assert "dev_marker" not in dev.predict_sam().json()
    stop = threading.Event()

    def keep_asking() -> None:
        for _ in range(10_000):  # bounded; stopped well before
            if stop.is_set():
                return
            try:
                dev.statuses.append(dev.predict_sam().status_code)
            except requests.RequestException:
                dev.statuses.append(0)
            time.sleep(0.05)

    asker = threading.Thread(target=keep_asking)
    asker.start()
    try:
        seen = len(dev.dev_lines())
        dev.edit(MARKER_LINE, MARKER_LINE + '\n            "dev_marker": 1,')
        reloaded = dev.wait_for(r"sam reloaded in ([\d.]+) s", seen, RELOAD_TIMEOUT_S)
        print(f"edit to first answer: {reloaded.group(1)} s (printed by make dev)")
        assert dev.predict_sam().json()["dev_marker"] == 1

        seen = len(dev.dev_lines())
        dev.edit('"dev_marker": 1,', '"dev_marker": (1,')  # a syntax error
        dev.wait_for(r"sam: not reloaded, the old version keeps serving", seen, RELOAD_TIMEOUT_S)
        assert "SyntaxError" in dev.output()
        assert dev.predict_sam().json()["dev_marker"] == 1

        seen = len(dev.dev_lines())
        dev.edit('"dev_marker": (1,', '"dev_marker": 1,')
        dev.wait_for(r"sam reloaded in", seen, RELOAD_TIMEOUT_S)
        seen = len(dev.dev_lines())
        load = "    def load(self, config: HandlerContext) -> None:\n"
        dev.edit(load, load + "        raise RuntimeError('cannot initialise: dev test')\n")
        dev.wait_for(r"sam: v\d+ failed to start; v\d+ keeps serving", seen, RELOAD_TIMEOUT_S)
        assert dev.output().count("cannot initialise: dev test") >= 1
        assert dev.predict_sam().json()["dev_marker"] == 1

        seen = len(dev.dev_lines())
        dev.edit("        raise RuntimeError('cannot initialise: dev test')\n", "")  # revert
        dev.wait_for(r"sam reloaded in", seen, RELOAD_TIMEOUT_S)
        assert dev.predict_sam().json()["dev_marker"] == 1
    finally:
        stop.set()
        asker.join(timeout=60)
    assert dev.statuses and set(dev.statuses) == {200}, sorted(set(dev.statuses))
    dev.process.send_signal(signal.SIGINT)
    dev.process.wait(timeout=180)
    assert re.search(r"\[dev\] 3 reloads, median [\d.]+ s", dev.output())
