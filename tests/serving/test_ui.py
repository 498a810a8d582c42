"""The browser editor (scripts/ui.py): its JSON API against a fake target, the click → mask →
erase flow against the real local TorchServe, and the page itself driven in Debian's chromium."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import uvicorn
from PIL import Image, ImageDraw, ImageFilter
from starlette.testclient import TestClient

from scripts import targets, ui
from scripts.client import IMAGE_ID, UNKNOWN_IMAGE_ID, png_bytes
from scripts.polling import poll_until
from scripts.targets import EditError, LocalTarget, refused
from scripts.torchserve.profile import free_ports
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


def sam_png(mask: Image.Image) -> bytes:
    """A mask PNG as the SAM handler writes it (zlib level 1): other bytes than png_bytes'."""
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


class FakeTarget:
    """SAM answers a square around the first click, and an image_id it keeps the image under
    (`images`, its embedding cache: clear it to have it forget); LaMa and SD black out the
    mask."""

    name = "fake"

    def __init__(self, error: EditError | None = None) -> None:
        self.error = error
        self.calls: list[tuple[str, dict]] = []
        self.images: dict[str, Image.Image] = {}
        self.masks: list[str] = []  # the generated_image of every SAM reply

    def describe(self) -> str:
        return "an in-memory fake"

    def invoke(self, model: str, body: bytes) -> dict:
        payload = json.loads(body)
        self.calls.append((model, payload))
        if self.error is not None:
            raise self.error
        if model == "sam":
            return self.segment(payload)
        image = image_from_b64(payload["image"]).convert("RGB")
        mask = image_from_b64(payload["mask_image"]).convert("L")
        image.paste((0, 0, 0), mask=mask)
        reply = {"generated_image": b64(png_bytes(image))}
        if model == "sd":
            reply["seed"] = payload["gen_args"].get("seed", 1234)
        return reply

    def segment(self, payload: dict) -> dict:
        if "image_id" in payload:
            image = self.images.get(payload["image_id"])
            if image is None:
                error = {"error": UNKNOWN_IMAGE_ID, "message": "send the image again"}
                raise refused(400, json.dumps(error))
        else:
            image = image_from_b64(payload["image"]).convert("RGB")
        image_id = hashlib.sha256(image.tobytes()).hexdigest()
        self.images[image_id] = image
        x, y = payload["gen_args"]["point_coords"][0]
        mask = Image.new("L", image.size, 0)
        ImageDraw.Draw(mask).rectangle([x - 5, y - 5, x + 5, y + 5], fill=255)
        self.masks.append(b64(sam_png(mask)))
        cache = "hit" if len(self.calls) > 1 else "miss"
        return {"generated_image": self.masks[-1], "embedding_cache": cache, "image_id": image_id}


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


def test_a_second_click_sends_the_image_id_and_gets_the_same_mask(api, fake: FakeTarget):
    click = {"points": [[20, 30]], "labels": [1], "dilate": 3}
    first = api.post("/api/segment", json={"image": b64(png_bytes(gradient())), **click})
    assert first.status_code == 200, first.text
    image_id = first.json()["image_id"]
    again = api.post("/api/segment", json={"image_id": image_id, **click})
    assert again.status_code == 200, again.text
    assert again.json()["image_id"] == image_id
    assert again.json()["mask"] == first.json()["mask"]
    assert (again.json()["width"], again.json()["height"]) == (64, 48)
    (_, to_target) = fake.calls[-1]
    assert to_target == {"image_id": image_id, "gen_args": fake.calls[0][1]["gen_args"]}


def test_an_image_id_the_target_forgot_is_answered_by_sending_the_picture(api, fake):
    image = b64(png_bytes(gradient()))
    first = api.post("/api/segment", json={"image": image, "points": [[20, 30]]}).json()
    fake.images.clear()  # evicted, or the server restarted
    again = api.post("/api/segment", json={"image_id": first["image_id"], "points": [[20, 30]]})
    assert again.status_code == 200, again.text
    assert [sorted(payload) for _, payload in fake.calls] == [
        ["gen_args", "image"], ["gen_args", "image_id"], ["gen_args", "image"],
    ]  # fmt: skip
    assert fake.calls[2][1]["image"] == image  # the picture the editor kept, as first sent
    assert again.json()["mask"] == first["mask"] and again.json()["image_id"] == first["image_id"]


def test_an_image_id_the_editor_does_not_hold_is_a_400_that_asks_for_the_image(api, fake):
    reply = api.post("/api/segment", json={"image_id": "0" * 64, "points": [[1, 1]]})
    assert reply.status_code == 400
    assert reply.json()["error"] == "unknown_image_id"
    assert "send the image again" in reply.json()["message"]
    assert fake.calls == []


def test_the_editor_keeps_only_the_most_recent_pictures(fake: FakeTarget, monkeypatch):
    monkeypatch.setattr(ui, "RECENT_PICTURES", 2)
    api = TestClient(ui.create_app(fake), base_url=LOOPBACK)
    ids = []
    for width in (30, 31, 32):
        body = {"image": b64(png_bytes(gradient(width))), "points": [[1, 1]]}
        ids.append(api.post("/api/segment", json=body).json()["image_id"])
    answers = [
        api.post("/api/segment", json={"image_id": image_id, "points": [[1, 1]]}).status_code
        for image_id in ids
    ]
    assert answers == [400, 200, 200]  # the oldest picture made room


def test_sams_png_is_passed_through_unless_the_picture_was_downscaled(fake: FakeTarget):
    body = {"image": b64(png_bytes(gradient())), "points": [[20, 30]]}
    as_is = TestClient(ui.create_app(fake), base_url=LOOPBACK).post("/api/segment", json=body)
    assert as_is.json()["mask"] == fake.masks[-1]  # SAM's own bytes: not decoded and re-encoded
    assert fake.masks[-1] != ui.png_base64(image_from_b64(fake.masks[-1]))  # as a re-encode is
    downscaled = TestClient(ui.create_app(fake, max_side=32), base_url=LOOPBACK)
    reply = downscaled.post("/api/segment", json=body).json()
    assert fake.calls[-1][1]["gen_args"]["point_coords"] == [[10.0, 15.0]]
    assert image_from_b64(fake.masks[-1]).size == (32, 24)
    mask = image_from_b64(reply["mask"])
    assert (reply["width"], reply["height"]) == mask.size == (64, 48)
    assert mask.getpixel((20, 30)) == 255 and mask.getpixel((50, 5)) == 0


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
    "image and id": ("/api/segment", {**POINT, "image_id": "0" * 64}, "conflicting_fields"),
    "bad image id": (
        "/api/segment",
        {"image_id": "0" * 63, "points": [[1, 1]]},
        "invalid_image_id",
    ),
    "image id not text": (
        "/api/segment",
        {"image_id": [1], "points": [[1, 1]]},
        "invalid_image_id",
    ),
    "unknown image id": (
        "/api/segment",
        {"image_id": "0" * 64, "points": [[1, 1]]},
        "unknown_image_id",
    ),
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


@pytest.mark.parametrize(
    ("kind", "exit_code", "status", "error"),
    [
        (targets.CannotSend, 2, 400, "bad_request"),
        (targets.Unreachable, 3, 502, "unreachable"),
        (targets.Refused, 4, 400, "refused"),
        (targets.TargetFailed, 5, 502, "target_failed"),
    ],
)
def test_client_errors_map_to_400_or_502_with_their_message(kind, exit_code, status, error):
    assert kind.exit_code == exit_code and issubclass(kind, EditError)  # the CLI's exit code
    target = FakeTarget(kind(f"went wrong with code {exit_code}"))
    api = TestClient(ui.create_app(target), base_url=LOOPBACK)
    body = {"image": b64(png_bytes(gradient())), "points": [[3, 3]]}
    reply = api.post("/api/segment", json=body)
    assert reply.status_code == status and reply.json()["error"] == error
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
    poll_until(lambda: server.started, what="the editor to start", timeout=30, interval=0.05)
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
            segments = record_segment_requests(page)
            page.goto(url)
            page.select_option("#sample-select", "chelsea")
            page.locator('#image[data-ready="true"]').wait_for()
            box = page.locator("#canvas").bounding_box()
            centre = {"x": box["width"] / 2, "y": box["height"] / 2}
            first_ms, first_overlay = click_until_masked(page, centre)
            page.click("#undo-point")
            repeat_ms, overlay = click_until_masked(page, centre)
            print(f"click -> overlay drawn: first {first_ms} ms, repeat (image_id) {repeat_ms} ms")
            page.click("#undo-point")
            resent = resend_when_the_id_is_unknown(page, centre)
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
    first, repeat, *_ = segments
    assert "image" in first and "image_id" not in first
    assert "image" not in repeat and IMAGE_ID.fullmatch(repeat["image_id"])
    assert repeat["points"] == first["points"]
    assert overlay == first_overlay  # the same mask, from the id alone
    assert resent == [
        ["dilate", "image_id", "labels", "points"],
        ["dilate", "image", "labels", "points"],
    ]
    mask = np.array(image_from_b64(overlay))[..., 3] > 0  # the tint's alpha is the mask
    assert mask.any(), status
    assert result.size == original.size
    changed = changed_pixels(result, original)
    assert not changed[~grown(mask, 2)].any(), "pixels well outside the mask changed"
    assert download.startswith("data:image/png;base64,")
    assert status.startswith("Done")
    assert refusal == "cannot reach the target: is it running?"
    assert opened_width == 64


def record_segment_requests(page) -> list[dict]:
    """The bodies the page posts to /api/segment, in order."""
    bodies: list[dict] = []

    def record(request) -> None:
        if request.url.endswith("/api/segment"):
            bodies.append(request.post_data_json)

    page.on("request", record)
    return bodies


def click_until_masked(page, position: dict) -> tuple[str, str]:
    """Click, wait for the overlay: the page's own click -> drawn time (ms), and the overlay."""
    page.click("#canvas", position=position)
    page.locator('#mask-overlay[data-ready="true"]').wait_for()
    drawn_ms = page.get_attribute("#mask-overlay", "data-drawn-ms")
    return drawn_ms, page.evaluate("document.getElementById('mask-overlay').toDataURL()")


def resend_when_the_id_is_unknown(page, position: dict) -> list[list[str]]:
    """The fields of each /api/segment request for one click while the editor answers every
    image_id with 400 unknown_image_id (as after a restart): the page sends the image again."""
    forgotten = {"error": "unknown_image_id", "message": "send the image again"}
    fields: list[list[str]] = []

    def answer(route) -> None:
        body = route.request.post_data_json
        fields.append(sorted(body))
        if "image_id" not in body:
            route.continue_()
            return
        route.fulfill(status=400, content_type="application/json", body=json.dumps(forgotten))

    page.route("**/api/segment", answer)
    click_until_masked(page, position)
    page.unroute("**/api/segment")
    return fields


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
