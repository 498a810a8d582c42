"""Promote the tested archives to a SageMaker GPU multi-model endpoint: `make promote`.

    python -m scripts.promote run [--dry-run] [--force] [--allow-tiny] [--no-smoke]
    python -m scripts.promote gate | upload | endpoint | scale | smoke   # one step on its own
    python -m scripts.promote models                 # the endpoint's models (TargetModel names)
    python -m scripts.promote teardown [--yes]       # endpoint, configs, models (not S3)
    python -m scripts.promote iam-policy             # least-privilege policies to attach

`run` does, in order: image (IMAGE_URI, or build and push where Docker runs; always used by
digest), driver (the InferenceAmiVersion whose NVIDIA driver runs the image's torch CUDA build,
from configs/inference-amis.yaml; a combination that cannot run stops here), gate (only
tarballs the local tests passed), upload (content-addressed keys, never overwritten, verified by
SHA-256), endpoint (model and config named by content hash; create, or update and check the
update really took), scale (Application Auto Scaling), smoke (every model through
sagemaker-runtime, each reporting a CUDA device), then writes promotion.json. A re-run with the
same inputs makes no mutating call. `--dry-run` prints the plan and creates no AWS client.

Settings: configs/promote.yaml, overridden by MMEKIT_<KEY> variables and then by flags.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import io
import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

import mmekit_cuda  # the driver/CUDA rule the handlers also use (torch-free)
from scripts import PROJECT_ROOT
from scripts.archive import DEFAULT_STORE, read_manifest
from scripts.models import MODELS, spec
from scripts.weights import sha256_of

SETTINGS_FILE = PROJECT_ROOT / "configs" / "promote.yaml"
AMI_TABLE = PROJECT_ROOT / "configs" / "inference-amis.yaml"
TESTED_RECORD = PROJECT_ROOT / ".mmekit" / "tested.json"
PROMOTION_FILE = PROJECT_ROOT / "promotion.json"
MULTIPART_THRESHOLD = 64 * 1024 * 1024  # one PUT below this; parts of PART_SIZE above
PART_SIZE = 64 * 1024 * 1024
UPLOAD_THREADS = 8
# Operations that change nothing: everything else counts as a mutating call.
READ_ONLY = re.compile(r"^(Describe|List|Get|Head|Invoke)")
SECRET_NAME = re.compile(r"SECRET|PASSWORD|TOKEN|CREDENTIAL|PRIVATE|ACCESS_KEY|API_KEY", re.I)
AWS_KEY_VALUE = re.compile(r"(AKIA|ASIA)[A-Z0-9]{16}")
TRANSITIONAL = {"Creating", "Updating", "SystemUpdating", "RollingBack", "Deleting"}
ECR_IMAGE = re.compile(
    r"^(?P<registry>\d{12})\.dkr\.ecr\.(?P<region>[a-z0-9-]+)\.amazonaws\.com(\.cn)?/"
    r"(?P<repository>[a-z0-9._/-]+):(?P<tag>[\w.-]+)$"
)
DIGEST_IMAGE = re.compile(r"^[^@\s]+@sha256:[0-9a-f]{64}$")


class PromoteError(Exception):
    """Promotion stopped: the message says why and what to do."""


# ---------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class Autoscaling:
    enabled: bool = True
    min_capacity: int = 1
    max_capacity: int = 2
    metric: str = "SageMakerVariantInvocationsPerInstance"
    target_value: float = 20.0
    scale_in_cooldown_s: int = 600
    scale_out_cooldown_s: int = 120


@dataclass(frozen=True)
class Settings:
    region: str = "us-east-1"
    bucket: str = ""
    prefix: str = "mmekit/models"
    role_arn: str = ""
    endpoint_name: str = "mmekit"
    image_repository: str = "mmekit"
    instance_type: str = "ml.g5.2xlarge"
    instance_count: int = 1
    variant_name: str = "AllTraffic"
    # torch.version.cuda inside the image, for images whose label cannot be read here (only in
    # a registry); checked against the label when both are known
    image_cuda: str = ""
    inference_ami_version: str = ""  # empty: chosen from configs/inference-amis.yaml
    container_environment: dict[str, str] = field(default_factory=dict)
    autoscaling: Autoscaling = field(default_factory=Autoscaling)
    wait_timeout_s: float = 3600.0
    poll_s: float = 30.0
    smoke_timeout_s: float = 900.0

    @property
    def model_data_url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}/"

    @property
    def account_id(self) -> str:
        """From the execution role's ARN (arn:aws:iam::<account>:role/<name>)."""
        parts = self.role_arn.split(":")
        return parts[4] if len(parts) > 5 and parts[4].isdigit() else "<ACCOUNT_ID>"

    @property
    def scaling_resource_id(self) -> str:
        return f"endpoint/{self.endpoint_name}/variant/{self.variant_name}"


def load_settings(
    path: Path = SETTINGS_FILE,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """configs/promote.yaml, then MMEKIT_<KEY> variables, then flags (None = not given)."""
    environ = os.environ if environ is None else environ
    raw = yaml.safe_load(path.read_text()) or {}
    unknown = set(raw) - {f.name for f in fields(Settings)}
    if unknown:
        raise PromoteError(f"{path.name}: unknown settings {', '.join(sorted(unknown))}")
    values: dict[str, Any] = dict(raw)
    for item in fields(Settings):
        name = f"MMEKIT_{item.name.upper()}"
        if name in environ and item.name not in ("container_environment", "autoscaling"):
            values[item.name] = environ[name]
    if not values.get("region"):  # as the AWS CLI: the environment, then us-east-1
        region = environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION")
        values["region"] = region or "us-east-1"
    for name, value in (overrides or {}).items():
        if value is not None:
            values[name] = value
    for name in ("image_cuda", "inference_ami_version"):
        if not isinstance(values.get(name, ""), str):  # YAML reads 12.10 as the float 12.1
            raise PromoteError(f'{path.name}: {name} must be a quoted string, e.g. "13.0"')
    try:
        scaling = Autoscaling(**(values.pop("autoscaling", None) or {}))
        settings = Settings(autoscaling=scaling, **values)
        settings = replace(
            settings,
            instance_count=int(settings.instance_count),
            prefix=settings.prefix.strip("/"),
            wait_timeout_s=float(settings.wait_timeout_s),
            poll_s=float(settings.poll_s),
            smoke_timeout_s=float(settings.smoke_timeout_s),
            container_environment={
                str(k): str(v) for k, v in (settings.container_environment or {}).items()
            },
        )
    except (TypeError, ValueError) as error:
        raise PromoteError(f"{path.name}: {error}") from None
    return settings


def check_settings(settings: Settings) -> None:
    """What a real promotion needs; one line naming the setting and where to set it."""
    for name in ("region", "bucket", "role_arn", "endpoint_name"):
        if not getattr(settings, name):
            raise PromoteError(
                f"no {name}: set it in configs/promote.yaml, MMEKIT_{name.upper()}=... "
                f"or --{name.replace('_', '-')}"
            )
    if not re.fullmatch(r"[a-zA-Z0-9](-*[a-zA-Z0-9]){0,46}", settings.endpoint_name):
        raise PromoteError(
            f"endpoint_name {settings.endpoint_name!r}: letters, digits and hyphens, at most "
            "47 characters (names of models and configs add a 16-character hash)"
        )
    if settings.instance_count < 1:
        raise PromoteError("instance_count must be at least 1")
    scaling = settings.autoscaling
    if scaling.enabled and not 1 <= scaling.min_capacity <= scaling.max_capacity:
        raise PromoteError("autoscaling: need 1 <= min_capacity <= max_capacity")
    for name, value in settings.container_environment.items():
        if SECRET_NAME.search(name) or AWS_KEY_VALUE.search(value):
            raise PromoteError(
                f"container_environment {name}: looks like a secret; the execution role gives "
                "the container its AWS access, and secrets belong in Secrets Manager"
            )


# ---------------------------------------------------------------------------------------------
# Artifacts and the gate


@dataclass(frozen=True)
class Artifact:
    model: str
    path: Path
    sha256: str
    size: int
    tier: str

    @property
    def target_model(self) -> str:
        """The TargetModel name, content-addressed: a changed tarball is a new model."""
        return f"{self.model}-{self.sha256[:12]}.tar.gz"

    def key(self, settings: Settings) -> str:
        return f"{settings.prefix}/{self.target_model}"


def read_artifacts(store: Path = DEFAULT_STORE, models: tuple[str, ...] = MODELS) -> list[Artifact]:
    """The manifest's tarballs, each re-hashed: what is promoted is what was built and tested."""
    entries = read_manifest(store)["models"]
    artifacts = []
    for model in models:
        entry = entries.get(model)
        path = store / f"{model}.tar.gz"
        if entry is None or not path.is_file():
            raise PromoteError(f"no {path.name} in {store}: run `make archive` first")
        digest = sha256_of(path)
        if digest != entry["sha256"]:
            raise PromoteError(
                f"{path.name} changed since `make archive` wrote the manifest: run it again"
            )
        artifacts.append(Artifact(model, path, digest, path.stat().st_size, entry["tier"]))
    return artifacts


def read_tested(record: Path = TESTED_RECORD) -> dict[str, dict]:
    try:
        return json.loads(record.read_text()).get("tarballs", {})
    except (OSError, ValueError):
        return {}


def gate(
    artifacts: list[Artifact],
    record: Path = TESTED_RECORD,
    force: bool = False,
    allow_tiny: bool = False,
    say: Callable[[str], None] = print,
) -> None:
    """Only tarballs whose SHA-256 a passing test run recorded; never random weights unasked."""
    tiny = [a.model for a in artifacts if a.tier in ("tiny", "synthetic")]
    if tiny and not allow_tiny:
        raise PromoteError(
            f"{', '.join(tiny)}: random-weight archives (outputs are noise); `make fetch-weights`"
            " and `make archive` first, or --allow-tiny to promote them anyway"
        )
    tested = read_tested(record)
    untested = [a for a in artifacts if a.sha256 not in tested]
    if untested and not force:
        names = ", ".join(f"{a.path.name} ({a.sha256[:12]})" for a in untested)
        raise PromoteError(
            f"not tested: {names}; run `make test-handlers` (it tests model_store/ and records "
            "what passed), or --force to promote untested archives"
        )
    for artifact in untested:
        say(f"WARNING: promoting {artifact.path.name} untested (--force)")
    for artifact in artifacts:
        if artifact.sha256 in tested:
            when = tested[artifact.sha256].get("tested_at", "?")
            say(f"gate: {artifact.path.name} {artifact.sha256[:12]} passed the tests ({when})")


def served_digests(store: Path, models: tuple[str, ...] = MODELS) -> dict[str, str]:
    """model -> SHA-256 of the tarballs in a store, taken when a test session serves them."""
    return {
        model: sha256_of(store / f"{model}.tar.gz")
        for model in models
        if (store / f"{model}.tar.gz").is_file()
    }


def record_tested(
    store: Path,
    tests: str,
    record: Path = TESTED_RECORD,
    digests: Mapping[str, str] | None = None,
) -> list[str]:
    """Called by a passing test session with the hashes of the tarballs it served (taken when
    it served them, so a rebuild during the run is not recorded as tested)."""
    entries = read_manifest(store)["models"]
    digests = served_digests(store) if digests is None else digests
    tested = read_tested(record)
    now = datetime.now(UTC).isoformat(timespec="seconds")
    recorded = []
    for model, digest in digests.items():
        if model not in entries:
            continue
        tested[digest] = {
            "model": model,
            "tier": entries[model]["tier"],
            "tested_at": now,
            "tests": tests,
        }
        recorded.append(digest)
    record.parent.mkdir(parents=True, exist_ok=True)
    staging = record.with_suffix(".partial")
    staging.write_text(json.dumps({"tarballs": tested}, indent=2, sort_keys=True) + "\n")
    staging.replace(record)
    return recorded


# ---------------------------------------------------------------------------------------------
# The driver: an InferenceAmiVersion whose NVIDIA driver runs the image's torch CUDA build


@dataclass(frozen=True)
class InferenceAmi:
    name: str
    driver: int  # the NVIDIA driver branch
    cuda: str
    instance_families: tuple[str, ...]
    families_documented: bool  # False: the table's assumption, not AWS's documentation


@dataclass(frozen=True)
class AmiChoice:
    ami: InferenceAmi
    image_cuda: str
    cuda_source: str  # where the image's CUDA came from
    reason: str  # one line: why this AMI (--dry-run and the run print it)


def botocore_ami_versions() -> tuple[str, ...]:
    """The InferenceAmiVersion values botocore's SageMaker model knows (no client is made)."""
    import botocore.session

    model = botocore.session.get_session().get_service_model("sagemaker")
    return tuple(model.shape_for("ProductionVariant").members["InferenceAmiVersion"].enum)


def load_ami_table(path: Path = AMI_TABLE) -> list[InferenceAmi]:
    """configs/inference-amis.yaml, in order of preference; each name checked against botocore."""
    raw = (yaml.safe_load(path.read_text()) or {}).get("amis") or {}
    known = botocore_ami_versions()
    amis = []
    for name, entry in raw.items():
        if name not in known:
            raise PromoteError(
                f"{path.name}: {name} is not an InferenceAmiVersion botocore knows "
                f"({', '.join(known)})"
            )
        try:
            mmekit_cuda.cuda_major(entry["cuda"])
            amis.append(
                InferenceAmi(
                    name=name,
                    driver=int(entry["driver"]),
                    cuda=str(entry["cuda"]),
                    instance_families=tuple(str(f) for f in entry["instance_families"]),
                    families_documented=bool(entry["families_documented"]),
                )
            )
        except (KeyError, TypeError, ValueError) as error:
            raise PromoteError(f"{path.name}: {name}: {error}") from None
    if not amis:
        raise PromoteError(f"{path.name}: no AMIs under `amis:`")
    return amis


def instance_family(instance_type: str) -> str:
    """ml.g5.2xlarge -> g5."""
    match = re.fullmatch(r"ml\.([a-z0-9-]+)\.[a-z0-9-]+", instance_type)
    if match is None:
        raise PromoteError(f"instance_type {instance_type!r}: expected ml.<family>.<size>")
    return match[1]


def image_cuda(settings: Settings, image_ref: str | None) -> tuple[str, str]:
    """torch.version.cuda of the image, and where it came from: the image's label (read with
    `docker image inspect` where the image is local), else image_cuda from the settings. The
    venv's torch is never taken for it: the image may be built from another wheel index."""
    from scripts import image

    label = image.image_torch_cuda(image_ref) if image_ref else None
    setting = settings.image_cuda.strip()
    if label is not None:
        if label in ("", "None"):
            raise PromoteError(
                f"{image_ref}: its torch is a CPU-only build ({image.CUDA_LABEL}="
                f"{label!r}); a GPU endpoint needs a CUDA build of torch in the image"
            )
        if setting and setting != label:
            raise PromoteError(
                f"image_cuda {setting!r} in the settings, but {image_ref} says CUDA {label} "
                f"(label {image.CUDA_LABEL}): remove image_cuda or correct it"
            )
        return label, f"label {image.CUDA_LABEL} of {image_ref}"
    if setting:
        return setting, "the image_cuda setting"
    raise PromoteError(
        "the image's CUDA is unknown (no local image here carries the label "
        f"{image.CUDA_LABEL}): set image_cuda "
        'in configs/promote.yaml to its torch.version.cuda, e.g. image_cuda: "13.0" (or '
        "MMEKIT_IMAGE_CUDA=13.0, --image-cuda 13.0); `docker run --rm --entrypoint python "
        '<image> -c "import torch; print(torch.version.cuda)"` prints it'
    )


def choose_ami(
    amis: list[InferenceAmi], cuda: str, cuda_source: str, settings: Settings
) -> AmiChoice:
    """The first AMI of the table whose driver runs `cuda` and that lists the instance type's
    family, or the explicit inference_ami_version if it does both; otherwise PromoteError,
    before any AWS call, saying what to change."""
    try:
        needed = mmekit_cuda.min_driver(cuda)
    except ValueError as error:
        raise PromoteError(f"image CUDA from {cuda_source}: {error}") from None
    family = instance_family(settings.instance_type)
    rule = (
        f"the image's torch is built for CUDA {cuda} ({cuda_source}), which needs driver "
        f">= {needed}"
    )

    def fits(ami: InferenceAmi) -> bool:
        return ami.driver >= needed and family in ami.instance_families

    fitting = [ami for ami in amis if fits(ami)]
    suggestion = (
        f"use inference_ami_version {fitting[0].name} (driver {fitting[0].driver})"
        if fitting
        else f"no AMI in {AMI_TABLE.name} fits ml.{family} with driver >= {needed}"
    )
    older = f"or build the image with a CUDA 12 torch: {mmekit_cuda.OLDER_TORCH_HINT}"
    wanted = settings.inference_ami_version.strip()
    if wanted:
        by_name = {ami.name: ami for ami in amis}
        if wanted not in by_name:
            known = botocore_ami_versions()
            where = "botocore knows it" if wanted in known else f"botocore knows {', '.join(known)}"
            raise PromoteError(
                f"inference_ami_version {wanted!r} is not in configs/{AMI_TABLE.name} ({where}): "
                "add its driver, CUDA and instance families there, or use one listed"
            )
        ami = by_name[wanted]
        if ami.driver < needed:
            raise PromoteError(
                f"inference_ami_version {ami.name} has NVIDIA driver {ami.driver}, but {rule}: "
                f"{suggestion}, {older}"
            )
        if family not in ami.instance_families:
            raise PromoteError(
                f"inference_ami_version {ami.name} does not list ml.{family} (it lists "
                f"{', '.join(ami.instance_families)}): {suggestion}, or change instance_type"
            )
        chosen, how = ami, "inference_ami_version in the settings"
    elif fitting:
        chosen, how = fitting[0], f"the first in {AMI_TABLE.name} that fits"
    else:
        supported = sorted(
            {f for ami in amis if ami.driver >= needed for f in ami.instance_families}
        )
        raise PromoteError(
            f"no InferenceAmiVersion in configs/{AMI_TABLE.name} runs this: {rule}, and none "
            f"with such a driver lists ml.{family} ({', '.join(supported) or 'none'} do): change "
            f"instance_type, {older}"
        )
    listed = "as documented" if chosen.families_documented else "the table's assumption"
    reason = (
        f"{rule}; {chosen.name} has driver {chosen.driver} (CUDA {chosen.cuda}) and lists "
        f"ml.{family} ({listed}); {how}"
    )
    return AmiChoice(chosen, cuda, cuda_source, reason)


def plan_ami(
    settings: Settings, image_ref: str | None, amis: list[InferenceAmi] | None = None
) -> AmiChoice:
    cuda, source = image_cuda(settings, image_ref)
    return choose_ami(load_ami_table() if amis is None else amis, cuda, source, settings)


# ---------------------------------------------------------------------------------------------
# Names: content hashes, so the same inputs name the same resources


def short_hash(value: object) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def model_name(settings: Settings, image: str) -> str:
    spec = {
        "image": image,
        "role": settings.role_arn,
        "data": settings.model_data_url,
        "env": settings.container_environment,
    }
    return f"{settings.endpoint_name}-m-{short_hash(spec)}"


def config_name(settings: Settings, model: str, ami: str) -> str:
    spec = {
        "model": model,
        "type": settings.instance_type,
        "count": settings.instance_count,
        "variant": settings.variant_name,
        "ami": ami,  # another driver is another config, and an UpdateEndpoint
    }
    return f"{settings.endpoint_name}-c-{short_hash(spec)}"


# ---------------------------------------------------------------------------------------------
# The promoter: every AWS call goes through clients from one factory (scripts.aws.make_client)


def error_code(error: Exception) -> str:
    return getattr(error, "response", {}).get("Error", {}).get("Code", "")


def is_not_found(error: Exception) -> bool:
    from botocore.exceptions import ClientError

    if not isinstance(error, ClientError):
        return False
    code = error_code(error)
    message = error.response.get("Error", {}).get("Message", "")
    status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return (
        code in ("404", "NoSuchKey", "NotFound", "ResourceNotFound", "ObjectNotFoundException")
        or status == 404
        or (code == "ValidationException" and "Could not find" in message)
    )


def b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


def part_ranges(size: int, part_size: int = PART_SIZE) -> list[tuple[int, int]]:
    return [(start, min(part_size, size - start)) for start in range(0, size, part_size)] or [
        (0, 0)
    ]


def expected_checksums(path: Path, sha256_hex: str, part_size: int = PART_SIZE) -> set[str]:
    """What S3 reports as ChecksumSHA256 for our upload: the object's SHA-256 for one PUT, the
    composite (SHA-256 of the parts' SHA-256s, "-<parts>") for a multipart upload."""
    whole = b64(bytes.fromhex(sha256_hex))
    size = path.stat().st_size
    if size < MULTIPART_THRESHOLD:
        return {whole}
    digests = b""
    with open(path, "rb") as stream:
        for _, length in part_ranges(size, part_size):
            digests += hashlib.sha256(stream.read(length)).digest()
    composite = b64(hashlib.sha256(digests).digest())
    return {whole, composite, f"{composite}-{len(part_ranges(size, part_size))}"}


class Progress:
    """A tqdm bar on a terminal, otherwise nothing (no bar noise in logs)."""

    def __init__(self, total: int, label: str) -> None:
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="B", unit_scale=True, desc=label, leave=False)
        self.lock = threading.Lock()

    def update(self, count: int) -> None:
        if self.bar is not None:
            with self.lock:
                self.bar.update(count)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclass
class Promoter:
    settings: Settings
    client_factory: Callable[[str], Any] | None = None
    say: Callable[[str], None] = print
    sleep: Callable[[float], None] = time.sleep
    operations: list[str] = field(default_factory=list)
    _clients: dict[str, Any] = field(default_factory=dict)

    # -- clients -------------------------------------------------------------------------------

    def client(self, service: str) -> Any:
        if service not in self._clients:
            if self.client_factory is None:
                from scripts.aws import make_client

                client = make_client(service, self.settings.region)
            else:
                client = self.client_factory(service)
            client.meta.events.register("before-parameter-build.*.*", self._log_operation)
            self._clients[service] = client
        return self._clients[service]

    def _log_operation(self, model: Any, **_: Any) -> None:
        self.operations.append(model.name)

    @property
    def mutating_operations(self) -> list[str]:
        return [name for name in self.operations if not READ_ONLY.match(name)]

    # -- 1. image --------------------------------------------------------------------------------

    def resolve_image(self, image_uri: str) -> str:
        """The image by digest: IMAGE_URI as given when it has one, else its ECR tag resolved."""
        if DIGEST_IMAGE.match(image_uri):
            return image_uri
        match = ECR_IMAGE.match(image_uri)
        if not match:
            raise PromoteError(
                f"IMAGE_URI={image_uri}: give an ECR image, <account>.dkr.ecr.<region>."
                "amazonaws.com/<repository>:<tag>, or any image @sha256:<digest>"
            )
        try:
            described = self.client("ecr").describe_images(
                registryId=match["registry"],
                repositoryName=match["repository"],
                imageIds=[{"imageTag": match["tag"]}],
            )
        except Exception as error:
            if error_code(error) in ("ImageNotFoundException", "RepositoryNotFoundException"):
                raise PromoteError(f"{image_uri} is not in ECR: push it first") from None
            raise
        digest = described["imageDetails"][0]["imageDigest"]
        repository = image_uri.rsplit(":", 1)[0]
        self.say(f"image: {image_uri} is {digest}")
        return f"{repository}@{digest}"

    # -- 3. upload -------------------------------------------------------------------------------

    def head(self, key: str) -> dict | None:
        try:
            return self.client("s3").head_object(
                Bucket=self.settings.bucket, Key=key, ChecksumMode="ENABLED"
            )
        except Exception as error:
            if is_not_found(error):
                return None
            raise

    def verify(self, artifact: Artifact, key: str, head: dict, expected: set[str]) -> None:
        reported = head.get("ChecksumSHA256")
        if reported not in expected:
            raise PromoteError(
                f"s3://{self.settings.bucket}/{key} holds other bytes (ChecksumSHA256 "
                f"{reported or 'missing'}, expected {sorted(expected)[0]}): refusing to use or "
                "overwrite it; find out who wrote it, delete it, and promote again"
            )

    def upload(self, artifacts: list[Artifact]) -> list[dict]:
        """Each tarball once, at its content-addressed key: skipped when an identical object is
        there, never overwritten, verified by S3's SHA-256 afterwards."""
        done = []
        for artifact in artifacts:
            key = artifact.key(self.settings)
            expected = expected_checksums(artifact.path, artifact.sha256)
            existing = self.head(key)
            if existing is not None:
                self.verify(artifact, key, existing, expected)
                self.say(f"upload: s3://{self.settings.bucket}/{key} already there, verified")
                state = "present"
            else:
                self.say(
                    f"upload: {artifact.path.name} -> s3://{self.settings.bucket}/{key} "
                    f"({artifact.size / 1e6:.1f} MB)"
                )
                self._put(artifact, key)
                uploaded = self.head(key)
                if uploaded is None:
                    raise PromoteError(f"s3://{self.settings.bucket}/{key} missing after upload")
                self.verify(artifact, key, uploaded, expected)
                state = "uploaded"
            done.append({"model": artifact.model, "key": key, "state": state})
        return done

    def _put(self, artifact: Artifact, key: str) -> None:
        s3, bucket = self.client("s3"), self.settings.bucket
        progress = Progress(artifact.size, artifact.path.name)
        try:
            if artifact.size < MULTIPART_THRESHOLD:
                body = artifact.path.read_bytes()
                s3.put_object(
                    Bucket=bucket,
                    Key=key,
                    Body=body,
                    ChecksumAlgorithm="SHA256",
                    ChecksumSHA256=b64(bytes.fromhex(artifact.sha256)),
                    IfNoneMatch="*",  # someone else's object at this key stays theirs
                )
                progress.update(len(body))
            else:
                self._put_multipart(artifact, key, progress)
        except Exception as error:
            if error_code(error) in ("PreconditionFailed", "ConditionalRequestConflict"):
                raise PromoteError(
                    f"s3://{bucket}/{key} appeared while uploading: promote again to verify it"
                ) from None
            raise
        finally:
            progress.close()

    def _put_multipart(self, artifact: Artifact, key: str, progress: Progress) -> None:
        s3, bucket = self.client("s3"), self.settings.bucket
        upload_id = s3.create_multipart_upload(Bucket=bucket, Key=key, ChecksumAlgorithm="SHA256")[
            "UploadId"
        ]

        def send(number: int, start: int, length: int) -> dict:
            with open(artifact.path, "rb") as stream:
                stream.seek(start)
                chunk = stream.read(length)
            checksum = b64(hashlib.sha256(chunk).digest())
            reply = s3.upload_part(
                Bucket=bucket,
                Key=key,
                UploadId=upload_id,
                PartNumber=number,
                Body=io.BytesIO(chunk),
                ChecksumAlgorithm="SHA256",
                ChecksumSHA256=checksum,
            )
            progress.update(length)
            return {"ETag": reply["ETag"], "PartNumber": number, "ChecksumSHA256": checksum}

        try:
            ranges = part_ranges(artifact.size)
            with ThreadPoolExecutor(max_workers=UPLOAD_THREADS) as pool:
                futures = [
                    pool.submit(send, number, start, length)
                    for number, (start, length) in enumerate(ranges, 1)
                ]
                parts = [future.result() for future in futures]
            s3.complete_multipart_upload(
                Bucket=bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
                IfNoneMatch="*",
            )
        except BaseException:
            s3.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
            raise

    # -- 4. endpoint -----------------------------------------------------------------------------

    def describe(self, operation: str, **arguments: Any) -> dict | None:
        try:
            return getattr(self.client("sagemaker"), operation)(**arguments)
        except Exception as error:
            if is_not_found(error):
                return None
            raise

    def ensure_model(self, image: str) -> str:
        name = model_name(self.settings, image)
        if self.describe("describe_model", ModelName=name) is None:
            self.say(f"endpoint: creating model {name}")
            self.client("sagemaker").create_model(
                ModelName=name,
                ExecutionRoleArn=self.settings.role_arn,
                PrimaryContainer={
                    "Image": image,
                    "Mode": "MultiModel",
                    "ModelDataUrl": self.settings.model_data_url,
                    "Environment": dict(self.settings.container_environment),
                },
                Tags=[{"Key": "mmekit:endpoint", "Value": self.settings.endpoint_name}],
            )
        return name

    def ensure_config(self, model: str, ami: str) -> str:
        name = config_name(self.settings, model, ami)
        if self.describe("describe_endpoint_config", EndpointConfigName=name) is None:
            self.say(f"endpoint: creating endpoint config {name}")
            self.client("sagemaker").create_endpoint_config(
                EndpointConfigName=name,
                ProductionVariants=[
                    {
                        "VariantName": self.settings.variant_name,
                        "ModelName": model,
                        "InstanceType": self.settings.instance_type,
                        "InitialInstanceCount": self.settings.instance_count,
                        # the driver the image's CUDA needs (the host default may be 470)
                        "InferenceAmiVersion": ami,
                    }
                ],
                Tags=[{"Key": "mmekit:endpoint", "Value": self.settings.endpoint_name}],
            )
        return name

    def ensure_endpoint(self, image: str, ami: str) -> dict:
        """Create the endpoint, or move it to the config these inputs name (`ami`: the
        InferenceAmiVersion from choose_ami). The config in service is never deleted here; a
        rollback, silent or not, fails the promotion."""
        model = self.ensure_model(image)
        config = self.ensure_config(model, ami)
        name = self.settings.endpoint_name
        current = self.describe("describe_endpoint", EndpointName=name)
        if current is None:
            self.say(f"endpoint: creating {name} on {config}")
            self.client("sagemaker").create_endpoint(
                EndpointName=name,
                EndpointConfigName=config,
                Tags=[{"Key": "mmekit:endpoint", "Value": name}],
            )
            previous = None
        else:
            if current["EndpointStatus"] in TRANSITIONAL:
                self.say(f"endpoint: {name} is {current['EndpointStatus']}; waiting first")
                current = self.wait(name, expected_config=None)
            if current["EndpointStatus"] != "InService":  # Failed, UpdateRollbackFailed, ...
                raise PromoteError(
                    f"endpoint {name} is {current['EndpointStatus']} "
                    f"({current.get('FailureReason', 'no reason given')}): fix it in the "
                    "console or `make teardown`, then promote again"
                )
            previous = current["EndpointConfigName"]
            if previous == config:
                self.say(f"endpoint: {name} already serves {config}")
                return {"endpoint": name, "config": config, "model": model, "changed": False}
            released = self.release_scaling_if_instance_type_changes(previous)
            self.say(f"endpoint: updating {name} from {previous} to {config}")
            try:
                self.client("sagemaker").update_endpoint(
                    EndpointName=name, EndpointConfigName=config
                )
                self.wait(name, expected_config=config, previous_config=previous)
            except BaseException:
                if released:  # the old config still serves: give it its autoscaling back
                    self.say("scale: restoring autoscaling on the config still in service")
                    self.scale()
                raise
            return {"endpoint": name, "config": config, "model": model, "changed": True}
        self.wait(name, expected_config=config, previous_config=previous)
        return {"endpoint": name, "config": config, "model": model, "changed": True}

    def release_scaling_if_instance_type_changes(self, previous_config: str) -> bool:
        """SageMaker refuses an update that changes a scaled variant's instance type: drop the
        policy and target first (the scale step puts them back). True if it dropped them."""
        described = self.describe("describe_endpoint_config", EndpointConfigName=previous_config)
        variants = (described or {}).get("ProductionVariants", [])
        old_types = {v["VariantName"]: v["InstanceType"] for v in variants}
        if old_types.get(self.settings.variant_name) in (None, self.settings.instance_type):
            return False
        if not self.release_scaling():
            return False
        self.say("scale: deregistered the variant while its instance type changes")
        return True

    def release_scaling(self) -> bool:
        """Delete the variant's scaling policies and deregister it; False if it had none."""
        scaling = self.client("application-autoscaling")
        targets = scaling.describe_scalable_targets(
            ServiceNamespace="sagemaker", ResourceIds=[self.settings.scaling_resource_id]
        )["ScalableTargets"]
        if not targets:
            return False
        policies = scaling.describe_scaling_policies(
            ServiceNamespace="sagemaker", ResourceId=self.settings.scaling_resource_id
        )["ScalingPolicies"]
        for policy in policies:
            scaling.delete_scaling_policy(
                PolicyName=policy["PolicyName"],
                ServiceNamespace="sagemaker",
                ResourceId=self.settings.scaling_resource_id,
                ScalableDimension="sagemaker:variant:DesiredInstanceCount",
            )
        scaling.deregister_scalable_target(
            ServiceNamespace="sagemaker",
            ResourceId=self.settings.scaling_resource_id,
            ScalableDimension="sagemaker:variant:DesiredInstanceCount",
        )
        return True

    def wait(
        self, name: str, expected_config: str | None, previous_config: str | None = None
    ) -> dict:
        """Poll until the endpoint settles, printing each status change with the time taken."""
        started = time.monotonic()
        deadline = started + self.settings.wait_timeout_s
        last = None
        while True:
            try:
                current = self.client("sagemaker").describe_endpoint(EndpointName=name)
            except Exception as error:
                if "Throttl" not in error_code(error):
                    raise
                current = {"EndpointStatus": last or "Updating"}  # retried after the sleep
            status = current["EndpointStatus"]
            if status != last:
                self.say(f"endpoint: {name} {status} ({time.monotonic() - started:.0f} s)")
                last = status
            if status in ("Failed", "UpdateRollbackFailed"):
                raise PromoteError(
                    f"endpoint {name} is {status}: {current.get('FailureReason', 'no reason')}"
                )
            if status == "InService" and expected_config is None:
                return current
            if status == "InService":
                serving = current.get("EndpointConfigName")
                if serving != expected_config:
                    reason = current.get("FailureReason") or "no FailureReason given"
                    raise PromoteError(
                        f"endpoint {name} rolled back: InService on {serving}, not "
                        f"{expected_config} ({reason}); the previous config "
                        f"{previous_config or serving} still serves"
                    )
                return current
            if time.monotonic() > deadline:
                raise PromoteError(
                    f"endpoint {name} still {status} after {self.settings.wait_timeout_s:.0f} s"
                )
            self.sleep(self.settings.poll_s)

    # -- 5. scale --------------------------------------------------------------------------------

    def scaling_policy(self) -> dict:
        scaling = self.settings.autoscaling
        if scaling.metric == "SageMakerVariantInvocationsPerInstance":
            metric: dict = {
                "PredefinedMetricSpecification": {
                    "PredefinedMetricType": "SageMakerVariantInvocationsPerInstance"
                }
            }
        elif scaling.metric == "GPUUtilization":
            metric = {
                "CustomizedMetricSpecification": {
                    "MetricName": "GPUUtilization",
                    "Namespace": "/aws/sagemaker/Endpoints",
                    "Dimensions": [
                        {"Name": "EndpointName", "Value": self.settings.endpoint_name},
                        {"Name": "VariantName", "Value": self.settings.variant_name},
                    ],
                    "Statistic": "Average",
                    "Unit": "Percent",
                }
            }
        else:
            raise PromoteError(
                f"autoscaling.metric {scaling.metric!r}: use SageMakerVariantInvocationsPerInstance"
                " or GPUUtilization"
            )
        return {
            "TargetValue": float(scaling.target_value),
            **metric,
            "ScaleInCooldown": int(scaling.scale_in_cooldown_s),
            "ScaleOutCooldown": int(scaling.scale_out_cooldown_s),
        }

    @property
    def policy_name(self) -> str:
        return f"{self.settings.endpoint_name}-target-tracking"

    def scale(self) -> dict:
        scaling, settings = self.settings.autoscaling, self.settings
        if not scaling.enabled:
            if self.release_scaling():
                self.say("scale: autoscaling disabled in configs/promote.yaml: deregistered")
            return {"enabled": False}
        client = self.client("application-autoscaling")
        common = {
            "ServiceNamespace": "sagemaker",
            "ResourceId": settings.scaling_resource_id,
            "ScalableDimension": "sagemaker:variant:DesiredInstanceCount",
        }
        targets = client.describe_scalable_targets(
            ServiceNamespace="sagemaker", ResourceIds=[settings.scaling_resource_id]
        )["ScalableTargets"]
        wanted = (scaling.min_capacity, scaling.max_capacity)
        if not targets or (targets[0]["MinCapacity"], targets[0]["MaxCapacity"]) != wanted:
            self.say(f"scale: {settings.scaling_resource_id} between {wanted[0]} and {wanted[1]}")
            client.register_scalable_target(
                **common, MinCapacity=scaling.min_capacity, MaxCapacity=scaling.max_capacity
            )
        policy = self.scaling_policy()
        existing = client.describe_scaling_policies(
            ServiceNamespace="sagemaker",
            ResourceId=settings.scaling_resource_id,
            PolicyNames=[self.policy_name],
        )["ScalingPolicies"]
        current = existing[0].get("TargetTrackingScalingPolicyConfiguration") if existing else None
        if current is None or not same_policy(current, policy):
            self.say(f"scale: target tracking {scaling.metric} = {scaling.target_value}")
            client.put_scaling_policy(
                PolicyName=self.policy_name,
                PolicyType="TargetTrackingScaling",
                TargetTrackingScalingPolicyConfiguration=policy,
                **common,
            )
        else:
            self.say("scale: already as configured")
        return {"enabled": True, "min": wanted[0], "max": wanted[1], "policy": policy}

    # -- 6. smoke --------------------------------------------------------------------------------

    def smoke(self, artifacts: list[Artifact], requests: Mapping[str, dict]) -> dict[str, str]:
        """Every promoted model through sagemaker-runtime, its reply checked against the
        contract and its device: each must run on CUDA (a GPU instance's CPU is many times
        slower, SD past the 60 s limit). ModelNotReadyException (a model still loading) is
        retried with back-off."""
        runtime = self.client("sagemaker-runtime")
        results = {}
        devices: dict[str, str | None] = {}
        for artifact in artifacts:
            request = {**requests[artifact.model], "report_device": True}
            body = json.dumps(request).encode()
            deadline = time.monotonic() + self.settings.smoke_timeout_s
            delay = 1.0
            while True:
                try:
                    reply = runtime.invoke_endpoint(
                        EndpointName=self.settings.endpoint_name,
                        TargetModel=artifact.target_model,
                        ContentType="application/json",
                        Body=body,
                    )
                    break
                except Exception as error:
                    if error_code(error) != "ModelNotReadyException":
                        raise PromoteError(
                            f"smoke: {artifact.target_model} failed: {error}"
                        ) from None
                    if time.monotonic() + delay > deadline:
                        raise PromoteError(
                            f"smoke: {artifact.target_model} still not ready after "
                            f"{self.settings.smoke_timeout_s:.0f} s"
                        ) from None
                    self.say(f"smoke: {artifact.target_model} loading; retry in {delay:.0f} s")
                    self.sleep(delay)
                    delay = min(delay * 2, 30.0)
            device = check_reply(artifact.model, reply["Body"].read())
            self.say(f"smoke: {artifact.target_model} answered as the contract says, on {device}")
            devices[artifact.target_model] = device
            results[artifact.model] = "ok"
        check_devices(devices, self.settings)
        return results


def same_policy(current: dict, wanted: dict) -> bool:
    keys = ("TargetValue", "ScaleInCooldown", "ScaleOutCooldown")
    metric_keys = ("PredefinedMetricSpecification", "CustomizedMetricSpecification")
    return all(current.get(k) == wanted.get(k) for k in keys) and all(
        current.get(k) == wanted.get(k) for k in metric_keys
    )


def check_reply(model: str, body: bytes) -> str | None:
    """The response contract: JSON with a decodable image, plus the keys the model's spec
    adds (SAM's scores). Returns the device the model reported (asked for with
    report_device), None if it gave none."""
    from PIL import Image

    try:
        reply = json.loads(body)
        image = Image.open(io.BytesIO(base64.b64decode(reply["generated_image"])))
        image.verify()
    except Exception as error:
        raise PromoteError(f"smoke: {model} answered outside the contract ({error})") from None
    missing = [key for key in spec(model).reply_keys if key not in reply]
    if missing:
        raise PromoteError(f"smoke: {model} answered without {', '.join(missing)}")
    device = reply.get("device")
    return device if isinstance(device, str) else None


def check_devices(devices: Mapping[str, str | None], settings: Settings) -> None:
    """Every model on CUDA, or the promotion fails naming each model and what it ran on."""
    silent = sorted(name for name, device in devices.items() if device is None)
    if silent:
        raise PromoteError(
            f"smoke: {', '.join(silent)} did not report its device (archives from before "
            "report_device): `make archive`, `make test-handlers`, and promote again"
        )
    off_gpu = {name: device for name, device in devices.items() if not device.startswith("cuda")}
    if off_gpu:
        listed = ", ".join(f"{name} on {device}" for name, device in sorted(off_gpu.items()))
        raise PromoteError(
            f"smoke: not on the GPU of {settings.instance_type}: {listed}. The archive's "
            "model-config.yaml says `device: cpu`, or TorchServe assigned no GPU (the "
            "container sees none: NVIDIA_VISIBLE_DEVICES=all, number_of_gpu); fix it and "
            f"promote again (endpoint {settings.endpoint_name} stays as deployed; "
            "`make teardown` removes it)"
        )


# ---------------------------------------------------------------------------------------------
# Plans, records, listing, teardown, IAM


def plan_lines(
    settings: Settings, artifacts: list[Artifact], image: str | None, ami: AmiChoice | None
) -> list[str]:
    """What `run` would do, for --dry-run: computed offline, no AWS client."""
    lines = [f"plan for endpoint {settings.endpoint_name} in {settings.region}"]
    if image and DIGEST_IMAGE.match(image):
        lines.append(f"  image: use {image}")
    elif image:
        lines.append(f"  image: resolve {image} to its digest in ECR")
    else:
        lines.append(f"  image: build and push to the ECR repository {settings.image_repository}")
    for artifact in artifacts:
        lines.append(
            f"  would upload {artifact.path.name} ({artifact.size / 1e6:.1f} MB, sha256 "
            f"{artifact.sha256[:12]}) to s3://{settings.bucket}/{artifact.key(settings)}"
            " unless an identical object is there"
        )
    if ami is not None:
        lines.append(f"  inference AMI: {ami.ami.name}: {ami.reason}")
    else:
        lines.append("  inference AMI: none can be chosen (see `would stop` below)")
    if image and DIGEST_IMAGE.match(image) and ami is not None:
        model = model_name(settings, image)
        config = config_name(settings, model, ami.ami.name)
    else:
        model = f"{settings.endpoint_name}-m-<hash of the image digest and settings>"
        config = f"{settings.endpoint_name}-c-<hash of the model and instance settings>"
    lines += [
        f"  would create model {model} (MultiModel, {settings.model_data_url}) unless it exists",
        f"  would create endpoint config {config} ({settings.instance_count} x "
        f"{settings.instance_type}, InferenceAmiVersion "
        f"{ami.ami.name if ami else '<none fits>'}) unless it exists",
        f"  would create endpoint {settings.endpoint_name} on it, or update it to it if it "
        "serves another config (the old config is kept)",
    ]
    scaling = settings.autoscaling
    if scaling.enabled:
        lines.append(
            f"  would scale {settings.scaling_resource_id} between {scaling.min_capacity} and "
            f"{scaling.max_capacity} instances, target tracking {scaling.metric} = "
            f"{scaling.target_value} (scale-in cooldown {scaling.scale_in_cooldown_s} s, "
            f"scale-out {scaling.scale_out_cooldown_s} s)"
        )
    lines.append(
        "  would invoke " + ", ".join(a.target_model for a in artifacts) + " as a smoke test,"
        " each required to report a CUDA device"
    )
    lines.append(f"  would write {PROMOTION_FILE.name}")
    return lines


def write_promotion(
    path: Path,
    settings: Settings,
    image: str,
    endpoint: dict,
    artifacts: list[Artifact],
    ami: AmiChoice,
) -> dict:
    record = {
        "region": settings.region,
        "endpoint": endpoint["endpoint"],
        "endpoint_config": endpoint["config"],
        "model": endpoint["model"],
        "image": image,
        "image_digest": image.split("@", 1)[1],
        "image_cuda": ami.image_cuda,
        "inference_ami_version": ami.ami.name,
        "model_data_url": settings.model_data_url,
        "models": {
            a.model: {"target_model": a.target_model, "sha256": a.sha256, "size": a.size}
            for a in artifacts
        },
        "promoted_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return record


def list_models(promoter: Promoter) -> list[dict]:
    """The TargetModel names under the endpoint's prefix (MultiDataModel.list_models)."""
    settings = promoter.settings
    paginator = promoter.client("s3").get_paginator("list_objects_v2")
    found = []
    for page in paginator.paginate(Bucket=settings.bucket, Prefix=f"{settings.prefix}/"):
        for item in page.get("Contents", []):
            found.append(
                {
                    "target_model": item["Key"][len(settings.prefix) + 1 :],
                    "size": item["Size"],
                    "last_modified": item["LastModified"].isoformat(),
                }
            )
    return found


def teardown(promoter: Promoter) -> list[str]:
    """Endpoint, then its configs and models (those named after it). S3 objects stay."""
    settings, sm = promoter.settings, promoter.client("sagemaker")
    deleted = []
    scaling = promoter.client("application-autoscaling")
    targets = scaling.describe_scalable_targets(
        ServiceNamespace="sagemaker", ResourceIds=[settings.scaling_resource_id]
    )["ScalableTargets"]
    if targets:
        scaling.deregister_scalable_target(
            ServiceNamespace="sagemaker",
            ResourceId=settings.scaling_resource_id,
            ScalableDimension="sagemaker:variant:DesiredInstanceCount",
        )
        deleted.append(f"scalable target {settings.scaling_resource_id}")
    if promoter.describe("describe_endpoint", EndpointName=settings.endpoint_name) is not None:
        sm.delete_endpoint(EndpointName=settings.endpoint_name)
        deleted.append(f"endpoint {settings.endpoint_name}")
    ours = re.compile(rf"{re.escape(settings.endpoint_name)}-(?P<kind>[mc])-[0-9a-f]{{12}}")
    for config in paged(sm, "list_endpoint_configs", "EndpointConfigs", settings.endpoint_name):
        match = ours.fullmatch(config["EndpointConfigName"])
        if match and match["kind"] == "c":
            sm.delete_endpoint_config(EndpointConfigName=config["EndpointConfigName"])
            deleted.append(f"endpoint config {config['EndpointConfigName']}")
    for model in paged(sm, "list_models", "Models", settings.endpoint_name):
        match = ours.fullmatch(model["ModelName"])
        if match and match["kind"] == "m":
            sm.delete_model(ModelName=model["ModelName"])
            deleted.append(f"model {model['ModelName']}")
    return deleted


def paged(client: Any, operation: str, key: str, name_contains: str) -> list[dict]:
    items, token = [], None
    for _ in range(1000):  # bounded: 100 000 items
        arguments: dict[str, Any] = {"NameContains": name_contains, "MaxResults": 100}
        if token:
            arguments["NextToken"] = token
        page = getattr(client, operation)(**arguments)
        items += page.get(key, [])
        token = page.get("NextToken")
        if not token:
            break
    return items


def iam_policies(settings: Settings) -> dict[str, dict]:
    """Least privilege: what the endpoint's execution role and the promoting user need."""
    partition = "aws-cn" if settings.region.startswith("cn-") else "aws"
    account, region = settings.account_id, settings.region
    objects = f"arn:{partition}:s3:::{settings.bucket}/{settings.prefix}/*"
    bucket = f"arn:{partition}:s3:::{settings.bucket}"
    repository = f"arn:{partition}:ecr:{region}:{account}:repository/{settings.image_repository}"
    endpoint = settings.endpoint_name
    sagemaker = f"arn:{partition}:sagemaker:{region}:{account}"
    log_group = (
        f"arn:{partition}:logs:{region}:{account}:log-group:/aws/sagemaker/Endpoints/{endpoint}"  # noqa: E501
    )
    execution_role = {
        "Version": "2012-10-17",
        "Statement": [
            {"Sid": "ReadModels", "Effect": "Allow", "Action": "s3:GetObject", "Resource": objects},
            {
                "Sid": "PullImage",
                "Effect": "Allow",
                "Action": [
                    "ecr:BatchGetImage",
                    "ecr:GetDownloadUrlForLayer",
                    "ecr:BatchCheckLayerAvailability",
                ],
                "Resource": repository,
            },
            {
                "Sid": "EcrLogin",
                "Effect": "Allow",
                "Action": "ecr:GetAuthorizationToken",
                "Resource": "*",
            },
            {
                "Sid": "Logs",
                "Effect": "Allow",
                "Action": [
                    "logs:CreateLogGroup",
                    "logs:CreateLogStream",
                    "logs:PutLogEvents",
                    "logs:DescribeLogStreams",
                ],
                "Resource": [log_group, f"{log_group}:*"],
            },
            {
                "Sid": "Metrics",
                "Effect": "Allow",
                "Action": "cloudwatch:PutMetricData",
                "Resource": "*",
                "Condition": {"StringLike": {"cloudwatch:namespace": "/aws/sagemaker/*"}},
            },
        ],
    }
    promoting_user = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "Upload",
                "Effect": "Allow",
                "Action": ["s3:PutObject", "s3:GetObject", "s3:AbortMultipartUpload"],
                "Resource": objects,
            },
            {
                # unconditioned: without ListBucket, S3 answers HeadObject on a missing key
                # with 403 instead of 404, and the upload could not tell "absent" from "denied"
                "Sid": "ListModels",
                "Effect": "Allow",
                "Action": "s3:ListBucket",
                "Resource": bucket,
            },
            {
                "Sid": "PushImage",
                "Effect": "Allow",
                "Action": [
                    "ecr:DescribeImages",
                    "ecr:BatchCheckLayerAvailability",
                    "ecr:InitiateLayerUpload",
                    "ecr:UploadLayerPart",
                    "ecr:CompleteLayerUpload",
                    "ecr:PutImage",
                    "ecr:BatchGetImage",
                ],
                "Resource": repository,
            },
            {
                "Sid": "EcrLogin",
                "Effect": "Allow",
                "Action": "ecr:GetAuthorizationToken",
                "Resource": "*",
            },
            {
                "Sid": "Endpoint",
                "Effect": "Allow",
                "Action": [
                    "sagemaker:CreateModel",
                    "sagemaker:DescribeModel",
                    "sagemaker:DeleteModel",
                    "sagemaker:CreateEndpointConfig",
                    "sagemaker:DescribeEndpointConfig",
                    "sagemaker:DeleteEndpointConfig",
                    "sagemaker:CreateEndpoint",
                    "sagemaker:UpdateEndpoint",
                    "sagemaker:DescribeEndpoint",
                    "sagemaker:DeleteEndpoint",
                    "sagemaker:InvokeEndpoint",
                    "sagemaker:UpdateEndpointWeightsAndCapacities",  # autoscaling acts as you
                    "sagemaker:AddTags",
                ],
                "Resource": [
                    f"{sagemaker}:model/{endpoint}-m-*",
                    f"{sagemaker}:endpoint-config/{endpoint}-c-*",
                    f"{sagemaker}:endpoint/{endpoint}",
                ],
            },
            {
                "Sid": "ListForTeardown",
                "Effect": "Allow",
                "Action": ["sagemaker:ListModels", "sagemaker:ListEndpointConfigs"],
                "Resource": "*",
            },
            {
                "Sid": "PassExecutionRole",
                "Effect": "Allow",
                "Action": "iam:PassRole",
                "Resource": settings.role_arn or f"arn:{partition}:iam::{account}:role/<ROLE>",
                "Condition": {"StringEquals": {"iam:PassedToService": "sagemaker.amazonaws.com"}},
            },
            {
                "Sid": "Autoscaling",
                "Effect": "Allow",
                "Action": [
                    "application-autoscaling:RegisterScalableTarget",
                    "application-autoscaling:DeregisterScalableTarget",
                    "application-autoscaling:DescribeScalableTargets",
                    "application-autoscaling:PutScalingPolicy",
                    "application-autoscaling:DeleteScalingPolicy",
                    "application-autoscaling:DescribeScalingPolicies",
                    "cloudwatch:PutMetricAlarm",
                    "cloudwatch:DescribeAlarms",
                    "cloudwatch:DeleteAlarms",
                ],
                "Resource": "*",
            },
            {
                "Sid": "AutoscalingServiceRole",
                "Effect": "Allow",
                "Action": "iam:CreateServiceLinkedRole",
                "Resource": "*",
                "Condition": {
                    "StringLike": {
                        "iam:AWSServiceName": "sagemaker.application-autoscaling.amazonaws.com"
                    }
                },
            },
        ],
    }
    return {"execution_role": execution_role, "promoting_user": promoting_user}


# ---------------------------------------------------------------------------------------------
# The image step's build (where Docker runs)


def build_and_push_image(settings: Settings, environ: Mapping[str, str], promoter: Promoter) -> str:
    """IMAGE_URI when given; else the image of this commit: reused when ECR already has it (a
    rebuild could change the digest, and with it the endpoint), built and pushed otherwise,
    where an engine runs. Never from uncommitted changes: the tag names a commit."""
    from scripts import image

    if environ.get("IMAGE_URI"):
        return environ["IMAGE_URI"]
    if not image.engine_reachable():
        raise PromoteError(
            "no image: pass IMAGE_URI=<account>.dkr.ecr.<region>.amazonaws.com/<repository>:<tag>"
            " of a pushed image, or run `make promote` where a Docker engine runs to build and "
            "push one"
        )
    if image.working_tree_dirty():
        raise PromoteError(
            "uncommitted changes: the image is tagged with the commit, so commit first "
            "(or pass IMAGE_URI= of an image you built yourself)"
        )
    repository = environ.get("IMAGE_REPOSITORY") or (
        f"{settings.account_id}.dkr.ecr.{settings.region}.amazonaws.com/{settings.image_repository}"
    )
    existing = f"{repository}:{image.git_sha()}"
    try:
        promoter.resolve_image(existing)
        promoter.say(f"image: {existing} is already in ECR; not rebuilt")
        return existing
    except PromoteError:
        pass  # not pushed yet
    remote = image.build_and_push(repository, dict(environ))
    if remote is None:
        raise PromoteError("building or pushing the image failed (see the docker output above)")
    return remote


# ---------------------------------------------------------------------------------------------
# Command line


def run(args: argparse.Namespace, settings: Settings, promoter: Promoter) -> int:
    artifacts = read_artifacts(args.store)
    image_uri = os.environ.get("IMAGE_URI", "")
    if args.dry_run:  # offline: what would happen, and what would stop it
        problems = []
        ami: AmiChoice | None = None
        for check in (
            lambda: check_settings(settings),
            lambda: gate(artifacts, args.record, args.force, args.allow_tiny, promoter.say),
        ):
            try:
                check()
            except PromoteError as error:
                problems.append(str(error))
        try:
            ami = plan_ami(settings, image_uri or None)
        except PromoteError as error:
            problems.append(str(error))
        for line in plan_lines(settings, artifacts, image_uri or None, ami):
            promoter.say(line)
        for problem in problems:
            promoter.say(f"would stop: {problem}")
        return 1 if problems else 0
    check_settings(settings)
    # the gate first: nothing is built, pushed or uploaded for archives that may not go out
    gate(artifacts, args.record, args.force, args.allow_tiny, promoter.say)
    amis = load_ami_table()
    early = None
    if image_uri or settings.image_cuda:  # the CUDA may be known already: refuse before building
        early = plan_ami(settings, image_uri or None, amis)
    image_ref = build_and_push_image(settings, os.environ, promoter)
    # an image built (or found in ECR) just now: its own label decides
    ami = early if early and image_ref == image_uri else plan_ami(settings, image_ref, amis)
    promoter.say(f"driver: InferenceAmiVersion {ami.ami.name}: {ami.reason}")
    image = promoter.resolve_image(image_ref)
    promoter.upload(artifacts)
    endpoint = promoter.ensure_endpoint(image, ami.ami.name)
    promoter.scale()
    if not args.no_smoke:
        from scripts.examples import requests as example_requests

        promoter.smoke(artifacts, example_requests(sd_steps=2))
    write_promotion(args.output, settings, image, endpoint, artifacts, ami)
    changed = len(promoter.mutating_operations)
    promoter.say(f"promoted: {args.output} ({changed} mutating calls)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    def shared(suppress: bool) -> argparse.ArgumentParser:
        """The global flags, accepted before or after the subcommand (`run --dry-run`)."""
        flags = argparse.ArgumentParser(add_help=False)

        def default(value: object) -> object:
            return argparse.SUPPRESS if suppress else value

        flags.add_argument("--config", type=Path, default=default(SETTINGS_FILE))
        for name in (
            "region", "bucket", "prefix", "role-arn", "endpoint-name", "instance-type",
            "image-cuda", "inference-ami-version",
        ):  # fmt: skip
            flags.add_argument(f"--{name}", default=default(None))
        flags.add_argument("--instance-count", type=int, default=default(None))
        flags.add_argument("--store", type=Path, default=default(DEFAULT_STORE))
        flags.add_argument(
            "--record", type=Path, default=default(TESTED_RECORD), help=argparse.SUPPRESS
        )
        flags.add_argument("--output", type=Path, default=default(PROMOTION_FILE))
        flags.add_argument(
            "--dry-run",
            action="store_true",
            default=default(os.environ.get("DRY_RUN", "") not in ("", "0")),
            help="print the plan; create no AWS client (DRY_RUN=1)",
        )
        flags.add_argument("--debug", action="store_true", default=default(False),
                           help="log every AWS call (botocore; credentials redacted)")  # fmt: skip
        return flags

    parser = argparse.ArgumentParser(
        prog="python -m scripts.promote",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[shared(suppress=False)],
    )
    after = [shared(suppress=True)]
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="every step, in order", parents=after)
    gate_parser = commands.add_parser("gate", help="check the tested record", parents=after)
    for sub in (run_parser, gate_parser):
        sub.add_argument("--force", action="store_true", help="promote untested archives")
        sub.add_argument("--allow-tiny", action="store_true", help="promote random weights")
    run_parser.add_argument("--no-smoke", action="store_true", help="skip the smoke test")
    commands.add_parser("upload", help="upload the archives (verified)", parents=after)
    endpoint_parser = commands.add_parser(
        "endpoint", help="create or update the endpoint", parents=after
    )
    endpoint_parser.add_argument("--image", default=None, help="default: IMAGE_URI")
    commands.add_parser("scale", help="register autoscaling as configured", parents=after)
    commands.add_parser("smoke", help="invoke every model through sagemaker-runtime", parents=after)
    commands.add_parser("models", help="list the endpoint's models", parents=after)
    teardown_parser = commands.add_parser(
        "teardown", help="delete endpoint, configs, models", parents=after
    )
    teardown_parser.add_argument("--yes", action="store_true", help="no confirmation prompt")
    commands.add_parser("iam-policy", help="print least-privilege IAM policies", parents=after)
    return parser


_SECRET_HEADERS = r"(x-amz-security-token|authorization|aws_secret_access_key)"
CREDENTIAL_IN_LOG = (
    # quoted, as in a logged dict: 'X-Amz-Security-Token': b'...'
    re.compile(_SECRET_HEADERS + r"""(['"]?\s*[:=]\s*b?)(['"])(.*?)\3""", re.I),
    # bare, as in the canonical request: x-amz-security-token:...
    re.compile(_SECRET_HEADERS + r"(\s*[:=]\s*)([^\s'\",;}]+)", re.I),
)


def redact(text: str) -> str:
    quoted, bare = CREDENTIAL_IN_LOG
    text = quoted.sub(lambda m: f"{m[1]}{m[2]}{m[3]}<redacted>{m[3]}", text)
    return bare.sub(lambda m: f"{m[1]}{m[2]}<redacted>", text)


class RedactCredentials(logging.Filter):
    """botocore's DEBUG log prints signed headers: the session token (SSO, assumed roles) and
    the Authorization header. Both are replaced before anything is written."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact(record.getMessage()), None
        return True


@contextlib.contextmanager
def debug_logging(enabled: bool) -> Iterator[None]:
    """--debug: botocore's own DEBUG log (every request and response) on stderr, for this run,
    with credentials redacted (RedactCredentials)."""
    if not enabled:
        yield
        return
    logger = logging.getLogger("botocore")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s [%(levelname)s] %(message)s"))
    handler.addFilter(RedactCredentials())
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        overrides = {
            "region": args.region,
            "bucket": args.bucket,
            "prefix": args.prefix,
            "role_arn": args.role_arn,
            "endpoint_name": args.endpoint_name,
            "instance_type": args.instance_type,
            "instance_count": args.instance_count,
            "image_cuda": args.image_cuda,
            "inference_ami_version": args.inference_ami_version,
        }
        settings = load_settings(args.config, overrides=overrides)
        with debug_logging(args.debug and not args.dry_run):
            if args.debug:  # environment values are the user's: names only
                shown = asdict(settings)
                shown["container_environment"] = sorted(settings.container_environment)
                print(f"settings: {json.dumps(shown, sort_keys=True)}", file=sys.stderr)
            return dispatch(args, settings, Promoter(settings))
    except PromoteError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except Exception as error:  # AWS refused: one line, with the code AWS gave
        from botocore.exceptions import BotoCoreError, ClientError

        if isinstance(error, ClientError | BotoCoreError):
            print(f"error: AWS: {error}", file=sys.stderr)
            return 1
        raise


def dispatch(args: argparse.Namespace, settings: Settings, promoter: Promoter) -> int:
    command = args.command
    if command == "run":
        return run(args, settings, promoter)
    if command == "iam-policy":
        print(json.dumps(iam_policies(settings), indent=2))
        return 0
    artifacts = read_artifacts(args.store) if command in ("gate", "upload", "smoke") else []
    if command == "gate":
        gate(artifacts, args.record, args.force, args.allow_tiny, promoter.say)
        return 0
    if args.dry_run:
        promoter.say(f"dry run: `{command}` would call AWS; nothing done")
        return 0
    check_settings(settings)
    if command == "upload":
        promoter.upload(artifacts)
    elif command == "endpoint":
        image = args.image or os.environ.get("IMAGE_URI", "")
        if not image:
            raise PromoteError("endpoint: pass --image or IMAGE_URI=<image>")
        ami = plan_ami(settings, image)  # before any call: a mismatch creates nothing
        promoter.say(f"driver: InferenceAmiVersion {ami.ami.name}: {ami.reason}")
        promoter.ensure_endpoint(promoter.resolve_image(image), ami.ami.name)
    elif command == "scale":
        promoter.scale()
    elif command == "smoke":
        from scripts.examples import requests as example_requests

        promoter.smoke(artifacts, example_requests(sd_steps=2))
    elif command == "models":
        for item in list_models(promoter):
            print(f"{item['target_model']}\t{item['size']}\t{item['last_modified']}")
    elif command == "teardown":
        if not args.yes:
            answer = input(
                f"Delete endpoint {settings.endpoint_name}, its configs and models in "
                f"{settings.region}? Type the endpoint name to confirm: "
            )
            if answer.strip() != settings.endpoint_name:
                print("not confirmed: nothing deleted")
                return 1
        for line in teardown(promoter) or ["nothing to delete"]:
            print(f"deleted {line}" if line != "nothing to delete" else line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
