"""Serve the three models on this machine: `make serve-local`.

Set-up is done by the Make target; this tool picks the weights (full when fetched, otherwise
tiny with a loud banner), builds the archives, renders a config profile and starts TorchServe
with the very tarballs that get promoted. It waits until every model answers a real inference,
then prints curl lines that work as printed.

    python -m scripts.serve start [--detach] [--tier auto|tiny|full] [--profile local]
                                  [--runtime auto|native|compose]
    python -m scripts.serve stop
    python -m scripts.serve token [--management]

Runtimes (RUNTIME=...): `compose` runs the serving image with compose (compose.yaml), on a GPU
where the engine has NVIDIA's runtime and on the CPU otherwise (compose.cpu.yaml); where no
Docker engine answers it sets up the project's podman (scripts/engine.py). `native` runs
TorchServe from the venv with Java 17; `auto` (the default) takes compose where an engine with
NVIDIA's runtime answers, native otherwise. Both serve the same tarballs with the same `local`
profile and print the same curl lines.

Ports come from the environment: INFERENCE_PORT (8080), MANAGEMENT_PORT (8081),
METRICS_PORT (8082), GRPC_INFERENCE_PORT (7070), GRPC_MANAGEMENT_PORT (7071).

This is the command only: the profiles, runtimes, readiness rule and HTTP client it uses are
scripts/torchserve/'s.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from dataclasses import replace
from pathlib import Path

from .archive import DEFAULT_STORE, archive_models
from .cli import tool_parser
from .examples import write_requests
from .models import MODELS
from .torchserve import RUN_DIR, ServeError, running
from .torchserve.client import loopback_url, read_token
from .torchserve.profile import Ports, check_ports_free, render_profile
from .torchserve.readiness import wait_for_token, wait_until_ready
from .torchserve.running import RECORDS, RunningServer, curl_lines
from .torchserve.runtime import (
    ACTIVE_RUNTIME,
    RUNTIMES,
    active_runtime,
    choose_runtime,
    interrupt,
    shut_down,
)
from .weights import DEFAULT_ROOT, WeightsChangedError


def prepare_archives(tier: str, weights_root: Path, store: Path) -> dict[str, dict]:
    try:
        entries = archive_models(MODELS, tier, store, weights_root)
    except WeightsChangedError as error:  # a changed full-tier file: one line, not a traceback
        raise ServeError(str(error)) from error
    if any(entry["tier"] in ("tiny", "synthetic") for entry in entries.values()):
        print(tiny_banner(entries), flush=True)
    return entries


def tiny_banner(entries: dict[str, dict]) -> str:
    which = ", ".join(f"{model}={entry['tier']}" for model, entry in entries.items())
    rule = "=" * 78
    return "\n".join(
        [
            rule,
            f"  RANDOM WEIGHTS ({which})",
            "  Outputs are meaningless noise: the code paths are real, the models are not.",
            "  For real results: `make fetch-weights` (about 4.9 GB, SHA-256 pinned),",
            "  then `make serve-local` again.",
            rule,
        ]
    )


def start(args: argparse.Namespace) -> int:
    run_dir, store = args.run_dir, args.store.resolve()
    previous = active_runtime(run_dir, store)
    already = previous.running_pid()
    if already is not None:  # its key file, config and pid file live in this run folder
        raise ServeError(
            f"an mmekit server is already running ({previous.name}, pid {already}): "
            "`make stop` first"
        )
    runtime = RUNTIMES[choose_runtime(args.runtime)](run_dir, store)
    if runtime.name == "compose" and args.profile != "local":
        raise ServeError("the compose runtime serves the `local` profile; use RUNTIME=native")
    ports = Ports.from_env()
    check_ports_free(ports, args.profile)
    prepare_archives(args.tier, args.weights, store)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / ACTIVE_RUNTIME).write_text(runtime.name + "\n")
    (runtime.key_dir / "key_file.json").unlink(missing_ok=True)  # fresh server, fresh keys
    config = run_dir / "config.properties"
    config.write_text(render_profile(args.profile, ports, store))
    examples = write_requests(run_dir / "requests")
    probes = write_requests(run_dir / "readiness", sd_steps=1)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, interrupt)
    log = None
    if args.detach:  # the server outlives this command: its output goes to a file
        (run_dir / "logs").mkdir(exist_ok=True)
        log = open(run_dir / "logs" / "console.log", "ab")  # noqa: SIM115 - the server owns it
        print(f"[serve] server output: {run_dir / 'logs' / 'console.log'}", flush=True)
    start_options = {"ports": ports} if runtime.name == "compose" else {}
    process = runtime.start(
        config, list(MODELS), foreground=not args.detach, log=log, **start_options
    )
    keep_running = False
    try:
        token = management_token = None
        if args.profile == "local":
            # compose builds the image first (minutes on a first run): wait as for readiness
            timeout = 60.0 if runtime.name == "native" else 1800.0
            token = wait_for_token(
                runtime.key_dir, process, timeout=timeout, foreground=not args.detach
            )
            management_token = read_token(runtime.key_dir, "management")
        # the management API watches workers, so a model that cannot start fails at once
        management_port = ports.management if args.profile == "local" else ports.inference
        wait_until_ready(
            loopback_url(ports.inference),
            token,
            probes,
            process,
            foreground=not args.detach,
            log=run_dir / "logs" / "model_log.log" if runtime.name == "native" else None,
            management_url=loopback_url(management_port),
            management_token=management_token,
        )
        records = run_dir / RECORDS
        served = replace(ports, management=management_port)
        running.write(
            RunningServer.started(
                runtime.name, runtime.running_pid(), served, run_dir, runtime.key_dir
            ),
            records,
        )
        print(curl_lines(loopback_url(ports.inference), examples["sam"].parent))
        print("Stop with Ctrl-C (or `make stop` when started with DETACH=1).", flush=True)
        if args.detach:
            keep_running = True
            return 0
        return process.wait()
    except KeyboardInterrupt:
        print("\n[serve] stopping", flush=True)
        return 0
    finally:
        if not keep_running:
            shut_down(runtime, process)
            running.clear(run_dir / RECORDS, runtime.name, run_dir)


def main(argv: list[str] | None = None) -> int:
    parser = tool_parser("python -m scripts.serve", __doc__)
    parser.add_argument("--run-dir", type=Path, default=RUN_DIR, help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True)
    start_parser = commands.add_parser("start", help="archive and serve all three models")
    start_parser.add_argument(
        "--runtime",
        choices=("auto", *sorted(RUNTIMES)),
        default=os.environ.get("RUNTIME") or "auto",
        help="compose where a Docker engine with a GPU runtime is present, else native",
    )
    start_parser.add_argument("--profile", choices=("local", "sagemaker"), default="local")
    start_parser.add_argument(
        "--tier",
        choices=("auto", "tiny", "synthetic", "full"),
        default=os.environ.get("TIER") or "auto",
    )
    start_parser.add_argument(
        "--detach",
        action="store_true",
        default=os.environ.get("DETACH", "") not in ("", "0"),
        help="return once ready (DETACH=1)",
    )
    start_parser.add_argument("--store", type=Path, default=DEFAULT_STORE)
    start_parser.add_argument("--weights", type=Path, default=DEFAULT_ROOT)
    commands.add_parser("stop", help="stop a server started with --detach")
    token_parser = commands.add_parser("token", help="print the inference token")
    token_parser.add_argument("--management", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.command == "start":
            return start(args)
        if args.command == "stop":
            runtime = active_runtime(args.run_dir)
            stopped = runtime.stop()
            running.clear(args.run_dir / RECORDS, runtime.name, args.run_dir)
            print("stopped" if stopped else "no mmekit server was running")
            return 0
        server = running.current(args.run_dir / RECORDS)  # make serve-local's, or make dev's
        print(server.token("management" if args.management else "inference"))
        return 0
    except ServeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
