"""scripts/download.py against a loopback HTTP server that can cut, ignore Range or lie."""

from __future__ import annotations

import hashlib
import random
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from scripts import download
from scripts.download import DownloadError, fetch_file

SIZE = 300_000
DATA = random.Random(20240601).randbytes(SIZE)
SHA = hashlib.sha256(DATA).hexdigest()
WRONG = random.Random(7).randbytes(SIZE)
WRONG_SHA = hashlib.sha256(WRONG).hexdigest()
CUT = 123_457  # not a multiple of any read size


@dataclass
class Served:
    """What the server does (tests flip these) and what it saw (tests assert on these)."""

    cut_after: int | None = None  # body bytes sent before dropping the connection ...
    cuts: int = 0  # ... for this many responses, then behave
    ignore_range: bool = False  # always 200 with the whole file
    wrong_bytes: bool = False  # same length, other content
    status: int | None = None  # answer every request with this status and no body
    requests: list[dict] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def bytes_sent(self) -> int:
        return sum(entry["sent"] for entry in self.requests)

    @property
    def ranges(self) -> list[str | None]:
        return [entry["range"] for entry in self.requests]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real CDNs do

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib's name
        pass  # the fixture prints its own log on failure

    def do_GET(self) -> None:  # noqa: N802 - stdlib's name
        served: Served = self.server.served  # type: ignore[attr-defined]
        wanted = self.headers.get("Range")
        entry = {"path": self.path, "range": wanted, "status": 0, "sent": 0}
        with served.lock:
            served.requests.append(entry)
            cut = served.cut_after if served.cuts > 0 else None
            if cut is not None:
                served.cuts -= 1
        if served.status is not None:
            entry["status"] = served.status
            self._head(served.status, {"Content-Length": "0"})
            return
        data = WRONG if served.wrong_bytes else DATA
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", wanted or "")
        if match and not served.ignore_range:
            start = int(match[1])
            end = min(int(match[2]) if match[2] else len(data) - 1, len(data) - 1)
            if start >= len(data):
                entry["status"] = 416
                self._head(416, {"Content-Range": f"bytes */{len(data)}", "Content-Length": "0"})
                return
            status, headers = 206, {"Content-Range": f"bytes {start}-{end}/{len(data)}"}
        else:
            start, end, status, headers = 0, len(data) - 1, 200, {}
        body = data[start : end + 1]
        headers["Content-Length"] = str(len(body))
        headers["Content-Type"] = "application/octet-stream"
        entry["status"] = status
        self._head(status, headers)
        if cut is not None:
            body = body[:cut]
        try:
            self.wfile.write(body)
            entry["sent"] = len(body)
        except OSError:
            self.close_connection = True
            return
        if cut is not None:
            # Promised Content-Length, delivered less: what a dropped link looks like.
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)

    def _head(self, status: int, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()


@dataclass
class Server:
    served: Served
    base: str

    def url(self, name: str = "sam_vit_h_4b8939.pth") -> str:
        return f"{self.base}/segment_anything/{name}"


@pytest.fixture
def server() -> Iterator[Server]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.served = Served()  # type: ignore[attr-defined]
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    host, port = httpd.server_address[:2]
    try:
        yield Server(httpd.served, f"http://{host}:{port}")  # type: ignore[attr-defined]
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)
        # pytest shows this only when the test failed.
        print("server request log:")
        for entry in httpd.served.requests:  # type: ignore[attr-defined]
            print(f"  {entry}")


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(download, "RETRY_BACKOFF_S", 0.01)


def fetch(server: Server, dest: Path, **kwargs: object) -> Path:
    options: dict = {"progress": False, "timeout": 5.0, "max_attempts": 5} | kwargs
    return fetch_file(server.url(), dest, SHA, **options)


def one_line(error: pytest.ExceptionInfo[DownloadError]) -> str:
    text = str(error.value)
    assert "\n" not in text and "Traceback" not in text
    return text


def test_checksum_match_downloads_then_reuses_without_a_request(
    server: Server, tmp_path: Path
) -> None:
    dest = tmp_path / "downloads" / "sam_vit_h_4b8939.pth"

    assert fetch(server, dest, size=SIZE) == dest
    assert dest.read_bytes() == DATA
    assert not dest.with_name(dest.name + ".part").exists()
    assert len(server.served.requests) == 1
    assert server.served.ranges == [None]

    assert fetch(server, dest, size=SIZE) == dest
    assert len(server.served.requests) == 1, "a verified file must not touch the network"


def test_progress_bar_path_works(server: Server, tmp_path: Path) -> None:
    dest = tmp_path / "w.pth"
    assert fetch(server, dest, progress=True) == dest
    assert dest.read_bytes() == DATA


def test_checksum_mismatch_names_both_hashes_and_leaves_nothing(
    server: Server, tmp_path: Path
) -> None:
    server.served.wrong_bytes = True
    dest = tmp_path / "w.pth"

    with pytest.raises(DownloadError) as error:
        fetch(server, dest, size=SIZE)

    text = one_line(error)
    assert SHA in text and WRONG_SHA in text
    assert not dest.exists()
    assert not dest.with_name(dest.name + ".part").exists()
    assert len(server.served.requests) == 1, "a wrong file is not retried"


def test_resumes_after_a_cut_connection(server: Server, tmp_path: Path) -> None:
    server.served.cut_after, server.served.cuts = CUT, 1
    dest = tmp_path / "w.pth"

    assert fetch(server, dest, size=SIZE) == dest

    assert dest.read_bytes() == DATA
    assert server.served.ranges == [None, f"bytes={CUT}-"]
    assert [entry["status"] for entry in server.served.requests] == [200, 206]
    assert server.served.bytes_sent == SIZE  # cut part + the rest, not the file twice


def test_resumes_after_repeated_cuts_without_size(server: Server, tmp_path: Path) -> None:
    server.served.cut_after, server.served.cuts = 50_000, 3
    dest = tmp_path / "w.pth"

    assert fetch(server, dest) == dest

    assert dest.read_bytes() == DATA
    assert server.served.ranges == [None, "bytes=50000-", "bytes=100000-", "bytes=150000-"]
    assert server.served.bytes_sent == SIZE


def test_gives_up_after_max_attempts_and_keeps_the_part(server: Server, tmp_path: Path) -> None:
    server.served.cut_after, server.served.cuts = 10_000, 1_000
    dest = tmp_path / "w.pth"

    with pytest.raises(DownloadError) as error:
        fetch(server, dest, size=SIZE, max_attempts=3)

    text = one_line(error)
    assert "after 3 attempts" in text and "resume" in text
    assert len(server.served.requests) == 3
    assert not dest.exists()
    part = dest.with_name(dest.name + ".part")
    assert part.read_bytes() == DATA[:30_000]  # kept: the next run resumes from here

    server.served.cuts = 0
    assert fetch(server, dest, size=SIZE) == dest
    assert server.served.ranges[-1] == "bytes=30000-"
    assert dest.read_bytes() == DATA


def test_existing_part_file_is_resumed(server: Server, tmp_path: Path) -> None:
    dest = tmp_path / "w.pth"
    dest.with_name(dest.name + ".part").write_bytes(DATA[:200_000])

    assert fetch(server, dest, size=SIZE) == dest

    assert server.served.ranges == ["bytes=200000-"]
    assert server.served.bytes_sent == SIZE - 200_000
    assert dest.read_bytes() == DATA
    assert not dest.with_name(dest.name + ".part").exists()


def test_complete_part_without_size_is_verified_after_416(server: Server, tmp_path: Path) -> None:
    dest = tmp_path / "w.pth"
    dest.with_name(dest.name + ".part").write_bytes(DATA)

    assert fetch(server, dest) == dest

    assert server.served.ranges == [f"bytes={SIZE}-"]
    assert [entry["status"] for entry in server.served.requests] == [416]
    assert dest.read_bytes() == DATA


def test_complete_part_with_size_needs_no_request(server: Server, tmp_path: Path) -> None:
    dest = tmp_path / "w.pth"
    dest.with_name(dest.name + ".part").write_bytes(DATA)

    assert fetch(server, dest, size=SIZE) == dest
    assert server.served.requests == []


def test_part_longer_than_the_file_restarts(server: Server, tmp_path: Path) -> None:
    dest = tmp_path / "w.pth"
    dest.with_name(dest.name + ".part").write_bytes(DATA + b"junk")

    assert fetch(server, dest) == dest  # size unknown: the 416 tells us the real length

    assert server.served.ranges == [f"bytes={SIZE + 4}-", None]
    assert dest.read_bytes() == DATA


def test_server_ignoring_range_restarts_from_zero(server: Server, tmp_path: Path) -> None:
    server.served.ignore_range = True
    dest = tmp_path / "w.pth"
    dest.with_name(dest.name + ".part").write_bytes(DATA[:100_000])

    assert fetch(server, dest, size=SIZE) == dest

    assert server.served.ranges == ["bytes=100000-"]
    assert [entry["status"] for entry in server.served.requests] == [200]
    assert dest.read_bytes() == DATA


def test_server_ignoring_range_after_a_cut(server: Server, tmp_path: Path) -> None:
    server.served.ignore_range = True
    server.served.cut_after, server.served.cuts = CUT, 1
    dest = tmp_path / "w.pth"

    assert fetch(server, dest, size=SIZE) == dest

    assert server.served.ranges == [None, f"bytes={CUT}-"]
    assert dest.read_bytes() == DATA


def test_corrupt_part_fails_verification_and_is_deleted(server: Server, tmp_path: Path) -> None:
    dest = tmp_path / "w.pth"
    part = dest.with_name(dest.name + ".part")
    part.write_bytes(WRONG[:100_000])

    with pytest.raises(DownloadError) as error:
        fetch(server, dest, size=SIZE)

    assert "checksum mismatch" in one_line(error)
    assert not part.exists() and not dest.exists()
    assert fetch(server, dest, size=SIZE) == dest  # so the next run starts clean
    assert dest.read_bytes() == DATA


def test_wrong_existing_dest_is_replaced(server: Server, tmp_path: Path) -> None:
    dest = tmp_path / "w.pth"
    dest.write_bytes(WRONG)

    assert fetch(server, dest, size=SIZE) == dest
    assert dest.read_bytes() == DATA
    assert len(server.served.requests) == 1


def test_size_disagreeing_with_the_server_fails_before_the_body(
    server: Server, tmp_path: Path
) -> None:
    dest = tmp_path / "w.pth"
    with pytest.raises(DownloadError) as error:
        fetch(server, dest, size=SIZE + 1)

    text = one_line(error)
    assert str(SIZE) in text and str(SIZE + 1) in text
    assert not dest.exists() and not dest.with_name(dest.name + ".part").exists()


def test_http_404_is_final_and_names_the_status(server: Server, tmp_path: Path) -> None:
    server.served.status = 404
    dest = tmp_path / "w.pth"

    with pytest.raises(DownloadError) as error:
        fetch(server, dest)

    assert "HTTP 404" in one_line(error)
    assert len(server.served.requests) == 1
    assert not dest.exists()


def test_http_503_is_retried_a_bounded_number_of_times(server: Server, tmp_path: Path) -> None:
    server.served.status = 503
    dest = tmp_path / "w.pth"

    with pytest.raises(DownloadError) as error:
        fetch(server, dest, max_attempts=4)

    assert "HTTP 503" in one_line(error)
    assert len(server.served.requests) == 4
    assert not dest.exists()


def test_unreachable_host_is_one_line_and_fast(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nobody listens on once closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dest = tmp_path / "w.pth"
    started = time.monotonic()

    with pytest.raises(DownloadError) as error:
        fetch_file(
            f"http://127.0.0.1:{port}/sam_vit_h_4b8939.pth",
            dest,
            SHA,
            progress=False,
            timeout=2.0,
            max_attempts=5,
        )

    text = one_line(error)
    assert time.monotonic() - started < 2.0
    assert "cannot reach 127.0.0.1" in text and "sam_vit_h_4b8939.pth" in text
    assert "connection refused" in text and str(dest) in text
    assert not dest.exists()
    assert error.value.__suppress_context__, "no chained traceback behind the one line"


@pytest.mark.parametrize(
    "url", ["file:///etc/passwd", "ftp://127.0.0.1/w.pth", "127.0.0.1/w.pth", "http:///w.pth"]
)
def test_non_http_urls_are_rejected(url: str, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="only http"):
        fetch_file(url, tmp_path / "w.pth", SHA, progress=False)
    assert not (tmp_path / "w.pth").exists()


def test_bad_pin_is_a_programming_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="64 hex"):
        fetch_file("http://127.0.0.1/w.pth", tmp_path / "w.pth", "abc", progress=False)
