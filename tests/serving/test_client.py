"""The editing client (`mmekit segment|erase|replace`) against the local TorchServe and the
local multi-model endpoint: only the transport differs, so the same commands run on both."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from botocore.exceptions import ClientError
from PIL import Image, ImageChops, ImageFilter

from scripts import client
from scripts.examples import BALL_CENTRE, ball_mask, scene
from scripts.mme import LocalSource
from scripts.serve import free_ports
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
    """A target that answers like the models and remembers what it was sent."""

    name = "fake"

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict]] = []

    def describe(self) -> str:
        return "a fake"

    def invoke(self, model: str, body: bytes) -> dict:
        payload = json.loads(body)
        self.sent.append((model, payload))
        image = Image.open(io.BytesIO(client.base64.b64decode(payload["image"])))
        answer = Image.new("L" if model == "sam" else "RGB", image.size, 255)
        return {"generated_image": client.b64(client.png_bytes(answer)), "scores": [1.0]}


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
    with pytest.raises(client.EditError, match="make promote") as raised:
        client.make_target("sagemaker", promotion=promotion)
    assert raised.value.exit_code == 2
    promotion.write_text(json.dumps({
        "endpoint": "mmekit", "region": "eu-west-1",
        "models": {"sam": {"target_model": "sam-abc.tar.gz", "sha256": "x", "size": 1}},
    }))  # fmt: skip
    target = client.make_target("sagemaker", promotion=promotion)
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

    target = client.RuntimeTarget("e", "us-east-1", _client=Runtime())
    assert target.invoke("lama", b"{}", sleep=lambda s: None) == {"generated_image": "aGk="}
    assert calls == ["lama.tar.gz"] * 3


def test_model_errors_show_the_handlers_message():
    error = ClientError(
        {"Error": {"Code": "ModelError", "Message": "Received client error (400)"},
         "OriginalStatusCode": 400,
         "OriginalMessage": json.dumps({"error": "bad_point", "message": "point is outside"})},
        "InvokeEndpoint",
    )  # fmt: skip
    failure = client.runtime_error(error, "sam.tar.gz")
    assert failure.exit_code == 4 and "point is outside" in str(failure)


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
