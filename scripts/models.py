"""Which models exist, and what each one is: the one registry the harness reads.

A model is a `ModelSpec`: its handler (a flat module in handlers/, shipped at the archive's
root), its config folder (configs/<name>/model-config.yaml), its weights variant per tier and
how to build or fetch them, its example request, and what the tools need to know about it
(footprint's torch modules, the curl line's output file, the keys promote's smoke check wants
in a reply). Adding a model is one entry below, its handler and its config; nothing else in
scripts/ names a model.

Importing this module imports the standard library only: HTTP-only tools (the `mmekit` client,
`make iam-policy`, `make promote DRY_RUN=1`) read the names without loading torch. Anything
heavy is named as "module:function" and imported on use (`resolve`).

    from .models import MODELS, spec
    spec("sam").config_file   # configs/sam/model-config.yaml
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from . import HANDLERS_DIR, PROJECT_ROOT

CONFIGS_DIR = PROJECT_ROOT / "configs"
CONFIG_FILE = "model-config.yaml"
TIERS = ("tiny", "synthetic", "full")
RANDOM_TIERS = ("tiny", "synthetic")  # built offline from a seed; "full" is downloaded

# A callable, or "module:attribute" naming one: imported only when it is called, so that the
# registry itself stays importable without torch.
Ref = str | Callable[..., Any]


@dataclass(frozen=True)
class ModelSpec:
    """One model, as the harness builds, archives, serves, measures and promotes it.

    Callables (given directly or as "module:function"):
    - random_weights(variant, seed, folder): write a random-initialised `variant` into
      `folder` as it is served (torch is already seeded with `seed`);
    - fetcher(pins, variant, folder, downloads, progress): the full tier from its pins in
      configs/weights-full.yaml; None when the model has no real checkpoint;
    - example(image, mask, steps): the example request for the scene's base64 PNG image and
      mask (`steps`: denoising steps, for a model that takes them);
    - footprint_request(handler): (payload, description) of footprint's one small request.
    """

    name: str
    handler_file: str  # the module TorchServe imports from the archive root
    handler_class: str  # the one handler class in it
    variants: Mapping[str, str]  # tier -> weights variant
    random_weights: Ref
    example: Ref
    curl_output: str  # what `make serve-local`'s curl line saves the reply's image as
    fetcher: Ref | None = None
    footprint_request: Ref | None = None
    # attribute paths on the loaded handler to its torch modules (a mapping's values count
    # too: a diffusers pipeline's components), for footprint's parameter count
    torch_modules: tuple[str, ...] = ()
    # the handler setting that sizes its working window in px, which footprint shrinks on a
    # CPU (--sd-window) so that a measurement takes seconds
    window_setting: str | None = None
    # keys a reply must carry besides the image, checked by promote's smoke test
    reply_keys: tuple[str, ...] = ()
    # where its handler and config live: the project's folders, or a test's own
    handlers_dir: Path = HANDLERS_DIR
    config_dir: Path | None = None  # None: configs/<name>

    def __post_init__(self) -> None:
        # read-only, so that a spec stays what was registered
        object.__setattr__(self, "variants", MappingProxyType(dict(self.variants)))
        unknown = set(self.variants) - set(TIERS)
        if unknown:
            raise ValueError(f"{self.name}: no tier {', '.join(sorted(unknown))}: {TIERS}")
        if ("full" in self.variants) != (self.fetcher is not None):
            raise ValueError(f"{self.name}: a full tier needs a fetcher, and a fetcher a full tier")

    @property
    def handler_path(self) -> Path:
        return self.handlers_dir / self.handler_file

    @property
    def config_file(self) -> Path:
        return (self.config_dir or CONFIGS_DIR / self.name) / CONFIG_FILE

    def handler_settings(self) -> dict:
        """The `handler:` section of its model-config.yaml: the knobs' one source, read by the
        tools that must agree with the handler (the editor's limits, bench's threads)."""
        import yaml  # on use: the registry itself stays standard library only

        config = yaml.safe_load(self.config_file.read_text())
        return dict(config.get("handler") or {})

    def variant(self, tier: str) -> str:
        """The weights variant this model serves in `tier`."""
        if tier not in self.variants:
            raise ValueError(f"{self.name} has no {tier} tier; it has {', '.join(self.variants)}")
        return self.variants[tier]


def resolve(ref: Ref) -> Callable[..., Any]:
    """The callable `ref` names ("module:attribute"), imported now; a callable as it is. A
    module with a leading dot is the harness's own (".weights"), whatever name it was imported
    under: `scripts` from the checkout, `mmekit` where it is installed."""
    if callable(ref):
        return ref
    module, _, attribute = ref.partition(":")
    return getattr(importlib.import_module(module, __package__), attribute)


SAM = ModelSpec(
    name="sam",
    handler_file="sam_handler.py",
    handler_class="SamHandler",
    variants={"tiny": "tiny", "synthetic": "vit_b", "full": "vit_h"},
    random_weights=".weights:random_sam",
    fetcher=".weights:fetch_sam",
    example=".examples:sam_example",
    footprint_request=".footprint:sam_request",
    curl_output="mask.png",
    torch_modules=("decoder.sam",),
    reply_keys=("scores",),
)
LAMA = ModelSpec(
    name="lama",
    handler_file="lama_handler.py",
    handler_class="LamaHandler",
    variants={"tiny": "tiny", "synthetic": "big-lama", "full": "big-lama"},
    random_weights=".weights:random_lama",
    fetcher=".weights:fetch_lama",
    example=".examples:lama_example",
    footprint_request=".footprint:lama_request",
    curl_output="erased.png",
    torch_modules=("network",),
)
SD = ModelSpec(
    name="sd",
    handler_file="sd_handler.py",
    handler_class="SdHandler",
    variants={"tiny": "tiny", "synthetic": "sd2-inpainting", "full": "sd2-inpainting"},
    random_weights=".weights:random_sd",
    fetcher=".weights:fetch_sd",
    example=".examples:sd_example",
    footprint_request=".footprint:sd_request",
    curl_output="replaced.png",
    torch_modules=("pipeline.components",),
    window_setting="window_size",
)

# The models this project archives, serves and promotes, in that order.
MODELS: tuple[str, ...] = (SAM.name, LAMA.name, SD.name)
_REGISTRY: dict[str, ModelSpec] = {model.name: model for model in (SAM, LAMA, SD)}


def spec(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(_REGISTRY)}") from None


def names() -> tuple[str, ...]:
    """Every model `spec` knows: MODELS, then any registered since (a test's own model)."""
    return tuple(_REGISTRY)


def register(model: ModelSpec) -> ModelSpec:
    """Make `model` known to every tool that is handed its name. It does not join MODELS, so
    the defaults (`make archive`, `make serve-local`, promote) stay the project's models."""
    if model.name in _REGISTRY:
        raise ValueError(f"a model named {model.name!r} is already registered")
    _REGISTRY[model.name] = model
    return model


def unregister(name: str) -> None:
    if name in MODELS:
        raise ValueError(f"{name!r} is one of the project's models")
    _REGISTRY.pop(name, None)
