"""The SageMaker contract through the real container: `make serve-mme MME_BACKEND=container`'s
emulator in front of `docker run <image> serve`, driven by the unmodified boto3 client (and the
SageMaker Python SDK where it is installed). The tarballs are extracted under
/opt/ml/models/<hash>/model (a bind mount) and registered by that path, as SageMaker does."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from scripts.sagemaker.backends import CONTAINER_MODELS_DIR, ContainerBackend, start_container
from scripts.sagemaker.emulator import MAX_BODY_BYTES, Endpoint, model_name
from scripts.sagemaker.sources import LocalSource
from tests.container.conftest import timed
from tests.serving.test_mme import ENDPOINT, Emulator, requests_by_target, serve_endpoint


@pytest.fixture(scope="module")
def backend(serving_image, tmp_path_factory) -> Iterator[ContainerBackend]:
    root = tmp_path_factory.mktemp("mme-container")
    started = time.monotonic()
    container = start_container(root, serving_image.tags[0])
    try:
        container.wait_until_accepting(300)
        timed("sagemaker mode: docker run <image> serve until /ping and the API answer",
              time.monotonic() - started)  # fmt: skip
        yield container
    except BaseException:
        print(f"--- the container's log ---\n{container.logs()}")
        raise
    finally:
        container.stop()


@pytest.fixture(scope="module")
def mme(backend: ContainerBackend, archives, tmp_path_factory) -> Iterator[Emulator]:
    endpoint = Endpoint(
        name=ENDPOINT,
        source=LocalSource(archives),
        models_dir=backend.models_dir,
        downloads_dir=tmp_path_factory.mktemp("mme-downloads"),
        torchserve=backend.client,
        not_ready_after_s=180,
        backend_models_dir=CONTAINER_MODELS_DIR,
    )
    yield from serve_endpoint(endpoint)


@pytest.fixture
def logs_on_failure(request, backend: ContainerBackend) -> Iterator[None]:
    yield
    report = getattr(request.node, "report_call", None)
    if report is not None and report.failed:
        print(f"--- the container's log ---\n{backend.logs()}")


def test_sagemaker_bind_to_port_is_honoured(backend: ContainerBackend):
    env = dict(item.split("=", 1) for item in backend.container.attrs["Config"]["Env"])
    port = backend.ports.inference
    assert env["SAGEMAKER_BIND_TO_PORT"] == str(port)
    ports = backend.container.attrs["NetworkSettings"]["Ports"]  # EXPOSEd ones too, unbound
    published = {name: bound for name, bound in ports.items() if bound}
    assert list(published) == [f"{port}/tcp"]  # TorchServe answers there, nowhere else
    assert published[f"{port}/tcp"][0]["HostIp"] == "127.0.0.1"


def test_all_three_models_load_and_answer_through_boto3(mme: Emulator, logs_on_failure):
    for target, body in requests_by_target(sd_steps=1).items():
        started = time.monotonic()
        assert "generated_image" in mme.invoke(target, body)
        timed(f"sagemaker mode: first invocation of {target} (fetch, extract, register, infer)",
              time.monotonic() - started)  # fmt: skip
        started = time.monotonic()
        assert "generated_image" in mme.invoke(f"/{target}", body)  # as the AWS sample sends it
        timed(f"sagemaker mode: cached invocation of {target}", time.monotonic() - started)
        name = model_name(mme.endpoint.source.uri, target)
        assert (mme.endpoint.models_dir / name / "model").is_dir()  # SageMaker's layout


def test_a_second_register_is_409(mme: Emulator, logs_on_failure):
    body = requests_by_target(sd_steps=1)["sam.tar.gz"]
    mme.invoke("sam.tar.gz", body)
    name = model_name(mme.endpoint.source.uri, "sam.tar.gz")
    again = mme.endpoint.torchserve.register(name, CONTAINER_MODELS_DIR / name / "model")
    assert again.status == 409, again.text


def test_after_unload_the_model_is_404_and_loads_again(mme: Emulator, logs_on_failure):
    body = requests_by_target(sd_steps=1)["lama.tar.gz"]
    mme.invoke("lama.tar.gz", body)
    name = model_name(mme.endpoint.source.uri, "lama.tar.gz")
    assert mme.endpoint.torchserve.describe(name).status == 200
    mme.endpoint.unload("lama.tar.gz")
    assert mme.endpoint.torchserve.describe(name).status == 404
    assert "generated_image" in mme.invoke("lama.tar.gz", body)


def test_the_6_mb_body_limit(mme: Emulator, logs_on_failure):
    over = mme.error("sam.tar.gz", b"x" * (MAX_BODY_BYTES + 1))
    assert over.get("Error", {}).get("Code") == "ValidationError", over
    assert over["ResponseMetadata"]["HTTPStatusCode"] == 400
    # at the limit it reaches the container, whose handler refuses it with a 400 of its own
    at = mme.error("sam.tar.gz", b"x" * MAX_BODY_BYTES)
    assert at["Error"]["Code"] == "ModelError" and at["OriginalStatusCode"] == 400, at


def test_a_bad_request_is_the_containers_400_as_a_model_error(mme: Emulator, logs_on_failure):
    response = mme.error("sam.tar.gz", json.dumps({"image": 5}).encode())
    assert response["Error"]["Code"] == "ModelError" and response["OriginalStatusCode"] == 400
    assert json.loads(response["OriginalMessage"])["message"]


def test_the_sagemaker_python_sdk_predicts_through_it(mme: Emulator, logs_on_failure):
    """The blog's call. Not installed by the project: sagemaker 2.250-2.257 conflict with the
    pins (pip: ResolutionImpossible); this runs where someone installs a version that fits."""
    pytest.importorskip("sagemaker", reason="the SageMaker Python SDK conflicts with the pins")
    import boto3
    from sagemaker.deserializers import JSONDeserializer
    from sagemaker.predictor import Predictor
    from sagemaker.serializers import JSONSerializer
    from sagemaker.session import Session

    session = Session(
        boto_session=boto3.Session(region_name="us-east-1", aws_access_key_id="testing",
                                   aws_secret_access_key="testing"),
        sagemaker_runtime_client=mme.client(),
    )  # fmt: skip
    predictor = Predictor(ENDPOINT, sagemaker_session=session, serializer=JSONSerializer(),
                          deserializer=JSONDeserializer())  # fmt: skip
    body = requests_by_target(sd_steps=1)["sam.tar.gz"]
    assert "generated_image" in predictor.predict(data=body, target_model="/sam.tar.gz")
