"""The two TorchServe profiles (scripts/torchserve/profile.py) and the serve tool's own checks,
without starting a server."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from scripts import serve
from scripts.torchserve import RUN_DIR, ServeError
from scripts.torchserve.profile import Ports, check_ports_free, render_profile
from scripts.torchserve.running import curl_lines


def properties(profile: str) -> dict[str, str]:
    text = render_profile(profile, Ports(18080, 18081, 18082, 17070, 17071), Path("/srv/models"))
    pairs = [line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#")]
    return {key.strip(): value.strip() for key, value in pairs}


def test_profiles_differ_where_intended_and_share_the_limits():
    local, sagemaker = properties("local"), properties("sagemaker")
    # local: token auth on (TorchServe's default), no model registration over HTTP
    assert "disable_token_authorization" not in local
    assert local["enable_model_api"] == "false"
    assert local["management_address"] == "http://127.0.0.1:18081"
    # sagemaker: as the inference toolkit runs an MME
    assert sagemaker["disable_token_authorization"] == "true"
    assert sagemaker["enable_model_api"] == "true"
    assert sagemaker["management_address"] == sagemaker["inference_address"]
    for key in (
        "max_request_size",
        "max_response_size",
        "decode_input_request",
        "default_workers_per_model",
        "default_response_timeout",
        "model_store",
        "allowed_urls",
        "install_py_dep_per_model",
        "inference_address",
    ):
        assert local[key] == sagemaker[key], key
    assert local["max_request_size"] == "6291456"  # SageMaker's InvokeEndpoint body limit
    assert local["decode_input_request"] == "false"
    assert local["allowed_urls"] == "file:///srv/models/[^%]*"  # no percent-escaped ..
    for profile in (local, sagemaker):
        assert all("127.0.0.1" in v for k, v in profile.items() if k.endswith("_address"))


def test_a_port_in_use_is_named_in_one_line():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        ports = Ports(port, *[p for p in (port + 1, port + 2, port + 3, port + 4)])
        with pytest.raises(ServeError) as raised:
            check_ports_free(ports, "local")
    message = str(raised.value)
    assert f"port {port} (inference)" in message and "INFERENCE_PORT" in message
    assert "\n" not in message


def test_ports_come_from_the_environment():
    ports = Ports.from_env({"INFERENCE_PORT": "9080", "METRICS_PORT": "9082"})
    assert (ports.inference, ports.management, ports.metrics) == (9080, 8081, 9082)
    with pytest.raises(ServeError, match="INFERENCE_PORT"):
        Ports.from_env({"INFERENCE_PORT": "http"})


def test_curl_lines_name_the_port_the_token_helper_and_the_request_files(tmp_path):
    text = curl_lines("http://127.0.0.1:9999", RUN_DIR / "requests")
    assert "http://127.0.0.1:9999/predictions/sam" in text
    assert "$(make -s token)" in text and "Content-Type: application/json" in text
    assert "@.mmekit/requests/sd.json" in text


def test_random_weights_get_a_loud_banner():
    banner = serve.tiny_banner({"sam": {"tier": "tiny"}, "sd": {"tier": "tiny"}})
    assert "meaningless" in banner and "make fetch-weights" in banner


def test_token_without_a_server_says_how_to_start_one(tmp_path, capsys):
    assert serve.main(["--run-dir", str(tmp_path), "token"]) == 1
    error = capsys.readouterr().err
    assert "make serve-local" in error and "make dev" in error
