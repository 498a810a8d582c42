"""`make iam-policy`: the least-privilege policies for the endpoint's execution role and the
promoting user, rendered from the JSON templates beside this module (iam/*.json), whose
${placeholders} string.Template fills from the settings."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from string import Template
from typing import Any

from .settings import Settings

TEMPLATES = Path(__file__).resolve().parent / "iam"
# Why two of the promoting user's statements are as they are (JSON carries no comments):
# - ListModels is unconditioned: without ListBucket, S3 answers HeadObject on a missing key
#   with 403 instead of 404, and the upload could not tell "absent" from "denied".
# - Endpoint allows sagemaker:UpdateEndpointWeightsAndCapacities: autoscaling acts as you.
POLICIES = {"execution_role": "execution-role.json", "promoting_user": "promoting-user.json"}


def render(value: Any, values: Mapping[str, str]) -> Any:
    """A parsed template with the ${placeholders} of each string filled: the values are never
    JSON text, so a quote or backslash in a setting is escaped by json.dumps as before."""
    if isinstance(value, str):
        return Template(value).substitute(values)
    if isinstance(value, list):
        return [render(item, values) for item in value]
    if isinstance(value, dict):
        return {key: render(item, values) for key, item in value.items()}
    return value


def iam_policies(settings: Settings) -> dict[str, dict]:
    """Least privilege: what the endpoint's execution role and the promoting user need."""
    partition = "aws-cn" if settings.region.startswith("cn-") else "aws"
    account = settings.account_id
    values = {
        "partition": partition,
        "region": settings.region,
        "account": account,
        "bucket": settings.bucket,
        "prefix": settings.prefix,
        "image_repository": settings.image_repository,
        "endpoint": settings.endpoint_name,
        "role_arn": settings.role_arn or f"arn:{partition}:iam::{account}:role/<ROLE>",
    }
    return {
        name: render(json.loads((TEMPLATES / template).read_text()), values)
        for name, template in POLICIES.items()
    }
