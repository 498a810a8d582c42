"""Where the emulator's tarballs come from: a local folder (make archive's model_store) or
s3:// (a moto server in the tests, or a real bucket), as SageMaker reads ModelDataUrl."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    pass

REGION = "us-east-1"  # the region the emulator answers as


# ---------------------------------------------------------------------------------------------
# Where tarballs come from


class ModelNotFound(Exception):
    pass


class LocalSource:
    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder).resolve()
        self.uri = str(self.folder)

    def fetch(self, target: str, destination: Path) -> None:
        source = self.folder / target
        if not source.is_file():
            raise ModelNotFound(target)
        shutil.copyfile(source, destination)


class S3Source:
    """s3://bucket/prefix, read with boto3 (so a local S3 such as a moto server works too)."""

    def __init__(self, uri: str, client_factory: Callable[[], Any]) -> None:
        bucket, _, prefix = uri.removeprefix("s3://").partition("/")
        self.uri, self.bucket, self.prefix = uri, bucket, prefix.strip("/")
        self.client_factory = client_factory

    def fetch(self, target: str, destination: Path) -> None:
        from botocore.exceptions import ClientError

        key = f"{self.prefix}/{target}" if self.prefix else target
        try:
            self.client_factory().download_file(self.bucket, key, str(destination))
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "403"):
                raise ModelNotFound(target) from None
            raise


def make_s3_client(endpoint_url: str | None = None, region: str | None = None) -> Any:
    """The emulator's S3 client, from the project's one seam (tests point it at moto)."""
    from ..aws import make_client

    return make_client("s3", region or REGION, endpoint_url=endpoint_url)
