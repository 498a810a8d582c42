"""The endpoint's models (`make models`: the TargetModel names under its prefix) and
`make teardown`: scaling, endpoint, then its configs and models; S3 objects stay."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .promoter import Promoter


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
