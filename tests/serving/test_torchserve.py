"""A real TorchServe serving the three tiny tarballs, exercised over HTTP."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import time

import numpy as np
import pytest
import requests
from mmekit_limits import SAGEMAKER_PAYLOAD_BYTES

from scripts.archive import read_manifest
from scripts.examples import BALL_CENTRE, scene
from tests.servers import Server, extract_like_sagemaker
from tests.support import b64, decode_image

SAGEMAKER_BODY_LIMIT = SAGEMAKER_PAYLOAD_BYTES


def click(point=BALL_CENTRE) -> str:
    return json.dumps({"image": b64(scene()), "gen_args": {"point_coords": list(point)}})


def image_of(reply: requests.Response) -> np.ndarray:
    assert reply.status_code == 200, reply.text
    return np.asarray(decode_image(reply.json()["generated_image"]))


def assert_only_masked_pixels_changed(result: np.ndarray, mask: np.ndarray) -> None:
    original = np.asarray(scene())
    assert result.shape == original.shape
    assert np.array_equal(result[~mask], original[~mask])


# -- the two user flows ----------------------------------------------------------------------


@pytest.mark.gate("erase")
def test_erase_flow_click_then_mask_then_lama(local_server: Server):
    mask_png = local_server.predict("sam", click()).json()["generated_image"]
    mask = np.asarray(decode_image(mask_png)) > 0
    assert mask.shape == (480, 640)
    erased = local_server.predict(
        "lama", json.dumps({"image": b64(scene()), "mask_image": mask_png})
    )
    assert_only_masked_pixels_changed(image_of(erased), mask)


@pytest.mark.gate("replace")
def test_replace_flow_click_then_mask_then_sd(local_server: Server):
    mask_png = local_server.predict("sam", click()).json()["generated_image"]
    mask = np.asarray(decode_image(mask_png)) > 0
    body = {
        "image": b64(scene()),
        "mask_image": mask_png,
        "prompt": "a potted cactus",
        "gen_args": {"seed": 1, "num_inference_steps": 2},
    }
    replaced = local_server.predict("sd", json.dumps(body))
    assert_only_masked_pixels_changed(image_of(replaced), mask)


def test_repeat_clicks_hit_the_embedding_cache_over_http(local_server: Server):
    local_server.predict("sam", click((10, 10)))
    again = local_server.predict("sam", click((600, 400)))
    assert again.json()["embedding_cache"] == "hit"


# -- errors and limits -----------------------------------------------------------------------


def test_bad_input_is_a_400_json_and_the_worker_keeps_serving(local_server: Server):
    bad = local_server.predict("sam", json.dumps({"image": "%%%", "gen_args": {}}))
    assert bad.status_code == 400
    assert bad.headers["content-type"].startswith("application/json")
    assert bad.json()["error"] == "invalid_base64"
    assert local_server.predict("sam", click()).status_code == 200


def test_form_encoded_body_gets_a_hint_about_content_type(local_server: Server):
    reply = local_server.client.predict(
        "lama",
        click(),
        content_type="application/x-www-form-urlencoded",
        token=local_server.token,
        timeout=30,
    )
    assert reply.status_code == 400
    assert "Content-Type: application/json" in reply.json()["message"]


def test_body_over_sagemakers_limit_is_refused_and_one_at_the_limit_is_not(
    local_server: Server,
):
    body = json.loads(click())
    body["padding"] = ""
    base = len(json.dumps(body).encode())
    body["padding"] = "x" * (SAGEMAKER_BODY_LIMIT - base)
    at_limit = json.dumps(body).encode()
    assert len(at_limit) == SAGEMAKER_BODY_LIMIT
    assert local_server.predict("sam", at_limit).status_code == 200  # unknown fields ignored
    over = local_server.predict("sam", at_limit + b" ")
    assert over.status_code == 413  # refused by the frontend, the worker never sees it


# -- the local profile's security ------------------------------------------------------------


def test_inference_needs_the_token(local_server: Server):
    for token in (None, "wrong"):
        refused = local_server.predict("sam", click(), token=token)
        assert refused.status_code == 400  # TorchServe's answer to a missing or bad key
        assert refused.json()["type"] == "InvalidKeyException"
    assert local_server.predict("sam", click()).status_code == 200


def test_model_registration_api_is_off(local_server: Server):
    reply = requests.post(
        f"{local_server.management_url}/models",
        params={"url": "sam.tar.gz"},
        headers=local_server.headers(local_server.management_token),
        timeout=30,
    )
    assert reply.status_code == 405
    listing = local_server.client.models(token=local_server.management_token, timeout=30)
    assert {m["modelName"] for m in listing.json()["models"]} == {"sam", "lama", "sd"}


def test_every_socket_the_server_listens_on_is_loopback(local_server: Server):
    import psutil

    pid = local_server.runtime.running_pid()
    assert pid is not None
    listening = [c for c in psutil.Process(pid).net_connections("inet") if c.status == "LISTEN"]
    ports = {c.laddr.port for c in listening}
    assert {local_server.ports.inference, local_server.ports.management} <= ports
    assert {local_server.ports.grpc_inference, local_server.ports.grpc_management} <= ports
    # Java listens on IPv6 sockets: 127.0.0.1 shows as ::ffff:127.0.0.1
    for connection in listening:
        address = ipaddress.ip_address(connection.laddr.ip)
        address = getattr(address, "ipv4_mapped", None) or address
        assert address.is_loopback, connection


def test_a_second_start_from_the_same_run_folder_is_refused(local_server: Server, capsys):
    from scripts import serve

    code = serve.main(
        ["--run-dir", str(local_server.run_dir), "start", "--store", str(local_server.store)]
    )
    assert code == 1
    assert "already running" in capsys.readouterr().err
    assert local_server.predict("sam", click()).status_code == 200  # untouched


def test_served_tarballs_are_the_ones_in_the_manifest(local_server: Server):
    manifest = read_manifest(local_server.store)
    for model in ("sam", "lama", "sd"):
        entry = manifest["models"][model]
        served = local_server.store / entry["file"]
        assert hashlib.sha256(served.read_bytes()).hexdigest() == entry["sha256"]
        assert entry["tier"] == "tiny"


# -- the sagemaker profile -------------------------------------------------------------------


@pytest.fixture(scope="module")
def registered(sagemaker_server: Server, served_store) -> Server:
    """Register the three models as SageMaker does: extracted tarball, POST /models."""
    for model in ("sam", "lama", "sd"):
        tarball = served_store / f"{model}.tar.gz"
        name = hashlib.sha256(tarball.read_bytes()).hexdigest()[:16]
        folder = extract_like_sagemaker(tarball, sagemaker_server.store, name)
        reply = sagemaker_server.client.register(model, folder, timeout=120)
        assert reply.status in (200, 202), reply.text
    return sagemaker_server


def invoke(server: Server, model: str, body: str) -> requests.Response:
    return requests.post(
        f"{server.url}/models/{model}/invoke",
        data=body,
        headers={
            "X-Amzn-SageMaker-Target-Model": f"{model}.tar.gz",
            "Content-Type": "application/json",
        },
        timeout=120,
    )


def wait_for(server: Server, model: str, body: str) -> requests.Response:
    """Registration loads in the background: invoke until the worker answers (bounded)."""
    deadline = time.monotonic() + 120
    while True:
        reply = invoke(server, model, body)
        if reply.status_code == 200 or time.monotonic() > deadline:
            return reply
        time.sleep(0.5)


@pytest.mark.gate("sagemaker_profile")
def test_sagemaker_profile_serves_the_same_flows(registered: Server):
    mask_png = wait_for(registered, "sam", click()).json()["generated_image"]
    mask = np.asarray(decode_image(mask_png)) > 0
    erased = wait_for(
        registered, "lama", json.dumps({"image": b64(scene()), "mask_image": mask_png})
    )
    assert_only_masked_pixels_changed(image_of(erased), mask)
    body = {
        "image": b64(scene()),
        "mask_image": mask_png,
        "prompt": "a cactus",
        "gen_args": {"seed": 1, "num_inference_steps": 2},
    }
    assert_only_masked_pixels_changed(image_of(wait_for(registered, "sd", json.dumps(body))), mask)


def test_sagemaker_profile_needs_no_token_and_answers_bad_input_with_400(registered: Server):
    wait_for(registered, "sam", click())
    bad = invoke(registered, "sam", json.dumps({"gen_args": {}}))
    assert bad.status_code == 400 and bad.json()["error"] == "missing_field"


def test_registering_a_loaded_model_again_is_a_conflict(registered: Server, served_store):
    folder = next(registered.store.glob("*/model"))
    reply = registered.client.register("sam", folder, timeout=60)
    assert reply.status == 409
