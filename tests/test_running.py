"""The record of the local server that is running (scripts/torchserve/running.py), and the
`local` target that follows it: found, passed over when gone, renewed after a restart."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from scripts import serve
from scripts.targets import LocalTarget, Refused, Unreachable
from scripts.torchserve.profile import Ports
from scripts.torchserve.running import NoLocalServer, RunningServer, clear, current, write
from tests.support import serving


def key_folder(folder: Path, key: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    keys = {api: {"key": f"{key}-{api}"} for api in ("management", "API")}
    (folder / "key_file.json").write_text(json.dumps({"inference": {"key": key}, **keys}))
    return folder


def record(runtime: str, folder: Path, pid: int | None, port: int = 8080) -> RunningServer:
    return RunningServer.started(runtime, pid, Ports(inference=port), folder, folder)


def dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True,
                          capture_output=True, text=True)  # fmt: skip
    return int(done.stdout)


def test_no_record_names_both_commands(tmp_path: Path):
    with pytest.raises(NoLocalServer, match=r"make serve-local.*make dev"):
        current(tmp_path / "servers")


def test_the_running_server_started_last_is_the_local_one(tmp_path: Path):
    records = tmp_path / "servers"
    write(record("native", tmp_path / "serve", os.getpid(), 8080), records)
    write(record("dev", tmp_path / "dev", os.getpid(), 9080), records)
    assert current(records).runtime == "dev"
    assert current(records).inference_url == "http://127.0.0.1:9080"
    clear(records, "dev", tmp_path / "dev")
    assert current(records).runtime == "native"


def test_a_server_that_has_gone_is_passed_over_and_named(tmp_path: Path):
    records = tmp_path / "servers"
    write(record("native", tmp_path / "serve", os.getpid()), records)
    write(record("dev", tmp_path / "dev", dead_pid()), records)
    assert current(records).runtime == "native"  # the dev server died: not the local one
    clear(records, "native", tmp_path / "serve")
    with pytest.raises(NoLocalServer, match=r"\(`make dev`'s server \(dev, [^)]*\) has stopped\)"):
        current(records)


def test_clear_removes_only_the_record_of_its_own_run_folder(tmp_path: Path):
    records = tmp_path / "servers"
    write(record("dev", tmp_path / "theirs", os.getpid()), records)
    clear(records, "dev", tmp_path / "mine")
    assert current(records).run_dir == str(tmp_path / "theirs")


def test_make_token_prints_the_running_servers_key(tmp_path: Path, capsys):
    run_dir = tmp_path / "run"  # serve's run folder: its records are servers/ in it
    dev_keys = key_folder(tmp_path / "dev", "dev-key")
    write(RunningServer.started("dev", os.getpid(), Ports(), dev_keys, dev_keys),
          run_dir / "servers")  # fmt: skip
    assert serve.main(["--run-dir", str(run_dir), "token"]) == 0
    assert capsys.readouterr().out.strip() == "dev-key"
    assert serve.main(["--run-dir", str(run_dir), "token", "--management"]) == 0
    assert capsys.readouterr().out.strip() == "dev-key-management"


class KeyedServer(ThreadingHTTPServer):
    """A stand-in TorchServe on loopback that accepts one inference key."""

    key = ""


class Predictions(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.headers.get("Authorization") == f"Bearer {self.server.key}":
            status, body = 200, {"generated_image": "", "served_with": self.server.key}
        else:
            status, body = 401, {"code": 401, "message": "InvalidKeyException: token invalid"}
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def keyed() -> Iterator[KeyedServer]:
    with serving(KeyedServer(("127.0.0.1", 0), Predictions)) as server:
        yield server


def test_the_local_target_reads_the_record(tmp_path: Path, keyed, monkeypatch):
    monkeypatch.delenv("MMEKIT_TOKEN", raising=False)
    with pytest.raises(Unreachable, match=r"make serve-local.*make dev"):
        LocalTarget.from_environment(records=tmp_path / "servers")
    keyed.key = "first"
    port = keyed.server_address[1]
    write(record("dev", key_folder(tmp_path / "dev", "first"), os.getpid(), port),
          tmp_path / "servers")  # fmt: skip
    target = LocalTarget.from_environment(records=tmp_path / "servers")
    assert target.url == f"http://127.0.0.1:{port}" and target.token == "first"
    assert target.invoke("sam", b"{}")["served_with"] == "first"


def test_a_restarted_server_is_followed_once_and_a_refusal_names_the_running_one(
    tmp_path: Path, keyed, monkeypatch
):
    monkeypatch.delenv("MMEKIT_TOKEN", raising=False)
    port, records = keyed.server_address[1], tmp_path / "servers"
    write(record("native", key_folder(tmp_path / "serve", "old"), os.getpid(), port), records)
    target = LocalTarget.from_environment(records=records)  # an editor left open
    # the server is restarted as `make dev`: a new record, a new key
    write(record("dev", key_folder(tmp_path / "dev", "new"), os.getpid(), port), records)
    keyed.key = "new"
    assert target.invoke("sam", b"{}")["served_with"] == "new"
    assert target.token == "new"
    keyed.key = "neither"  # a key no record holds: refused, and the message says who runs
    with pytest.raises(Refused, match=r"`make dev`'s server \(dev, http://127\.0\.0\.1:\d+\)"):
        target.invoke("sam", b"{}")
