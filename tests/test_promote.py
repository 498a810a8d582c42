"""`make promote` against a moto server on loopback (S3, ECR, SageMaker, Application Auto
Scaling), and botocore's Stubber for the UpdateEndpoint sequences moto does not implement.

moto's SageMaker knows no ml.g5 instance types, so these runs use ml.g4dn.2xlarge (also a GPU
instance); the default stays ml.g5.2xlarge (configs/promote.yaml).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import shutil
from dataclasses import replace
from pathlib import Path

import boto3
import pytest
from botocore.response import StreamingBody
from botocore.stub import Stubber
from PIL import Image

import mmekit_cuda
from scripts import PROJECT_ROOT, promote
from scripts.archive import archive_models, read_manifest, write_manifest
from scripts.models import MODELS
from scripts.sagemaker.ami import load_ami_table, plan_ami
from scripts.sagemaker.gate import Artifact, read_artifacts, record_tested
from scripts.sagemaker.iam import iam_policies
from scripts.sagemaker.naming import config_name, model_name
from scripts.sagemaker.promoter import Promoter
from scripts.sagemaker.s3 import expected_checksums
from scripts.sagemaker.settings import (
    SECRET_NAME,
    Autoscaling,
    PromoteError,
    Settings,
    check_settings,
    load_settings,
)
from tests.conftest import BUCKET, FAKE_SECRET, IMAGE, IMAGE_TAG_URI, ROLE

AMI_12 = "al2-ami-sagemaker-inference-gpu-2"  # driver 535: CUDA 12.x builds
AMI_13 = "al2023-ami-sagemaker-inference-gpu-4-1"  # driver 580: CUDA 13.x builds


@pytest.fixture(autouse=True)
def image_labels(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The org.mmekit.torch.cuda labels of the images "local" to these tests (none unless a
    test adds one): no test depends on a Docker engine."""
    labels: dict[str, str] = {}
    monkeypatch.setattr("scripts.image.image_torch_cuda", labels.get)
    return labels


@pytest.fixture(scope="module")
def tiny_archives(tmp_path_factory: pytest.TempPathFactory, weights_root: Path) -> Path:
    store = tmp_path_factory.mktemp("promote-store")
    archive_models(MODELS, "tiny", store, weights_root)
    return store


@pytest.fixture
def store(tiny_archives: Path, tmp_path: Path) -> Path:
    """A copy of the tiny store a test may change, with its tested record beside it."""
    copy = tmp_path / "model_store"
    shutil.copytree(tiny_archives, copy)
    record_tested(copy, "tests", tmp_path / "tested.json")
    return copy


def argv(store: Path, *command: str, **flags: str) -> list[str]:
    options = {
        "bucket": BUCKET,
        "role-arn": ROLE,
        "instance-type": "ml.g4dn.2xlarge",
        "store": str(store),
        "record": str(store.parent / "tested.json"),
        "output": str(store.parent / "promotion.json"),
        "image-cuda": "13.0",  # the pinned torch's build; IMAGE_URI is not a local image here
        **flags,
    }
    return [item for name, value in options.items() for item in (f"--{name}", value)] + list(
        command
    )


def run_promote(store: Path, *extra: str, **flags: str) -> tuple[int, Promoter]:
    """`run` as main() does it, keeping the Promoter to read its calls back."""
    args = promote.build_parser().parse_args(argv(store, "run", "--allow-tiny", *extra, **flags))
    settings = load_settings(
        args.config,
        overrides={
            "bucket": args.bucket,
            "role_arn": args.role_arn,
            "instance_type": args.instance_type,
            "image_cuda": args.image_cuda,
            "inference_ami_version": args.inference_ami_version,
        },
    )
    promoter = Promoter(settings, say=lambda line: None)
    return promote.run(args, settings, promoter), promoter


def s3_keys() -> dict[str, bytes]:
    s3 = boto3.client("s3", region_name="us-east-1")
    listed = s3.list_objects_v2(Bucket=BUCKET).get("Contents", [])
    return {o["Key"]: s3.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read() for o in listed}


# ---------------------------------------------------------------------------------------------
# Against moto


def test_full_promote_then_a_rerun_makes_no_mutating_call(aws, store):
    code, first = run_promote(store, "--no-smoke")
    assert code == 0
    assert sorted(first.mutating_operations) == sorted(
        ["PutObject"] * 3
        + ["CreateModel", "CreateEndpointConfig", "CreateEndpoint"]
        + ["RegisterScalableTarget", "PutScalingPolicy"]
    )
    record = json.loads((store.parent / "promotion.json").read_text())
    manifest = read_manifest(store)["models"]
    keys = s3_keys()
    for model in MODELS:
        sha = manifest[model]["sha256"]
        entry = record["models"][model]
        assert entry == {
            "target_model": f"{model}-{sha[:12]}.tar.gz",
            "sha256": sha,
            "size": manifest[model]["size"],
        }
        uploaded = keys[f"mmekit/models/{entry['target_model']}"]
        assert hashlib.sha256(uploaded).hexdigest() == sha  # the tested bytes, unchanged
    assert record["image"].endswith("@" + record["image_digest"])
    assert record["image_digest"].startswith("sha256:")

    sm = boto3.client("sagemaker", region_name="us-east-1")
    endpoint = sm.describe_endpoint(EndpointName="mmekit")
    assert endpoint["EndpointStatus"] == "InService"
    assert endpoint["EndpointConfigName"] == record["endpoint_config"]
    (variant,) = sm.describe_endpoint_config(EndpointConfigName=record["endpoint_config"])[
        "ProductionVariants"
    ]
    assert variant["InferenceAmiVersion"] == AMI_13 == record["inference_ami_version"]
    container = sm.describe_model(ModelName=record["model"])["PrimaryContainer"]
    assert container["Mode"] == "MultiModel"
    assert container["Image"] == record["image"] and "@sha256:" in container["Image"]
    assert container["ModelDataUrl"] == f"s3://{BUCKET}/mmekit/models/"
    assert not any(SECRET_NAME.search(k) for k in container.get("Environment", {}))
    scaling = boto3.client("application-autoscaling", region_name="us-east-1")
    (target,) = scaling.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"]
    assert (target["MinCapacity"], target["MaxCapacity"]) == (1, 2)
    (policy,) = scaling.describe_scaling_policies(ServiceNamespace="sagemaker")["ScalingPolicies"]
    tracking = policy["TargetTrackingScalingPolicyConfiguration"]
    assert tracking["ScaleInCooldown"] == 600

    code, second = run_promote(store, "--no-smoke")
    assert code == 0 and second.mutating_operations == []
    assert second.operations  # it did look


def test_a_changed_tarball_gets_a_new_key_and_target_model_and_nothing_else(aws, store):
    assert run_promote(store, "--no-smoke")[0] == 0
    before = json.loads((store.parent / "promotion.json").read_text())
    tarball = store / "lama.tar.gz"
    tarball.write_bytes(tarball.read_bytes() + b"\0" * 1024)  # still a valid gzip'd tar
    manifest = read_manifest(store)
    manifest["models"]["lama"].update(
        sha256=hashlib.sha256(tarball.read_bytes()).hexdigest(), size=tarball.stat().st_size
    )
    write_manifest(store, manifest)
    record_tested(store, "tests", store.parent / "tested.json")

    code, rerun = run_promote(store, "--no-smoke")
    assert code == 0 and rerun.mutating_operations == ["PutObject"]
    after = json.loads((store.parent / "promotion.json").read_text())
    assert after["models"]["lama"]["target_model"] != before["models"]["lama"]["target_model"]
    assert after["models"]["sam"] == before["models"]["sam"]
    assert after["endpoint_config"] == before["endpoint_config"]
    assert len([k for k in s3_keys() if "/lama-" in k]) == 2  # the old one stays, for rollbacks


def test_an_object_with_other_bytes_at_the_key_aborts_and_is_left_alone(aws, store, capsys):
    artifact = next(a for a in read_artifacts(store) if a.model == "sam")
    squatter = b"not the tested tarball"
    s3 = boto3.client("s3", region_name="us-east-1")
    key = f"mmekit/models/{artifact.target_model}"
    s3.put_object(Bucket=BUCKET, Key=key, Body=squatter, ChecksumAlgorithm="SHA256")
    assert promote.main(argv(store, "run", "--allow-tiny", "--no-smoke")) == 1
    err = capsys.readouterr().err
    assert "holds other bytes" in err and "refusing" in err and err.count("\n") == 1
    assert s3.get_object(Bucket=BUCKET, Key=key)["Body"].read() == squatter
    sm = boto3.client("sagemaker", region_name="us-east-1")
    assert sm.list_endpoints()["Endpoints"] == []  # stopped before the endpoint step


def test_multipart_uploads_are_verified_by_their_composite_checksum(aws, tmp_path, monkeypatch):
    monkeypatch.setattr("scripts.sagemaker.s3.MULTIPART_THRESHOLD", 5 * 1024 * 1024)
    monkeypatch.setattr("scripts.sagemaker.s3.PART_SIZE", 5 * 1024 * 1024)
    path = tmp_path / "sd.tar.gz"
    path.write_bytes(os.urandom(11 * 1024 * 1024))  # three parts
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    artifact = Artifact("sd", path, sha, path.stat().st_size, "full")
    settings = Settings(bucket=BUCKET, role_arn=ROLE)
    uploader = Promoter(settings, say=lambda line: None)
    assert uploader.upload([artifact])[0]["state"] == "uploaded"
    assert "CompleteMultipartUpload" in uploader.mutating_operations
    again = Promoter(settings, say=lambda line: None)
    assert again.upload([artifact])[0]["state"] == "present"
    assert again.mutating_operations == []
    assert hashlib.sha256(s3_keys()[artifact.key(settings)]).hexdigest() == sha


def test_the_gate_refuses_untested_hashes_and_tiny_weights(aws, store, capsys):
    (store.parent / "tested.json").unlink()
    assert promote.main(argv(store, "run", "--allow-tiny", "--no-smoke")) == 1
    err = capsys.readouterr().err
    assert "not tested" in err and "make test-handlers" in err and "--force" in err
    assert s3_keys() == {}  # nothing went out

    record_tested(store, "tests", store.parent / "tested.json")
    assert promote.main(argv(store, "run", "--no-smoke")) == 1
    assert "random-weight archives" in capsys.readouterr().err


def test_force_promotes_untested_archives_with_a_warning(aws, store, capsys):
    (store.parent / "tested.json").unlink()
    assert promote.main(argv(store, "run", "--allow-tiny", "--force", "--no-smoke")) == 0
    out = capsys.readouterr().out
    assert out.count("WARNING: promoting") == 3 and "untested (--force)" in out


def test_models_lists_the_target_models(aws, store, capsys):
    assert run_promote(store, "--no-smoke")[0] == 0
    capsys.readouterr()
    assert promote.main(argv(store, "models")) == 0
    listed = [line.split("\t")[0] for line in capsys.readouterr().out.splitlines()]
    record = json.loads((store.parent / "promotion.json").read_text())
    assert sorted(listed) == sorted(m["target_model"] for m in record["models"].values())


def test_teardown_asks_first_then_deletes_endpoint_configs_and_models(
    aws, store, capsys, monkeypatch
):
    assert run_promote(store, "--no-smoke")[0] == 0
    sm = boto3.client("sagemaker", region_name="us-east-1")
    # another endpoint's model whose name merely starts like ours ("mmekit-m" is an endpoint)
    sm.create_model(
        ModelName="mmekit-m-m-0123456789ab",
        ExecutionRoleArn=ROLE,
        PrimaryContainer={"Image": IMAGE, "Mode": "MultiModel", "ModelDataUrl": "s3://x/y/"},
    )
    monkeypatch.setattr("builtins.input", lambda prompt: "no")
    assert promote.main(argv(store, "teardown")) == 1
    assert len(sm.list_endpoints()["Endpoints"]) == 1  # not confirmed: untouched
    monkeypatch.setattr("builtins.input", lambda prompt: "mmekit")
    assert promote.main(argv(store, "teardown")) == 0
    out = capsys.readouterr().out
    assert "deleted endpoint mmekit" in out and "deleted model mmekit-m-" in out
    assert sm.list_endpoints()["Endpoints"] == []
    assert sm.list_endpoint_configs()["EndpointConfigs"] == []
    assert [m["ModelName"] for m in sm.list_models()["Models"]] == ["mmekit-m-m-0123456789ab"]
    assert len(s3_keys()) == 3  # the tarballs stay
    assert promote.main(argv(store, "teardown", "--yes")) == 0
    assert "nothing to delete" in capsys.readouterr().out


def test_dry_run_prints_a_readable_plan_and_creates_no_client(aws, store, capsys, monkeypatch):
    def no_clients(*args, **kwargs):
        raise AssertionError("--dry-run created an AWS client")

    monkeypatch.setattr("scripts.aws.make_client", no_clients)
    monkeypatch.setattr(boto3, "client", no_clients)
    monkeypatch.setenv("IMAGE_URI", IMAGE)
    monkeypatch.setenv("DRY_RUN", "1")
    assert promote.main(argv(store, "run", "--allow-tiny")) == 0
    out = capsys.readouterr().out
    for model in MODELS:
        assert f"would upload {model}.tar.gz" in out
    settings = load_settings(
        overrides={"bucket": BUCKET, "role_arn": ROLE, "instance_type": "ml.g4dn.2xlarge"},
    )
    model = model_name(settings, IMAGE)
    assert f"would create model {model}" in out
    config = config_name(settings, model, AMI_13)
    assert f"would create endpoint config {config}" in out
    assert f"inference AMI: {AMI_13}" in out and "needs driver >= 580" in out
    assert "between 1 and 2 instances" in out and "would write promotion.json" in out
    assert not (store.parent / "promotion.json").exists()


def test_without_an_engine_or_image_uri_says_both_options(aws, store, capsys, monkeypatch):
    monkeypatch.delenv("IMAGE_URI")
    monkeypatch.setattr("scripts.image.engine_reachable", lambda: False)
    assert promote.main(argv(store, "run", "--allow-tiny", "--no-smoke")) == 1
    err = capsys.readouterr().err.strip()
    assert "IMAGE_URI=" in err and "Docker engine" in err and "\n" not in err


def test_an_image_tag_missing_from_ecr_is_one_line(aws, store, capsys, monkeypatch):
    monkeypatch.setenv("IMAGE_URI", IMAGE_TAG_URI.replace(":v1", ":missing"))
    assert promote.main(argv(store, "run", "--allow-tiny", "--no-smoke")) == 1
    assert "is not in ECR: push it first" in capsys.readouterr().err


def test_no_secret_reaches_any_output_or_file_even_with_debug(aws, store, capfd, monkeypatch):
    session_token = "FwoGZXIvYXdzEFAKEsessionTOKENdoNotLeak"
    monkeypatch.setenv("AWS_SESSION_TOKEN", session_token)  # SSO and assumed roles have one
    assert promote.main(["--debug", *argv(store, "run", "--allow-tiny", "--no-smoke")]) == 0
    assert promote.main(["--debug", *argv(store, "models")]) == 0
    captured = capfd.readouterr()
    assert "PutObject" in captured.err or "put_object" in captured.err.lower()  # debug is on
    for secret in (FAKE_SECRET, session_token):
        assert secret not in captured.out + captured.err
        for path in store.parent.rglob("*"):
            if path.is_file():
                assert secret.encode() not in path.read_bytes(), path


# ---------------------------------------------------------------------------------------------
# Settings, names, IAM


def test_settings_come_from_the_file_then_the_environment_then_flags(tmp_path):
    config = tmp_path / "promote.yaml"
    config.write_text("bucket: from-file\nprefix: /p/\ninstance_count: 1\n")
    environ = {"MMEKIT_BUCKET": "from-env", "MMEKIT_INSTANCE_COUNT": "3", "AWS_REGION": "eu-west-1"}
    settings = load_settings(config, environ, {"instance_count": 2, "bucket": None})
    assert settings.bucket == "from-env" and settings.instance_count == 2
    assert settings.prefix == "p" and settings.region == "eu-west-1"
    assert settings.model_data_url == "s3://from-env/p/"


def test_missing_or_bad_settings_are_one_line_each(tmp_path):
    with pytest.raises(PromoteError, match="MMEKIT_BUCKET"):
        check_settings(Settings(role_arn=ROLE))
    with pytest.raises(PromoteError, match="looks like a secret"):
        check_settings(
            Settings(bucket=BUCKET, role_arn=ROLE, container_environment={"HF_TOKEN": "abc"})
        )
    with pytest.raises(PromoteError, match="looks like a secret"):
        check_settings(
            Settings(
                bucket=BUCKET, role_arn=ROLE, container_environment={"X": "AKIAABCDEFGHIJKLMNOP"}
            )
        )
    config = tmp_path / "promote.yaml"
    config.write_text("buckett: typo\n")
    with pytest.raises(PromoteError, match="unknown settings buckett"):
        load_settings(config, {})


def test_names_follow_the_content_and_change_with_it():
    settings = Settings(bucket=BUCKET, role_arn=ROLE)
    model = model_name(settings, IMAGE)
    assert model == model_name(settings, IMAGE)
    assert model != model_name(settings, IMAGE.replace("ab", "cd"))
    bigger = Settings(bucket=BUCKET, role_arn=ROLE, instance_count=2)
    assert config_name(settings, model, AMI_13) != config_name(bigger, model, AMI_13)
    assert config_name(settings, model, AMI_13) != config_name(
        settings, model, AMI_12
    )  # another driver, another config
    long = Settings(endpoint_name="e" * 47)
    assert len(config_name(long, model, AMI_13)) <= 63


def test_iam_policies_are_scoped_and_pass_role_is_conditioned():
    settings = Settings(bucket=BUCKET, role_arn=ROLE, prefix="mmekit/models")
    policies = iam_policies(settings)
    role_statements = {s["Sid"]: s for s in policies["execution_role"]["Statement"]}
    assert role_statements["ReadModels"] == {
        "Sid": "ReadModels",
        "Effect": "Allow",
        "Action": "s3:GetObject",
        "Resource": f"arn:aws:s3:::{BUCKET}/mmekit/models/*",
    }
    assert role_statements["PullImage"]["Resource"].endswith(":123456789012:repository/mmekit")
    user = {s["Sid"]: s for s in policies["promoting_user"]["Statement"]}
    assert user["PassExecutionRole"]["Resource"] == ROLE
    assert user["PassExecutionRole"]["Condition"] == {
        "StringEquals": {"iam:PassedToService": "sagemaker.amazonaws.com"}
    }
    for statement in [*role_statements.values(), *user.values()]:
        actions = (
            statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
        )
        assert all("*" not in action for action in actions), statement


def test_iam_policy_prints_json(capsys):
    assert promote.main(["--bucket", BUCKET, "--role-arn", ROLE, "iam-policy"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"execution_role", "promoting_user"}


# ---------------------------------------------------------------------------------------------
# UpdateEndpoint sequences with botocore's Stubber (moto does not implement UpdateEndpoint)


OLD_CONFIG = "mmekit-c-000000000000"
ENDPOINT_ARN = "arn:aws:sagemaker:us-east-1:123456789012:endpoint/mmekit"
MODEL_ARN = "arn:aws:sagemaker:us-east-1:123456789012:model/m"
POLICY_ARN = "arn:aws:autoscaling:us-east-1:123456789012:scalingPolicy:x"


def stubbed(settings: Settings) -> tuple[Promoter, Stubber, Stubber]:
    clients = {
        service: boto3.client(
            service, region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="y"
        )
        for service in ("sagemaker", "application-autoscaling")
    }
    stubs = {service: Stubber(client) for service, client in clients.items()}
    for stub in stubs.values():
        stub.activate()
    promoter = Promoter(
        settings, client_factory=clients.__getitem__, say=lambda line: None, sleep=lambda s: None
    )
    return promoter, stubs["sagemaker"], stubs["application-autoscaling"]


def endpoint(status: str, config: str, reason: str | None = None) -> dict:
    reply = {
        "EndpointName": "mmekit",
        "EndpointArn": "arn:aws:sagemaker:us-east-1:123456789012:endpoint/mmekit",
        "EndpointConfigName": config,
        "EndpointStatus": status,
        "CreationTime": "2026-11-26T00:00:00Z",
        "LastModifiedTime": "2026-11-26T00:00:00Z",
    }
    if reason:
        reply["FailureReason"] = reason
    return reply


def config_reply(name: str, instance_type: str) -> dict:
    return {
        "EndpointConfigName": name,
        "EndpointConfigArn": f"arn:aws:sagemaker:us-east-1:123456789012:endpoint-config/{name}",
        "ProductionVariants": [
            {"VariantName": "AllTraffic", "ModelName": "m", "InstanceType": instance_type}
        ],
        "CreationTime": "2026-11-26T00:00:00Z",
    }


def up_to_update(sm: Stubber, settings: Settings, old_type: str = "ml.g5.2xlarge") -> str:
    """The calls before UpdateEndpoint: model and config exist, the endpoint serves OLD_CONFIG."""
    model = model_name(settings, IMAGE)
    config = config_name(settings, model, AMI_13)
    sm.add_response(
        "describe_model",
        {"ModelName": model, "ModelArn": "arn:aws:sagemaker:us-east-1:1:model/m",
         "CreationTime": "2026-11-26T00:00:00Z"},
        {"ModelName": model},
    )  # fmt: skip
    sm.add_response(
        "describe_endpoint_config",
        config_reply(config, settings.instance_type),
        {"EndpointConfigName": config},
    )
    sm.add_response(
        "describe_endpoint", endpoint("InService", OLD_CONFIG), {"EndpointName": "mmekit"}
    )
    sm.add_response(
        "describe_endpoint_config",
        config_reply(OLD_CONFIG, old_type),
        {"EndpointConfigName": OLD_CONFIG},
    )
    return config


SETTINGS = Settings(bucket=BUCKET, role_arn=ROLE, poll_s=0, wait_timeout_s=60)


def test_update_moves_the_endpoint_to_the_new_config():
    promoter, sm, _ = stubbed(SETTINGS)
    config = up_to_update(sm, SETTINGS)
    sm.add_response(
        "update_endpoint",
        {"EndpointArn": ENDPOINT_ARN},
        {"EndpointName": "mmekit", "EndpointConfigName": config},
    )
    sm.add_response("describe_endpoint", endpoint("Updating", OLD_CONFIG))
    sm.add_response("describe_endpoint", endpoint("InService", config))
    result = promoter.ensure_endpoint(IMAGE, AMI_13)
    assert result["changed"] and result["config"] == config
    sm.assert_no_pending_responses()
    assert promoter.mutating_operations == ["UpdateEndpoint"]  # the old config is not deleted


def test_a_silent_rollback_fails_the_promotion():
    promoter, sm, _ = stubbed(SETTINGS)
    config = up_to_update(sm, SETTINGS)
    sm.add_response("update_endpoint", {"EndpointArn": ENDPOINT_ARN})
    sm.add_response("describe_endpoint", endpoint("Updating", OLD_CONFIG))
    sm.add_response("describe_endpoint", endpoint("RollingBack", OLD_CONFIG))
    sm.add_response("describe_endpoint", endpoint("InService", OLD_CONFIG))
    with pytest.raises(PromoteError, match="rolled back") as raised:
        promoter.ensure_endpoint(IMAGE, AMI_13)
    assert OLD_CONFIG in str(raised.value) and config in str(raised.value)


@pytest.mark.parametrize("status", ["UpdateRollbackFailed", "Failed"])
def test_a_failed_update_fails_fast_with_the_reason(status):
    promoter, sm, _ = stubbed(SETTINGS)
    up_to_update(sm, SETTINGS)
    sm.add_response("update_endpoint", {"EndpointArn": ENDPOINT_ARN})
    sm.add_response("describe_endpoint", endpoint(status, OLD_CONFIG, "CUDA out of memory"))
    with pytest.raises(PromoteError, match=f"{status}: CUDA out of memory"):
        promoter.ensure_endpoint(IMAGE, AMI_13)
    sm.assert_no_pending_responses()  # no further polling


def test_throttled_polls_are_retried_until_the_endpoint_settles():
    promoter, sm, _ = stubbed(SETTINGS)
    config = up_to_update(sm, SETTINGS)
    sm.add_response("update_endpoint", {"EndpointArn": ENDPOINT_ARN})
    sm.add_client_error("describe_endpoint", "ThrottlingException", "Rate exceeded", 400)
    sm.add_client_error("describe_endpoint", "ThrottlingException", "Rate exceeded", 400)
    sm.add_response("describe_endpoint", endpoint("InService", config))
    assert promoter.ensure_endpoint(IMAGE, AMI_13)["config"] == config


def test_throttling_that_outlasts_retries_is_one_line(capsys, monkeypatch):
    promoter, sm, _ = stubbed(SETTINGS)
    up_to_update(sm, SETTINGS)
    sm.add_client_error("update_endpoint", "ThrottlingException", "Rate exceeded", 400)
    monkeypatch.setattr(promote, "Promoter", lambda settings: promoter)
    monkeypatch.setenv("IMAGE_URI", IMAGE)
    assert (
        promote.main(["--bucket", BUCKET, "--role-arn", ROLE, "--image-cuda", "13.0", "endpoint"])
        == 1
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: AWS:") and "ThrottlingException" in err and "\n" not in err


def test_an_instance_type_change_releases_autoscaling_before_the_update():
    settings = Settings(bucket=BUCKET, role_arn=ROLE, poll_s=0, instance_type="ml.g5.4xlarge")
    promoter, sm, scaling = stubbed(settings)
    config = up_to_update(sm, settings, old_type="ml.g5.2xlarge")
    resource = settings.scaling_resource_id
    dimension = "sagemaker:variant:DesiredInstanceCount"
    scaling.add_response(
        "describe_scalable_targets",
        {"ScalableTargets": [{"ServiceNamespace": "sagemaker", "ResourceId": resource,
          "ScalableDimension": dimension, "MinCapacity": 1, "MaxCapacity": 2,
          "RoleARN": ROLE, "CreationTime": "2026-11-26T00:00:00Z"}]},
    )  # fmt: skip
    scaling.add_response(
        "describe_scaling_policies",
        {"ScalingPolicies": [{"PolicyARN": POLICY_ARN, "PolicyName": "mmekit-target-tracking",
          "ServiceNamespace": "sagemaker", "ResourceId": resource, "ScalableDimension": dimension,
          "PolicyType": "TargetTrackingScaling", "CreationTime": "2026-11-26T00:00:00Z"}]},
    )  # fmt: skip
    scaling.add_response("delete_scaling_policy", {})
    scaling.add_response("deregister_scalable_target", {})
    sm.add_response("update_endpoint", {"EndpointArn": ENDPOINT_ARN})
    sm.add_response("describe_endpoint", endpoint("InService", config))
    promoter.ensure_endpoint(IMAGE, AMI_13)
    assert promoter.mutating_operations == [
        "DeleteScalingPolicy",
        "DeregisterScalableTarget",
        "UpdateEndpoint",
    ]


def test_a_failed_endpoint_is_reported_not_updated():
    promoter, sm, _ = stubbed(SETTINGS)
    model = model_name(SETTINGS, IMAGE)
    config = config_name(SETTINGS, model, AMI_13)
    sm.add_response(
        "describe_model",
        {"ModelName": model, "ModelArn": MODEL_ARN, "CreationTime": "2026-11-26T00:00:00Z"},
    )
    sm.add_response("describe_endpoint_config", config_reply(config, "ml.g5.2xlarge"))
    sm.add_response("describe_endpoint", endpoint("Failed", OLD_CONFIG, "image not found"))
    with pytest.raises(PromoteError, match="image not found.*make teardown"):
        promoter.ensure_endpoint(IMAGE, AMI_13)
    assert promoter.mutating_operations == []


def test_expected_checksums_match_what_s3_reports(tmp_path, monkeypatch):
    path = tmp_path / "small.tar.gz"
    path.write_bytes(b"x" * 1000)
    digest = hashlib.sha256(b"x" * 1000)
    assert expected_checksums(path, digest.hexdigest()) == {
        base64.b64encode(digest.digest()).decode()
    }


@pytest.mark.parametrize("status", ["UpdateRollbackFailed", "OutOfService"])
def test_an_endpoint_that_is_not_in_service_is_never_taken_as_up_to_date(status):
    promoter, sm, _ = stubbed(SETTINGS)
    model = model_name(SETTINGS, IMAGE)
    config = config_name(SETTINGS, model, AMI_13)
    sm.add_response(
        "describe_model", {"ModelName": model, "ModelArn": MODEL_ARN, "CreationTime": "2026-11-26"}
    )
    sm.add_response("describe_endpoint_config", config_reply(config, "ml.g5.2xlarge"))
    sm.add_response("describe_endpoint", endpoint(status, config, "driver mismatch"))
    with pytest.raises(PromoteError, match=f"{status} .driver mismatch"):
        promoter.ensure_endpoint(IMAGE, AMI_13)
    assert promoter.mutating_operations == []


def test_a_failed_instance_type_change_gives_the_old_config_its_autoscaling_back():
    settings = Settings(bucket=BUCKET, role_arn=ROLE, poll_s=0, instance_type="ml.g5.4xlarge")
    promoter, sm, scaling = stubbed(settings)
    up_to_update(sm, settings, old_type="ml.g5.2xlarge")
    resource = settings.scaling_resource_id
    dimension = "sagemaker:variant:DesiredInstanceCount"
    target = {"ServiceNamespace": "sagemaker", "ResourceId": resource,
              "ScalableDimension": dimension, "MinCapacity": 1, "MaxCapacity": 2,
              "RoleARN": ROLE, "CreationTime": "2026-11-26T00:00:00Z"}  # fmt: skip
    scaling.add_response("describe_scalable_targets", {"ScalableTargets": [target]})
    scaling.add_response("describe_scaling_policies", {"ScalingPolicies": []})
    scaling.add_response("deregister_scalable_target", {})
    sm.add_response("update_endpoint", {"EndpointArn": ENDPOINT_ARN})
    sm.add_response("describe_endpoint", endpoint("Failed", OLD_CONFIG, "capacity"))
    scaling.add_response("describe_scalable_targets", {"ScalableTargets": []})
    scaling.add_response("register_scalable_target", {})
    scaling.add_response("describe_scaling_policies", {"ScalingPolicies": []})
    scaling.add_response("put_scaling_policy", {"PolicyARN": POLICY_ARN, "Alarms": []})
    with pytest.raises(PromoteError, match="capacity"):
        promoter.ensure_endpoint(IMAGE, AMI_13)
    assert promoter.mutating_operations[-2:] == ["RegisterScalableTarget", "PutScalingPolicy"]
    scaling.assert_no_pending_responses()


def test_disabling_autoscaling_deregisters_the_variant(aws, store, tmp_path):
    assert run_promote(store, "--no-smoke")[0] == 0
    settings = load_settings(overrides={"bucket": BUCKET, "role_arn": ROLE})
    disabled = replace(settings, autoscaling=Autoscaling(enabled=False))
    promoter = Promoter(disabled, say=lambda line: None)
    assert promoter.scale() == {"enabled": False}
    assert "DeregisterScalableTarget" in promoter.mutating_operations
    scaling = boto3.client("application-autoscaling", region_name="us-east-1")
    assert scaling.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"] == []


def test_flags_go_before_or_after_the_subcommand(store, capsys):
    for order in (
        ["--dry-run", *argv(store, "run", "--allow-tiny")],
        [*argv(store, "run", "--allow-tiny", "--dry-run")],
    ):
        assert promote.main(order) == 0
        assert "would create endpoint config" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# The driver: InferenceAmiVersion matched to the image's torch CUDA build


def test_the_ami_table_agrees_with_botocore():
    """Every AMI is one of botocore's InferenceAmiVersion values, with the driver and CUDA
    that botocore's documentation of the shape gives it."""
    import botocore.session

    shape = (
        botocore.session.get_session()
        .get_service_model("sagemaker")
        .shape_for("ProductionVariant")
        .members["InferenceAmiVersion"]
    )
    text = re.sub(r"<[^>]+>", " ", shape.documentation)
    documented = {
        name: (int(driver), cuda)
        for name, driver, cuda in re.findall(
            r"(al2\S*-gpu-[\d-]+)\s+Accelerator: GPU\s+NVIDIA driver version: (\d+)\s+"
            r"CUDA version: ([\d.]+)",
            text,
        )
    }
    table = load_ami_table()
    assert {ami.name for ami in table} <= set(shape.enum)
    for ami in table:
        assert documented[ami.name] == (ami.driver, ami.cuda), ami.name
    # what SageMaker's guide documents for gpu-2; the others are marked as assumptions
    (gpu2,) = [ami for ami in table if ami.name == AMI_12]
    assert gpu2.families_documented
    assert set(gpu2.instance_families) == {"g4dn", "g5", "g6", "p3", "p4d", "p4de", "p5"}


def fresh_endpoint_calls(sm: Stubber, settings: Settings, ami: str) -> None:
    """No model, config or endpoint yet: create all three; CreateEndpointConfig must carry
    `ami` as the variant's InferenceAmiVersion."""
    model = model_name(settings, IMAGE)
    config = config_name(settings, model, ami)
    missing = ("ValidationException", "Could not find it", 400)
    sm.add_client_error("describe_model", *missing)
    sm.add_response("create_model", {"ModelArn": MODEL_ARN})
    sm.add_client_error("describe_endpoint_config", *missing)
    sm.add_response(
        "create_endpoint_config",
        {"EndpointConfigArn": f"arn:aws:sagemaker:us-east-1:123456789012:endpoint-config/{config}"},
        {
            "EndpointConfigName": config,
            "ProductionVariants": [
                {
                    "VariantName": "AllTraffic",
                    "ModelName": model,
                    "InstanceType": settings.instance_type,
                    "InitialInstanceCount": 1,
                    "InferenceAmiVersion": ami,
                }
            ],
            "Tags": [{"Key": "mmekit:endpoint", "Value": "mmekit"}],
        },
    )
    sm.add_client_error("describe_endpoint", *missing)
    sm.add_response("create_endpoint", {"EndpointArn": ENDPOINT_ARN})
    sm.add_response("describe_endpoint", endpoint("InService", config))


@pytest.mark.parametrize(
    ("cuda", "instance_type", "expected"),
    [
        ("13.0", "ml.g5.2xlarge", AMI_13),  # the pinned torch on the default instance
        ("13.0", "ml.g5.48xlarge", AMI_13),
        ("12.6", "ml.g5.2xlarge", AMI_12),  # a cu126 build runs on driver 535
        ("12.4", "ml.g4dn.xlarge", AMI_12),
        ("13.0", "ml.g6.xlarge", AMI_13),
        ("12.1", "ml.p3.2xlarge", AMI_12),
        ("12.8", "ml.g6e.xlarge", "al2-ami-sagemaker-inference-gpu-3-1"),  # gpu-2 lists no g6e
    ],
)
def test_create_endpoint_config_carries_the_ami_for_the_images_cuda(cuda, instance_type, expected):
    settings = replace(SETTINGS, instance_type=instance_type, image_cuda=cuda)
    choice = plan_ami(settings, IMAGE)
    assert choice.ami.name == expected
    assert f"CUDA {cuda}" in choice.reason and f"driver >= {mmekit_cuda.min_driver(cuda)}" in (
        choice.reason
    )
    promoter, sm, _ = stubbed(settings)
    fresh_endpoint_calls(sm, settings, expected)
    promoter.ensure_endpoint(IMAGE, choice.ami.name)
    sm.assert_no_pending_responses()
    assert promoter.mutating_operations == ["CreateModel", "CreateEndpointConfig", "CreateEndpoint"]


def test_changing_the_ami_makes_a_new_config_and_an_update_endpoint():
    old_settings = replace(SETTINGS, image_cuda="13.0")
    model = model_name(SETTINGS, IMAGE)
    serving = config_name(old_settings, model, AMI_13)
    new_settings = replace(SETTINGS, image_cuda="12.6")  # rebuilt with a cu126 torch
    choice = plan_ami(new_settings, IMAGE)
    assert choice.ami.name == AMI_12
    config = config_name(new_settings, model, AMI_12)
    assert config != serving
    promoter, sm, _ = stubbed(new_settings)
    sm.add_response(
        "describe_model",
        {"ModelName": model, "ModelArn": MODEL_ARN, "CreationTime": "2026-11-26T00:00:00Z"},
    )
    sm.add_client_error("describe_endpoint_config", "ValidationException", "Could not find", 400)
    sm.add_response(
        "create_endpoint_config",
        {"EndpointConfigArn": f"arn:aws:sagemaker:us-east-1:123456789012:endpoint-config/{config}"},
    )
    sm.add_response("describe_endpoint", endpoint("InService", serving))
    sm.add_response("describe_endpoint_config", config_reply(serving, "ml.g5.2xlarge"))
    sm.add_response(
        "update_endpoint",
        {"EndpointArn": ENDPOINT_ARN},
        {"EndpointName": "mmekit", "EndpointConfigName": config},
    )
    sm.add_response("describe_endpoint", endpoint("InService", config))
    assert promoter.ensure_endpoint(IMAGE, choice.ami.name)["changed"]
    sm.assert_no_pending_responses()
    assert promoter.mutating_operations == ["CreateEndpointConfig", "UpdateEndpoint"]


def test_the_full_promote_sets_the_ami_on_the_variant(aws, store, image_labels):
    image_labels[IMAGE_TAG_URI] = "12.4"  # the image's own label decides
    code, _ = run_promote(store, "--no-smoke", **{"image-cuda": ""})
    assert code == 0
    record = json.loads((store.parent / "promotion.json").read_text())
    assert record["inference_ami_version"] == AMI_12 and record["image_cuda"] == "12.4"
    sm = boto3.client("sagemaker", region_name="us-east-1")
    (variant,) = sm.describe_endpoint_config(EndpointConfigName=record["endpoint_config"])[
        "ProductionVariants"
    ]
    assert variant["InferenceAmiVersion"] == AMI_12


@pytest.mark.parametrize(
    ("flags", "label", "says"),
    [
        # a CUDA 13 image on a driver-535 AMI
        (
            {"inference-ami-version": AMI_12},
            None,
            [f"{AMI_12} has NVIDIA driver 535", ">= 580", f"use inference_ami_version {AMI_13}"],
        ),
        # an AMI that does not list the instance type
        (
            {
                "image-cuda": "12.4",
                "inference-ami-version": AMI_12,
                "instance-type": "ml.g6e.xlarge",
            },
            None,
            [f"{AMI_12} does not list ml.g6e", "change instance_type"],
        ),
        # no AMI with a driver for CUDA 13 lists p3 (V100)
        ({"instance-type": "ml.p3.2xlarge"}, None, ["lists ml.p3", "TORCH_INDEX_URL="]),
        ({"instance-type": "ml.m5.xlarge"}, None, ["lists ml.m5"]),  # no GPU at all
        ({"image-cuda": ""}, None, ["CUDA is unknown", 'image_cuda: "13.0"']),
        ({}, "12.4", ["image_cuda '13.0'", "says CUDA 12.4", "remove image_cuda"]),
        ({"image-cuda": ""}, "None", ["CPU-only build"]),
        ({"inference-ami-version": "al2-ami-sagemaker-inference-gpu-9"}, None, ["not in configs"]),
        ({"image-cuda": "cu130"}, None, ["expected <major>.<minor>"]),
    ],
)
def test_a_combination_that_cannot_run_stops_before_any_call(
    aws, store, image_labels, monkeypatch, capsys, flags, label, says
):
    if label is not None:
        image_labels[IMAGE_TAG_URI] = label
    made: list[str] = []

    def counting_factory(service: str, *args, **kwargs):
        made.append(service)
        return boto3.client(service, region_name="us-east-1")

    monkeypatch.setattr("scripts.aws.make_client", counting_factory)
    assert promote.main(argv(store, "run", "--allow-tiny", "--no-smoke", **flags)) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    for text in says:
        assert text in err
    assert made == []  # no AWS client at all, so no call that creates anything
    assert s3_keys() == {}
    sm = boto3.client("sagemaker", region_name="us-east-1")
    assert sm.list_models()["Models"] == [] and sm.list_endpoint_configs()["EndpointConfigs"] == []


def test_a_known_mismatch_stops_before_the_image_is_built(aws, store, monkeypatch, capsys):
    monkeypatch.delenv("IMAGE_URI")

    def no_build(*args, **kwargs):
        raise AssertionError("built an image for a promotion that cannot run")

    monkeypatch.setattr(promote, "build_and_push_image", no_build)
    flags = {"inference-ami-version": AMI_12}
    assert promote.main(argv(store, "run", "--allow-tiny", "--no-smoke", **flags)) == 1
    assert "has NVIDIA driver 535" in capsys.readouterr().err


def test_dry_run_says_what_would_stop_a_mismatch(aws, store, capsys, monkeypatch):
    monkeypatch.setattr("scripts.aws.make_client", lambda *a, **k: pytest.fail("a client"))
    flags = {"inference-ami-version": AMI_12}
    assert promote.main(argv(store, "run", "--allow-tiny", "--dry-run", **flags)) == 1
    out = capsys.readouterr().out
    assert "inference AMI: none can be chosen" in out
    assert f"would stop: inference_ami_version {AMI_12} has NVIDIA driver 535" in out


def test_image_cuda_in_yaml_must_be_quoted(tmp_path):
    config = tmp_path / "promote.yaml"
    config.write_text("image_cuda: 12.10\n")  # YAML: the float 12.1
    with pytest.raises(PromoteError, match="quoted string"):
        load_settings(config, {})


# ---------------------------------------------------------------------------------------------
# The smoke test proves the device


def png() -> str:
    buffer = io.BytesIO()
    Image.new("L", (4, 4)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def smoke_promoter(devices: dict[str, str | None]) -> tuple[Promoter, list]:
    runtime = boto3.client(
        "sagemaker-runtime",
        region_name="us-east-1",
        aws_access_key_id="x",
        aws_secret_access_key="y",
    )
    stub = Stubber(runtime)
    artifacts = []
    for model, device in devices.items():
        reply: dict = {"generated_image": png(), "scores": [0.1, 0.2, 0.3]}
        if device is not None:
            reply["device"] = device
        data = json.dumps(reply).encode()
        stub.add_response(
            "invoke_endpoint",
            {"Body": StreamingBody(io.BytesIO(data), len(data)), "ContentType": "application/json"},
        )
        artifacts.append(Artifact(model, Path(f"{model}.tar.gz"), "ab" * 32, 1, "full"))
    stub.activate()
    promoter = Promoter(SETTINGS, client_factory=lambda s: runtime, say=lambda line: None)
    return promoter, artifacts


SMOKE_REQUESTS = {model: {"image": "x"} for model in MODELS}


def test_smoke_passes_when_every_model_runs_on_cuda():
    promoter, artifacts = smoke_promoter({"sam": "cuda:0", "lama": "cuda:0", "sd": "cuda:0"})
    assert promoter.smoke(artifacts, SMOKE_REQUESTS) == {m: "ok" for m in MODELS}


def test_smoke_fails_when_a_model_runs_on_the_cpu():
    promoter, artifacts = smoke_promoter({"sam": "cuda:0", "lama": "cpu", "sd": "cuda:0"})
    with pytest.raises(PromoteError, match="not on the GPU") as raised:
        promoter.smoke(artifacts, SMOKE_REQUESTS)
    message = str(raised.value)
    assert f"lama-{'ab' * 6}.tar.gz on cpu" in message and "sam-" not in message


def test_smoke_fails_when_a_model_does_not_say_its_device():
    promoter, artifacts = smoke_promoter({"sam": "cuda:0", "lama": None, "sd": "cuda:0"})
    with pytest.raises(PromoteError, match="did not report its device"):
        promoter.smoke(artifacts, SMOKE_REQUESTS)


@pytest.mark.parametrize(("cuda", "expected"), [("13.0", AMI_13), ("12.6", AMI_12)])
def test_every_g5_size_gets_the_ami_the_readme_says(cuda, expected):
    import yaml

    table = yaml.safe_load((PROJECT_ROOT / "configs" / "instances.yaml").read_text())
    sizes = [name for name in table["instances"] if name.startswith("ml.g5.")]
    assert len(sizes) >= 6
    for size in sizes:
        settings = replace(SETTINGS, instance_type=size, image_cuda=cuda)
        assert plan_ami(settings, None).ami.name == expected, size
    readme = (PROJECT_ROOT / "README.md").read_text()
    assert f"`{expected}`" in readme
