"""The gate: the manifest's tarballs, re-hashed, promoted only when a passing test session
recorded their SHA-256 (.mmekit/tested.json, written by tests/gate.py through record_tested)."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from ..archive import DEFAULT_STORE, read_manifest
from ..models import MODELS
from ..weights import sha256_of
from .settings import TESTED_RECORD, PromoteError, Settings


@dataclass(frozen=True)
class Artifact:
    model: str
    path: Path
    sha256: str
    size: int
    tier: str

    @property
    def target_model(self) -> str:
        """The TargetModel name, content-addressed: a changed tarball is a new model."""
        return f"{self.model}-{self.sha256[:12]}.tar.gz"

    def key(self, settings: Settings) -> str:
        return f"{settings.prefix}/{self.target_model}"


def read_artifacts(store: Path = DEFAULT_STORE, models: tuple[str, ...] = MODELS) -> list[Artifact]:
    """The manifest's tarballs, each re-hashed: what is promoted is what was built and tested."""
    entries = read_manifest(store)["models"]
    artifacts = []
    for model in models:
        entry = entries.get(model)
        path = store / f"{model}.tar.gz"
        if entry is None or not path.is_file():
            raise PromoteError(f"no {path.name} in {store}: run `make archive` first")
        digest = sha256_of(path)
        if digest != entry["sha256"]:
            raise PromoteError(
                f"{path.name} changed since `make archive` wrote the manifest: run it again"
            )
        artifacts.append(Artifact(model, path, digest, path.stat().st_size, entry["tier"]))
    return artifacts


def read_tested(record: Path = TESTED_RECORD) -> dict[str, dict]:
    try:
        return json.loads(record.read_text()).get("tarballs", {})
    except (OSError, ValueError):
        return {}


def gate(
    artifacts: list[Artifact],
    record: Path = TESTED_RECORD,
    force: bool = False,
    allow_tiny: bool = False,
    say: Callable[[str], None] = print,
) -> None:
    """Only tarballs whose SHA-256 a passing test run recorded; never random weights unasked."""
    tiny = [a.model for a in artifacts if a.tier in ("tiny", "synthetic")]
    if tiny and not allow_tiny:
        raise PromoteError(
            f"{', '.join(tiny)}: random-weight archives (outputs are noise); `make fetch-weights`"
            " and `make archive` first, or --allow-tiny to promote them anyway"
        )
    tested = read_tested(record)
    untested = [a for a in artifacts if a.sha256 not in tested]
    if untested and not force:
        names = ", ".join(f"{a.path.name} ({a.sha256[:12]})" for a in untested)
        raise PromoteError(
            f"not tested: {names}; run `make test-handlers` (it tests model_store/ and records "
            "what passed), or --force to promote untested archives"
        )
    for artifact in untested:
        say(f"WARNING: promoting {artifact.path.name} untested (--force)")
    for artifact in artifacts:
        if artifact.sha256 in tested:
            when = tested[artifact.sha256].get("tested_at", "?")
            say(f"gate: {artifact.path.name} {artifact.sha256[:12]} passed the tests ({when})")


def served_digests(store: Path, models: tuple[str, ...] = MODELS) -> dict[str, str]:
    """model -> SHA-256 of the tarballs in a store, taken when a test session serves them."""
    return {
        model: sha256_of(store / f"{model}.tar.gz")
        for model in models
        if (store / f"{model}.tar.gz").is_file()
    }


def record_tested(
    store: Path,
    tests: str,
    record: Path = TESTED_RECORD,
    digests: Mapping[str, str] | None = None,
) -> list[str]:
    """Called by a passing test session with the hashes of the tarballs it served (taken when
    it served them, so a rebuild during the run is not recorded as tested)."""
    entries = read_manifest(store)["models"]
    digests = served_digests(store) if digests is None else digests
    tested = read_tested(record)
    now = datetime.now(UTC).isoformat(timespec="seconds")
    recorded = []
    for model, digest in digests.items():
        if model not in entries:
            continue
        tested[digest] = {
            "model": model,
            "tier": entries[model]["tier"],
            "tested_at": now,
            "tests": tests,
        }
        recorded.append(digest)
    record.parent.mkdir(parents=True, exist_ok=True)
    staging = record.with_suffix(".partial")
    staging.write_text(json.dumps({"tarballs": tested}, indent=2, sort_keys=True) + "\n")
    staging.replace(record)
    return recorded
