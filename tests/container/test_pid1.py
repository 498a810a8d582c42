"""scripts/container.py as PID 1 in the real image: `docker stop` ends TorchServe and its
workers cleanly within the grace period, and a worker killed inside is replaced."""

from __future__ import annotations

import json
import time

import pytest

from scripts.examples import requests as example_requests
from scripts.sagemaker.backends import (
    CONTAINER_MODELS_DIR,
    CONTAINER_STOP_TIMEOUT_S,
    start_container,
)
from tests.container.conftest import processes, timed
from tests.servers import extract_like_sagemaker


@pytest.fixture
def serving(serving_image, archives, tmp_path):
    backend = start_container(tmp_path, serving_image.tags[0])
    try:
        backend.wait_until_accepting(300)
        extract_like_sagemaker(archives / "sam.tar.gz", backend.models_dir, "sam")
        started = time.monotonic()
        reply = backend.client.register("sam", CONTAINER_MODELS_DIR / "sam" / "model")
        assert reply.status == 200, reply.text
        timed("pid 1: register sam in the container", time.monotonic() - started)
        yield backend
    except BaseException:
        print(f"--- the container's log ---\n{backend.logs()}")
        raise
    finally:
        backend.stop()


def sam_answers(backend) -> int:
    body = json.dumps(example_requests(sd_steps=1)["sam"]).encode()
    return backend.client.invoke("sam", "sam.tar.gz", body, "application/json", 120).status


def worker_pids(backend) -> list[int]:
    described = json.loads(backend.client.describe("sam").body)
    return [w["pid"] for w in described[0]["workers"] if isinstance(w.get("pid"), int)]


def test_a_worker_killed_inside_is_replaced_and_the_next_request_served(serving):
    assert sam_answers(serving) == 200
    (pid,) = worker_pids(serving)
    killed = serving.container.exec_run(["bash", "-c", f"kill -KILL {pid}"])
    assert killed.exit_code == 0, killed.output
    started = time.monotonic()
    statuses = []
    for _ in range(60):  # bounded: TorchServe restarts the worker after a back-off
        statuses.append(sam_answers(serving))
        if statuses[-1] == 200:
            break
        time.sleep(1)
    timed("pid 1: SIGKILL of a worker until the next request is served",
          time.monotonic() - started, f"(answers on the way: {statuses})")  # fmt: skip
    assert statuses[-1] == 200, (statuses, serving.logs())
    assert worker_pids(serving) != [pid]


def test_docker_stop_ends_torchserve_and_its_workers_cleanly(serving):
    assert sam_answers(serving) == 200
    assert len(processes(serving.container)) >= 4  # PID 1, the launcher, Java, the worker
    started = time.monotonic()
    serving.container.stop(timeout=CONTAINER_STOP_TIMEOUT_S)
    took = time.monotonic() - started
    serving.container.reload()
    state = serving.container.attrs["State"]
    note = f"(exit {state['ExitCode']}; SIGKILL would come at {CONTAINER_STOP_TIMEOUT_S} s)"
    timed("pid 1: docker stop until the container exited", took, note)
    log = serving.logs(tail=400)
    assert state["Status"] == "exited" and state["ExitCode"] == 0, log
    assert "SIGTERM: stopping TorchServe" in log
    assert "killing what is left" not in log  # nothing had to be killed: all exited by itself
