"""The browser editor (scripts/ui.py): its JSON API against a fake target, the click → mask →
erase flow against the real local TorchServe, and the page itself driven in Debian's chromium."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import uvicorn
from PIL import Image, ImageDraw, ImageFilter
from starlette.testclient import TestClient

from scripts import ui
from scripts.client import EditError, LocalTarget, png_bytes
from scripts.serve import free_ports
from tests.servers import Server

CHROMIUM = Path("/usr/bin/chromium")
LOOPBACK = "http://127.0.0.1"  # the editor answers loopback host names only


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def image_from_b64(text: str) -> Image.Image:
    if text.startswith("data:"):
        text = text.split(",", 1)[1]
    return Image.open(io.BytesIO(base64.b64decode(text)))


def gradient(width: int = 64, height: int = 48) -> Image.Image:
    ramp = np.linspace(0, 255, width * height, dtype=np.uint8).reshape(height, width)
    return Image.fromarray(np.stack([ramp, ramp[::-1], np.full_like(ramp, 90)], axis=2))


class FakeTarget:
    """SAM answers a square around the first click; LaMa and SD black out the mask."""

    name = "fake"

    def __init__(self, error: EditError | None = None) -> None:
        self.error = error
        self.calls: list[tuple[str, dict]] = []

    def describe(self) -> str:
        return "an in-memory fake"

    def invoke(self, model: str, body: bytes) -> dict:
        payload = json.loads(body)
        self.calls.append((model, payload))
        if self.error is not None:
            raise self.error
        image = image_from_b64(payload["image"]).convert("RGB")
        if model == "sam":
            x, y = payload["gen_args"]["point_coords"][0]
            mask = Image.new("L", image.size, 0)
            ImageDraw.Draw(mask).rectangle([x - 5, y - 5, x + 5, y + 5], fill=255)
            cache = "hit" if len(self.calls) > 1 else "miss"
            return {"generated_image": b64(png_bytes(mask)), "embedding_cache": cache}
        mask = image_from_b64(payload["mask_image"]).convert("L")
        image.paste((0, 0, 0), mask=mask)
        reply = {"generated_image": b64(png_bytes(image))}
        if model == "sd":
            reply["seed"] = payload["gen_args"].get("seed", 1234)
        return reply


@pytest.fixture
def fake() -> FakeTarget:
    return FakeTarget()


@pytest.fixture
def api(fake: FakeTarget) -> TestClient:
    return TestClient(ui.create_app(fake), base_url=LOOPBACK)


def square_mask(size: tuple[int, int], box: tuple[int, int, int, int]) -> Image.Image:
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).rectangle(box, fill=255)
    return mask


def edit_body(image: Image.Image, mask: Image.Image, **extra) -> dict:
    return {"image": b64(png_bytes(image)), "mask": b64(png_bytes(mask)), "dilate": 0, **extra}


def grown(mask: np.ndarray, margin: int) -> np.ndarray:
    image = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.array(image.filter(ImageFilter.MaxFilter(2 * margin + 1))) > 0


def changed_pixels(result: Image.Image, original: Image.Image) -> np.ndarray:
    before = np.array(original.convert("RGB")).astype(int)
    return np.any(np.array(result.convert("RGB")).astype(int) != before, axis=2)


# -- the API, against a fake target ----------------------------------------------------------


def test_the_page_and_its_static_files_are_served(api: TestClient):
    page = api.get("/")
    assert page.status_code == 200
    for element in ("sample-select", "file-input", "canvas", "mask-overlay", "dilate", "erase"):
        assert f'id="{element}"' in page.text
    assert api.get("/static/app.js").status_code == 200
    assert api.get("/static/style.css").status_code == 200


def test_samples_are_listed_and_served_as_png(api: TestClient):
    assert api.get("/api/samples").json() == ["chelsea", "astronaut"]
    sample = api.get("/api/samples/chelsea")
    assert sample.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(sample.content)).size == (451, 300)
    missing = api.get("/api/samples/nope")
    assert missing.status_code == 404
    assert "chelsea" in missing.json()["message"]


def test_segment_returns_the_mask_and_the_cache_state(api: TestClient, fake: FakeTarget):
    body = {"image": b64(png_bytes(gradient())), "points": [[20, 30]], "labels": [1], "dilate": 3}
    reply = api.post("/api/segment", json=body)
    assert reply.status_code == 200, reply.text
    mask = image_from_b64(reply.json()["mask"])
    assert mask.size == (64, 48) and mask.getpixel((20, 30)) == 255
    assert reply.json()["embedding_cache"] == "miss"
    assert api.post("/api/segment", json=body).json()["embedding_cache"] == "hit"
    gen_args = fake.calls[0][1]["gen_args"]
    assert gen_args["point_coords"] == [[20.0, 30.0]]
    assert gen_args["dilate_kernel_size"] == 3


def test_erase_changes_only_the_masked_pixels(api: TestClient):
    image, mask = gradient(), square_mask((64, 48), (10, 10, 20, 20))
    reply = api.post("/api/erase", json=edit_body(image, mask))
    assert reply.status_code == 200, reply.text
    result = image_from_b64(reply.json()["image"])
    assert result.size == image.size
    assert np.array_equal(changed_pixels(result, image), np.array(mask) > 0)


def test_replace_passes_the_prompt_and_returns_the_seed(api: TestClient, fake: FakeTarget):
    body = edit_body(gradient(), square_mask((64, 48), (1, 1, 9, 9)), prompt="a cat", seed=42)
    reply = api.post("/api/replace", json={**body, "negative_prompt": "dog", "steps": 3})
    assert reply.status_code == 200, reply.text
    assert reply.json()["seed"] == 42
    model, payload = fake.calls[-1]
    assert model == "sd" and payload["prompt"] == "a cat" and payload["negative_prompt"] == "dog"
    assert payload["gen_args"]["num_inference_steps"] == 3


HI = b64(b"hi")  # valid base64, not an image: the checks before decoding come first
POINT = {"image": HI, "points": [[1, 1]]}
BAD_REQUESTS = {
    "missing image": ("/api/segment", {"points": [[1, 1]]}, "missing_image"),
    "bad base64": ("/api/segment", {**POINT, "image": "%%%not base64"}, "invalid_base64"),
    "not an image": ("/api/segment", POINT, "bad_request"),
    "no points": ("/api/segment", {**POINT, "points": []}, "missing_points"),
    "bad point": ("/api/segment", {**POINT, "points": [[1, "x"]]}, "invalid_points"),
    "bad label": ("/api/segment", {**POINT, "labels": [2]}, "invalid_labels"),
    "dilate true": ("/api/erase", {"image": HI, "mask": HI, "dilate": True}, "invalid_dilate"),
    "no prompt": ("/api/replace", {"image": HI, "mask": HI, "prompt": " "}, "missing_prompt"),
    "no mask": ("/api/erase", {"image": b64(png_bytes(gradient()))}, "missing_mask"),
}


@pytest.mark.parametrize("path, body, error", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_bad_input_is_a_400_that_says_what_to_fix(api, fake, path, body, error):
    reply = api.post(path, json=body)
    assert reply.status_code == 400
    assert reply.json()["error"] == error
    assert reply.json()["message"]
    assert fake.calls == []  # nothing reached the target


def test_infinity_is_not_a_number_of_pixels(api: TestClient):
    body = b'{"image": "aGk=", "mask": "aGk=", "dilate": Infinity}'  # json.loads accepts it
    reply = api.post("/api/erase", content=body, headers={"Content-Type": "application/json"})
    assert reply.status_code == 400
    assert reply.json()["error"] == "invalid_dilate"


def test_a_mask_of_another_size_is_a_400(api: TestClient):
    body = edit_body(gradient(), square_mask((10, 10), (1, 1, 5, 5)))
    reply = api.post("/api/erase", json=body)
    assert reply.status_code == 400
    assert "must match" in reply.json()["message"]


@pytest.mark.parametrize(
    "content, content_type",
    [(b"{not json", "application/json"), (b"[1, 2]", "application/json"), (b"{}", "text/plain")],
)
def test_a_body_that_is_not_a_json_object_is_a_400(api: TestClient, content, content_type):
    reply = api.post("/api/erase", content=content, headers={"Content-Type": content_type})
    assert reply.status_code == 400
    assert reply.json()["error"] == "not_json"


def test_a_body_over_the_limit_is_refused_unread(api: TestClient, monkeypatch):
    monkeypatch.setattr(ui, "MAX_REQUEST_BYTES", 1000)
    declared = api.post("/api/erase", json={"image": "A" * 2000})
    assert declared.status_code == 400 and declared.json()["error"] == "too_large"
    chunks = (b" " * 400 for _ in range(5))  # no Content-Length: counted as it streams
    streamed = api.post("/api/erase", content=chunks, headers={"Content-Type": "application/json"})
    assert streamed.status_code == 400 and streamed.json()["error"] == "too_large"


@pytest.mark.parametrize("exit_code, status", [(2, 400), (3, 502), (4, 400), (5, 502)])
def test_client_errors_map_to_400_or_502_with_their_message(exit_code: int, status: int):
    target = FakeTarget(EditError(f"went wrong with code {exit_code}", exit_code))
    api = TestClient(ui.create_app(target), base_url=LOOPBACK)
    body = {"image": b64(png_bytes(gradient())), "points": [[3, 3]]}
    reply = api.post("/api/segment", json=body)
    assert reply.status_code == status
    assert reply.json()["message"] == f"went wrong with code {exit_code}"


def test_an_unexpected_failure_is_json_not_a_traceback(fake: FakeTarget):
    fake.invoke = lambda model, body: {"generated_image": None}  # breaks the client's decoding
    api = TestClient(ui.create_app(fake), base_url=LOOPBACK, raise_server_exceptions=False)
    reply = api.post("/api/segment", json={"image": b64(png_bytes(gradient())), "points": [[1, 1]]})
    assert reply.status_code == 500
    assert reply.json()["error"] == "internal"


@pytest.mark.parametrize(
    "host", ["attacker.example", "attacker.example:8095", "127.0.0.1.nip.io:8095", "[::1]:8095"]
)
def test_other_host_names_are_refused_with_json(fake: FakeTarget, host: str):
    # a page on another site that rebinds its name to 127.0.0.1 must not reach the API
    api = TestClient(ui.create_app(fake), base_url=LOOPBACK)
    for method, path in (("GET", "/api/samples"), ("GET", "/"), ("POST", "/api/segment")):
        reply = api.request(method, path, json=POINT, headers={"Host": host})
        assert reply.status_code == 400, (method, path)
        assert reply.json()["error"] == "bad_host"
        assert host in reply.json()["message"]
    assert fake.calls == []


def test_the_loopback_names_are_answered_on_any_port(api: TestClient):
    for host in ("127.0.0.1:8095", "localhost:8095", "LOCALHOST:9999"):
        assert api.get("/api/samples", headers={"Host": host}).status_code == 200, host


FOREIGN_ORIGINS = {
    "another site": {"Origin": "https://attacker.example"},
    "another local port": {"Origin": "http://127.0.0.1:3000"},
    "an opaque origin": {"Origin": "null"},  # a sandboxed frame, a file:// page
    "https on our port": {"Origin": "https://127.0.0.1:8095"},
    "cross-site fetch": {"Origin": "http://127.0.0.1:8095", "Sec-Fetch-Site": "cross-site"},
    "same-site fetch": {"Sec-Fetch-Site": "same-site"},  # another port of this machine
}


@pytest.mark.parametrize("headers", FOREIGN_ORIGINS.values(), ids=FOREIGN_ORIGINS.keys())
def test_edits_from_another_origin_are_a_403(fake: FakeTarget, headers: dict):
    api = TestClient(ui.create_app(fake), base_url="http://127.0.0.1:8095")
    body = {"image": b64(png_bytes(gradient())), "points": [[3, 3]]}
    reply = api.post("/api/segment", json=body, headers=headers)
    assert reply.status_code == 403
    assert reply.json()["error"] == "cross_origin"
    assert reply.json()["message"]
    assert fake.calls == []  # the target was not spent
    # a read goes through: the browser's CORS keeps its answer from the other page
    assert api.get("/api/samples", headers=headers).status_code == 200


@pytest.mark.parametrize(
    "headers",
    [
        {},  # curl, the CLI: no Origin
        {"Origin": "http://127.0.0.1:8095", "Sec-Fetch-Site": "same-origin"},  # the page
        {"Origin": "http://localhost:8095", "Host": "localhost:8095"},
    ],
)
def test_edits_from_the_editors_own_page_or_no_page_go_through(fake: FakeTarget, headers):
    api = TestClient(ui.create_app(fake), base_url="http://127.0.0.1:8095")
    body = {"image": b64(png_bytes(gradient())), "points": [[3, 3]]}
    reply = api.post("/api/segment", json=body, headers=headers)
    assert reply.status_code == 200, reply.text


# -- the real local TorchServe ---------------------------------------------------------------


@pytest.fixture(scope="module")
def local_app(local_server: Server):
    return ui.create_app(LocalTarget(local_server.url, local_server.token))


def test_click_then_erase_through_the_local_server(local_app):
    api = TestClient(local_app, base_url=LOOPBACK)
    chelsea = api.get("/api/samples/chelsea").content
    original = Image.open(io.BytesIO(chelsea))
    segment = {"image": b64(chelsea), "points": [[225, 150]], "labels": [1], "dilate": 5}
    first = api.post("/api/segment", json=segment)
    assert first.status_code == 200, first.text
    assert api.post("/api/segment", json=segment).json()["embedding_cache"] == "hit"
    mask = image_from_b64(first.json()["mask"])
    assert mask.size == original.size
    erased = api.post("/api/erase", json={"image": b64(chelsea), "mask": first.json()["mask"]})
    assert erased.status_code == 200, erased.text
    result = image_from_b64(erased.json()["image"])
    assert result.size == original.size
    changed = changed_pixels(result, original)
    assert not changed[~(np.array(mask) > 0)].any()  # LaMa keeps every unmasked pixel


def test_the_model_refusing_is_a_400_with_its_message(local_app):
    api = TestClient(local_app, base_url=LOOPBACK)
    image = png_bytes(gradient())
    reply = api.post("/api/segment", json={"image": b64(image), "points": [[64, 10]]})
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"] == "refused"


# -- the page in a browser -------------------------------------------------------------------


@contextmanager
def serve_ui(app) -> Iterator[str]:
    """The editor on a free loopback port, in a thread, stopped afterwards."""
    (port,) = free_ports(1)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "the editor did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no {CHROMIUM} (`make setup` installs it)")
def test_the_page_erases_a_clicked_object(local_app, tmp_path: Path):
    from playwright.sync_api import sync_playwright

    original = Image.open(io.BytesIO(ui.sample_png("chelsea"))).convert("RGB")
    errors: list[str] = []
    with serve_ui(local_app) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"]
        )
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.set_default_timeout(60_000)
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(url)
            page.select_option("#sample-select", "chelsea")
            page.locator('#image[data-ready="true"]').wait_for()
            box = page.locator("#canvas").bounding_box()
            page.click("#canvas", position={"x": box["width"] / 2, "y": box["height"] / 2})
            page.locator('#mask-overlay[data-ready="true"]').wait_for()
            overlay = page.evaluate("document.getElementById('mask-overlay').toDataURL()")
            page.click("#erase")
            page.locator('#result[data-ready="true"]').wait_for()
            result = image_from_b64(page.evaluate("document.getElementById('result').src"))
            download = page.get_attribute("#download", "href")
            status = page.text_content("#status")
            screenshot = tmp_path / "editor.png"
            page.screenshot(path=str(screenshot), full_page=True)
            print(f"screenshot: {screenshot}")
            refusal = show_a_server_error(page)
            opened_width = open_a_file(page, tmp_path)
        finally:
            browser.close()
    assert errors == []
    mask = np.array(image_from_b64(overlay))[..., 3] > 0  # the tint's alpha is the mask
    assert mask.any(), status
    assert result.size == original.size
    changed = changed_pixels(result, original)
    assert not changed[~grown(mask, 2)].any(), "pixels well outside the mask changed"
    assert download.startswith("data:image/png;base64,")
    assert status.startswith("Done")
    assert refusal == "cannot reach the target: is it running?"
    assert opened_width == 64


def show_a_server_error(page) -> str:
    """The status line after the server answers Replace with an error (stubbed: no SD run)."""
    error = {"error": "unreachable", "message": "cannot reach the target: is it running?"}
    page.route(
        "**/api/replace",
        lambda route: route.fulfill(
            status=502, content_type="application/json", body=json.dumps(error)
        ),
    )
    page.fill("#prompt", "a teapot")
    page.click("#replace")
    page.locator("#status.error").wait_for()
    return page.text_content("#status")


def open_a_file(page, tmp_path: Path) -> int:
    """The width the page reads from an image opened through the file input."""
    path = tmp_path / "small.png"
    gradient().save(path)
    page.set_input_files("#file-input", str(path))
    page.wait_for_function("document.getElementById('image').naturalWidth === 64")
    page.locator('#image[data-ready="true"]').wait_for()
    return page.evaluate("document.getElementById('canvas').width")
