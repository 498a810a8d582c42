"""Step 3, upload: each tarball once, at its content-addressed key, never overwritten
(IfNoneMatch), verified by the SHA-256 S3 reports (a composite one for multipart uploads)."""

from __future__ import annotations

import base64
import hashlib
import io
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .errors import error_code, is_not_found
from .gate import Artifact
from .settings import PromoteError, Settings

MULTIPART_THRESHOLD = 64 * 1024 * 1024  # one PUT below this; parts of PART_SIZE above
PART_SIZE = 64 * 1024 * 1024
UPLOAD_THREADS = 8


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


class Uploads:
    """The Promoter's upload step (a mixin of scripts.sagemaker.promoter.Promoter)."""

    # from the Promoter (scripts/sagemaker/promoter.py)
    settings: Settings
    say: Callable[[str], None]
    client: Callable[[str], Any]

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
