"""A local SageMaker multi-model endpoint: `make serve-mme`.

A small server on loopback that speaks the SageMaker runtime API for one endpoint
(`POST /endpoints/{name}/invocations` with `X-Amzn-SageMaker-Target-Model`, as
`boto3.client("sagemaker-runtime").invoke_endpoint(..., TargetModel=...)` sends it), in front of
a real TorchServe running the `sagemaker` profile, and drives it the way SageMaker drives the
container: on a target's first invocation it fetches the tarball (local folder or `s3://`),
extracts it to `<root>/opt/ml/models/<hash>/model`, registers it with `POST /models
{"model_name", "url"}`, then invokes `/models/<hash>/invoke`. Unlike SageMaker's network, this
machine lets any local process reach loopback, so that TorchServe runs the profile as `mme`: a
key on every API (the management API on a port of its own), in a run folder only its owner can
read, so only the emulator can register a model. It keeps SageMaker's limits and error shapes
(ValidationError, ModelError 424 with OriginalStatusCode, ModelNotReadyException 429), evicts
least-recently-used models past a memory budget or on a 507, and exposes MME-style metrics in
Prometheus text at `/metrics`.

    python -m scripts.sagemaker.emulator [--source model_store | s3://bucket/prefix] [--port 8090]
                          [--backend native|container] [--image TAG]

`--backend container` (MME_BACKEND=container) puts the serving image behind the emulator
instead of a native TorchServe, exactly as SageMaker runs it (ContainerBackend).

Why ~600 lines: most of it is one class, Endpoint, SageMaker's agent (load on first call,
readiness, LRU eviction, the error shapes), whose methods share its lock and its model table;
where tarballs come from (sources.py) and what runs them (backends.py) are apart.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import sys
import tarfile
import threading
import time
import uuid
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import requests
from mmekit_limits import SAGEMAKER_PAYLOAD_BYTES
from prometheus_client import CollectorRegistry, Counter, Gauge, Summary, generate_latest

from .. import PROJECT_ROOT
from ..cli import tool_parser
from ..polling import PollTimeout, poll_until
from ..torchserve import ServeError
from ..torchserve.client import Reply, TorchServeClient
from ..torchserve.profile import check_port_free
from ..torchserve.readiness import accepts_calls
from .backends import (
    CONTAINER_MODELS_DIR,
    READY_POLL_S,
    Backend,
    ContainerBackend,
    start_container,
    start_torchserve,
)
from .sources import REGION, LocalSource, ModelNotFound, S3Source, make_s3_client

if TYPE_CHECKING:
    pass

logger = logging.getLogger("mmekit.mme")

MAX_BODY_BYTES = SAGEMAKER_PAYLOAD_BYTES  # InvokeEndpoint's request and response limit
INVOCATION_TIMEOUT_S = 60.0  # SageMaker waits this long for the container's answer
NOT_READY_AFTER_S = 60.0  # a model still loading then: ModelNotReadyException, load goes on
LOAD_TIMEOUT_S = 360.0  # how long a load may go on at all
ACCOUNT = "000000000000"


# ---------------------------------------------------------------------------------------------
# SageMaker's answers


class SageMakerError(Exception):
    """An error response in the runtime API's rest-json shape, as botocore parses it."""

    def __init__(self, code: str, status: int, message: str, **members: Any) -> None:
        super().__init__(message)
        self.code, self.status, self.message, self.members = code, status, message, members

    def body(self) -> bytes:
        return json.dumps({"message": self.message, **self.members}).encode()


def validation_error(message: str) -> SageMakerError:
    return SageMakerError("ValidationError", 400, message)


def not_ready_error(message: str) -> SageMakerError:
    """SageMaker's answer for "not yet", which a client retries (HTTP 429)."""
    return SageMakerError(
        "ModelNotReadyException", 429, f"{message} Wait and try your request again."
    )


def model_error(endpoint: str, status: int, original: str) -> SageMakerError:
    kind = "client" if 400 <= status < 500 else "server"
    log_group = f"/aws/sagemaker/Endpoints/{endpoint}"
    message = (
        f'Received {kind} error ({status}) from primary with message "{original}". See '
        f"https://{REGION}.console.aws.amazon.com/cloudwatch/home?region={REGION}"
        f"#logEventViewer:group={log_group} in account {ACCOUNT} for more information."
    )
    return SageMakerError(
        "ModelError",
        424,
        message,
        OriginalStatusCode=status,
        OriginalMessage=original,
        LogStreamArn=f"arn:aws:logs:{REGION}:{ACCOUNT}:log-group:{log_group}",
    )


TIMEOUT_MESSAGE = (
    "Your invocation timed out while waiting for a response from container primary. Review the "
    "latency metrics for each container in Amazon CloudWatch, resolve the issue, and try again."
)


# ---------------------------------------------------------------------------------------------
# The endpoint


@dataclass
class LoadedModel:
    target: str
    name: str
    folder: Path
    size_bytes: int


class Metrics:
    """MME-style CloudWatch metrics, in Prometheus text."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.cache_hit = Summary(
            "ModelCacheHit",
            "1 when the target model was already loaded (mean = hit rate)",
            registry=self.registry,
        )
        self.loading_wait = Summary(
            "ModelLoadingWaitTime_seconds",
            "time an invocation waited for its model to be downloaded and loaded",
            registry=self.registry,
        )
        self.downloading = Summary(
            "ModelDownloadingTime_seconds", "time to fetch a model", registry=self.registry
        )
        self.loading = Summary(
            "ModelLoadingTime_seconds", "time to extract and register", registry=self.registry
        )
        self.unloading = Summary(
            "ModelUnloadingTime_seconds", "time to unload", registry=self.registry
        )
        self.loaded = Gauge("LoadedModelCount", "models loaded now", registry=self.registry)
        self.invocations = Counter(
            "Invocations", "invocations by outcome", ["outcome"], registry=self.registry
        )

    def text(self) -> bytes:
        return generate_latest(self.registry)


@dataclass
class Endpoint:
    """One multi-model endpoint: the models it has loaded and how it loads more."""

    name: str
    source: LocalSource | S3Source
    models_dir: Path  # SageMaker's /opt/ml/models: TorchServe's model store
    downloads_dir: Path
    torchserve: TorchServeClient
    memory_budget_bytes: int | None = None
    # where TorchServe sees models_dir: itself natively, /opt/ml/models in the container
    backend_models_dir: PurePosixPath | None = None
    not_ready_after_s: float = NOT_READY_AFTER_S
    invocation_timeout_s: float = INVOCATION_TIMEOUT_S
    metrics: Metrics = field(default_factory=Metrics)

    def __post_init__(self) -> None:
        self.models_dir.mkdir(parents=True, exist_ok=True)
        self.downloads_dir.mkdir(parents=True, exist_ok=True)
        self.loaded: OrderedDict[str, LoadedModel] = OrderedDict()  # least recent first
        self.loading: dict[str, Future] = {}
        self.lock = threading.RLock()
        self.executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="mme-load")
        # set once TorchServe has taken calls: until then /ping says 503 and loads wait
        self.accepting = threading.Event()

    # -- readiness ----------------------------------------------------------------------------
    def backend_ready(self) -> bool:
        """TorchServe answers /ping and its management API takes calls (with the client's key,
        where it has one): what SageMaker's /ping of the container means before InService."""
        if accepts_calls(self.torchserve, management=True):
            if not self.accepting.is_set():
                logger.info("ready: TorchServe accepts calls")
            self.accepting.set()
            return True
        return False

    def _wait_until_accepting(self, deadline: float) -> bool:
        """Bounded: an invocation that arrived while TorchServe was starting waits for it."""
        while not self.accepting.is_set():
            if self.backend_ready():
                return True
            if time.monotonic() + READY_POLL_S >= deadline:
                return False
            time.sleep(READY_POLL_S)
        return True

    # -- invocation ---------------------------------------------------------------------------
    def invoke(self, endpoint: str, target: str | None, body: bytes, content_type: str) -> Reply:
        try:
            reply = self._invoke(endpoint, target, body, content_type)
            self.metrics.invocations.labels("ok").inc()
            return reply
        except SageMakerError as error:
            self.metrics.invocations.labels(error.code).inc()
            raise

    def _invoke(self, endpoint: str, target: str | None, body: bytes, content_type: str) -> Reply:
        if endpoint != self.name:
            raise validation_error(f"Endpoint {endpoint} of account {ACCOUNT} not found.")
        if len(body) > MAX_BODY_BYTES:
            raise validation_error(
                "1 validation error detected: Value at 'body' failed to satisfy constraint: "
                f"Member must have length less than or equal to {MAX_BODY_BYTES}"
            )
        target = normalise_target(target)
        started = time.monotonic()
        with self.lock:
            model = self.loaded.get(target)
            if model is not None:
                self.loaded.move_to_end(target)
        self.metrics.cache_hit.observe(1.0 if model else 0.0)
        if model is None:
            model = self._wait_for_load(target)
            self.metrics.loading_wait.observe(time.monotonic() - started)
        reply = self._forward(model, body, content_type)
        if reply.status == 404:  # unloaded behind our back: load again, once
            self._forget(target)
            reply = self._forward(self._wait_for_load(target), body, content_type)
        if reply.status == 507:  # out of memory: make room, try once more
            self.evict_least_recent(keep=target)
            reply = self._forward(model, body, content_type)
        if reply.status >= 400:
            raise model_error(self.name, reply.status, reply.text)
        if len(reply.body) > MAX_BODY_BYTES:
            raise model_error(
                self.name, 413, f"response payload larger than {MAX_BODY_BYTES} bytes"
            )
        return reply

    def _forward(self, model: LoadedModel, body: bytes, content_type: str) -> Reply:
        try:
            return self.torchserve.invoke(
                model.name, model.target, body, content_type, self.invocation_timeout_s
            )
        except requests.Timeout:
            raise model_error(self.name, 0, TIMEOUT_MESSAGE) from None

    # -- loading ------------------------------------------------------------------------------
    def _wait_for_load(self, target: str) -> LoadedModel:
        deadline = time.monotonic() + self.not_ready_after_s
        if not self._wait_until_accepting(deadline):  # no load that would meet a closed port
            raise not_ready_error(
                f"Model {target} is not ready yet: the endpoint is still starting (TorchServe "
                "does not accept calls yet)."
            )
        with self.lock:
            future = self.loading.get(target)
            if future is None:
                future = self.executor.submit(self.load, target)
                self.loading[target] = future
        try:
            return future.result(timeout=max(0.0, deadline - time.monotonic()))
        except FutureTimeout:
            raise not_ready_error(
                f"Model {target} is not ready yet: it is still being downloaded or loaded."
            ) from None
        except ModelNotFound:
            raise validation_error(
                f"Failed to download model data(bucket/folder: {self.source.uri}, key: "
                f"{target}). Please ensure that there is an object located at the URL."
            ) from None
        except SageMakerError:
            raise
        except Exception as error:  # a broken tarball, TorchServe unreachable, ...
            logger.exception("loading %s failed", target)
            raise model_error(self.name, 500, f"could not load {target}: {error}") from None

    def load(self, target: str) -> LoadedModel:
        """Fetch, extract, register. Runs in the loader pool; the invocation may stop waiting."""
        try:
            name = model_name(self.source.uri, target)
            tarball = self.downloads_dir / f"{name}.tar.gz"
            started = time.monotonic()
            self.source.fetch(target, tarball)
            self.metrics.downloading.observe(time.monotonic() - started)
            started = time.monotonic()
            folder = self.models_dir / name / "model"
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            extract_tarball(tarball, folder)
            tarball.unlink()
            size = sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
            model = LoadedModel(target, name, folder, size)
            self._make_room(size, target)
            url = self.backend_path(folder)
            reply = self.torchserve.register(name, url, timeout=LOAD_TIMEOUT_S)
            if reply.status == 507:  # TorchServe is out of memory: free some, once
                self.evict_least_recent(keep=target)
                reply = self.torchserve.register(name, url, timeout=LOAD_TIMEOUT_S)
            if reply.status == 409:
                logger.info("%s was already registered (%s)", target, name)
            elif reply.status >= 300:
                raise model_error(self.name, reply.status, reply.text)
            self._wait_until_serving(name)
            self.metrics.loading.observe(time.monotonic() - started)
            with self.lock:
                self.loaded[target] = model
                self.metrics.loaded.set(len(self.loaded))
            return model
        finally:
            with self.lock:
                self.loading.pop(target, None)

    def backend_path(self, folder: Path) -> Path | PurePosixPath:
        """The model folder as TorchServe sees it (SageMaker registers the container's path)."""
        if self.backend_models_dir is None:
            return folder
        return self.backend_models_dir / folder.relative_to(self.models_dir).as_posix()

    def _wait_until_serving(self, name: str) -> None:
        """Until a worker of `name` is READY. Not serve's Readiness rule (a READY worker and a
        real request answering 200): the emulator has no example request for an arbitrary
        model it was asked to load, and the invocation that caused the load is that request."""

        def worker_ready() -> bool:
            reply = self.torchserve.describe(name)
            if reply.status != 200:
                return False
            workers = json.loads(reply.body)[0].get("workers", [])
            return any(worker.get("status") == "READY" for worker in workers)

        try:
            poll_until(worker_ready, what=f"model {name} to be ready", timeout=LOAD_TIMEOUT_S)
        except PollTimeout:
            raise model_error(self.name, 500, f"model {name} did not become ready") from None

    def _make_room(self, size: int, target: str) -> None:
        if self.memory_budget_bytes is None:
            return
        while True:
            with self.lock:
                used = sum(model.size_bytes for model in self.loaded.values())
                others = [t for t in self.loaded if t != target]
            if used + size <= self.memory_budget_bytes or not others:
                return
            self.unload(others[0])

    def evict_least_recent(self, keep: str) -> str | None:
        with self.lock:
            others = [target for target in self.loaded if target != keep]
        if not others:
            return None
        self.unload(others[0])
        return others[0]

    def unload(self, target: str) -> None:
        """`DELETE /models/<name>` as SageMaker does when it evicts a model."""
        with self.lock:
            model = self.loaded.pop(target, None)
            self.metrics.loaded.set(len(self.loaded))
        if model is None:
            return
        started = time.monotonic()
        reply = self.torchserve.unregister(model.name)
        if reply.status >= 500:
            # Seen with the serving image (make test-container): TorchServe 0.12 answers the
            # first DELETE after a load "500 Interrupted while cleaning resources" (its worker
            # stopped, the model kept); a second DELETE unregisters it.
            logger.info("unloading %s: TorchServe answered %s; once more", target, reply.status)
            reply = self.torchserve.unregister(model.name)
        if reply.status >= 300:
            logger.warning("unloading %s: TorchServe answered %s %s", target, reply.status,
                           reply.text[:200])  # fmt: skip
        shutil.rmtree(model.folder.parent, ignore_errors=True)
        self.metrics.unloading.observe(time.monotonic() - started)
        logger.info("unloaded %s", target)

    def _forget(self, target: str) -> None:
        with self.lock:
            self.loaded.pop(target, None)
            self.metrics.loaded.set(len(self.loaded))

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


def extract_tarball(tarball: Path, folder: Path) -> None:
    """Extract as SageMaker does, and read the gzip stream to its end: tarfile stops at the
    tar's end-of-archive blocks, before gzip's CRC trailer, so a flipped byte would otherwise
    be extracted silently."""
    with tarfile.open(tarball) as archive:
        archive.extractall(folder, filter="data")
        for _ in range(1 << 30):  # bounded: 1 MiB a read
            if not archive.fileobj.read(1 << 20):
                break


def normalise_target(target: str | None) -> str:
    """TargetModel is a path relative to the endpoint's S3 prefix ("sam.tar.gz" or, as the
    AWS sample sends it, "/sam.tar.gz")."""
    if not target:
        raise validation_error(
            "TargetModel is required: this is a multi-model endpoint "
            "(header X-Amzn-SageMaker-Target-Model)"
        )
    path = PurePosixPath(target.lstrip("/"))
    if not path.parts or ".." in path.parts or len(target) > 1024:
        raise validation_error(f"TargetModel {target!r} is not a valid model path")
    return str(path)


def model_name(source_uri: str, target: str) -> str:
    """The folder and TorchServe name of a target: a hash, as SageMaker names them."""
    return hashlib.sha256(f"{source_uri}\0{target}".encode()).hexdigest()[:32]


# ---------------------------------------------------------------------------------------------
# HTTP


def create_app(endpoint: Endpoint, bind_address: str = "127.0.0.1") -> Any:
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    from ..loopback import LoopbackGuard

    async def invocations(request: Request) -> Response:
        request_id = str(uuid.uuid4())
        body = await request.body()
        try:
            reply = await run_in_threadpool(
                endpoint.invoke,
                request.path_params["endpoint_name"],
                request.headers.get("x-amzn-sagemaker-target-model"),
                body,
                request.headers.get("content-type", "application/octet-stream"),
            )
        except SageMakerError as error:
            return Response(
                error.body(),
                status_code=error.status,
                media_type="application/json",
                headers={"x-amzn-ErrorType": error.code, "x-amzn-RequestId": request_id},
            )
        return Response(
            reply.body,
            media_type=reply.content_type or "application/json",
            headers={
                "x-Amzn-Invoked-Production-Variant": "AllTraffic",
                "x-amzn-RequestId": request_id,
            },
        )

    async def ping(request: Request) -> Response:
        # 200 only once an invocation would be served: SageMaker keeps an endpoint out of
        # service until the container's /ping passes, so its clients never meet a cold start
        if await run_in_threadpool(endpoint.backend_ready):
            return JSONResponse({"status": "Healthy"})
        message = "the endpoint is starting: TorchServe does not accept calls yet"
        return JSONResponse({"status": "Unhealthy", "message": message}, status_code=503)

    async def metrics(request: Request) -> Response:
        return Response(endpoint.metrics.text(), media_type="text/plain; version=0.0.4")

    return Starlette(
        routes=[
            Route("/endpoints/{endpoint_name}/invocations", invocations, methods=["POST"]),
            Route("/ping", ping, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
        ],
        # loopback names only: a DNS-rebinding page must not reach the models (JSON 400)
        middleware=[Middleware(LoopbackGuard, bind_address=bind_address)],
    )


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    from ..archive import DEFAULT_STORE, archive_models
    from ..examples import write_requests
    from ..torchserve.runtime import interrupt

    parser = tool_parser("python -m scripts.sagemaker.emulator", __doc__)
    parser.add_argument(
        "--source",
        default=os.environ.get("MME_SOURCE") or str(DEFAULT_STORE),
        help="folder or s3://bucket/prefix holding <model>.tar.gz",
    )
    parser.add_argument("--endpoint-name", default="mmekit-local")
    parser.add_argument("--port", type=int, default=int(os.environ.get("MME_PORT", "8090")))
    parser.add_argument(
        "--memory-budget-mb",
        type=float,
        default=None,
        help="evict least-recently-used models past this (extracted size)",
    )
    parser.add_argument("--s3-endpoint-url", default=os.environ.get("S3_ENDPOINT_URL"))
    parser.add_argument(
        "--backend",
        choices=("native", "container"),
        default=os.environ.get("MME_BACKEND") or "native",
        help="TorchServe from the venv, or the serving image as SageMaker runs it",
    )
    parser.add_argument(
        "--image",
        default=os.environ.get("MME_IMAGE"),
        help="with --backend container: this image (default: build this tree's, reused)",
    )
    parser.add_argument("--root", type=Path, default=PROJECT_ROOT / ".mmekit" / "mme")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="[mme] %(message)s")
    if args.source.startswith("s3://"):
        source: LocalSource | S3Source = S3Source(
            args.source, lambda: make_s3_client(args.s3_endpoint_url)
        )
    else:
        if Path(args.source).resolve() == DEFAULT_STORE.resolve():
            archive_models()  # the model store is built from the project, as for serve-local
        source = LocalSource(Path(args.source))
    try:
        check_port_free(args.port, "emulator", "MME_PORT")
    except ServeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    backend: Backend | ContainerBackend
    if args.backend == "container":
        from .. import engine, image

        try:
            tag = args.image or image.build_image(reuse=True).tags[0]
            backend = start_container(args.root, tag)
        except (RuntimeError, engine.EngineError) as error:
            print(f"error: MME_BACKEND=container: {error}", file=sys.stderr)
            return 1
        print(f"[mme] TorchServe: the image {tag} in SageMaker's mode (`serve`, "
              f"SAGEMAKER_BIND_TO_PORT={backend.ports.inference})", flush=True)  # fmt: skip
    else:
        backend = start_torchserve(args.root)
    endpoint = Endpoint(
        name=args.endpoint_name,
        source=source,
        models_dir=backend.models_dir,
        downloads_dir=args.root / "downloads",
        torchserve=backend.client,
        memory_budget_bytes=(
            int(args.memory_budget_mb * 1e6) if args.memory_budget_mb is not None else None
        ),
        backend_models_dir=CONTAINER_MODELS_DIR if args.backend == "container" else None,
    )
    write_requests(args.root / "requests")
    print(usage(args.port, args.endpoint_name, args.root / "requests"), flush=True)
    # uvicorn re-raises SIGINT/SIGTERM after its own shutdown; turn that into an exception so
    # the TorchServe behind it is stopped too
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, interrupt)
    try:
        uvicorn.run(create_app(endpoint), host="127.0.0.1", port=args.port, log_level="warning")
    except KeyboardInterrupt:
        pass
    finally:
        endpoint.close()
        backend.stop()
    return 0


def usage(port: int, endpoint_name: str, requests_dir: Path) -> str:
    request_file = os.path.relpath(requests_dir / "sam.json", PROJECT_ROOT)
    return "\n".join(
        [
            f"Local multi-model endpoint {endpoint_name!r} on http://127.0.0.1:{port}",
            "  import boto3",
            f'  runtime = boto3.client("sagemaker-runtime", endpoint_url="http://127.0.0.1:{port}",',
            '                         region_name="us-east-1", aws_access_key_id="local",',
            '                         aws_secret_access_key="local")',
            f'  runtime.invoke_endpoint(EndpointName="{endpoint_name}", TargetModel="sam.tar.gz",',
            '                          ContentType="application/json",',
            f'                          Body=open("{request_file}", "rb").read())',
            f"Metrics: http://127.0.0.1:{port}/metrics",
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
