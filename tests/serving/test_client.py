"""The editing client (`mmekit segment|erase|replace`) against the local TorchServe and the
local multi-model endpoint: only the transport differs, so the same commands run on both."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from botocore.exceptions import ClientError
from PIL import Image, ImageChops, ImageFilter

from scripts import client, targets
from scripts.examples import BALL_CENTRE, ball_mask, scene
from scripts.sagemaker.sources import LocalSource
from scripts.torchserve.profile import free_ports
from tests.servers import Server, emulator_backend
from tests.serving.test_mme import Emulator, make_endpoint, serve_endpoint


@pytest.fixture(scope="module")
def emulator(served_store: Path, tmp_path_factory) -> Iterator[Emulator]:
    """`make serve-mme`: the emulator in front of its own keyed TorchServe."""
    with emulator_backend(tmp_path_factory.mktemp("client-mme")) as backend:
        endpoint = make_endpoint(
            backend, LocalSource(served_store), tmp_path_factory.mktemp("client-downloads")
        )
        yield from serve_endpoint(endpoint)


@pytest.fixture(autouse=True)
def image_ids_file(tmp_path: Path, monkeypatch) -> Path:
    """`mmekit segment`'s image_id file, per test: never the project's own .mmekit/."""
    path = tmp_path / "image-ids.json"
    monkeypatch.setattr(client, "IMAGE_IDS_FILE", path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("client-files")
    paths = {"scene": folder / "scene.png", "mask": folder / "mask.png"}
    scene().save(paths["scene"])
    ball_mask().save(paths["mask"])
    return paths


@pytest.fixture(params=["local", "mme"])
def target_args(request, local_server: Server, monkeypatch) -> list[str]:
    """The command-line flags that pick each target (the local one with the test server's key)."""
    if request.param == "local":
        monkeypatch.setenv("MMEKIT_TOKEN", local_server.token)
        return ["--target", "local", "--url", local_server.url]
    emulator = request.getfixturevalue("emulator")
    return ["--target", "mme", "--url", emulator.url, "--endpoint", emulator.endpoint.name]


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = client.main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def reply_info(out: str) -> dict:
    """The JSON `mmekit segment` prints after "wrote ... (mask WxH)"."""
    return json.loads(out[out.index("{") :])


class Spy:
    """A real target, and what it was sent (model and fields) and refused (error codes)."""

    def __init__(self, target: targets.Target) -> None:
        self.target, self.name = target, target.name
        self.sent: list[tuple[str, list[str]]] = []
        self.refusals: list[str | None] = []

    def describe(self) -> str:
        return self.target.describe()

    def invoke(self, model: str, body: bytes) -> dict:
        self.sent.append((model, sorted(json.loads(body))))
        try:
            return self.target.invoke(model, body)
        except targets.EditError as error:
            self.refusals.append(error.code)
            raise


def spy_on_targets(monkeypatch) -> list[Spy]:
    """Every target the command line makes, wrapped in a Spy (listed in the order made)."""
    spies: list[Spy] = []
    make_target = targets.make_target

    def spied(*args, **kwargs) -> Spy:
        spies.append(Spy(make_target(*args, **kwargs)))
        return spies[-1]

    monkeypatch.setattr(client, "make_target", spied)
    return spies


def unchanged_outside(result: Path, original: Path, mask: Image.Image, margin: int) -> bool:
    """Every pixel farther than `margin` from the mask is the original's own."""
    binary = mask.convert("L").point(lambda value: 255 if value else 0)
    grown = np.array(binary.filter(ImageFilter.MaxFilter(2 * margin + 1))) > 0
    before = np.array(Image.open(original).convert("RGB"))
    after = np.array(Image.open(result).convert("RGB"))
    return after.shape == before.shape and bool((after[~grown] == before[~grown]).all())


def test_segment_writes_the_mask_at_the_image_size(target_args, files, tmp_path, capsys):
    output = tmp_path / "mask.png"
    x, y = BALL_CENTRE
    code, out, err = run_cli(
        [*target_args, "segment", str(files["scene"]), "--point", f"{x},{y}", "-o", str(output)],
        capsys,
    )
    assert code == 0, err
    mask = Image.open(output)
    assert mask.size == scene().size and mask.mode == "L"
    assert set(np.unique(np.array(mask))) <= {0, 255}
    assert '"scores"' in out


def test_segment_again_on_the_same_file_sends_only_the_image_id(
    target_args, files, tmp_path, capsys, monkeypatch
):
    spies = spy_on_targets(monkeypatch)
    x, y = BALL_CENTRE
    outputs, infos = [tmp_path / "first.png", tmp_path / "again.png"], []
    for output in outputs:
        code, out, err = run_cli(
            [*target_args, "segment", str(files["scene"]), "--point", f"{x},{y}", "-o",
             str(output)],
            capsys,
        )  # fmt: skip
        assert code == 0, err
        infos.append(reply_info(out))
    first, again = spies
    assert first.sent == [("sam", ["gen_args", "image"])]
    assert again.sent == [("sam", ["gen_args", "image_id"])]
    assert infos[1]["image_id"] == infos[0]["image_id"]
    assert infos[1]["embedding_cache"] == "hit"
    assert Image.open(outputs[0]).tobytes() == Image.open(outputs[1]).tobytes()


def test_erase_with_clicks_changes_only_the_masked_region(target_args, files, tmp_path, capsys):
    x, y = BALL_CENTRE
    click = [str(files["scene"]), "--point", f"{x},{y}"]
    code, _, err = run_cli([*target_args, "segment", *click, "-o", str(tmp_path / "m.png")], capsys)
    assert code == 0, err
    output = tmp_path / "erased.png"
    code, out, err = run_cli(
        [*target_args, "erase", *click, "--dilate", "5", "-o", str(output)], capsys
    )
    assert code == 0, err
    assert "wrote" in out and Image.open(output).size == scene().size
    # SAM's mask for the same click, grown by the dilation: nothing outside it changed
    assert unchanged_outside(output, files["scene"], Image.open(tmp_path / "m.png"), margin=5)


def test_replace_with_a_mask_file_is_reproducible_by_seed(target_args, files, tmp_path, capsys):
    outputs = [tmp_path / "a.png", tmp_path / "b.png"]
    for output in outputs:
        code, out, err = run_cli(
            [*target_args, "replace", str(files["scene"]), "--mask", str(files["mask"]),
             "--prompt", "a cactus", "--seed", "7", "--steps", "2", "-o", str(output)],
            capsys,
        )  # fmt: skip
        assert code == 0, err
        assert "seed 7" in out
    assert outputs[0].read_bytes() == outputs[1].read_bytes()
    assert unchanged_outside(outputs[0], files["scene"], Image.open(files["mask"]), margin=16)


def test_the_models_message_is_passed_through_with_exit_4(target_args, files, tmp_path, capsys):
    code, _, err = run_cli(
        [*target_args, "segment", str(files["scene"]), "--point", "5000,10", "-o",
         str(tmp_path / "x.png")],
        capsys,
    )  # fmt: skip
    assert code == 4
    assert "outside the 640x480 image" in err and err.count("\n") == 1


def test_an_image_id_the_endpoint_forgot_is_answered_by_sending_the_image(
    emulator: Emulator, files
):
    """Through boto3 and the emulator: SageMaker evicting SAM (its worker and embedding cache
    go) turns the id into a ModelError 400 unknown_image_id; the client sends the image."""
    target = Spy(
        targets.RuntimeTarget(
            emulator.endpoint.name, "us-east-1", endpoint_url=emulator.url, name="mme"
        )
    )
    picture = client.prepare(files["scene"])
    mask, info = client.segment(target, picture, [BALL_CENTRE])
    remembered, hit = client.segment(target, picture, [BALL_CENTRE], image_id=info["image_id"])
    emulator.endpoint.unload("sam.tar.gz")
    again, fallback = client.segment(target, picture, [BALL_CENTRE], image_id=info["image_id"])
    assert target.sent == [
        ("sam", ["gen_args", "image"]),
        ("sam", ["gen_args", "image_id"]),
        ("sam", ["gen_args", "image_id"]),  # refused: the reloaded worker never saw it
        ("sam", ["gen_args", "image"]),
    ]
    assert target.refusals == [client.UNKNOWN_IMAGE_ID]
    assert hit["embedding_cache"] == "hit" and fallback["embedding_cache"] == "miss"
    assert hit["image_id"] == fallback["image_id"] == info["image_id"]
    assert remembered.tobytes() == mask.tobytes() == again.tobytes()


def test_a_server_that_is_down_is_exit_3(files, tmp_path, capsys):
    (port,) = free_ports(1)
    for flags in (["--target", "local"], ["--target", "mme"]):
        code, _, err = run_cli(
            [*flags, "--url", f"http://127.0.0.1:{port}", "segment", str(files["scene"]),
             "--point", "1,1", "-o", str(tmp_path / "x.png")],
            capsys,
        )  # fmt: skip
        assert code == 3, err
        assert "cannot reach" in err and "make serve-" in err


def test_an_image_over_the_body_limit_is_refused_before_sending(tmp_path, capsys, local_server):
    noise = np.random.default_rng(0).integers(0, 256, (2200, 2200, 3), dtype=np.uint8)
    big = tmp_path / "big.png"
    Image.fromarray(noise).save(big)
    code, _, err = run_cli(
        ["--url", "http://127.0.0.1:9", "segment", str(big), "--point", "10,10", "-o",
         str(tmp_path / "x.png")],
        capsys,
    )  # fmt: skip
    assert code == 2  # refused here: port 9 would have been exit 3
    assert "over SageMaker's 6,291,456-byte limit" in err and "--max-side" in err
    assert f"{big.stat().st_size:,}"[:2] in err or "bytes" in err


def test_max_side_downscales_and_returns_the_original_size(
    local_server, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("MMEKIT_TOKEN", local_server.token)
    noise = np.random.default_rng(1).integers(0, 256, (1800, 2000, 3), dtype=np.uint8)
    big = tmp_path / "big.png"
    Image.fromarray(noise).save(big)
    mask = Image.new("L", (2000, 1800))
    mask.paste(255, (900, 800, 1100, 1000))
    mask.save(tmp_path / "mask.png")
    output = tmp_path / "erased.png"
    code, _, err = run_cli(
        ["--url", local_server.url, "erase", str(big), "--mask", str(tmp_path / "mask.png"),
         "--max-side", "800", "-o", str(output)],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert Image.open(output).size == (2000, 1800)
    # outside the edited region the original's own pixels, not a resampled copy
    assert unchanged_outside(output, big, mask, margin=60)


# ---------------------------------------------------------------------------------------------
# Without a server


class Recording:
    """A target that answers like the models and remembers what it was sent. SAM names each
    image with an image_id and keeps its size under it, as its embedding cache does; `known`
    is that cache (clear it to have the target forget)."""

    name = "fake"

    def __init__(self, refusal: str | None = None) -> None:
        self.sent: list[tuple[str, dict]] = []
        self.known: dict[str, tuple[int, int]] = {}
        self.refusal = refusal  # SAM refuses every request with this error code

    def describe(self) -> str:
        return "a fake"

    def invoke(self, model: str, body: bytes) -> dict:
        payload = json.loads(body)
        self.sent.append((model, payload))
        if self.refusal is not None:
            raise targets.refused(400, json.dumps({"error": self.refusal, "message": "no"}))
        if "image_id" in payload:
            image_id = payload["image_id"]
            if image_id not in self.known:
                message = f"image_id {image_id[:12]}... is not in the cache: send the image again"
                error = {"error": client.UNKNOWN_IMAGE_ID, "message": message}
                raise targets.refused(400, json.dumps(error))
            size = self.known[image_id]
        else:
            image = Image.open(io.BytesIO(client.base64.b64decode(payload["image"])))
            image_id = hashlib.sha256(image.convert("RGB").tobytes()).hexdigest()
            size = image.size
        answer = Image.new("L" if model == "sam" else "RGB", size, 255)
        reply = {"generated_image": client.b64(client.png_bytes(answer)), "scores": [1.0]}
        if model == "sam":
            self.known[image_id] = size
            reply["image_id"] = image_id
        return reply


def test_a_repeat_segment_sends_only_the_image_id(tmp_path):
    Image.new("RGB", (64, 48), "gray").save(tmp_path / "photo.png")
    fake, picture = Recording(), client.prepare(tmp_path / "photo.png")
    mask, info = client.segment(fake, picture, [(10.0, 20.0)], dilate=3)
    again, again_info = client.segment(fake, picture, [(11.0, 21.0)], image_id=info["image_id"])
    (_, first), (_, repeat) = fake.sent
    assert "image" in first and "image_id" not in first
    assert repeat == {
        "image_id": info["image_id"],
        "gen_args": {
            "point_coords": [[11.0, 21.0]],
            "point_labels": 1,
            "dilate_kernel_size": 0,
            "mask_bits": 1,
        },
    }
    assert again_info["image_id"] == info["image_id"]
    assert again.size == mask.size == (64, 48)


def test_an_unknown_image_id_is_answered_by_sending_the_image_once(tmp_path):
    Image.new("RGB", (1000, 500), "gray").save(tmp_path / "photo.png")
    fake, picture = Recording(), client.prepare(tmp_path / "photo.png", max_side=500)
    _, info = client.segment(fake, picture, [(400.0, 200.0)])
    fake.known.clear()  # evicted, restarted, or another instance answers
    mask, again = client.segment(fake, picture, [(400.0, 200.0)], image_id=info["image_id"])
    assert [sorted(payload) for _, payload in fake.sent] == [
        ["gen_args", "image"], ["gen_args", "image_id"], ["gen_args", "image"],
    ]  # fmt: skip
    assert fake.sent[1][1]["gen_args"] == fake.sent[2][1]["gen_args"]  # the same click
    assert again["image_id"] == info["image_id"] and mask.size == (1000, 500)


def test_other_refusals_of_an_image_id_are_not_retried(tmp_path):
    Image.new("RGB", (64, 48)).save(tmp_path / "photo.png")
    fake = Recording(refusal="point_out_of_bounds")
    with pytest.raises(targets.EditError) as raised:
        client.segment(fake, client.prepare(tmp_path / "photo.png"), [(1, 1)], image_id="a" * 64)
    assert raised.value.code == "point_out_of_bounds" and raised.value.exit_code == 4
    assert len(fake.sent) == 1


def test_the_cli_sends_the_image_id_on_a_second_run_on_the_same_file(
    tmp_path, capsys, monkeypatch, image_ids_file
):
    fake = Recording()
    monkeypatch.setattr(client, "make_target", lambda *args: fake)
    Image.new("RGB", (64, 48), "gray").save(tmp_path / "photo.png")
    segment = ["segment", str(tmp_path / "photo.png"), "--point", "5,5", "-o"]
    outputs = []
    for run in range(3):
        if run == 2:
            fake.known.clear()  # the third run finds the server has forgotten it
        code, out, err = run_cli([*segment, str(tmp_path / f"{run}.png")], capsys)
        assert code == 0, err
        outputs.append(reply_info(out))
    sent = [sorted(payload) for _, payload in fake.sent]
    image, image_id = ["gen_args", "image"], ["gen_args", "image_id"]
    assert sent == [image, image_id, image_id, image]
    assert fake.sent[1][1]["image_id"] == outputs[0]["image_id"] == outputs[2]["image_id"]
    assert list(json.loads(image_ids_file.read_text()).values()) == [outputs[0]["image_id"]]
    # other bytes sent (here: downscaled) are another image: sent whole
    code, _, err = run_cli([*segment, str(tmp_path / "small.png"), "--max-side", "32"], capsys)
    assert code == 0, err
    assert sorted(fake.sent[-1][1]) == image


def test_the_image_id_file_keeps_the_most_recent_and_shrugs_off_a_broken_one(tmp_path):
    path = tmp_path / "deep" / "image-ids.json"
    ids = client.ImageIds(path, capacity=3)
    assert ids.get("anything") is None  # no file yet
    for number in range(5):
        ids.put(f"key {number}", f"{number:064x}")
    assert ids.get("key 2") == f"{2:064x}"
    assert [ids.get(f"key {n}") for n in (0, 1)] == [None, None]  # the oldest went first
    ids.put("key 2", "f" * 64)  # used again: now the most recent
    assert list(json.loads(path.read_text())) == ["key 3", "key 4", "key 2"]
    for broken in ("{not json", "[1, 2]", '{"key": "not an id", "other": 5}'):
        path.write_text(broken)
        assert ids.get("key") is None and ids.get("other") is None
        ids.put("key", "e" * 64)  # and it is written afresh
        assert ids.get("key") == "e" * 64


def test_points_and_dilation_are_scaled_with_the_image(tmp_path):
    image = tmp_path / "photo.png"
    Image.new("RGB", (1000, 500), "gray").save(image)
    fake = Recording()
    picture = client.prepare(image, max_side=500)
    mask, _ = client.segment(fake, picture, [(400.0, 200.0)], [1], dilate=10)
    ((model, payload),) = fake.sent
    assert payload["gen_args"]["point_coords"] == [[200.0, 100.0]]
    assert payload["gen_args"]["dilate_kernel_size"] == 5
    assert mask.size == (1000, 500)


def test_a_jpeg_is_sent_as_its_own_bytes(tmp_path):
    image = tmp_path / "photo.jpg"
    Image.new("RGB", (64, 48), "red").save(image, quality=80)
    assert client.prepare(image).data == image.read_bytes()
    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    Image.new("RGB", (64, 48), "red").save(rotated, exif=exif)
    picture = client.prepare(rotated)
    assert picture.original.size == (48, 64) and picture.data != rotated.read_bytes()


def test_mask_and_points_together_or_a_wrong_sized_mask_are_usage_errors(tmp_path, capsys):
    Image.new("RGB", (64, 48)).save(tmp_path / "i.png")
    Image.new("L", (10, 10)).save(tmp_path / "m.png")
    common = ["--url", "http://127.0.0.1:9", "erase", str(tmp_path / "i.png"), "-o", "x.png"]
    code, _, err = run_cli([*common, "--mask", str(tmp_path / "m.png")], capsys)
    assert code == 2 and "10x10" in err and "64x48" in err


def test_the_sagemaker_target_comes_from_promotion_json(tmp_path):
    promotion = tmp_path / "promotion.json"
    with pytest.raises(targets.EditError, match="make promote") as raised:
        targets.make_target("sagemaker", promotion=promotion)
    assert raised.value.exit_code == 2
    promotion.write_text(json.dumps({
        "endpoint": "mmekit", "region": "eu-west-1",
        "models": {"sam": {"target_model": "sam-abc.tar.gz", "sha256": "x", "size": 1}},
    }))  # fmt: skip
    target = targets.make_target("sagemaker", promotion=promotion)
    assert (target.endpoint, target.region) == ("mmekit", "eu-west-1")
    assert target.target_model("sam") == "sam-abc.tar.gz"


def test_a_model_still_loading_is_retried(monkeypatch):
    calls = []

    class Runtime:
        def invoke_endpoint(self, **arguments):
            calls.append(arguments["TargetModel"])
            if len(calls) < 3:
                raise ClientError(
                    {"Error": {"Code": "ModelNotReadyException", "Message": "loading"}},
                    "InvokeEndpoint",
                )
            body = io.BytesIO(json.dumps({"generated_image": "aGk="}).encode())
            return {"Body": body}

    target = targets.RuntimeTarget("e", "us-east-1", _client=Runtime())
    assert target.invoke("lama", b"{}", sleep=lambda s: None) == {"generated_image": "aGk="}
    assert calls == ["lama.tar.gz"] * 3


def test_model_errors_show_the_handlers_message():
    error = ClientError(
        {"Error": {"Code": "ModelError", "Message": "Received client error (400)"},
         "OriginalStatusCode": 400,
         "OriginalMessage": json.dumps({"error": "bad_point", "message": "point is outside"})},
        "InvokeEndpoint",
    )  # fmt: skip
    failure = targets.runtime_error(error, "sam.tar.gz")
    assert failure.exit_code == 4 and "point is outside" in str(failure)
    assert failure.code == "bad_point"  # what a caller tells unknown_image_id apart by


def test_a_refusal_carries_the_handlers_error_code_only():
    handler = json.dumps({"error": "unknown_image_id", "message": "send the image again"})
    assert targets.refused(400, handler).code == "unknown_image_id"
    torchserve = json.dumps({"code": 400, "type": "InvalidKeyException", "message": "bad key"})
    assert targets.refused(400, torchserve).code is None
    assert targets.refused(400, "not json").code is None
    assert targets.refused(500, json.dumps({"error": "internal_error", "message": "x"})).code == (
        "internal_error"
    )


def test_results_from_a_downscaled_copy_keep_the_original_outside_the_mask():
    original = Image.effect_noise((400, 300), 60).convert("RGB")
    picture = client.Picture(original, original.resize((200, 150)), b"")
    mask = Image.new("L", (400, 300))
    mask.paste(255, (100, 100, 200, 200))
    edited = Image.new("RGB", (200, 150), "white")
    combined = client.at_original_size(edited, mask, picture)
    assert combined.size == (400, 300)
    assert combined.getpixel((150, 150)) == (255, 255, 255)
    difference = ImageChops.difference(combined, original).crop((250, 0, 400, 300))
    assert difference.getbbox() is None
