"""`make promote`'s settings: configs/promote.yaml, then MMEKIT_<KEY> variables, then flags;
the files a promotion reads and writes; PromoteError, with which every step stops."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from .. import PROJECT_ROOT

SETTINGS_FILE = PROJECT_ROOT / "configs" / "promote.yaml"
AMI_TABLE = PROJECT_ROOT / "configs" / "inference-amis.yaml"
TESTED_RECORD = PROJECT_ROOT / ".mmekit" / "tested.json"
PROMOTION_FILE = PROJECT_ROOT / "promotion.json"
SECRET_NAME = re.compile(r"SECRET|PASSWORD|TOKEN|CREDENTIAL|PRIVATE|ACCESS_KEY|API_KEY", re.I)
AWS_KEY_VALUE = re.compile(r"(AKIA|ASIA)[A-Z0-9]{16}")


class PromoteError(Exception):
    """Promotion stopped: the message says why and what to do."""


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
