"""The serving image's entry point (PID 1): TorchServe in the foreground, stopped cleanly.

    python -m scripts.container serve        # SageMaker: `docker run <image> serve`
    python -m scripts.container local        # compose on a workstation (compose.yaml)
    python -m scripts.container healthcheck  # compose's health check: a real SAM inference

`serve` renders the `sagemaker` profile on 0.0.0.0 (port 8080, or SAGEMAKER_BIND_TO_PORT) with
the model store `/`, as SageMaker's PyTorch toolkit does, and starts with no model: SageMaker
registers each one with `POST /models` on its first invocation. `local` renders the `local`
profile on 0.0.0.0 (the ports are published on the host's loopback only) and serves the
tarballs mounted at /opt/mmekit/model_store with token auth on; key_file.json and logs/ land in
the mounted run folder.

TorchServe's launcher (`torchserve --foreground`) starts Java and waits for it, but installs no
signal handler: a SIGTERM would kill the launcher alone and leave the frontend running (and as
PID 1 with no handler, the kernel would not even deliver it). So this process stays PID 1,
runs the launcher as its child, forwards SIGTERM/SIGINT to the Java frontend (TorchServe's own
`torchserve --stop` sends exactly that), reaps every child (orphaned workers included) and
kills whatever is left after STOP_TIMEOUT_S, before SageMaker's SIGKILL 30 s after SIGTERM.
"""

from __future__ import annotations

import signal
import sys

if __name__ == "__main__":
    # As PID 1, a signal with no handler is dropped. Until TorchServe runs there is nothing to
    # stop, so a SIGTERM during the imports below (torch: seconds) just ends the process, with
    # the usual 128 + signal status (never a healthy health check).
    def stop_before_start(signum: int, frame: object) -> None:
        print(f"[container] {signal.Signals(signum).name} before start: exiting", flush=True)
        sys.exit(128 + signum)

    for early in (signal.SIGTERM, signal.SIGINT):
        signal.signal(early, stop_before_start)

import argparse
import ctypes
import json
import os
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

import psutil

from .cli import tool_parser
from .examples import requests as example_requests
from .models import MODELS
from .torchserve import ServeError
from .torchserve.client import loopback_url, read_token
from .torchserve.profile import Ports, render_profile
from .torchserve.readiness import Readiness
from .torchserve.runtime import NativeRuntime

IMAGE_ROOT = Path("/opt/mmekit")  # WORKDIR in the Dockerfile: scripts/, configs/, handlers/
RUN_DIR = IMAGE_ROOT / "run"  # TorchServe's working folder (compose mounts .mmekit/compose)
MODEL_STORE = IMAGE_ROOT / "model_store"  # compose mounts model_store/ here, read-only
SAGEMAKER_MODEL_STORE = Path("/")  # as the toolkit's mme-ts.properties: SageMaker passes paths
SCRATCH = Path("/tmp/mmekit")  # TorchServe's temp dir: extracted archives, its pid file
TS_NAMESPACE = "org.pytorch.serve.ModelServer"  # in the Java frontend's command line
STOP_TIMEOUT_S = 25.0  # SIGTERM -> SIGKILL of stragglers; SageMaker kills at 30 s
PR_SET_CHILD_SUBREAPER = 36


def log(message: str) -> None:
    print(f"[container] {message}", flush=True)


# ---------------------------------------------------------------------------------------------
# Configs and commands


def sagemaker_ports(environ: Mapping[str, str]) -> Ports:
    """One port for both APIs: SAGEMAKER_BIND_TO_PORT when SageMaker sets it (multi-container
    endpoints), else 8080; the other listeners inside SAGEMAKER_SAFE_PORT_RANGE when given."""
    api = int(environ.get("SAGEMAKER_BIND_TO_PORT") or 8080)
    extra = [8082, 7070, 7071]
    if environ.get("SAGEMAKER_SAFE_PORT_RANGE"):
        low, high = (int(part) for part in environ["SAGEMAKER_SAFE_PORT_RANGE"].split("-"))
        extra = [port for port in range(low, high + 1) if port != api][:3]
        if len(extra) < 3:
            raise ServeError(f"SAGEMAKER_SAFE_PORT_RANGE={low}-{high} has too few free ports")
    return Ports(api, api, *extra)


def sagemaker_config(environ: Mapping[str, str]) -> str:
    return render_profile(
        "sagemaker", sagemaker_ports(environ), SAGEMAKER_MODEL_STORE, bind_address="0.0.0.0"
    )


def local_config(store: Path = MODEL_STORE) -> str:
    """The native `local` profile with the container's fixed ports, bound to 0.0.0.0."""
    return render_profile("local", Ports(), store, bind_address="0.0.0.0")


def torchserve_command(config: Path, store: Path, models: list[str]) -> list[str]:
    """The launcher in the foreground, flags as `make serve-local` passes them."""
    return NativeRuntime(RUN_DIR, store).command(config, models, foreground=True)


def environment(scratch: Path = SCRATCH) -> dict[str, str]:
    scratch.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TEMP": str(scratch), "TMPDIR": str(scratch)}
    if not os.access(env.get("HOME", "/"), os.W_OK):  # compose runs as the host's uid
        home = scratch / "home"
        home.mkdir(exist_ok=True)
        env["HOME"] = str(home)
    return env


# ---------------------------------------------------------------------------------------------
# PID 1


def descendants() -> list[psutil.Process]:
    try:
        return psutil.Process().children(recursive=True)
    except psutil.Error:
        return []


def frontends() -> list[psutil.Process]:
    found = []
    for process in descendants():
        try:
            if TS_NAMESPACE in process.cmdline():
                found.append(process)
        except psutil.Error:
            pass
    return found


def send(processes: list[psutil.Process], signum: int) -> None:
    for process in processes:
        try:
            process.send_signal(signum)
        except psutil.Error:
            pass


def become_subreaper() -> None:
    """Adopt orphaned workers even when not PID 1 (tests, `docker run --init`), to reap them."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def supervise(
    command: list[str],
    env: Mapping[str, str],
    cwd: Path,
    stop_timeout: float = STOP_TIMEOUT_S,
    poll: float = 0.1,
) -> int:
    """Run the launcher until TorchServe exits. 0 after a requested stop (SIGTERM/SIGINT), 1
    when TorchServe exited by itself (a crash, or a start-up error)."""
    become_subreaper()
    launcher: subprocess.Popen | None = None
    stop_requested = False
    deadline: float | None = None

    def stop(signum: int, frame: object) -> None:
        nonlocal stop_requested, deadline
        if not stop_requested:
            log(f"{signal.Signals(signum).name}: stopping TorchServe")
            stop_requested, deadline = True, time.monotonic() + stop_timeout
        targets = frontends()
        if not targets and launcher is not None and launcher.returncode is None:
            targets = [p for p in descendants() if p.pid == launcher.pid]  # no Java yet
        send(targets, signal.SIGTERM)

    for signum in (signal.SIGTERM, signal.SIGINT):  # before the launcher: no unhandled window
        signal.signal(signum, stop)
    launcher = subprocess.Popen(command, env=dict(env), cwd=cwd)
    if stop_requested:  # the signal came while it was being started
        stop(signal.SIGTERM, None)
    killed = False
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:  # nothing left to wait for
            break
        if pid == launcher.pid:
            launcher.returncode = os.waitstatus_to_exitcode(status)
            if stop_requested:  # a frontend started as the launcher was stopped: now adopted
                send(frontends(), signal.SIGTERM)
            else:  # the frontend is gone: end its orphaned workers too
                log(f"TorchServe exited (launcher status {launcher.returncode})")
                deadline = time.monotonic() + stop_timeout
                send(descendants(), signal.SIGTERM)
        if pid:
            continue  # reaped one; look for more before sleeping
        if deadline is not None and not killed and time.monotonic() > deadline:
            log(f"still running after {stop_timeout:.0f} s: killing what is left")
            send(descendants(), signal.SIGKILL)
            killed = True
        time.sleep(poll)
    return 0 if stop_requested else 1


# ---------------------------------------------------------------------------------------------
# Subcommands


def serve(run_dir: Path = RUN_DIR, scratch: Path = SCRATCH) -> int:
    run_dir.mkdir(parents=True, exist_ok=True)
    config = run_dir / "config.properties"
    config.write_text(sagemaker_config(os.environ))
    command = torchserve_command(config, SAGEMAKER_MODEL_STORE, [])
    return supervise(command, environment(scratch), run_dir)


def local(run_dir: Path = RUN_DIR, store: Path = MODEL_STORE, scratch: Path = SCRATCH) -> int:
    missing = [f"{model}.tar.gz" for model in MODELS if not (store / f"{model}.tar.gz").is_file()]
    if missing:
        raise ServeError(
            f"no {', '.join(missing)} in the mounted model store: run `make archive` first"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "key_file.json").unlink(missing_ok=True)  # the health check waits for new keys
    config = run_dir / "config.properties"
    config.write_text(local_config(store))
    return supervise(torchserve_command(config, store, list(MODELS)), environment(scratch), run_dir)


def healthcheck(
    base_url: str = loopback_url(Ports().inference), run_dir: Path = RUN_DIR, timeout: float = 25.0
) -> int:
    """0 only when SAM answers its example request with HTTP 200; 1 otherwise (Docker's
    'unhealthy'). Not /ping: it stays 200 while a worker crash-loops."""
    try:
        token = read_token(run_dir)
    except (ServeError, OSError, ValueError, KeyError) as error:
        print(f"unhealthy: no inference token ({error})")
        return 1
    # serve's readiness rule, less the worker watch (Docker asks again every interval): a
    # real request answering 200; a worker that died is unhealthy and says so
    readiness = Readiness(base_url, token, request_timeout=timeout)
    body = json.dumps(example_requests(sd_steps=1)["sam"]).encode()
    try:
        status = readiness.answer("sam", body)
    except ServeError as error:
        print(f"unhealthy: {error}")
        return 1
    if status is None:
        print(f"unhealthy: no answer from {base_url}")
        return 1
    print(f"{'healthy' if status == 200 else 'unhealthy'}: sam answered HTTP {status}")
    return 0 if status == 200 else 1


def main(argv: list[str] | None = None) -> int:
    parser = tool_parser("python -m scripts.container", __doc__)
    parser.add_argument("--run-dir", type=Path, default=RUN_DIR, help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="SageMaker multi-model endpoint (the image's default)")
    local_parser = commands.add_parser("local", help="compose: the local profile, all models")
    local_parser.add_argument("--store", type=Path, default=MODEL_STORE, help=argparse.SUPPRESS)
    check_parser = commands.add_parser("healthcheck", help="a real SAM inference, exit 0 on 200")
    check_parser.add_argument("--url", default=loopback_url(Ports().inference))
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            return serve(args.run_dir)
        if args.command == "local":
            return local(args.run_dir, args.store)
        return healthcheck(args.url, args.run_dir)
    except ServeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
