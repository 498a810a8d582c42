"""The local multi-model endpoint, driven by an unmodified boto3 sagemaker-runtime client, in
front of TorchServe as `make serve-mme` runs it (the `mme` profile: a key on every API)."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import psutil
import pytest
import requests
import uvicorn
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from scripts import PROJECT_ROOT
from scripts.examples import requests as example_requests
from scripts.models import MODELS
from scripts.polling import poll_until
from scripts.sagemaker.backends import Backend
from scripts.sagemaker.emulator import MAX_BODY_BYTES, Endpoint, create_app, model_name
from scripts.sagemaker.sources import LocalSource, S3Source, make_s3_client
from scripts.torchserve.client import Reply, TorchServeClient, loopback_url
from scripts.torchserve.profile import free_ports
from tests.servers import Server, emulator_backend

ENDPOINT = "mmekit-test"
TARGETS = tuple(f"{model}.tar.gz" for model in MODELS)  # SageMaker's TargetModel names


def runtime_client(url: str):
    """The unmodified boto3 sagemaker-runtime client, pointed at the emulator, no retries."""
    return boto3.client(
        "sagemaker-runtime",
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=Config(retries={"total_max_attempts": 1}, read_timeout=300),
    )


@dataclass
class Emulator:
    endpoint: Endpoint
    url: str

    def client(self):
        return runtime_client(self.url)

    def invoke(self, target: str, body: dict | bytes, endpoint: str = ENDPOINT) -> dict:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        reply = self.client().invoke_endpoint(
            EndpointName=endpoint, TargetModel=target, ContentType="application/json", Body=data
        )
        return json.loads(reply["Body"].read())

    def error(self, target: str | None, body: dict | bytes, endpoint: str = ENDPOINT) -> dict:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        arguments = {"EndpointName": endpoint, "ContentType": "application/json", "Body": data}
        if target is not None:
            arguments["TargetModel"] = target
        with pytest.raises(ClientError) as raised:
            self.client().invoke_endpoint(**arguments)
        return raised.value.response


def serve_endpoint(endpoint: Endpoint) -> Iterator[Emulator]:
    """The emulator's app on a free loopback port, in a thread, stopped afterwards."""
    (port,) = free_ports(1)
    server = uvicorn.Server(
        uvicorn.Config(create_app(endpoint), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    poll_until(lambda: server.started, what="the emulator to start", timeout=30, interval=0.05)
    try:
        yield Emulator(endpoint, f"http://127.0.0.1:{port}")
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        for target in list(endpoint.loaded):
            endpoint.unload(target)
        endpoint.close()


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    """The TorchServe behind the emulator, started as `make serve-mme` starts it (keyed)."""
    with emulator_backend(tmp_path_factory.mktemp("mme-root")) as started:
        yield started


def make_endpoint(backend: Backend, source, downloads: Path) -> Endpoint:
    return Endpoint(
        name=ENDPOINT,
        source=source,
        models_dir=backend.models_dir,  # SageMaker's /opt/ml/models is TorchServe's model store
        downloads_dir=downloads,
        torchserve=backend.client,
        not_ready_after_s=120,
    )


@pytest.fixture(scope="module")
def mme(backend: Backend, served_store: Path, tmp_path_factory) -> Iterator[Emulator]:
    endpoint = make_endpoint(
        backend, LocalSource(served_store), tmp_path_factory.mktemp("mme-downloads")
    )
    yield from serve_endpoint(endpoint)


@pytest.fixture
def fresh(mme: Emulator) -> Iterator[Emulator]:
    """No model loaded, default knobs; whatever a test changes is put back."""
    for target in list(mme.endpoint.loaded):
        mme.endpoint.unload(target)
    knobs = (
        mme.endpoint.memory_budget_bytes,
        mme.endpoint.not_ready_after_s,
        mme.endpoint.invocation_timeout_s,
        mme.endpoint.torchserve,
    )
    yield mme
    (
        mme.endpoint.memory_budget_bytes,
        mme.endpoint.not_ready_after_s,
        mme.endpoint.invocation_timeout_s,
        mme.endpoint.torchserve,
    ) = knobs


def requests_by_target(sd_steps: int = 2) -> dict[str, dict]:
    bodies = example_requests(sd_steps=sd_steps)
    return {f"{model}.tar.gz": body for model, body in bodies.items()}


def sample(mme: Emulator, name: str) -> float:
    return mme.endpoint.metrics.registry.get_sample_value(name) or 0.0


def extracted_size(tarball: Path) -> int:
    with tarfile.open(tarball) as archive:
        return sum(member.size for member in archive.getmembers() if member.isfile())


# -- loading and caching ---------------------------------------------------------------------


def test_first_invocation_loads_the_model_then_it_is_a_cache_hit(fresh: Emulator):
    body = requests_by_target()["lama.tar.gz"]
    hits, count = sample(fresh, "ModelCacheHit_sum"), sample(fresh, "ModelCacheHit_count")
    assert "generated_image" in fresh.invoke("lama.tar.gz", body)
    assert "generated_image" in fresh.invoke("lama.tar.gz", body)
    assert sample(fresh, "ModelCacheHit_count") - count == 2
    assert sample(fresh, "ModelCacheHit_sum") - hits == 1  # the miss, then the hit
    name = model_name(fresh.endpoint.source.uri, "lama.tar.gz")
    assert (fresh.endpoint.models_dir / name / "model").is_dir()  # SageMaker's layout
    assert sample(fresh, "LoadedModelCount") == 1


def test_target_with_a_leading_slash_is_the_same_model(fresh: Emulator):
    body = requests_by_target()["sam.tar.gz"]
    fresh.invoke("sam.tar.gz", body)
    fresh.invoke("/sam.tar.gz", body)  # as the AWS sample's client sends it
    assert list(fresh.endpoint.loaded) == ["sam.tar.gz"]


def test_all_three_models_answer_through_boto3(fresh: Emulator):
    for target, body in requests_by_target().items():
        assert "generated_image" in fresh.invoke(target, body)


def test_a_model_already_registered_in_torchserve_is_used_409_and_all(
    fresh: Emulator, served_store: Path
):
    name = model_name(fresh.endpoint.source.uri, "sam.tar.gz")
    folder = fresh.endpoint.models_dir / name / "model"
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(served_store / "sam.tar.gz") as archive:
        archive.extractall(folder, filter="data")
    direct = fresh.endpoint.torchserve.register(name, folder)  # behind the endpoint's back
    assert direct.status in (200, 202), direct.text
    assert "generated_image" in fresh.invoke("sam.tar.gz", requests_by_target()["sam.tar.gz"])


def test_unloading_deletes_the_model_from_torchserve(fresh: Emulator):
    body = requests_by_target()["lama.tar.gz"]
    fresh.invoke("lama.tar.gz", body)
    name = model_name(fresh.endpoint.source.uri, "lama.tar.gz")
    assert fresh.endpoint.torchserve.describe(name).status == 200
    fresh.endpoint.unload("lama.tar.gz")
    assert fresh.endpoint.torchserve.describe(name).status == 404
    assert fresh.endpoint.loaded == {}
    hits = sample(fresh, "ModelCacheHit_sum")
    assert "generated_image" in fresh.invoke("lama.tar.gz", body)  # loaded again
    assert sample(fresh, "ModelCacheHit_sum") == hits


def test_least_recently_used_model_is_evicted_past_the_memory_budget(
    fresh: Emulator, served_store: Path
):
    sizes = {target: extracted_size(served_store / target) for target in TARGETS}
    fresh.endpoint.memory_budget_bytes = sum(sizes.values()) - 1  # room for two of three
    bodies = requests_by_target()
    fresh.invoke("sam.tar.gz", bodies["sam.tar.gz"])
    fresh.invoke("lama.tar.gz", bodies["lama.tar.gz"])
    fresh.invoke("sam.tar.gz", bodies["sam.tar.gz"])  # lama is now the least recent
    fresh.invoke("sd.tar.gz", bodies["sd.tar.gz"])
    assert list(fresh.endpoint.loaded) == ["sam.tar.gz", "sd.tar.gz"]
    lama = model_name(fresh.endpoint.source.uri, "lama.tar.gz")
    assert fresh.endpoint.torchserve.describe(lama).status == 404


class InsufficientMemoryOnce:
    """TorchServe's client, answering 507 the first time `call` is made."""

    def __init__(self, real: TorchServeClient, call: str) -> None:
        self.real, self.call, self.refused = real, call, 0

    def __getattr__(self, name: str):
        method = getattr(self.real, name)
        if name != self.call:
            return method

        def refuse_once(*args, **kwargs):
            if not self.refused:
                self.refused += 1
                return Reply(507, b'{"code": 507, "message": "Out of resources"}')
            return method(*args, **kwargs)

        return refuse_once


@pytest.mark.parametrize("call", ["register", "invoke"])
def test_a_507_evicts_the_least_recent_model_and_retries_once(fresh: Emulator, call: str):
    bodies = requests_by_target()
    fresh.invoke("sam.tar.gz", bodies["sam.tar.gz"])
    fresh.invoke("lama.tar.gz", bodies["lama.tar.gz"])
    flaky = InsufficientMemoryOnce(fresh.endpoint.torchserve, call)
    fresh.endpoint.torchserve = flaky
    assert "generated_image" in fresh.invoke("sd.tar.gz", bodies["sd.tar.gz"])
    assert flaky.refused == 1
    assert "sam.tar.gz" not in fresh.endpoint.loaded  # the least recent one made room


def test_a_load_still_running_is_model_not_ready_and_keeps_loading(fresh: Emulator):
    fresh.endpoint.not_ready_after_s = 0.001
    body = requests_by_target()["sd.tar.gz"]
    response = fresh.error("sd.tar.gz", body)
    assert response["Error"]["Code"] == "ModelNotReadyException"
    assert response["ResponseMetadata"]["HTTPStatusCode"] == 429
    poll_until(lambda: "sd.tar.gz" in fresh.endpoint.loaded, what="the load to go on", timeout=120)
    assert "generated_image" in fresh.invoke("sd.tar.gz", body)


# -- SageMaker's errors ----------------------------------------------------------------------


def test_container_errors_are_model_errors_with_the_original_status(fresh: Emulator):
    response = fresh.error("sam.tar.gz", {"image": "%%%", "gen_args": {}})
    assert response["Error"]["Code"] == "ModelError"
    assert response["ResponseMetadata"]["HTTPStatusCode"] == 424
    assert response["OriginalStatusCode"] == 400
    assert json.loads(response["OriginalMessage"])["error"] == "invalid_base64"
    assert "Received client error (400) from primary" in response["Error"]["Message"]
    assert response["LogStreamArn"].startswith("arn:aws:logs:")


def test_an_invocation_over_the_time_limit_is_a_model_error(fresh: Emulator):
    body = requests_by_target(sd_steps=20)["sd.tar.gz"]
    fresh.invoke("sd.tar.gz", requests_by_target()["sd.tar.gz"])  # loaded first
    fresh.endpoint.invocation_timeout_s = 0.2
    response = fresh.error("sd.tar.gz", body)
    assert response["Error"]["Code"] == "ModelError"
    assert "timed out" in response["Error"]["Message"]


def test_a_body_over_6_mb_is_a_validation_error(fresh: Emulator):
    response = fresh.error("sam.tar.gz", b"x" * (MAX_BODY_BYTES + 1))
    assert response["Error"]["Code"] == "ValidationError"
    assert response["ResponseMetadata"]["HTTPStatusCode"] == 400
    assert fresh.endpoint.loaded == {}  # refused before any model work


@pytest.mark.parametrize(
    "target, endpoint, words",
    [
        ("nope.tar.gz", ENDPOINT, "Failed to download model data"),
        ("../sam.tar.gz", ENDPOINT, "not a valid model path"),
        (None, ENDPOINT, "TargetModel is required"),
        ("sam.tar.gz", "other-endpoint", "Endpoint other-endpoint of account"),
    ],
)
def test_unknown_targets_and_endpoints_are_validation_errors(fresh, target, endpoint, words):
    response = fresh.error(target, {"image": "x"}, endpoint=endpoint)
    assert response["Error"]["Code"] == "ValidationError"
    assert words in response["Error"]["Message"]


# -- starting up: /ping means ready ----------------------------------------------------------


@pytest.fixture
def starting(served_store: Path, tmp_path: Path) -> Iterator[Emulator]:
    """An emulator whose TorchServe never comes up: nothing listens on its port."""
    (closed,) = free_ports(1)
    endpoint = Endpoint(
        name=ENDPOINT,
        source=LocalSource(served_store),
        models_dir=tmp_path / "models",
        downloads_dir=tmp_path / "downloads",
        torchserve=TorchServeClient(loopback_url(closed)),
        not_ready_after_s=0.5,
    )
    yield from serve_endpoint(endpoint)


def test_ping_is_503_and_invocations_retryable_until_torchserve_accepts_calls(
    starting: Emulator,
):
    ping = requests.get(f"{starting.url}/ping", timeout=10)
    assert ping.status_code == 503
    assert "TorchServe" in ping.json()["message"]
    response = starting.error("sam.tar.gz", requests_by_target()["sam.tar.gz"])
    assert response["Error"]["Code"] == "ModelNotReadyException"  # retryable, not a 500
    assert response["ResponseMetadata"]["HTTPStatusCode"] == 429
    assert "still starting" in response["Error"]["Message"]
    assert starting.endpoint.loading == {}  # no load was started against a closed port
    assert list(starting.endpoint.downloads_dir.iterdir()) == []


def test_ping_is_200_once_torchserve_accepts_calls(mme: Emulator):
    ping = requests.get(f"{mme.url}/ping", timeout=10)
    assert ping.status_code == 200
    assert ping.json() == {"status": "Healthy"}


def outcome_of_invoking(client, body: bytes) -> str:
    """What a boto3 user sees: "ok", "unreachable" (nothing listens yet) or the error's code,
    status and original status."""
    try:
        reply = client.invoke_endpoint(
            EndpointName=ENDPOINT, TargetModel="sam.tar.gz", ContentType="application/json",
            Body=body,
        )  # fmt: skip
        return "ok" if "generated_image" in json.loads(reply["Body"].read()) else "no image"
    except ClientError as error:
        response = error.response
        return (
            f"{response['Error']['Code']} {response['ResponseMetadata']['HTTPStatusCode']} "
            f"{response.get('OriginalStatusCode', '-')}: {response['Error']['Message'][:200]}"
        )
    except BotoCoreError as error:  # connection refused: the emulator is not listening yet
        return "unreachable" if "connect" in str(error).lower() else f"{error!r}"


def stop_process_tree(process: subprocess.Popen) -> None:
    """SIGTERM (the emulator stops its TorchServe), bounded; whatever is left is killed."""
    try:
        tree = psutil.Process(process.pid).children(recursive=True)
    except psutil.Error:
        tree = []
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)
    _, alive = psutil.wait_procs(tree, timeout=30)
    for straggler in alive:
        straggler.kill()


def test_make_serve_mme_never_answers_an_early_invocation_with_a_500(
    served_store: Path, tmp_path: Path
):
    """`make serve-mme` as a user starts it, invoked with boto3 in a tight loop from the start
    while /ping is polled: before /ping says 200 an invocation may not connect, may wait, or
    may be told to retry (429); never a 500. Once /ping has said 200, every one is served."""
    (port,) = free_ports(1)
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "mme.log"
    command = [
        sys.executable, "-m", "scripts.sagemaker.emulator", "--source", str(served_store),
        "--port", str(port), "--root", str(tmp_path / "mme"), "--endpoint-name", ENDPOINT,
    ]  # fmt: skip
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT)
    ping_ok, stop = threading.Event(), threading.Event()
    pings: list[int | str] = []

    def poll_ping() -> None:
        session = requests.Session()
        for _ in range(20_000):  # bounded; ends at the first 200 or when the test ends
            if stop.is_set():
                return
            try:
                pings.append(session.get(f"{url}/ping", timeout=10).status_code)
            except requests.RequestException:
                pings.append("unreachable")
            if pings[-1] == 200:
                ping_ok.set()
                return
            time.sleep(0.05)

    poller = threading.Thread(target=poll_ping, daemon=True)
    poller.start()
    body = json.dumps(requests_by_target()["sam.tar.gz"]).encode()
    client = runtime_client(url)
    before: list[str] = []  # outcomes of invocations sent before /ping said 200
    after: list[str] = []  # and after
    try:
        deadline = time.monotonic() + 300
        while len(after) < 3:
            assert time.monotonic() < deadline, f"not ready in time: pings {pings[-5:]}"
            assert process.poll() is None, "the emulator exited: " + log_path.read_text()[-3000:]
            ready = ping_ok.is_set()  # read before sending: this invocation is "after"
            outcome = outcome_of_invoking(client, body)
            (after if ready else before).append(outcome)
            if outcome == "unreachable":
                time.sleep(0.05)  # tight, not spinning on a port nobody holds yet
    finally:
        stop.set()
        poller.join(timeout=30)
        stop_process_tree(process)
    print(f"pings: {pings[:3]}...{pings[-3:]} ({len(pings)}); before /ping 200: {before[-5:]}")
    early = [o for o in before if o not in ("ok", "unreachable") and "429" not in o]
    assert early == [], f"an early invocation got neither an answer nor a retry: {early}"
    assert not any(" 500" in outcome for outcome in before + after)
    assert after == ["ok"] * len(after), after


# -- who may call: loopback names only -------------------------------------------------------


@pytest.mark.parametrize(
    "host", ["attacker.example", "attacker.example:{port}", "127.0.0.1.nip.io:{port}", "[::1]"]
)
def test_foreign_host_names_are_refused_with_json(starting: Emulator, host: str):
    # a page that rebinds its own name to 127.0.0.1 must not reach the models (nor /ping)
    port = starting.url.rsplit(":", 1)[1]
    headers = {"Host": host.format(port=port), "Content-Type": "application/json"}
    for method, path in (("POST", f"/endpoints/{ENDPOINT}/invocations"), ("GET", "/ping")):
        reply = requests.request(
            method,
            f"{starting.url}{path}",
            data=b"{}",
            headers={**headers, "X-Amzn-SageMaker-Target-Model": "sam.tar.gz"},
            timeout=10,
        )
        assert reply.status_code == 400, (method, path, reply.text)
        assert reply.json()["error"] == "bad_host"
        assert host.format(port=port) in reply.json()["message"]
    assert sample(starting, "ModelCacheHit_count") == 0  # nothing reached the endpoint


def test_localhost_is_this_servers_name_too(starting: Emulator):
    port = starting.url.rsplit(":", 1)[1]
    reply = requests.get(
        f"{starting.url}/metrics", headers={"Host": f"localhost:{port}"}, timeout=10
    )
    assert reply.status_code == 200


# -- sources and layouts ---------------------------------------------------------------------


def test_a_flat_tarball_loads_like_one_with_a_root_folder(
    backend: Backend, served_store: Path, tmp_path: Path
):
    flat = tmp_path / "flat"
    unpacked = tmp_path / "unpacked"
    with tarfile.open(served_store / "lama.tar.gz") as archive:
        archive.extractall(unpacked, filter="data")
    flat.mkdir()
    with tarfile.open(flat / "lama.tar.gz", "w:gz") as archive:  # the blog's `tar czf . `
        for path in sorted((unpacked / "lama").iterdir()):
            archive.add(path, arcname=path.name)
    endpoint = make_endpoint(backend, LocalSource(flat), tmp_path / "downloads")
    for emulator in serve_endpoint(endpoint):
        assert "generated_image" in emulator.invoke(
            "lama.tar.gz", requests_by_target()["lama.tar.gz"]
        )


def test_an_s3_prefix_is_a_model_source(
    backend: Backend, served_store: Path, tmp_path, monkeypatch
):
    from moto.server import ThreadedMotoServer

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")  # moto accepts any; boto3 needs some
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")

    (port,) = free_ports(1)
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    try:
        s3_url = f"http://127.0.0.1:{port}"
        s3 = make_s3_client(s3_url)
        s3.create_bucket(Bucket="mmekit-models")
        s3.upload_file(str(served_store / "sam.tar.gz"), "mmekit-models", "prefix/sam.tar.gz")
        source = S3Source("s3://mmekit-models/prefix", lambda: make_s3_client(s3_url))
        endpoint = make_endpoint(backend, source, tmp_path / "downloads")
        for emulator in serve_endpoint(endpoint):
            reply = emulator.invoke("sam.tar.gz", requests_by_target()["sam.tar.gz"])
            assert "generated_image" in reply
            missing = emulator.error("lama.tar.gz", {"image": "x"})
            assert "Failed to download model data" in missing["Error"]["Message"]
    finally:
        moto.stop()


def test_metrics_are_prometheus_text(fresh: Emulator):
    fresh.invoke("sam.tar.gz", requests_by_target()["sam.tar.gz"])
    text = requests.get(f"{fresh.url}/metrics", timeout=10).text
    for name in (
        "ModelCacheHit_sum",
        "ModelLoadingWaitTime_seconds_count",
        "LoadedModelCount",
        "ModelLoadingTime_seconds_sum",
        'Invocations_total{outcome="ok"}',
    ):
        assert name in text, name


# -- parity ----------------------------------------------------------------------------------


@pytest.mark.gate("emulator")
def test_boto3_through_the_emulator_matches_torchserve_directly(
    fresh: Emulator, local_server: Server
):
    for target, body in requests_by_target().items():
        model = target.removesuffix(".tar.gz")
        payload = json.dumps(body)
        for _ in range(2):  # the second SAM call hits the embedding cache on both sides
            via_emulator = fresh.invoke(target, payload.encode())
            direct = local_server.predict(model, payload)
        assert direct.status_code == 200
        assert via_emulator == direct.json(), model


# -- phone photos ----------------------------------------------------------------------------


@pytest.mark.slow  # ~30 s here: two model loads and two 12 MP photos
def test_a_12_mp_phone_photo_erases_and_replaces_through_boto3_with_the_samples_payloads(
    fresh: Emulator,
):
    """The blog's flow on a phone photo, unchanged: a JPEG of 4032 x 3024 with the sample's
    payload shapes (gen_args as a JSON string) gets a JPEG of its size that fits the response."""
    import io

    import numpy as np
    from PIL import Image

    from tests.support import box_mask, decode_image, photo_like, photo_request

    width, height = 4032, 3024
    obj = (2600, 1400, 3200, 1900)
    photo = photo_request(photo_like(width, height), box_mask(width, height, obj))
    sent = np.asarray(Image.open(io.BytesIO(base64.b64decode(photo["image"]))).convert("RGB"))
    far = np.ones((height, width), dtype=bool)
    far[obj[1] - 24 : obj[3] + 24, obj[0] - 24 : obj[2] + 24] = False  # dilated mask + 2 blocks
    sd_extra = {"prompt": "a red vase", "gen_args": json.dumps({"num_inference_steps": 2})}
    for target, extra in (("lama.tar.gz", {}), ("sd.tar.gz", sd_extra)):
        body = json.dumps({**photo, **extra, "dilate_kernel_size": 15}).encode()
        assert len(body) <= MAX_BODY_BYTES
        reply = fresh.client().invoke_endpoint(
            EndpointName=ENDPOINT, TargetModel=target, ContentType="application/json", Body=body
        )
        raw = reply["Body"].read()
        assert len(raw) <= MAX_BODY_BYTES, target
        answer = json.loads(raw)
        assert answer["format"] == "jpeg", target
        result = decode_image(answer["generated_image"])
        assert result.format == "JPEG" and result.size == (width, height), target
        difference = np.abs(np.asarray(result).astype(np.int16) - sent.astype(np.int16))[far]
        assert difference.mean() <= 2.0 and difference.max() <= 48, target
