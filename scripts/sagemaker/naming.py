"""Names: content hashes, so the same inputs name the same resources (the endpoint's model
and endpoint config; a TargetModel is named by its tarball's hash, gate.Artifact)."""

from __future__ import annotations

import hashlib
import json

from .settings import Settings


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
