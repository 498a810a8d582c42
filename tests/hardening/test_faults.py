"""Faults: workers killed while idle and while serving, a handler past its responseTimeout, a
handler that cannot initialise, SIGTERM with requests in flight.

Each test runs its own TorchServe (the runner `make serve-local` uses, tests/servers.py), never
the shared `local_server`, because it kills things. Test-only model archives are built here the
way scripts/archive.py builds the real ones, with a handler module that subclasses a real handler
(`import lama_handler`: TorchServe wants exactly one class defined in a handler module) and the
shared modules and tiny weights beside it; production code is untouched.

Bounds are behaviour bounds: "an error, not a hang" (an answer long before the model's
responseTimeout), "the next request succeeds within 10 s" (the issue's figure, measured from the
kill with a bounded retry loop), "not ready at once" (not after TorchServe's 300 s of retries).
In the figures, `lost` counts requests that got neither an answer nor a connection error within
their bound (hangs); the 5xx the faults cause on purpose are counted as server errors.

By default SD's worker is killed both ways, SAM's idle and LaMa's serving; --hardening-full kills
every model's both ways. SD has the least headroom: on an idle 2-core CPU its restart takes about
6 s (TorchServe's fixed 1 s retry delay; 1.2 s for the new worker to import torch; 3.3 s to
initialise, nearly all of it importing diffusers and transformers, whose own imports pull in
torch._dynamo, scipy and torchvision; 0.3 s for the request); when other work shares the cores
it can take 7-14 s. SAM and LaMa come back in 2.5-4 s.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import requests
import yaml

from scripts import HANDLERS_DIR
from scripts.archive import (
    SHARED_MODULES,
    ArchiveInputs,
    link_or_copy,
    run_archiver,
    write_deterministic_tar,
)
from scripts.examples import ball_mask, encode, scene, write_requests
from scripts.examples import requests as example_requests
from scripts.models import MODELS, spec
from scripts.polling import PollTimeout, poll_until
from scripts.torchserve import ServeError
from scripts.torchserve.client import loopback_url, read_token
from scripts.torchserve.profile import Ports, free_ports, render_profile
from scripts.torchserve.readiness import wait_for_token, wait_until_ready
from scripts.torchserve.runtime import NativeRuntime, shut_down
from tests.servers import Server, start_server

RECOVERY_BOUND_S = 10.0  # the issue: the next request succeeds within 10 s
DIAGNOSE_S = 60.0  # past the bound, keep polling this long to say how late it was
NO_HANG_S = 30.0  # an answer well before the models' responseTimeout (55-58 s)
SLOW_TIMEOUT_S = 3  # responseTimeout of the test-only slow model
NOT_READY_BOUND_S = 60.0  # "at once": TorchServe itself retries a broken worker for 300 s
SHUTDOWN_BOUND_S = 30.0

# its own servers, killed and restarted: `make test-hardening` and `make test-slow` run it
pytestmark = pytest.mark.slow

SLOW_HANDLER = '''"""Test only: LaMa that sleeps in infer for the request's "test_sleep_s"."""

import time

import lama_handler



class SlowLama(lama_handler.LamaHandler):
    def decode(self, payload):
        self.test_sleep_s = float(payload.get("test_sleep_s", 0))
        return super().decode(payload)

    def infer(self, request):
        time.sleep(self.test_sleep_s)
        return super().infer(request)
'''

BROKEN_HANDLER = '''"""Test only: LaMa whose initialisation always fails."""

import lama_handler


class BrokenLama(lama_handler.LamaHandler):
    def load(self, config):
        raise RuntimeError("test-only handler: fails to initialise on purpose")
'''


# -- helpers -------------------------------------------------------------------------------


def build_test_archive(
    store: Path,
    name: str,
    handler_source: str,
    weights: Path,
    response_timeout: int | None = None,
) -> Path:
    """store/<name>.tar.gz: a LaMa archive whose handler is `handler_source`, laid out as
    scripts/archive.py lays out the real ones (shared modules, lama_handler.py, weights/)."""
    with tempfile.TemporaryDirectory(prefix=f".build-{name}-", dir=store) as workdir:
        work = Path(workdir)
        handler = work / f"fault_{name}.py"  # never lama_handler.py: that one ships beside it
        handler.write_text(handler_source)
        config = yaml.safe_load(spec("lama").config_file.read_text())
        if response_timeout is not None:
            config["responseTimeout"] = response_timeout
        config_path = work / "model-config.yaml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        shared = (*SHARED_MODULES, spec("lama").handler_file)
        inputs = ArchiveInputs(
            model=name,
            tier="tiny",
            weights=weights,
            config=config_path,
            handler=handler,
            shared=tuple(HANDLERS_DIR / module for module in shared),
        )
        (work / "build").mkdir()
        folder = run_archiver(inputs, work / "build")
        target = store / f"{name}.tar.gz"
        write_deterministic_tar(folder, target, name, 0)
    return target


@dataclass
class Outcome:
    status: int | None  # None: no HTTP answer
    error: str  # the connection error, if any
    seconds: float
    text: str = ""

    @property
    def hung(self) -> bool:
        return self.status is None and "Timeout" in self.error


def post(server: Server, model: str, body: str, timeout: float = NO_HANG_S) -> Outcome:
    started = time.monotonic()
    try:
        reply = server.client.predict(model, body, token=server.token, timeout=timeout)
    except requests.RequestException as error:
        return Outcome(None, repr(error), time.monotonic() - started)
    return Outcome(reply.status_code, "", time.monotonic() - started, reply.text[:300])


def frontend(server: Server) -> psutil.Process:
    pid = server.runtime.running_pid()
    assert pid is not None, "no TorchServe frontend is running"
    return psutil.Process(pid)


def worker_pid(server: Server, model: str) -> int:
    """The pid of `model`'s one worker (management API), checked to be a child of the frontend."""
    reply = server.client.describe(model, timeout=10, token=server.management_token)
    assert reply.status == 200, reply.text
    workers = reply.json()[0]["workers"]
    assert len(workers) == 1, workers
    pid = int(workers[0]["pid"])
    children = {child.pid for child in frontend(server).children(recursive=True)}
    assert pid in children, f"{model}'s worker {pid} is not a child of the frontend"
    return pid


def wait_until_busy(pid: int, bound_s: float = NO_HANG_S) -> None:
    """Until the worker has used CPU since the call: it has a request (idle workers block)."""
    process = psutil.Process(pid)
    start = sum(process.cpu_times()[:2])
    try:
        poll_until(
            lambda: sum(process.cpu_times()[:2]) - start >= 0.05,
            what=f"worker {pid} to start on the request",
            timeout=bound_s,
            interval=0.01,
        )
    except PollTimeout:
        raise AssertionError(f"worker {pid} never started on the request") from None


@dataclass
class Recovery:
    seconds: float | None  # from the fault to the first 200; None: not within DIAGNOSE_S
    tries: list[Outcome]


def recover(server: Server, model: str, body: str, since: float) -> Recovery:
    """Retry the request (bounded) until it is answered 200; time from `since`."""
    tries: list[Outcome] = []
    deadline = since + DIAGNOSE_S
    while time.monotonic() < deadline and len(tries) < 200:
        outcome = post(server, model, body, timeout=max(1.0, deadline - time.monotonic()))
        tries.append(outcome)
        if outcome.status == 200:
            return Recovery(time.monotonic() - since, tries)
        assert not outcome.hung, f"{model}: a request hung during recovery: {outcome}"
        time.sleep(0.2)
    return Recovery(None, tries)


def seconds(value: float | None) -> str:
    return "never (within the bound)" if value is None else f"{value:.1f} s"


def record(figures, tries: list[Outcome], faults: int = 0) -> None:
    figures.add(
        faults_injected=faults,
        requests_sent=len(tries),
        lost=sum(t.hung for t in tries),
        server_errors=sum(t.status is not None and t.status >= 500 for t in tries),
    )


def examples() -> dict[str, str]:
    return {model: json.dumps(body) for model, body in example_requests(sd_steps=1).items()}


def heavy_request(model: str) -> str:
    """A request its worker needs a second of CPU or more for (tiny weights, this CPU), so a
    kill lands while it is being served."""
    body = example_requests(sd_steps=40)[model]  # SD: 40 diffusion steps
    if model in ("sam", "lama"):  # SAM's embedding and a 12 MP mask; LaMa at 3 MP
        size = (4096, 3072) if model == "sam" else (2048, 1536)
        body["image"] = encode(scene().resize(size))
        if model == "sam":
            body["gen_args"] = {"point_coords": [size[0] // 2, size[1] // 2]}
        else:
            body["mask_image"] = encode(ball_mask().resize(size))
    return json.dumps(body)


# -- servers -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fault_store(served_store: Path, tiny_weights: Callable[[str], Path], tmp_path_factory) -> Path:
    """The three tiny tarballs plus `slowlama` (responseTimeout 3 s, sleeps when asked)."""
    store = tmp_path_factory.mktemp("fault-store")
    for model in MODELS:
        link_or_copy(str(served_store / f"{model}.tar.gz"), str(store / f"{model}.tar.gz"))
    build_test_archive(
        store, "slowlama", SLOW_HANDLER, tiny_weights("lama"), response_timeout=SLOW_TIMEOUT_S
    )
    return store


@pytest.fixture(scope="module")
def fault_server(fault_store: Path, tmp_path_factory) -> Iterator[Server]:
    server = start_server(
        tmp_path_factory.mktemp("fault-run"), fault_store, "local", [*MODELS, "slowlama"]
    )
    try:
        # readiness probed the three real models; the slow one answers like LaMa
        assert post(server, "slowlama", examples()["lama"]).status == 200
        yield server
    finally:
        server.stop()


@pytest.fixture
def log_on_failure(request: pytest.FixtureRequest) -> Iterator[Callable[[Server], None]]:
    """watch(server): print that server's log tail if the test fails."""
    watched: list[Server] = []
    yield watched.append
    report = getattr(request.node, "report_call", None)
    if report is not None and report.failed:
        for server in watched:
            print(f"--- {server.run_dir.name} log (tail) ---\n{server.log_tail(120)}")


def every_fault(full: bool, model: str, defaults: tuple[str, ...]) -> None:
    """Only the default models' cases unless --hardening-full."""
    if not full and model not in defaults:
        pytest.skip("--hardening-full (HARDENING_FULL=1) kills every model's worker")


# -- kill -9 ---------------------------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
def test_a_worker_killed_while_idle_is_replaced_and_serves_within_10_s(
    model, fault_server, full, figures, log_on_failure
):
    every_fault(full, model, defaults=("sam", "sd"))
    log_on_failure(fault_server)
    body = examples()[model]
    pid = worker_pid(fault_server, model)
    killed_at = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    recovery = recover(fault_server, model, body, killed_at)
    record(figures, recovery.tries, faults=1)
    answers = [(t.status, round(t.seconds, 2)) for t in recovery.tries]
    print(f"\n{model}: killed idle worker; 200 after {recovery.seconds} s; answers {answers}")
    figures.measured(f"{model} killed idle: 200 again after {seconds(recovery.seconds)}")
    for outcome in recovery.tries[:-1]:  # before recovery: errors, each answered promptly
        assert outcome.status in (500, 503, 507) or outcome.error, outcome
    assert recovery.seconds is not None, f"{model} never recovered: {answers}"
    assert recovery.seconds <= RECOVERY_BOUND_S, (
        f"{model} answered 200 only {recovery.seconds:.1f} s after its worker was killed"
    )
    assert worker_pid(fault_server, model) != pid


@pytest.mark.parametrize("model", MODELS)
def test_a_worker_killed_while_serving_fails_that_request_and_serves_within_10_s(
    model, fault_server, full, figures, log_on_failure
):
    every_fault(full, model, defaults=("lama", "sd"))
    log_on_failure(fault_server)
    pid = worker_pid(fault_server, model)
    in_flight: dict[str, Outcome] = {}
    client = threading.Thread(
        target=lambda: in_flight.update(o=post(fault_server, model, heavy_request(model)))
    )
    client.start()
    try:
        wait_until_busy(pid)
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
    finally:
        client.join(NO_HANG_S + 5)
    assert not client.is_alive(), f"{model}: the in-flight request hung"
    failed = in_flight["o"]
    answered_after = time.monotonic() - killed_at
    recovery = recover(fault_server, model, examples()[model], killed_at)
    record(figures, [failed, *recovery.tries], faults=1)
    print(
        f"\n{model}: killed serving worker; in-flight request answered {failed.status} "
        f"{failed.error or failed.text[:60]!r} by {answered_after:.2f} s after the kill; "
        f"200 again after {recovery.seconds} s ({len(recovery.tries)} tries)"
    )
    figures.measured(
        f"{model} killed serving: in-flight request {failed.status or 'closed'} after "
        f"{answered_after:.2f} s, 200 again after {seconds(recovery.seconds)}"
    )
    assert failed.status in (500, 503, 507) or (failed.error and not failed.hung), failed
    assert recovery.seconds is not None, f"{model} never recovered: {recovery.tries}"
    assert recovery.seconds <= RECOVERY_BOUND_S, (
        f"{model} answered 200 only {recovery.seconds:.1f} s after its worker was killed"
    )
    assert worker_pid(fault_server, model) != pid


# -- responseTimeout -------------------------------------------------------------------------


def test_a_handler_past_its_response_timeout_is_an_error_then_the_model_recovers(
    fault_server, figures, log_on_failure
):
    log_on_failure(fault_server)
    pid = worker_pid(fault_server, "slowlama")
    sleepy = example_requests(sd_steps=1)["lama"] | {"test_sleep_s": 5 * NO_HANG_S}
    started = time.monotonic()
    timed_out = post(fault_server, "slowlama", json.dumps(sleepy), timeout=NO_HANG_S + 10)
    recovery = recover(fault_server, "slowlama", examples()["lama"], started)
    record(figures, [timed_out, *recovery.tries], faults=1)
    print(
        f"\nslowlama (responseTimeout {SLOW_TIMEOUT_S} s, sleeping {5 * NO_HANG_S:.0f} s): "
        f"{timed_out.status} after {timed_out.seconds:.2f} s; 200 again "
        f"{recovery.seconds} s after the request was sent"
    )
    figures.measured(
        f"past responseTimeout {SLOW_TIMEOUT_S} s: {timed_out.status} after "
        f"{timed_out.seconds:.2f} s, 200 again after {seconds(recovery.seconds)}"
    )
    # answered by the timeout, not by the handler finishing its sleep or by the client giving up
    assert timed_out.status is not None and timed_out.status >= 500, timed_out
    assert timed_out.seconds < NO_HANG_S, timed_out
    assert recovery.seconds is not None, f"slowlama never recovered: {recovery.tries}"
    assert worker_pid(fault_server, "slowlama") != pid  # the stuck worker was replaced
    # the other models were never disturbed
    assert post(fault_server, "lama", examples()["lama"]).status == 200


# -- a handler that cannot initialise ------------------------------------------------------


def test_a_handler_that_fails_to_initialise_is_reported_not_ready_at_once(
    tiny_weights, tmp_path, figures
):
    """The readiness check `make serve-local` runs (scripts/serve.py start: wait_until_ready
    with the management API), on a server whose only model's handler raises in initialize."""
    store = tmp_path / "store"
    store.mkdir()
    # named `lama` so the readiness check probes it with the LaMa example, as serve-local does
    build_test_archive(store, "lama", BROKEN_HANDLER, tiny_weights("lama"))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    ports = Ports(*free_ports(5))
    config = run_dir / "config.properties"
    config.write_text(render_profile("local", ports, store))
    runtime = NativeRuntime(run_dir, store)
    model_log = run_dir / "logs" / "model_log.log"
    started = time.monotonic()
    with open(run_dir / "server.log", "wb") as log:
        process = runtime.start(config, ["lama"], foreground=True, log=log)
    try:
        token = wait_for_token(run_dir, process)
        probes = {"lama": write_requests(run_dir / "readiness", sd_steps=1)["lama"]}
        with pytest.raises(ServeError) as raised:
            wait_until_ready(
                loopback_url(ports.inference),
                token,
                probes,
                process,
                timeout=10 * NOT_READY_BOUND_S,  # serve-local's own timeout is 600 s
                log=model_log,
                management_url=loopback_url(ports.management),
                management_token=read_token(run_dir, "management"),
            )
        elapsed = time.monotonic() - started
        head = psutil.Process(runtime.running_pid() or process.pid)
        processes = [head, *head.children(recursive=True)]
    finally:
        shut_down(runtime, process)
    figures.add(faults_injected=1, requests_sent=1)
    message = str(raised.value)
    print(f"\nnot ready {elapsed:.1f} s after the start: {message}")
    assert elapsed < NOT_READY_BOUND_S, f"not-ready took {elapsed:.0f} s"
    assert "lama" in message and str(model_log) in message
    assert "fails to initialise on purpose" in model_log.read_text(errors="replace")
    _, alive = psutil.wait_procs(processes, timeout=SHUTDOWN_BOUND_S)
    assert not alive, f"the failed server was left running: {alive}"


# -- SIGTERM -----------------------------------------------------------------------------------


def test_sigterm_with_five_requests_in_flight_shuts_down_cleanly(
    served_store, tmp_path, figures, log_on_failure
):
    server = start_server(tmp_path / "run", served_store, "local", ["sd"])
    log_on_failure(server)
    pool = ThreadPoolExecutor(5)
    try:
        head = frontend(server)
        processes = [head, *head.children(recursive=True)]
        body = json.dumps(example_requests(sd_steps=30)["sd"])
        futures = [pool.submit(post, server, "sd", body, NO_HANG_S + 15) for _ in range(5)]
        wait_for_queue(server, "sd", pending=4)  # one in the worker, four queued
        # what `make stop` (torchserve --stop) and Ctrl-C (serve.py -> NativeRuntime.stop)
        # send: SIGTERM to the frontend
        stopped_at = time.monotonic()
        head.send_signal(signal.SIGTERM)
        done, not_done = wait_futures(futures, timeout=NO_HANG_S + 20)
        outcomes = [future.result() for future in done]
        _, alive = psutil.wait_procs(processes, timeout=SHUTDOWN_BOUND_S)
        gone_after = time.monotonic() - stopped_at
        launcher_exit = server.process.wait(timeout=SHUTDOWN_BOUND_S)
        record(figures, outcomes, faults=1)
        figures.add(requests_sent=len(not_done), lost=len(not_done))
        summary = [(o.status, o.error[:50], round(o.seconds, 2)) for o in outcomes]
        print(
            f"\nSIGTERM: in-flight requests {summary}; all processes gone after {gone_after:.1f} s"
        )
        figures.measured(f"SIGTERM, 5 requests in flight: all processes gone in {gone_after:.1f} s")
        assert not not_done, "in-flight requests hung after SIGTERM"
        for outcome in outcomes:  # an answer, or the connection closed: never a hang
            assert outcome.status is not None or (outcome.error and not outcome.hung), outcome
        assert not alive, f"still running after SIGTERM: {alive}"
        assert launcher_exit == 0
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        server.stop()


def wait_for_queue(server: Server, model: str, pending: int, bound_s: float = NO_HANG_S) -> None:
    def queued() -> bool:
        reply = server.client.describe(model, timeout=10, token=server.management_token)
        return reply.json()[0]["jobQueueStatus"]["pendingRequests"] >= pending

    try:
        poll_until(
            queued, what=f"{pending} {model} requests queued", timeout=bound_s, interval=0.05
        )
    except PollTimeout:
        raise AssertionError(f"{model}: {pending} requests never queued") from None
