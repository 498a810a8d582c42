"""End to end: promote to moto's S3 and SageMaker, then smoke-test every model through the local
multi-model endpoint reading that same S3 prefix, with the boto3 invoke code a cloud run uses."""

from __future__ import annotations

import json
from pathlib import Path

from scripts import promote
from scripts.mme import S3Source, make_s3_client
from tests.conftest import BUCKET, ROLE
from tests.servers import Server
from tests.serving.test_mme import ENDPOINT, make_endpoint, serve_endpoint


def test_promoted_models_answer_through_the_emulator_from_s3(
    aws: str, sagemaker_server: Server, served_store: Path, tmp_path: Path, monkeypatch, capsys
):
    record = tmp_path / "tested.json"
    promote.record_tested(served_store, "tests", record)
    prefix = "promoted/models"
    source = S3Source(f"s3://{BUCKET}/{prefix}", lambda: make_s3_client(aws))
    endpoint = make_endpoint(sagemaker_server, source, tmp_path / "downloads")
    for emulator in serve_endpoint(endpoint):
        # sagemaker-runtime goes to the emulator; every other service to moto
        monkeypatch.setenv("AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME", emulator.url)
        output = tmp_path / "promotion.json"
        code = promote.main(
            [
                "--bucket", BUCKET, "--role-arn", ROLE, "--prefix", prefix,
                "--endpoint-name", ENDPOINT, "--instance-type", "ml.g4dn.2xlarge",
                "--store", str(served_store), "--record", str(record), "--output", str(output),
                "run", "--allow-tiny",
            ]
        )  # fmt: skip
        out = capsys.readouterr()
        assert code == 0, out.err
        promoted = json.loads(output.read_text())
        for entry in promoted["models"].values():
            assert f"smoke: {entry['target_model']} answered as the contract says" in out.out
            assert entry["target_model"] in emulator.endpoint.loaded  # fetched from moto's S3
        assert set(promoted["models"]) == {"sam", "lama", "sd"}
