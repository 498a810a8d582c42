"""Real TorchServe servers on free loopback ports, serving the tiny tarballs (fixtures shared by
every test folder: tests/conftest.py imports them).

Started with the same runner `make serve-local` uses (scripts/torchserve/runtime.py), ready only
once every model has answered a real inference (scripts/torchserve/readiness.py), torn down at
the end; a failing test prints the server log. Each server's `client` is TorchServe's one HTTP
client (scripts/torchserve/client.py).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from scripts.archive import archive_models
from scripts.examples import write_requests
from scripts.models import MODELS
from scripts.sagemaker.backends import Backend, start_torchserve
from scripts.sagemaker.emulator import extract_tarball
from scripts.sagemaker.gate import served_digests
from scripts.torchserve.client import TorchServeClient, loopback_url, read_token
from scripts.torchserve.profile import Ports
from scripts.torchserve.readiness import wait_for_ping, wait_for_token, wait_until_ready
from scripts.torchserve.runtime import NativeRuntime, launch_native, shut_down

READY_TIMEOUT_S = 240


@dataclass
class Server:
    profile: str
    ports: Ports
    run_dir: Path
    store: Path
    process: subprocess.Popen
    runtime: NativeRuntime
    log_path: Path
    token: str | None = None
    management_token: str | None = None
    # keyed from the server's key_file.json; the sagemaker profile's APIs share one port
    client: TorchServeClient = field(init=False)

    def __post_init__(self) -> None:
        management = self.url if self.profile == "sagemaker" else self.management_url
        self.client = TorchServeClient(self.url, management, key_dir=self.run_dir)

    @property
    def url(self) -> str:
        return loopback_url(self.ports.inference)

    @property
    def management_url(self) -> str:
        return loopback_url(self.ports.management)

    def headers(self, token: str | None) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return headers

    def predict(self, model: str, body: bytes | str, token: str | None = "default"):
        token = self.token if token == "default" else token
        return self.client.predict(model, body, token=token, timeout=120)

    def log_tail(self, lines: int = 80) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        self.client.close()
        shut_down(self.runtime, self.process)


def start_server(
    run_dir: Path,
    store: Path,
    profile: str,
    models: list[str],
    extra_properties: Mapping[str, str | int] | None = None,
) -> Server:
    """`extra_properties`: TorchServe settings beside the profile's (a test's own variant)."""
    log_path = run_dir / "server.log"
    runtime, process, ports = launch_native(
        run_dir, store, profile, models, log_path, extra_properties
    )
    server = Server(profile, ports, run_dir, store, process, runtime, log_path)
    try:
        if profile == "local":
            server.token = wait_for_token(run_dir, process)
            server.management_token = read_token(run_dir, "management")
        if models:
            probes = write_requests(run_dir / "readiness", sd_steps=1)
            probes = {model: path for model, path in probes.items() if model in models}
            wait_until_ready(
                server.url,
                server.token,
                probes,
                process,
                READY_TIMEOUT_S,
                log=log_path,
                # the sagemaker profile serves management on the inference port
                management_url=server.management_url if profile == "local" else server.url,
                management_token=server.management_token,
            )
        else:
            wait_for_ping(server.client, server.process, READY_TIMEOUT_S)
    except BaseException:
        print(f"--- {profile} server log ---\n{server.log_tail(200)}")
        server.stop()
        raise
    return server


@pytest.fixture(scope="session")
def served_store(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, weights_root: Path
) -> Path:
    """The archives the serving tests serve: `--store DIR`'s (make test-handlers: model_store/),
    else the three tiny tarballs and manifest.json built afresh, as `make archive` builds them."""
    store = request.config.getoption("--store")
    if store is not None:
        store = store.resolve()
        missing = [m for m in MODELS if not (store / f"{m}.tar.gz").is_file()]
        if missing or not (store / "manifest.json").is_file():
            pytest.exit(f"--store {store}: no archives of {missing or MODELS}; run `make archive`")
    else:
        store = tmp_path_factory.mktemp("model_store")
        archive_models(MODELS, "tiny", store, weights_root)
    from tests.gate import serving_run  # the plugin's own module (imported by pytest first)

    serving_run.store = store  # make promote's gate records it if the flows pass (tests/gate.py)
    serving_run.digests = served_digests(store)  # what is served now is what gets recorded
    return store


@pytest.fixture(autouse=True)
def print_server_logs_on_failure(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    report = getattr(request.node, "report_call", None)
    if report is not None and report.failed:
        for name in ("local_server", "sagemaker_server"):
            if name in request.fixturenames:
                server = request.getfixturevalue(name)
                print(f"--- {name} log (tail) ---\n{server.log_tail()}")


@pytest.fixture(scope="session")
def local_server(served_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The `local` profile serving the three tiny tarballs, as `make serve-local` runs it."""
    server = start_server(tmp_path_factory.mktemp("local-run"), served_store, "local", list(MODELS))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def sagemaker_server(
    served_store: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """The `sagemaker` profile, no model at start; SageMaker's model root as its store."""
    model_root = tmp_path_factory.mktemp("opt-ml-models")
    server = start_server(tmp_path_factory.mktemp("sagemaker-run"), model_root, "sagemaker", [])
    yield server
    server.stop()


def extract_like_sagemaker(tarball: Path, model_root: Path, name: str) -> Path:
    """SageMaker extracts each model's tarball to /opt/ml/models/<hash>/model."""
    target = model_root / name / "model"
    target.mkdir(parents=True, exist_ok=True)
    extract_tarball(tarball, target)
    return target


@contextmanager
def emulator_backend(root: Path) -> Iterator[Backend]:
    """The TorchServe behind `make serve-mme`, started and keyed by the emulator's own code,
    accepting calls; its log is printed if it does not start, and it is stopped afterwards."""
    log_path = root / "torchserve.log"
    with open(log_path, "wb") as log:
        backend = start_torchserve(root, log)
    try:
        try:
            backend.wait_until_accepting(READY_TIMEOUT_S)
        except BaseException:
            print(f"--- emulator's TorchServe log ---\n{log_path.read_text(errors='replace')}")
            raise
        yield backend
    finally:
        backend.stop()
