"""Resumable, SHA-256-pinned downloads of the real model weights (`make fetch-weights`).

`fetch_file(url, dest, sha256)` is the one entry point. After it returns, `dest` holds exactly the
pinned bytes; after it raises `DownloadError`, `dest` is absent and any `dest.part` left behind is
a verified-so-far prefix that the next call resumes from (with an HTTP `Range` request). Every
loop is bounded by `max_attempts`; the error's text is one line saying what to do.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import requests
from tqdm import tqdm
from urllib3.exceptions import HTTPError as Urllib3Error
from urllib3.exceptions import NameResolutionError, NewConnectionError

__all__ = ["DownloadError", "fetch_file"]

CHUNK_BYTES = 1 << 20
# Seconds before the 2nd attempt, doubled after each failure up to RETRY_BACKOFF_MAX_S.
RETRY_BACKOFF_S = 0.5
RETRY_BACKOFF_MAX_S = 8.0
# Statuses worth another try (overload, gateway hiccups); any other 4xx/5xx is final.
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})

_SHA256 = re.compile(r"[0-9a-f]{64}")
_CONTENT_RANGE = re.compile(r"bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)", re.IGNORECASE)


class DownloadError(Exception):
    """A failed download the user has to act on; str() is a single line saying what to do."""

    def __init__(self, message: str) -> None:
        # One line, always: callers print it after "error: " with no traceback.
        super().__init__(" ".join(message.splitlines()))


class _Retry(Exception):
    """A transient failure (broken connection, 5xx, ...): the next attempt resumes the .part."""


def fetch_file(
    url: str,
    dest: Path,
    sha256: str,
    *,
    size: int | None = None,
    progress: bool = True,
    timeout: float = 30.0,
    max_attempts: int = 5,
) -> Path:
    """Download `url` to `dest` unless `dest` already has the pinned SHA-256; return `dest`.

    Resumes `dest.part` with `Range: bytes=N-`, retries broken connections and 408/429/5xx up to
    `max_attempts` requests in all, checks `size` (bytes) when given, and renames the .part to
    `dest` only once its hash matches. `timeout` bounds connecting and each read, not the
    transfer. Raises DownloadError (one line) for anything the user must fix.
    """
    expected = sha256.strip().lower()
    if not _SHA256.fullmatch(expected):
        raise ValueError(f"sha256 must be 64 hex digits, got {sha256!r}")
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
    if size is not None and size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise DownloadError(
            f"refusing to fetch {url!r}: only http:// and https:// URLs are supported"
        )

    dest = Path(dest)
    if dest.is_file():
        if _file_matches(dest, expected, size, progress):
            return dest
        # Keep the promise that `dest` only ever holds the pinned bytes.
        print(
            f"warning: {dest} does not match its pinned sha256; downloading it again",
            file=sys.stderr,
        )
        dest.unlink()
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DownloadError(
            f"cannot create {dest.parent} ({error.strerror or error}): "
            "check the path and its permissions"
        ) from None
    return _Job(url, dest, expected, size, progress, timeout, max_attempts).run()


def _file_matches(path: Path, expected: str, size: int | None, progress: bool) -> bool:
    if size is not None and path.stat().st_size != size:
        return False  # no need to hash gigabytes to know
    return _hash_file(path, progress).hexdigest() == expected


def _hash_file(path: Path, progress: bool) -> hashlib._Hash:
    digest = hashlib.sha256()
    total = path.stat().st_size
    with (
        open(path, "rb") as stream,
        tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=f"checking {path.name}",
            disable=True if not progress else None,
            leave=False,
        ) as bar,
    ):
        while chunk := stream.read(CHUNK_BYTES):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest


def _unreachable(error: requests.ConnectionError) -> str | None:
    """Why a connection could not even be opened (DNS, refused, ...), or None if it was opened."""
    if isinstance(error, requests.ConnectTimeout):
        return "connection timed out"
    reason = error.args[0] if error.args else None
    reason = getattr(reason, "reason", reason)  # requests wraps urllib3's MaxRetryError
    if isinstance(reason, NameResolutionError):
        return "DNS lookup failed"
    if not isinstance(reason, NewConnectionError):
        return None
    cause = reason.__cause__ or reason.__context__
    if isinstance(cause, ConnectionRefusedError):
        return "connection refused"
    if isinstance(cause, socket.gaierror):
        return "DNS lookup failed"
    if isinstance(cause, TimeoutError):
        return "connection timed out"
    return "no connection"


def _content_range(header: str | None) -> tuple[int | None, int | None]:
    """(first byte, total length) of a Content-Range header; None where absent or '*'."""
    match = _CONTENT_RANGE.fullmatch((header or "").strip())
    if not match:
        return None, None
    first, _, total = match.groups()
    return (int(first) if first else None), (int(total) if total != "*" else None)


def _int_header(response: requests.Response, name: str) -> int | None:
    value = response.headers.get(name, "").strip()
    return int(value) if value.isdigit() else None


class _Job:
    """One fetch_file call: the .part on disk, the running hash of its bytes, the attempts."""

    def __init__(
        self,
        url: str,
        dest: Path,
        expected: str,
        size: int | None,
        progress: bool,
        timeout: float,
        max_attempts: int,
    ) -> None:
        self.url, self.dest, self.expected, self.size = url, dest, expected, size
        self.progress, self.timeout, self.max_attempts = progress, timeout, max_attempts
        self.part = dest.with_name(dest.name + ".part")
        self.host = urlsplit(url).hostname or url
        self.name = Path(urlsplit(url).path).name or dest.name
        # sha256 of the first `hashed` bytes of the .part: resuming must not re-read gigabytes.
        self.digest = hashlib.sha256()
        self.hashed: int | None = None  # None: the .part on disk has not been hashed yet
        self.received_any = False
        self.bar: tqdm | None = None

    # -- the attempt loop ---------------------------------------------------------------------

    def run(self) -> Path:
        last = "no attempt made"
        try:
            with requests.Session() as session:
                for attempt in range(self.max_attempts):
                    if attempt:
                        time.sleep(min(RETRY_BACKOFF_S * 2 ** (attempt - 1), RETRY_BACKOFF_MAX_S))
                    try:
                        self._attempt(session)
                    except _Retry as retry:
                        last = str(retry)
                        continue
                    return self._finish()
        finally:
            if self.bar is not None:
                self.bar.close()
        raise DownloadError(
            f"gave up fetching {self.name} from {self.host} after {self.max_attempts} attempts "
            f"(last: {last}): run again to resume from {self.part}, or place the file at "
            f"{self.dest} yourself"
        )

    def _attempt(self, session: requests.Session) -> None:
        """One request; returns when the .part is believed complete, raises _Retry otherwise."""
        offset = self._prepare_part()
        if self.size is not None and offset == self.size:
            return  # complete from an earlier run: verify without touching the network
        # identity: byte ranges and the pinned hash are both about the bytes as stored.
        headers = {"Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        try:
            response = session.get(self.url, headers=headers, stream=True, timeout=self.timeout)
        except requests.exceptions.SSLError as error:
            raise DownloadError(
                f"TLS error talking to {self.host} while fetching {self.name} "
                f"({type(error).__name__}): check the system clock and CA certificates, or place "
                f"the file at {self.dest} yourself"
            ) from None
        except requests.ConnectionError as error:
            why = _unreachable(error)
            if why and not self.received_any:
                # Nothing came through yet: offline or wrong host, retrying will not help.
                raise DownloadError(
                    f"cannot reach {self.host} to fetch {self.name} ({why}; offline?): check "
                    f"your network or place the file at {self.dest} yourself"
                ) from None
            raise _Retry(why or "connection dropped before the response") from None
        except requests.Timeout:
            raise _Retry(f"no response within {self.timeout:g} s") from None
        except requests.RequestException as error:
            raise DownloadError(
                f"cannot fetch {self.name} from {self.url} ({type(error).__name__}: {error})"
            ) from None
        with response:
            self._receive(response, offset)

    def _receive(self, response: requests.Response, offset: int) -> None:
        status = response.status_code
        if status == 416 and offset:
            # Our range starts at or past the end: the .part is complete (verify) or too long.
            _, total = _content_range(response.headers.get("Content-Range"))
            if total is not None and offset > total:
                self._restart()
                raise _Retry(f"partial file longer than the {total} bytes served")
            return
        if status in RETRY_STATUSES:
            raise _Retry(f"HTTP {status} {response.reason}")
        if status not in (200, 206):
            raise DownloadError(
                f"HTTP {status} {response.reason} fetching {self.name} from {self.url}: check the "
                f"URL and its pin, or place the file at {self.dest} yourself"
            )
        encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise DownloadError(
                f"{self.host} sent {self.name} with Content-Encoding {encoding!r} although "
                f"identity was asked for: place the file at {self.dest} yourself"
            )

        if status == 206:
            first, total = _content_range(response.headers.get("Content-Range"))
            if first != offset:
                self._restart()
                raise _Retry(f"server answered bytes from {first} instead of {offset}")
        else:
            total = _int_header(response, "Content-Length")
            if offset:
                # The server ignored Range and sends the whole file: start over, same response.
                self._restart()
                offset = 0
        if self.size is not None and total is not None and total != self.size:
            self._discard()
            raise DownloadError(
                f"{self.host} serves {self.name} as {total} bytes but the pin says {self.size}: "
                f"the URL or the pin is wrong; place the file at {self.dest} yourself"
            )

        bar = self._bar(total if self.size is None else self.size, offset)
        expected_body = _int_header(response, "Content-Length")
        received = 0
        # raw, undecoded reads: a broken connection still hands over what arrived before it.
        chunks = response.raw.stream(CHUNK_BYTES, decode_content=False)
        with open(self.part, "ab") as out:
            while True:
                try:
                    chunk = next(chunks, None)
                except (Urllib3Error, OSError) as error:
                    raise _Retry(
                        f"connection broke after {offset + received} bytes ({type(error).__name__})"
                    ) from None
                if not chunk:
                    break
                if self.size is not None and offset + received + len(chunk) > self.size:
                    self._discard()
                    raise DownloadError(
                        f"{self.host} sent more than the pinned {self.size} bytes of {self.name}: "
                        f"the URL or the pin is wrong; place the file at {self.dest} yourself"
                    )
                try:
                    out.write(chunk)
                except OSError as error:
                    raise DownloadError(
                        f"cannot write {self.part} ({error.strerror or error}): "
                        "free some disk space and run again"
                    ) from None
                self.digest.update(chunk)
                received += len(chunk)
                self.hashed = offset + received
                self.received_any = True
                bar.update(len(chunk))
        if expected_body is not None and received < expected_body:
            raise _Retry(f"connection closed after {received} of {expected_body} bytes")
        if self.size is not None and offset + received < self.size:
            raise _Retry(f"got {offset + received} of {self.size} bytes")

    # -- the .part file -----------------------------------------------------------------------

    def _prepare_part(self) -> int:
        """Length of the .part to resume from, with self.digest covering exactly those bytes."""
        try:
            length = self.part.stat().st_size
        except FileNotFoundError:
            length = 0
        if self.size is not None and length > self.size:
            self._restart()
            return 0
        if self.hashed != length:
            # Left by an earlier run (or changed under us): hash what is there before appending.
            self.digest = _hash_file(self.part, self.progress) if length else hashlib.sha256()
            self.hashed = length
        return length

    def _restart(self) -> None:
        self.part.unlink(missing_ok=True)
        self.digest = hashlib.sha256()
        self.hashed = 0

    def _discard(self) -> None:
        self.part.unlink(missing_ok=True)
        self.hashed = None

    def _finish(self) -> Path:
        self.part.touch()  # a pinned empty file never got a body to append
        length = self.part.stat().st_size
        if self.hashed != length:
            self._prepare_part()
        actual = self.digest.hexdigest()
        if actual != self.expected or (self.size is not None and length != self.size):
            self._discard()
            pinned = f" ({self.size} bytes)" if self.size is not None else ""
            raise DownloadError(
                f"checksum mismatch for {self.name} from {self.host}: expected sha256 "
                f"{self.expected}{pinned}, got {actual} ({length} bytes); the partial download "
                f"was deleted: check the URL and its pin, or place the file at {self.dest} "
                "yourself"
            )
        # Durable before visible: a crash must not leave a truncated file under the final name.
        with open(self.part, "r+b") as stream:
            os.fsync(stream.fileno())
        os.replace(self.part, self.dest)
        return self.dest

    def _bar(self, total: int | None, position: int) -> tqdm:
        if self.bar is None:
            # disable=None: tqdm turns itself off when stderr is not a terminal (CI, logs).
            self.bar = tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=self.name,
                disable=True if not self.progress else None,
            )
        self.bar.total = total
        self.bar.n = position
        self.bar.refresh()
        return self.bar
