"""poll_until (scripts/polling.py) and the readiness rule (scripts/torchserve/readiness.py
Readiness), against a fake check, a short-lived process and a loopback HTTP server standing in
for TorchServe."""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from scripts.polling import PollError, PollTimeout, ProcessExited, poll_until
from scripts.torchserve import ServeError
from scripts.torchserve.readiness import Readiness, wait_until, wait_until_ready
from tests.support import serving

NO_WAIT_S = 0.0  # a deadline already passed: the check runs once, then the wait gives up
QUICK_S = 0.01


class Counter:
    """A check that answers `answers` in turn, counting its calls."""

    def __init__(self, *answers: object) -> None:
        self.answers, self.calls = list(answers), 0

    def __call__(self) -> object:
        self.calls += 1
        return self.answers.pop(0) if self.answers else None


# -- poll_until --------------------------------------------------------------------------------


def test_returns_the_first_truthy_value():
    check = Counter(None, 0, "", "ready")
    assert poll_until(check, what="it", timeout=60, interval=QUICK_S) == "ready"
    assert check.calls == 4


def test_times_out_naming_what_it_waited_for_and_how_long():
    check = Counter()
    with pytest.raises(PollTimeout, match=r"waiting for the answer after 0 s") as raised:
        poll_until(check, what="the answer", timeout=NO_WAIT_S, interval=QUICK_S)
    assert check.calls == 1  # tried once, even with no time left
    assert raised.value.what == "the answer" and raised.value.timeout == NO_WAIT_S
    assert isinstance(raised.value, TimeoutError) and isinstance(raised.value, PollError)


def test_a_callable_what_names_what_is_still_missing_when_it_gives_up():
    missing = ["sam", "lama"]
    with pytest.raises(PollTimeout, match=r"models \(sam, lama\)"):
        poll_until(Counter(), what=lambda: f"models ({', '.join(missing)})", timeout=NO_WAIT_S)


def test_stops_when_the_watched_process_exits():
    process = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    process.wait()
    check = Counter()
    with pytest.raises(ProcessExited, match=r"exited \(status 3\) while waiting for ping"):
        poll_until(check, what="ping", timeout=60, interval=QUICK_S, process=process)
    assert check.calls == 0  # a dead server is not asked


def test_a_clean_exit_may_be_allowed_for_a_detached_launcher():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    check = Counter(None, True)
    assert poll_until(
        check, what="it", timeout=60, interval=QUICK_S, process=process, clean_exit_ok=True
    )
    assert check.calls == 2


def test_an_exception_from_the_check_ends_the_wait():
    def hopeless() -> bool:
        raise ServeError("worker died")

    with pytest.raises(ServeError, match="worker died"):
        poll_until(hopeless, what="it", timeout=60)


def test_serve_converts_poll_errors_to_serve_error():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    with pytest.raises(ServeError, match="while waiting for TorchServe"):
        wait_until(Counter(), "TorchServe", 60, QUICK_S, process)  # foreground: any exit
    with pytest.raises(ServeError, match="gave up waiting for TorchServe"):
        wait_until(Counter(), "TorchServe", NO_WAIT_S, QUICK_S)


# -- the readiness rule ------------------------------------------------------------------------


@dataclass
class FakeTorchServe:
    """What the loopback server answers: POST /predictions/{model} and GET /models/{model}."""

    url: str = ""
    prediction: tuple[int, str] = (200, "{}")
    workers: list[dict] = field(default_factory=list)
    posts: list[str] = field(default_factory=list)


@pytest.fixture
def torchserve() -> Iterator[FakeTorchServe]:
    fake = FakeTorchServe()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
            self.rfile.read(int(self.headers["Content-Length"]))
            fake.posts.append(self.path)
            self.answer(*fake.prediction)

        def do_GET(self) -> None:  # noqa: N802
            self.answer(200, json.dumps([{"workers": fake.workers}]))

        def answer(self, status: int, body: str) -> None:
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args: object) -> None:
            pass

    with serving(http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)) as server:
        fake.url = f"http://127.0.0.1:{server.server_address[1]}"
        yield fake


def test_ready_when_a_real_request_answers_200(torchserve):
    assert Readiness(torchserve.url, "key").model_ready("sam", b"{}")
    assert torchserve.posts == ["/predictions/sam"]
    torchserve.prediction = (503, "{}")
    assert not Readiness(torchserve.url, "key").model_ready("sam", b"{}")


def test_no_probe_until_a_worker_is_ready(torchserve):
    readiness = Readiness(torchserve.url, management_url=torchserve.url)
    torchserve.workers = [{"id": "9000", "pid": 10, "status": "UNLOADING"}]
    assert not readiness.model_ready("sam", b"{}")
    assert torchserve.posts == []
    torchserve.workers = [{"id": "9000", "pid": 10, "status": "READY"}]
    assert readiness.model_ready("sam", b"{}")


def test_a_restarted_worker_is_reported_at_once_naming_the_log(torchserve):
    readiness = Readiness(torchserve.url, management_url=torchserve.url, where="logs/x.log")
    torchserve.workers = [{"id": "9000", "pid": 10, "status": "UNLOADING"}]
    assert not readiness.model_ready("sam", b"{}")
    torchserve.workers = [{"id": "9000", "pid": 11, "status": "UNLOADING"}]
    with pytest.raises(ServeError, match=r"restarted it \(pid 10, now 11\).*logs/x\.log"):
        readiness.model_ready("sam", b"{}")


@pytest.mark.parametrize("status", [500, 507])
def test_worker_died_answer_is_reported_at_once_naming_the_log(torchserve, status):
    torchserve.prediction = (status, '{"message": "Worker died."}')
    with pytest.raises(ServeError, match=r"worker died.*logs/x\.log"):
        Readiness(torchserve.url, where="logs/x.log").model_ready("sam", b"{}")


def test_no_answer_is_not_ready_and_not_an_error():
    closed = Readiness("http://127.0.0.1:9", request_timeout=1)  # discard port: nothing there
    assert closed.answer("sam", b"{}") is None
    assert not closed.model_ready("sam", b"{}")


@pytest.fixture
def running_server_process() -> Iterator[subprocess.Popen]:
    """A process that stays up, standing in for TorchServe's launcher."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        yield process
    finally:
        process.kill()
        process.wait()


def test_wait_until_ready_probes_every_model_with_its_example(
    torchserve, running_server_process, tmp_path
):
    examples = {model: tmp_path / f"{model}.json" for model in ("sam", "lama")}
    for path in examples.values():
        path.write_text("{}")
    wait_until_ready(torchserve.url, "key", examples, running_server_process, timeout=60)
    assert sorted(torchserve.posts) == ["/predictions/lama", "/predictions/sam"]


def test_wait_until_ready_reports_a_dead_worker_without_waiting_out_the_timeout(
    torchserve, running_server_process, tmp_path
):
    (tmp_path / "sam.json").write_text("{}")
    torchserve.prediction = (500, "Worker died.")
    with pytest.raises(ServeError, match="worker died"):
        wait_until_ready(
            torchserve.url, None, {"sam": tmp_path / "sam.json"}, running_server_process
        )
    assert len(torchserve.posts) == 1
