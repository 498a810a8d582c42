"""Shared fixtures: tiny weights built once per session, handlers served the TorchServe way."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
import torch

from scripts.torchserve.profile import free_ports
from scripts.weights import build_tier
from tests.servers import (  # noqa: F401 - the server fixtures, for every test folder
    local_server,
    print_server_logs_on_failure,
    sagemaker_server,
    served_store,
)
from tests.support import ServedModel, make_model_dir

# make promote's gate: which archives passed the serving flows (tests/gate.py)
pytest_plugins = ["tests.gate"]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow")
    parser.addoption(
        "--run-container",
        action="store_true",
        help="collect tests/container: build and run the serving image (make test-container)",
    )
    parser.addoption(
        "--hardening-full",
        action="store_true",
        default=os.environ.get("HARDENING_FULL", "") not in ("", "0"),
        help="tests/hardening at full size (2,000-request load, every fault; HARDENING_FULL=1)",
    )
    parser.addoption(
        "--store",
        type=Path,
        default=None,
        help="serve this model store's archives in tests/serving (make test-handlers: "
        "model_store) instead of freshly built tiny ones",
    )


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """tests/container builds a multi-GB image and runs it: only `make test-container`."""
    if collection_path.name == "container" and collection_path.parent == Path(__file__).parent:
        return not config.getoption("--run-container")
    return None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> object:
    """Keep each phase's report on the test, so fixtures can tell a failure from a pass."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_slow = pytest.mark.skip(reason="slow: run with --run-slow (make test-slow)")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--run-slow"):
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def weights_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A weights/ folder for the session (tiers get built into it on demand)."""
    return tmp_path_factory.mktemp("weights")


@pytest.fixture(scope="session")
def tiny_weights(weights_root: Path) -> Callable[[str], Path]:
    """tiny_weights("sam") -> weights/tiny/sam, built on first use by `make weights`'s tool."""

    def _weights(model: str) -> Path:
        return build_tier("tiny", root=weights_root, models=(model,))[0]

    return _weights


@pytest.fixture(scope="session")
def serve(
    tiny_weights: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory
) -> Callable[..., ServedModel]:
    """serve("sam", batch_size=1, gpu_id=None, **handler_settings) -> a fresh ServedModel."""

    def _serve(
        model: str, batch_size: int = 1, gpu_id: int | None = None, **settings: object
    ) -> ServedModel:
        folder = make_model_dir(
            tmp_path_factory.mktemp(f"{model}-model"), model, tiny_weights(model), settings
        )
        return ServedModel(folder, batch_size, gpu_id)

    return _serve


@pytest.fixture(scope="module")
def sam(serve: Callable[..., ServedModel]) -> ServedModel:
    return serve("sam")


@pytest.fixture(scope="module")
def lama(serve: Callable[..., ServedModel]) -> ServedModel:
    return serve("lama")


@pytest.fixture(scope="module")
def sd(serve: Callable[..., ServedModel]) -> ServedModel:
    return serve("sd")


# ---------------------------------------------------------------------------------------------
# AWS on loopback: a moto server for S3, ECR, SageMaker and Application Auto Scaling

BUCKET = "mmekit-test-bucket"
ROLE = "arn:aws:iam::123456789012:role/mmekit-execution"
IMAGE_TAG_URI = "123456789012.dkr.ecr.us-east-1.amazonaws.com/mmekit:v1"
IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/mmekit@sha256:" + "ab" * 32
FAKE_SECRET = "mmekitFAKEsecretKEY/doNotLeak0123456789abcd"


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    (port,) = free_ports(1)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def aws(moto_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A clean moto account with the bucket and an image in ECR; boto3 pointed at it."""
    import boto3  # here, not at the top: the GPU tests run where no AWS library is installed

    requests.post(f"{moto_url}/moto-api/reset", timeout=10)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")  # where the tests look
    monkeypatch.delenv("DRY_RUN", raising=False)
    for name in list(os.environ):
        if name.startswith("MMEKIT_"):
            monkeypatch.delenv(name)
    boto3.client("s3", region_name="us-east-1").create_bucket(Bucket=BUCKET)
    ecr = boto3.client("ecr", region_name="us-east-1")
    ecr.create_repository(repositoryName="mmekit")
    image_manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {
            "mediaType": "application/vnd.docker.container.image.v1+json",
            "digest": "sha256:" + "1" * 64,
            "size": 1,
        },
        "layers": [],
    }
    ecr.put_image(repositoryName="mmekit", imageManifest=json.dumps(image_manifest), imageTag="v1")
    monkeypatch.setenv("IMAGE_URI", IMAGE_TAG_URI)
    return moto_url
