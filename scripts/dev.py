"""The inner loop: `make dev` serves the three models and hot-swaps a model when you edit it.

    python -m scripts.dev [--tier tiny|synthetic|full]

It starts TorchServe with the `dev` profile (loopback, token on, the model API on for this
only) and watches handlers/ and configs/. When a file a model depends on changes, only that
model's archive is rebuilt, registered as a new version beside the old one, probed with a real
request, made the default, and the old version unregistered: requests keep being answered by
the old code until the new code has answered. A change that fails (a syntax error, a handler
that cannot initialise) leaves the old version serving and prints the error in full, once.
One line per reload with the time from the edit to the new code's first answer; the median of
the session when it exits (Ctrl-C).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import requests

from . import PROJECT_ROOT
from .archive import (
    GZIP_LEVEL,
    SHARED_MODULES,
    ArchiveInputs,
    resolve_tier,
    run_archiver,
    write_deterministic_tar,
)
from .cli import tool_parser
from .examples import requests as example_requests
from .examples import write_requests
from .models import MODELS, spec
from .torchserve import RUN_DIR, ServeError, running
from .torchserve.client import Reply, TorchServeClient, loopback_url
from .torchserve.profile import Ports, check_ports_free, render_profile
from .torchserve.readiness import wait_for_ping, wait_for_token, wait_until
from .torchserve.running import RECORDS_DIR, RunningServer, curl_lines
from .torchserve.runtime import NativeRuntime, interrupt, shut_down
from .weights import DEFAULT_ROOT, build_tier, sha256_of, weights_dir

PROBE_TIMEOUT_S = 120.0  # a new version that has not answered by then is given up
PROBE_POLL_S = 0.2
PING_TIMEOUT_S = 120.0  # TorchServe with no model starts in seconds
TRACEBACK_SETTLE_S = 0.5  # a worker's traceback reaches model_log.log over several writes
DRAIN_GRACE_S = 2.0  # plus 3x the new version's first answer: the old one's requests finish
RESTART_NEEDED = re.compile(r".*\.properties$")  # TorchServe reads these at start-up only


def log(message: str) -> None:
    print(f"[dev] {message}", flush=True)


def affected_models(changed: list[Path], root: Path) -> tuple[set[str], list[Path]]:
    """The models whose archive inputs changed, and changes that need a restart instead."""
    by_handler = {spec(model).handler_file: model for model in MODELS}
    models: set[str] = set()
    restart = []
    for path in changed:
        try:
            relative = path.resolve().relative_to(root.resolve())
        except ValueError:
            continue
        parts = relative.parts
        if parts[:1] == ("handlers",) and len(parts) == 2:
            if parts[1] in by_handler:
                models.add(by_handler[parts[1]])
            elif parts[1] in SHARED_MODULES:  # shipped in every archive
                models.update(MODELS)
        elif parts[:1] == ("configs",) and len(parts) == 3 and parts[2] == "model-config.yaml":
            if parts[1] in MODELS:
                models.add(parts[1])
        elif parts[:1] == ("configs",) and RESTART_NEEDED.match(parts[-1]):
            restart.append(relative)
    return models, restart


@dataclass
class DevServer:
    root: Path  # the project whose handlers/ and configs/ are served and watched
    run_dir: Path
    weights_root: Path
    tier: str
    ports: Ports
    versions: dict[str, int] = field(default_factory=dict)
    reload_seconds: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.store = self.run_dir / "store"
        self.store.mkdir(parents=True, exist_ok=True)
        self.runtime = NativeRuntime(self.run_dir, self.store)
        # the keys are read from key_file.json for every call
        self.client = TorchServeClient(
            self.inference_url, self.management_url, key_dir=self.run_dir
        )
        self.probes = {m: json.dumps(r).encode() for m, r in example_requests(sd_steps=1).items()}

    # -- archives ------------------------------------------------------------------------------
    def inputs(self, model: str) -> ArchiveInputs:
        handlers = self.root / "handlers"
        return ArchiveInputs(
            model=model,
            tier=self.tier,
            weights=weights_dir(self.weights_root, self.tier, model),
            config=self.root / "configs" / model / "model-config.yaml",
            handler=handlers / spec(model).handler_file,
            shared=tuple(handlers / name for name in SHARED_MODULES),
        )

    def build(self, model: str, version: int) -> Path:
        """The model's archive as version `version`, in the dev store."""
        target = self.store / f"{model}-v{version}.tar.gz"
        with tempfile.TemporaryDirectory(prefix=f".build-{model}-", dir=self.store) as workdir:
            folder = run_archiver(self.inputs(model), Path(workdir), version=str(version))
            write_deterministic_tar(folder, target, model, GZIP_LEVEL)
        return target

    def precheck(self, model: str) -> str | None:
        """A syntax error in the model's Python files, found before anything is built."""
        inputs = self.inputs(model)
        for path in (inputs.handler, *inputs.shared):
            try:
                compile(path.read_bytes(), str(path), "exec")
            except (SyntaxError, ValueError) as error:
                return "".join(traceback.format_exception_only(error)).rstrip()
            except OSError as error:
                return f"{path}: {error}"
        return None

    # -- TorchServe ----------------------------------------------------------------------------
    @property
    def inference_url(self) -> str:
        return loopback_url(self.ports.inference)

    @property
    def management_url(self) -> str:
        return loopback_url(self.ports.management)

    def register(self, model: str, version: int) -> Reply:
        return self.client.register(
            model,
            f"{model}-v{version}.tar.gz",
            query=True,
            timeout=60,
            initial_workers=1,
            synchronous="false",  # we probe it ourselves, with a real request
        )

    def unregister(self, model: str, version: int) -> None:
        try:
            self.client.unregister(model, version, timeout=60)
        except requests.RequestException:
            pass

    def probe(self, model: str, version: int | None = None) -> requests.Response:
        return self.client.predict(model, self.probes[model], version=version, timeout=120)

    def worker_failure(self, model: str, version: int, since: int) -> str | None:
        """The error a worker of this version printed while failing to start, if it did."""
        log_file = self.run_dir / "logs" / "model_log.log"
        try:
            with open(log_file, "rb") as stream:
                stream.seek(since)
                text = stream.read().decode(errors="replace")
        except OSError:
            return None
        worker = re.compile(rf"-{re.escape(model)}_{version}-std(out|err)")
        lines = [line for line in text.splitlines() if worker.search(line)]
        messages = [line.split(" - ", 1)[-1] for line in lines]
        start = next(
            (i for i, m in enumerate(messages) if "Traceback" in m or "Failed to load" in m), None
        )
        return None if start is None else "\n".join(messages[start:])  # the error, not the noise

    def log_size(self) -> int:
        try:
            return (self.run_dir / "logs" / "model_log.log").stat().st_size
        except OSError:
            return 0

    def wait_answering(self, model: str, version: int, since: int) -> None:
        """Until the version answers a real request; ServeError with its error otherwise.

        Not serve's Readiness rule, on purpose: dev loads a new *version* while the old one
        keeps serving, so it probes /predictions/{model}/{version}; and a developer editing a
        handler wants the traceback itself in the terminal, not a pointer to the log, so a
        failure is found by reading this version's worker lines in model_log.log."""

        def answered() -> bool:
            try:
                if self.probe(model, version).status_code == 200:
                    return True
            except requests.RequestException:
                pass
            failure = self.worker_failure(model, version, since)
            if failure:
                time.sleep(TRACEBACK_SETTLE_S)  # let the rest of the traceback reach the log
                raise ServeError(self.worker_failure(model, version, since) or failure)
            return False

        wait_until(answered, f"{model} v{version} to answer", PROBE_TIMEOUT_S, PROBE_POLL_S)

    def retire(self, model: str, version: int) -> None:
        self.unregister(model, version)
        (self.store / f"{model}-v{version}.tar.gz").unlink(missing_ok=True)

    # -- the loop ------------------------------------------------------------------------------
    def start(self, log_stream: object = None) -> subprocess.Popen:
        if self.tier in ("tiny", "synthetic"):
            build_tier(self.tier, self.weights_root)
        builds = {model: self.build(model, 1) for model in MODELS}
        process = self.launch(log_stream)
        for model in MODELS:
            since = self.log_size()
            reply = self.register(model, 1)
            if reply.status not in (200, 202):
                raise ServeError(f"registering {model} failed: {reply.text.strip()}")
            self.wait_answering(model, 1, since)
            self.versions[model] = 1
            log(f"{model} v1 ready ({builds[model].name}, sha256 {sha256_of(builds[model])[:12]})")
        return process

    def launch(self, log_stream: object = None) -> subprocess.Popen:
        """TorchServe with the `dev` profile and no model yet, once it answers. Only a caller
        with its keys (key_file.json, owner only: NativeRuntime.start) may register a model."""
        config = self.run_dir / "config.properties"
        config.write_text(render_profile("dev", self.ports, self.store))
        (self.run_dir / "key_file.json").unlink(missing_ok=True)
        process = self.runtime.start(config, [], foreground=True, log=log_stream)
        wait_for_token(self.run_dir, process)
        wait_for_ping(self.client, process, PING_TIMEOUT_S)
        return process

    def announce(self, records: Path) -> None:
        """Record this server as the local one (`make token`, the `mmekit` client and
        `make ui` find it there) and print the curl lines `make serve-local` prints."""
        requests_dir = write_requests(self.run_dir / "requests")["sam"].parent
        record = RunningServer.started(
            "dev", self.runtime.running_pid(), self.ports, self.run_dir, self.run_dir
        )
        running.write(record, records)
        print(curl_lines(self.inference_url, requests_dir, self.root), flush=True)

    def reload(self, model: str, edited_at: float) -> bool:
        """Swap `model` to its edited code; False (old version kept) when the edit fails."""
        error = self.precheck(model)
        if error:
            log(f"{model}: not reloaded, the old version keeps serving:\n{error}")
            return False
        old, new = self.versions[model], self.versions[model] + 1
        try:
            archive = self.build(model, new)
        except (subprocess.CalledProcessError, OSError) as failure:
            log(f"{model}: building the archive failed ({failure}); the old version keeps serving")
            return False
        since = self.log_size()
        reply = self.register(model, new)
        if reply.status not in (200, 202):
            log(f"{model}: registering v{new} failed: {reply.text.strip()}")
            archive.unlink(missing_ok=True)
            return False
        try:
            probe_started = time.monotonic()
            self.wait_answering(model, new, since)
            answer_seconds = time.monotonic() - probe_started
        except ServeError as failure:
            self.unregister(model, new)
            archive.unlink(missing_ok=True)
            log(f"{model}: v{new} failed to start; v{old} keeps serving:\n{failure}")
            return False
        made_default = self.client.set_default(model, new, timeout=60)
        if not made_default.ok:
            raise ServeError(
                f"{model}: making v{new} the default failed (HTTP {made_default.status}): "
                f"{made_default.text.strip()}"
            )
        self.versions[model] = new
        # Requests that reached the old version before the swap are still running or queued
        # there, and TorchServe drops them if their version is unregistered: let them finish.
        grace = DRAIN_GRACE_S + 3 * answer_seconds
        timer = threading.Timer(grace, self.retire, args=(model, old))
        timer.daemon = True
        timer.start()
        seconds = time.time() - edited_at
        self.reload_seconds.append(seconds)
        log(
            f"{model} reloaded in {seconds:.1f} s (edit to first answer; v{new}, "
            f"sha256 {sha256_of(archive)[:12]})"
        )
        return True

    def watch(self, stop: threading.Event) -> None:
        from watchfiles import watch

        watched = [self.root / "handlers", self.root / "configs"]
        log(f"watching {', '.join(str(p) for p in watched)} (Ctrl-C stops)")
        for changes in watch(*watched, stop_event=stop, debounce=200, step=50):
            paths = [Path(path) for _, path in changes]
            edited_at = max((p.stat().st_mtime for p in paths if p.exists()), default=time.time())
            models, restart = affected_models(paths, self.root)
            for path in restart:
                log(f"{path} changed: TorchServe reads it at start-up only; restart `make dev`")
            for model in sorted(models):
                try:
                    self.reload(model, edited_at)
                except Exception:  # the loop outlives any one reload; say what broke, in full
                    log(f"{model}: reload failed; the old version keeps serving:")
                    traceback.print_exc()

    def summary(self) -> str:
        if not self.reload_seconds:
            return "no reloads this session"
        median = statistics.median(self.reload_seconds)
        return f"{len(self.reload_seconds)} reloads, median {median:.1f} s from edit to answer"


def main(argv: list[str] | None = None) -> int:
    parser = tool_parser("python -m scripts.dev", __doc__)
    parser.add_argument(
        "--tier",
        choices=("auto", "tiny", "synthetic", "full"),
        default=os.environ.get("TIER") or "tiny",
        help="the weights served (default tiny: reloads in seconds)",
    )
    parser.add_argument("--root", type=Path, default=PROJECT_ROOT, help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", type=Path, default=RUN_DIR / "dev", help=argparse.SUPPRESS)
    parser.add_argument("--weights", type=Path, default=DEFAULT_ROOT, help=argparse.SUPPRESS)
    # where the clients find the running server (a test's own, so as not to touch the user's)
    parser.add_argument("--records", type=Path, default=RECORDS_DIR, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    ports = Ports.from_env()
    server = None
    process = None
    stop = threading.Event()
    # SIGINT too: a process started in the background by a non-interactive shell inherits SIGINT
    # ignored, and Python then installs no KeyboardInterrupt handler of its own
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, interrupt)
    try:
        check_ports_free(ports, "local")
        tier = "tiny" if args.tier == "auto" else args.tier
        if args.tier == "auto":
            tier = resolve_tier("sam", "auto", args.weights)
        server = DevServer(args.root, args.run_dir, args.weights, tier, ports)
        process = server.start()
        server.announce(args.records)
        log(
            f"ready on {server.inference_url} (tier {tier}); edit handlers/ or configs/ and "
            "the model swaps in"
        )
        server.watch(stop)
        return 0
    except ServeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        stop.set()
        if server is not None:
            log(server.summary())
        if server is not None and process is not None:
            shut_down(server.runtime, process)
            running.clear(args.records, "dev", server.run_dir)


if __name__ == "__main__":
    sys.exit(main())
