"""Load: a mixed load at concurrency 16, a per-model job queue limit, slow and vanishing clients.

The mixed load runs against the shared `local_server` (the three tiny tarballs, the `local`
profile, as served): 60 requests by default, 2,000 with --hardening-full, SD at one diffusion
step and images at 320 x 240 so a `make test` stays short. (60, not 200: with every worker
running torch on all cores, three busy workers oversubscribe a small CPU and the mix runs about
6x slower than with one thread per worker; 200 took 220 s on the shared 2-core machine.)
p50/p99 are printed, not asserted: the assertions are behaviour (nothing lost, no 5xx, every
client answered within its bound).
In the figures, the queue test's 503s are counted as 5xx: they are what it provokes.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import pytest
import requests

from scripts.examples import ball_mask, encode, scene
from scripts.examples import requests as example_requests
from tests.servers import Server, start_server

CONCURRENCY = 16
DEFAULT_REQUESTS, FULL_REQUESTS = 60, 2000
REQUEST_BOUND_S = 120.0  # no request may take longer: a hang, not a slow answer
LOAD_SIZE = (320, 240)
JOB_QUEUE_SIZE = 2
BURST = 12  # well above the queue and the one request in the worker
OVERFLOW_TARGET_S = 0.1  # the figure for a 503, printed beside the measurement

# minutes on a 2-core machine: `make test-hardening` and `make test-slow` run it, not `make test`
pytestmark = pytest.mark.slow


@dataclass
class Answer:
    model: str
    status: int | None  # None: no HTTP answer (connection error or timeout)
    seconds: float
    error: str = ""
    text: str = ""


def post(server: Server, model: str, body: str, timeout: float = REQUEST_BOUND_S) -> Answer:
    """One request on this thread's keep-alive session (the client keeps one per thread), as a
    client library sends them."""
    started = time.monotonic()
    try:
        reply = server.client.predict(model, body, token=server.token, timeout=timeout)
    except requests.RequestException as error:
        return Answer(model, None, time.monotonic() - started, repr(error))
    return Answer(model, reply.status_code, time.monotonic() - started, text=reply.text[:200])


def load_bodies(sd_steps: int = 1) -> dict[str, str]:
    """The example requests at LOAD_SIZE (SD still runs its 512 px window)."""
    bodies = example_requests(sd_steps=sd_steps)
    image, mask = encode(scene().resize(LOAD_SIZE)), encode(ball_mask().resize(LOAD_SIZE))
    bodies["sam"]["image"] = image
    bodies["sam"]["gen_args"] = json.dumps({"point_coords": [200, 150], "point_labels": 1})
    for model in ("lama", "sd"):
        bodies[model]["image"], bodies[model]["mask_image"] = image, mask
    return {model: json.dumps(body) for model, body in bodies.items()}


def percentiles(seconds: list[float]) -> str:
    if not seconds:
        return "none"
    p50, p99 = np.percentile(np.array(seconds) * 1000, [50, 99])
    return f"p50 {p50:.0f} ms, p99 {p99:.0f} ms (n={len(seconds)})"


def record(figures, answers: list[Answer]) -> None:
    figures.add(
        requests_sent=len(answers),
        lost=sum(answer.status is None for answer in answers),
        server_errors=sum(answer.status is not None and answer.status >= 500 for answer in answers),
    )


# -- 2,000 (60) mixed requests at concurrency 16 ---------------------------------------------


def test_mixed_load_at_concurrency_16_loses_nothing_and_has_no_5xx(
    local_server: Server, full: bool, figures
):
    total = FULL_REQUESTS if full else DEFAULT_REQUESTS
    bodies = load_bodies()
    models = list(bodies)
    plan = [models[index % len(models)] for index in range(total)]
    started = time.monotonic()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        answers = list(pool.map(lambda model: post(local_server, model, bodies[model]), plan))
    wall = time.monotonic() - started
    record(figures, answers)

    ok = [answer for answer in answers if answer.status == 200]
    print(
        f"\n{total} requests at concurrency {CONCURRENCY} in {wall:.1f} s "
        f"({total / wall:.1f}/s): all {percentiles([a.seconds for a in ok])}"
    )
    for model in models:
        print(f"  {model}: {percentiles([a.seconds for a in ok if a.model == model])}")
    figures.measured(
        f"{total} mixed requests at concurrency {CONCURRENCY}: {wall:.0f} s, "
        f"{len(ok)} answered 200, {percentiles([a.seconds for a in ok])}"
    )
    lost = [answer for answer in answers if answer.status is None]
    errors = [answer for answer in answers if answer.status is not None and answer.status >= 500]
    others = [answer for answer in answers if answer.status not in (None, 200)]
    assert not lost, f"{len(lost)} lost, e.g. {lost[0]}"
    assert not errors, f"{len(errors)} 5xx, e.g. {errors[0]}"
    assert not others, f"{len(others)} non-200 answers, e.g. {others[0]}"
    assert len(ok) == total


# -- a per-model job queue limit ---------------------------------------------------------------


@pytest.fixture(scope="module")
def small_queue_server(served_store: Path, tmp_path_factory) -> Iterator[Server]:
    """SD alone, behind a job queue of JOB_QUEUE_SIZE (TorchServe's job_queue_size is per
    model), with the `local` profile otherwise unchanged."""
    server = start_server(
        tmp_path_factory.mktemp("queue-run"),
        served_store,
        "local",
        ["sd"],
        extra_properties={"job_queue_size": JOB_QUEUE_SIZE},
    )
    try:
        assert (
            f"job_queue_size={JOB_QUEUE_SIZE}" in (server.run_dir / "config.properties").read_text()
        )
        yield server
    finally:
        server.stop()


def test_a_full_job_queue_is_answered_503_at_once_while_accepted_requests_succeed(
    small_queue_server: Server, figures
):
    body = load_bodies(sd_steps=3)["sd"]  # slower than a 503: the burst fills the queue
    barrier = threading.Barrier(BURST, timeout=30)

    def burst_client(_: int) -> Answer:
        barrier.wait()
        return post(small_queue_server, "sd", body)

    with ThreadPoolExecutor(BURST) as pool:
        answers = list(pool.map(burst_client, range(BURST)))
    after = post(small_queue_server, "sd", load_bodies()["sd"])  # the queue drained
    record(figures, [*answers, after])

    accepted = [answer for answer in answers if answer.status == 200]
    overflow = [answer for answer in answers if answer.status == 503]
    overflow_ms = sorted(round(answer.seconds * 1000, 1) for answer in overflow)
    print(
        f"\nburst of {BURST} into a queue of {JOB_QUEUE_SIZE}: {len(accepted)} accepted "
        f"({percentiles([a.seconds for a in accepted])}), {len(overflow)} answered 503 in "
        f"{overflow_ms} ms (target < {OVERFLOW_TARGET_S * 1000:.0f} ms)"
    )
    if overflow_ms:
        figures.measured(
            f"burst of {BURST} into a queue of {JOB_QUEUE_SIZE}: {len(overflow)} answered 503 "
            f"in {overflow_ms[0]}-{overflow_ms[-1]} ms, {len(accepted)} accepted"
        )
    assert len(accepted) + len(overflow) == BURST, [(a.status, a.error) for a in answers]
    assert overflow and accepted
    # the worker's one request and a full queue; the rest overflow
    assert len(accepted) <= JOB_QUEUE_SIZE + 1
    assert all("ServiceUnavailableException" in answer.text for answer in overflow)
    # "at once": every 503 came back before the quickest accepted request was done, i.e. none
    # waited for a slot (a behaviour bound; the absolute figure is printed above)
    assert max(a.seconds for a in overflow) < min(a.seconds for a in accepted)
    assert after.status == 200, after


# -- slow clients and disconnects --------------------------------------------------------------


def raw_request(server: Server, model: str, body: bytes) -> tuple[bytes, bytes]:
    """An HTTP/1.1 request's head and body, for a client written by hand."""
    head = (
        f"POST /predictions/{model} HTTP/1.1\r\n"
        f"Host: {server.url.removeprefix('http://')}\r\n"
        f"Authorization: Bearer {server.token}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode(), body


def connect(server: Server) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    assert host == "127.0.0.1"
    return socket.create_connection((host, int(port)), timeout=REQUEST_BOUND_S)


def read_status(sock: socket.socket) -> int | None:
    """The status of the answer on a socket (bounded by its timeout); None without one."""
    data = b""
    try:
        while b"\r\n" not in data and len(data) < 65536:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    except OSError:
        return None
    parts = data.split(b" ", 2)
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None


def worker_pid(server: Server, model: str) -> int:
    reply = server.client.describe(model, timeout=10, token=server.management_token)
    return int(reply.json()[0]["workers"][0]["pid"])


def wait_until_busy(pid: int, bound_s: float = 30.0) -> bool:
    """True once the worker has used CPU since the call (an idle worker blocks on its socket)."""
    process = psutil.Process(pid)
    start = sum(process.cpu_times()[:2])
    deadline = time.monotonic() + bound_s
    while time.monotonic() < deadline:
        if sum(process.cpu_times()[:2]) - start >= 0.05:
            return True
        time.sleep(0.01)
    return False


def test_slow_clients_and_disconnects_mid_inference_do_not_stall_other_clients(
    local_server: Server, figures
):
    bodies = load_bodies()
    others_done = threading.Event()
    slow_results: dict[int, dict] = {}

    def slow_client(index: int) -> None:
        """Sends its (valid, small) SAM request a byte at a time, and holds the last bytes
        back until the other clients are done: its upload is in progress the whole time."""
        tiny = example_requests(sd_steps=1)["sam"] | {
            "image": encode(scene().resize((32, 24))),
            "gen_args": {"point_coords": [20, 15]},
        }
        head, body = raw_request(local_server, "sam", json.dumps(tiny).encode())
        result = slow_results[index] = {"status": None, "waited": False}
        with connect(local_server) as sock:
            sock.sendall(head)
            for byte in range(len(body) - 8):
                sock.sendall(body[byte : byte + 1])
                time.sleep(0.01)
            result["waited"] = others_done.wait(REQUEST_BOUND_S)
            sock.sendall(body[-8:])
            result["status"] = read_status(sock)

    sd_pid = worker_pid(local_server, "sd")
    dropped = {}

    def vanishing_clients() -> None:
        # one leaves mid-inference: SD at 10 steps, gone once the worker is on it
        head, body = raw_request(local_server, "sd", load_bodies(sd_steps=10)["sd"].encode())
        with connect(local_server) as sock:
            sock.sendall(head + body)
            dropped["mid_inference"] = wait_until_busy(sd_pid)
        # one leaves mid-upload: half a LaMa body, then gone
        head, body = raw_request(local_server, "lama", bodies["lama"].encode())
        with connect(local_server) as sock:
            sock.sendall(head + body[: len(body) // 2])
        dropped["mid_upload"] = True

    slow = [threading.Thread(target=slow_client, args=(index,)) for index in range(3)]
    for thread in slow:
        thread.start()
    vanishing = threading.Thread(target=vanishing_clients)
    vanishing.start()
    others: list[Answer] = []
    try:
        time.sleep(0.5)  # the slow uploads have begun
        vanishing.join(REQUEST_BOUND_S)
        for _ in range(3):  # the other clients: each model, three times, one after another
            for model, body in bodies.items():
                others.append(post(local_server, model, body))
    finally:
        others_done.set()
        for thread in [*slow, vanishing]:
            thread.join(REQUEST_BOUND_S)
    afterwards = post(local_server, "sd", bodies["sd"])
    record(figures, [*others, afterwards])
    figures.add(requests_sent=len(slow_results) + len(dropped))
    figures.add(lost=sum(result["status"] is None for result in slow_results.values()))

    print(
        f"\nwith 3 slow uploads, a client gone mid-inference and one gone mid-upload: "
        f"others {percentiles([a.seconds for a in others if a.status == 200])}; "
        f"slow clients answered {[r['status'] for r in slow_results.values()]}"
    )
    assert not any(thread.is_alive() for thread in [*slow, vanishing]), "a client hung"
    assert dropped == {"mid_inference": True, "mid_upload": True}
    assert [answer.status for answer in others] == [200] * len(others), others
    # the slow uploads were still open (held back) until every other client had its answer
    assert all(result["waited"] for result in slow_results.values())
    assert [result["status"] for result in slow_results.values()] == [200] * len(slow)
    assert afterwards.status == 200, afterwards  # the abandoned inference left SD serving
