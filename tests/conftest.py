"""Shared fixtures: tiny weights built once per session, handlers served the TorchServe way."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from scripts.weights import build_tier
from tests.support import ServedModel, make_model_dir


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_slow = pytest.mark.skip(reason="slow: run with --run-slow (make test-slow)")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--run-slow"):
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """tiny_weights("sam") -> weights/tiny/sam, built on first use by `make weights`'s tool."""
    root = tmp_path_factory.mktemp("weights")

    def _weights(model: str) -> Path:
        return build_tier("tiny", root=root, models=(model,))[0]

    return _weights


@pytest.fixture(scope="session")
def serve(
    tiny_weights: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory
) -> Callable[..., ServedModel]:
    """serve("sam", batch_size=1, gpu_id=None, **handler_settings) -> a fresh ServedModel."""

    def _serve(
        model: str, batch_size: int = 1, gpu_id: int | None = None, **settings: object
    ) -> ServedModel:
        folder = make_model_dir(
            tmp_path_factory.mktemp(f"{model}-model"), model, tiny_weights(model), settings
        )
        return ServedModel(folder, batch_size, gpu_id)

    return _serve


@pytest.fixture(scope="module")
def sam(serve: Callable[..., ServedModel]) -> ServedModel:
    return serve("sam")


@pytest.fixture(scope="module")
def lama(serve: Callable[..., ServedModel]) -> ServedModel:
    return serve("lama")


@pytest.fixture(scope="module")
def sd(serve: Callable[..., ServedModel]) -> ServedModel:
    return serve("sd")
