"""When TorchServe is ready: the one readiness rule (Readiness, wait_until_ready) and the waits
before it (its keys written, its frontend answering). Every wait is scripts/polling.py's
poll_until, its errors converted to ServeError here (wait_until)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import TypeVar

import requests

from ..polling import PollError, poll_until
from . import ServeError
from .client import TorchServeClient, read_token

T = TypeVar("T")

READY_POLL_S = 1.0  # between rounds of readiness probes (each may run a real inference)
PING_POLL_S = 0.2
TOKEN_POLL_S = 0.2
DESCRIBE_TIMEOUT_S = 10.0  # one GET /models/{model}
FIRST_INFERENCE_TIMEOUT_S = 300.0  # a probe may wait for the worker to load its weights
DEFAULT_WHERE = "the server log (logs/model_log.log in TorchServe's run folder)"


def accepts_calls(client: TorchServeClient, management: bool = False, timeout: float = 2.0) -> bool:
    """One look: TorchServe's /ping answers 200 and, with `management`, its management API
    answers `GET /models`, so a registration now would be taken. Not readiness of a model (that
    is a real inference, wait_until_ready): the frontend's. False, never an exception, while it
    is starting (connection refused, a half-open listener)."""
    try:
        if client.ping(timeout=timeout).status_code != 200:
            return False
        return not management or client.models(timeout=timeout).status == 200
    except requests.RequestException:
        return False


def wait_until(
    check: Callable[[], T],
    what: str | Callable[[], str],
    timeout: float,
    interval: float,
    process: subprocess.Popen | None = None,
    foreground: bool = True,
) -> T:
    """poll_until, its errors as ServeError (the one place they are converted). A foreground
    launcher that exits has lost its server, whatever its status (it exits 0 when Java dies);
    a detached one exits 0 once it has started Java."""
    try:
        return poll_until(
            check,
            what=what,
            timeout=timeout,
            interval=interval,
            process=process,
            clean_exit_ok=not foreground,
        )
    except PollError as failure:
        raise ServeError(f"{failure}; see TorchServe's log") from None


def wait_for_ping(
    client: TorchServeClient, process: subprocess.Popen | None = None, timeout: float = 300.0
) -> None:
    """Until TorchServe's frontend answers /ping (not readiness of a model: wait_until_ready)."""
    wait_until(
        lambda: accepts_calls(client), "TorchServe to answer /ping", timeout, PING_POLL_S, process
    )


@dataclass
class Readiness:
    """The readiness rule: a model is ready when a worker is READY and a real request answers
    200 (not /ping, which stays 200 while a worker crash-loops). A worker that died is reported
    at once, naming where its traceback is, not after TorchServe's own retries
    (maxRetryTimeoutInSec, 300 s) or the caller's timeout.

    With `management_url` (and its token, if the API has one), each model's workers are
    watched: a worker whose pid changes before the model is ready was restarted because it
    died, and the probe goes out only once a worker is READY (a probe queued behind a crash
    loop waits through several of TorchServe's growing retry delays). Without it, the failure
    shows when TorchServe answers a waiting probe "Worker died."."""

    base_url: str
    token: str | None = None
    management_url: str | None = None
    management_token: str | None = None
    where: str = DEFAULT_WHERE  # where the error says to look
    request_timeout: float = FIRST_INFERENCE_TIMEOUT_S
    worker_pids: dict[tuple[str, str], int] = dataclass_field(
        default_factory=dict
    )  # first pid seen

    def __post_init__(self) -> None:
        self.client = TorchServeClient(
            self.base_url,
            self.management_url,
            token=self.token,
            management_token=self.management_token,
        )

    def model_ready(self, model: str, request_body: bytes) -> bool:
        """One look; ServeError when the model's worker died."""
        if self.management_url is not None and not self.worker_ready(model):
            return False
        return self.answer(model, request_body) == 200

    def answer(self, model: str, request_body: bytes) -> int | None:
        """The HTTP status of one real request (None: no answer); ServeError when TorchServe
        says the worker died."""
        try:
            reply = self.client.predict(model, request_body, timeout=self.request_timeout)
        except requests.RequestException:
            return None
        if reply.status_code in (500, 507) and "Worker died" in reply.text:
            # 507 when the exit looked like the OOM killer's (SIGKILL)
            raise ServeError(
                f"{model} is not ready: its worker died while loading or serving its first "
                f'request (TorchServe answered {reply.status_code} "Worker died."); '
                f"the traceback is in {self.where}"
            )
        return reply.status_code

    def worker_ready(self, model: str) -> bool:
        """A worker of `model` is READY; ServeError when one was restarted (its pid changed)."""
        try:
            described = self.client.describe(model, timeout=DESCRIBE_TIMEOUT_S)
            workers = described.json()[0]["workers"] if described.ok else []
        except (requests.RequestException, ValueError, LookupError, TypeError):
            return False  # the management API is not up yet
        for worker in workers:
            pid = worker.get("pid")
            if not isinstance(pid, int) or pid <= 0:
                continue
            first = self.worker_pids.setdefault((model, str(worker.get("id"))), pid)
            if pid != first:
                raise ServeError(
                    f"{model} is not ready: its worker died while loading and "
                    f"TorchServe restarted it (pid {first}, now {pid}); the traceback "
                    f"is in {self.where}"
                )
        return any(worker.get("status") == "READY" for worker in workers)


def wait_until_ready(
    base_url: str,
    token: str | None,
    examples: dict[str, Path],
    process: subprocess.Popen,
    timeout: float = 600.0,
    foreground: bool = True,
    log: Path | str | None = None,
    management_url: str | None = None,
    management_token: str | None = None,
) -> None:
    """Until every model in `examples` is ready by the Readiness rule, each probed with its
    example request. `log`: where the error says to look."""
    readiness = Readiness(
        base_url, token, management_url, management_token, str(log or DEFAULT_WHERE)
    )
    pending = dict(examples)

    def all_ready() -> bool:
        for model, path in list(pending.items()):
            if readiness.model_ready(model, path.read_bytes()):
                print(f"[serve] {model} is ready", flush=True)
                del pending[model]
        return not pending

    try:
        wait_until(
            all_ready,
            lambda: f"models to be ready ({', '.join(pending)})",
            timeout,
            READY_POLL_S,
            process,
            foreground,
        )
    finally:
        readiness.client.close()


def wait_for_token(
    run_dir: Path, process: subprocess.Popen, timeout: float = 60.0, foreground: bool = True
) -> str:
    """The inference key, once TorchServe has finished writing key_file.json."""

    def token() -> str | None:
        try:
            return read_token(run_dir)
        except (ServeError, json.JSONDecodeError, KeyError):
            return None  # not written yet, or half written

    return wait_until(
        token, "TorchServe to write key_file.json", timeout, TOKEN_POLL_S, process, foreground
    )
