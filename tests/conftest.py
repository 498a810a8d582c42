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


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> object:
    """Keep each phase's report on the test, so fixtures can tell a failure from a pass."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_slow = pytest.mark.skip(reason="slow: run with --run-slow (make test-slow)")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--run-slow"):
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def weights_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A weights/ folder for the session (tiers get built into it on demand)."""
    return tmp_path_factory.mktemp("weights")


@pytest.fixture(scope="session")
def tiny_weights(weights_root: Path) -> Callable[[str], Path]:
    """tiny_weights("sam") -> weights/tiny/sam, built on first use by `make weights`'s tool."""

    def _weights(model: str) -> Path:
        return build_tier("tiny", root=weights_root, models=(model,))[0]

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
