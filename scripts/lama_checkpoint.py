"""big-lama's published checkpoint -> safetensors for our generator, once, at fetch time.

`best.ckpt` is a PyTorch Lightning checkpoint: a pickle whose `state_dict` holds the generator
(`generator.model.*`), the discriminator, loss networks and evaluators, beside training
metadata that may reference classes of the training code. It is read without running any of
that code, its generator keys are checked against our network, and only those are kept.
"""

from __future__ import annotations

import pickle
import types
from collections.abc import Mapping
from pathlib import Path

import torch

import lama_net  # noqa: E402

from . import HANDLERS_DIR  # noqa: F401  (puts handlers/ on sys.path)

GENERATOR_PREFIX = "generator."


class _Inert:
    """Stands in for any class or function the pickle names outside torch's tensor allowlist:
    accepts whatever the pickle does to it and runs nothing."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __setstate__(self, state: object) -> None:
        pass

    def __setitem__(self, key: object, value: object) -> None:
        pass

    def append(self, value: object) -> None:
        pass

    def extend(self, values: object) -> None:
        pass


def _restricted_pickle_module() -> types.ModuleType:
    """A pickle module for torch.load whose Unpickler resolves only the globals torch's own
    weights_only loader allows; every other global becomes `_Inert`."""
    from torch._weights_only_unpickler import _get_allowed_globals

    allowed = _get_allowed_globals()

    class RestrictedUnpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> object:
            return allowed.get(f"{module}.{name}", _Inert)

    module = types.ModuleType("mmekit_restricted_pickle")
    module.Unpickler = RestrictedUnpickler  # type: ignore[attr-defined]
    # torch.load reads legacy (non-zip) checkpoints through `pickle_module.load`: it must be
    # the restricted unpickler too, or a crafted file runs code (tests/hardening/test_artifacts)
    module.load = lambda file, **kwargs: RestrictedUnpickler(file, **kwargs).load()  # type: ignore[attr-defined]
    module.__name__ = "mmekit_restricted_pickle"
    return module


def load_checkpoint_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a (Lightning) checkpoint, read without importing or running its classes."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # weights_only refuses the training metadata; keep the tensors, neutralise the rest
        checkpoint = torch.load(
            path, map_location="cpu", weights_only=False, pickle_module=_restricted_pickle_module()
        )
    state_dict = (
        checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, Mapping) else None
    )
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"{path} holds no state_dict")
    return {name: value for name, value in state_dict.items() if isinstance(value, torch.Tensor)}


def convert_big_lama_state_dict(
    checkpoint_state_dict: Mapping[str, torch.Tensor], variant: str = "big-lama"
) -> dict[str, torch.Tensor]:
    """Keep the generator's tensors, without their prefix, checked against our network."""
    converted = {
        name[len(GENERATOR_PREFIX) :]: tensor
        for name, tensor in checkpoint_state_dict.items()
        if name.startswith(GENERATOR_PREFIX)
    }
    expected = lama_net.build_lama(variant).state_dict()
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    mismatched = sorted(
        f"{name} {tuple(converted[name].shape)} != {tuple(expected[name].shape)}"
        for name in set(expected) & set(converted)
        if converted[name].shape != expected[name].shape
    )
    problems = []
    for label, names in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("wrong shape", mismatched),
    ):
        if names:
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            problems.append(f"{len(names)} {label}: {shown}")
    if problems:
        raise ValueError(f"not a {variant} generator checkpoint: " + "; ".join(problems))
    return {name: converted[name].contiguous() for name in expected}


def convert_file(checkpoint_path: Path, out_path: Path, variant: str = "big-lama") -> None:
    from safetensors.torch import save_file

    state_dict = convert_big_lama_state_dict(load_checkpoint_state_dict(checkpoint_path), variant)
    save_file(state_dict, str(out_path))
