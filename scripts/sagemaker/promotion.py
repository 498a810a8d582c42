"""The promotion as a whole: the plan `run --dry-run` prints (offline, no AWS client), and
promotion.json, the record of what a run promoted."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

from .ami import AmiChoice
from .endpoint import DIGEST_IMAGE
from .gate import Artifact
from .naming import config_name, model_name
from .settings import PROMOTION_FILE, Settings


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
