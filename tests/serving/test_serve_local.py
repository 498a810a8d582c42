"""`make serve-local` itself, as a user runs it: `serve start --detach`, then token, curl, stop.

The other serving tests start TorchServe through the runner's parts; this one goes through the
command line from end to end, with the auto runtime (native here: there is no Docker engine).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import psutil
import pytest
import requests

from scripts import PROJECT_ROOT, serve
from scripts.torchserve.client import TorchServeClient, loopback_url
from scripts.torchserve.profile import Ports, free_ports
from scripts.torchserve.runtime import active_runtime


@pytest.fixture
def detached(tmp_path: Path, weights_root: Path, monkeypatch: pytest.MonkeyPatch, capsys):
    ports = Ports(*free_ports(5))
    for field, port in vars(ports).items():
        monkeypatch.setenv(f"{field.upper()}_PORT", str(port))
    monkeypatch.delenv("RUNTIME", raising=False)
    run_dir, store = tmp_path / "run", tmp_path / "model_store"
    argv = ["--run-dir", str(run_dir)]
    code = serve.main(
        [*argv, "start", "--detach", "--tier", "tiny", "--store", str(store),
         "--weights", str(weights_root)]
    )  # fmt: skip
    output = capsys.readouterr()
    try:
        assert code == 0, output.err
        yield ports, run_dir, argv, output.out
    finally:
        stopped = serve.main([*argv, "stop"]) == 0
        log = run_dir / "logs" / "console.log"
        if not stopped and log.exists():
            print(log.read_text(errors="replace")[-8000:])


def test_start_detached_serves_the_printed_curl_lines_and_stop_ends_it(detached, capsys, tmp_path):
    ports, run_dir, argv, out = detached
    if active_runtime(run_dir).name == "native":
        assert "runtime: native" in out
    assert "RANDOM WEIGHTS" in out  # tiny weights get the banner
    curl = [line for line in out.splitlines() if line.strip().startswith("curl")]
    assert len(curl) == 3
    assert all(f"http://127.0.0.1:{ports.inference}/predictions/" in line for line in curl)

    assert serve.main([*argv, "token"]) == 0
    token = capsys.readouterr().out.strip()
    # the printed curl lines, run as printed from the project folder, with the token that
    # `make -s token` prints for the default run folder taken from this one instead
    for line, output in zip(curl, ("mask.png", "erased.png", "replaced.png"), strict=True):
        command = line.strip().replace("$(make -s token)", token)
        command = command.replace(f" {output}", f" {tmp_path / output}")
        done = subprocess.run(
            ["bash", "-c", f"set -o pipefail; {command}"],
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert (tmp_path / output).read_bytes().startswith(b"\x89PNG"), done.stdout

    frontend = active_runtime(run_dir).running_pid()
    assert frontend is not None
    server = [psutil.Process(frontend), *psutil.Process(frontend).children(recursive=True)]
    assert len(server) >= 4  # the frontend and one worker per model
    assert serve.main([*argv, "stop"]) == 0
    assert capsys.readouterr().out.strip() == "stopped"
    assert not any(_alive(process) for process in server)
    with pytest.raises(requests.ConnectionError):
        TorchServeClient(loopback_url(ports.inference)).ping(timeout=5)


def _alive(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
