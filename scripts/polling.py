"""Waiting for something to become true: the one loop behind every "until it is ready" wait.

Stdlib only, so the HTTP-only tools and the emulator can import it without torch. A hand-written
deadline loop is easy to get subtly wrong (a check skipped at the deadline, a dead server waited
on for minutes, a timeout that does not say what it waited for); `poll_until` gets it right once.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

DEFAULT_INTERVAL_S = 0.2


class PollError(Exception):
    """A wait that ended without its condition; callers convert it to their own error once."""


class PollTimeout(PollError, TimeoutError):
    """The condition was not met before the deadline."""

    def __init__(self, what: str, timeout: float) -> None:
        super().__init__(f"gave up waiting for {what} after {timeout:.0f} s")
        self.what, self.timeout = what, timeout


class ProcessExited(PollError):
    """The process that would have made the condition true has exited: waiting on is pointless."""

    def __init__(self, what: str, returncode: int | None) -> None:
        super().__init__(f"the process exited (status {returncode}) while waiting for {what}")
        self.what, self.returncode = what, returncode


def has_exited(process: subprocess.Popen, clean_exit_ok: bool = False) -> bool:
    """Whether `process` has exited; with `clean_exit_ok`, only when it failed (a detached
    launcher exits 0 once it has started the server it launched)."""
    if process.poll() is None:
        return False
    return not (clean_exit_ok and process.returncode == 0)


def poll_until(
    check: Callable[[], T],
    *,
    what: str | Callable[[], str],
    timeout: float,
    interval: float = DEFAULT_INTERVAL_S,
    process: subprocess.Popen | None = None,
    clean_exit_ok: bool = False,
) -> T:
    """`check()`'s first truthy value, trying every `interval` seconds for `timeout` seconds.

    `what` names the condition for the error ("TorchServe to answer /ping"); a callable is
    asked when the error is raised, so it can name what is still missing. With `process`,
    ProcessExited as soon as it has exited (see has_exited for `clean_exit_ok`), checked
    before each try. The check runs at least once and once more at the deadline, so a
    condition that became true during the last sleep is not reported as a timeout. An
    exception from `check` propagates: a check that knows the wait is hopeless raises."""
    deadline = time.monotonic() + timeout
    while True:
        if process is not None and has_exited(process, clean_exit_ok):
            raise ProcessExited(describe(what), process.returncode)
        value = check()
        if value:
            return value
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise PollTimeout(describe(what), timeout)
        time.sleep(min(interval, remaining))


def describe(what: str | Callable[[], str]) -> str:
    return what() if callable(what) else what
