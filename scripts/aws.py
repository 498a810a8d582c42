"""The one seam for AWS clients: every boto3 client mmekit makes comes from `make_client`.

Endpoints follow boto3's own settings, so tests and local stacks need no code path of their own:
AWS_ENDPOINT_URL (all services, e.g. a moto server) and AWS_ENDPOINT_URL_<SERVICE> (e.g.
AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME for the local multi-model endpoint, `make serve-mme`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import boto3
from botocore import UNSIGNED
from botocore.config import Config

# Throttling and transient errors are retried by botocore itself (standard mode, with back-off).
RETRIES = {"mode": "standard", "max_attempts": 8}

ClientFactory = Callable[[str], Any]


def make_client(
    service: str,
    region: str | None = None,
    read_timeout: float = 120.0,
    endpoint_url: str | None = None,
    unsigned: bool = False,
) -> Any:
    """A boto3 client for `service` in `region`, with standard retries; `endpoint_url` only
    where a tool takes one explicitly (the emulator's S3_ENDPOINT_URL). `unsigned`: no
    credentials needed, for the local emulator, which ignores signatures."""
    config = Config(
        signature_version=UNSIGNED if unsigned else None,
        region_name=region,
        retries=RETRIES,
        read_timeout=read_timeout,
        user_agent_extra="mmekit",
    )
    return boto3.session.Session().client(service, endpoint_url=endpoint_url, config=config)
