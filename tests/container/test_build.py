"""The build itself: a rebuild of the same inputs and a handler-only change reuse the
dependency layers; torch's CUDA build is in the image's label."""

from __future__ import annotations

import re
import shutil
import time
import uuid
from pathlib import Path

from scripts import PROJECT_ROOT, image
from tests.container.conftest import timed


def steps_and_cache(log: Path) -> list[tuple[str, bool]]:
    """(step line, reused from cache) for every Dockerfile step of a podman or BuildKit log."""
    steps: list[tuple[str, bool]] = []
    for line in log.read_text(errors="replace").splitlines():
        text = line.strip()
        if image.STEP_LINE.match(text):
            steps.append((text, False))
        elif steps and ("Using cache" in text or text.endswith(" CACHED")):
            steps[-1] = (steps[-1][0], True)
    return steps


def test_the_image_says_which_cuda_build_torch_is(serving_image, docker_client):
    labels = docker_client.images.get(serving_image.tags[0]).labels
    assert labels[image.CUDA_LABEL] == serving_image.cuda
    assert re.fullmatch(r"\d+\.\d+|none", serving_image.cuda)
    assert labels[image.TORCH_LABEL].startswith("2.14.1")
    assert labels["com.amazonaws.sagemaker.capabilities.multi-models"] == "true"


def test_a_handler_only_change_reuses_the_dependency_layers(serving_image, tmp_path):
    context = tmp_path / "context"
    for relative in image.context_files():
        (context / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(PROJECT_ROOT / relative, context / relative)
    handler = context / "handlers" / "sam_handler.py"
    # unique per run: a change built before would come from the engine's cache, rightly
    handler.write_text(handler.read_text() + f"\n# a handler-only change {uuid.uuid4()}\n")
    log = tmp_path / "build.log"
    started = time.monotonic()
    built = image.build_image(root=context, log_path=log)
    timed("image: rebuild after a handler-only change", time.monotonic() - started)
    try:
        steps = steps_and_cache(log)
        install = [cached for step, cached in steps if "pip install" in step]
        handlers = [cached for step, cached in steps if "COPY handlers/" in step]
        assert install == [True], steps  # the multi-GB layer is reused
        assert handlers == [False], steps  # and the change is in the image
    finally:
        client = image.engine.ensure().client()
        try:
            client.images.remove(built.tags[0], noprune=False)
        finally:
            client.close()
