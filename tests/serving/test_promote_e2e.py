"""End to end: promote to moto's S3 and SageMaker, then smoke-test every model through the local
multi-model endpoint reading that same S3 prefix, with the boto3 invoke code a cloud run uses.

The emulator serves on this machine's CPU, so every model answers per the contract and reports
`cpu`: the smoke test must then fail the promotion, as it would on a GPU instance whose models
fell back to the CPU."""

from __future__ import annotations

from pathlib import Path

from scripts import promote
from scripts.sagemaker.backends import Backend
from scripts.sagemaker.gate import record_tested
from scripts.sagemaker.sources import S3Source, make_s3_client
from tests.conftest import BUCKET, ROLE
from tests.serving import test_mme
from tests.serving.test_mme import ENDPOINT, make_endpoint, serve_endpoint

backend = test_mme.backend  # the fixture: the emulator's TorchServe, as `make serve-mme` starts it


def test_promoted_models_answer_through_the_emulator_from_s3(
    aws: str, backend: Backend, served_store: Path, tmp_path: Path, monkeypatch, capsys
):
    record = tmp_path / "tested.json"
    record_tested(served_store, "tests", record)
    prefix = "promoted/models"
    source = S3Source(f"s3://{BUCKET}/{prefix}", lambda: make_s3_client(aws))
    endpoint = make_endpoint(backend, source, tmp_path / "downloads")
    for emulator in serve_endpoint(endpoint):
        # sagemaker-runtime goes to the emulator; every other service to moto
        monkeypatch.setenv("AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME", emulator.url)
        output = tmp_path / "promotion.json"
        code = promote.main(
            [
                "--bucket", BUCKET, "--role-arn", ROLE, "--prefix", prefix,
                "--endpoint-name", ENDPOINT, "--instance-type", "ml.g4dn.2xlarge",
                "--store", str(served_store), "--record", str(record), "--output", str(output),
                "--image-cuda", "13.0", "run", "--allow-tiny",
            ]
        )  # fmt: skip
        out = capsys.readouterr()
        assert code == 1, out.err
        error = out.err.strip()
        assert "not on the GPU of ml.g4dn.2xlarge" in error and "\n" not in error
        for model in ("sam", "lama", "sd"):
            (target,) = [name for name in emulator.endpoint.loaded if name.startswith(f"{model}-")]
            # each answered as the contract says, from moto's S3, on the CPU
            assert f"smoke: {target} answered as the contract says, on cpu" in out.out
            assert f"{target} on cpu" in error
        assert not output.exists()  # no promotion record for an endpoint that runs on CPUs
