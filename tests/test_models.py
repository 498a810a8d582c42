"""The model registry (scripts/models.py): one entry per model, read by every tool.

The proof that it is the only place a model is described: a fourth, trivial model, its handler
and config written here and its entry registered here, is built, archived, served by a real
TorchServe and benchmarked by the harness's own code, with no module of scripts/ changed.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from scripts import PROJECT_ROOT, archive, bench, examples, models
from scripts.models import MODELS, ModelSpec, resolve, spec
from scripts.weights import weights_dir
from tests.support import ServedModel, make_model_dir

HEAVY_MODULES = ("torch", "numpy", "PIL", "yaml")


def test_the_registry_imports_the_standard_library_only():
    check = (
        "import sys, scripts.models; "
        f"loaded = sorted(set({HEAVY_MODULES!r}) & set(sys.modules)); "
        "assert not loaded, loaded"
    )
    done = subprocess.run(
        [sys.executable, "-c", check], cwd=PROJECT_ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr


def test_the_project_serves_three_models_whose_files_and_callables_exist():
    assert MODELS == ("sam", "lama", "sd")
    for name in MODELS:
        model = spec(name)
        assert model.config_file == PROJECT_ROOT / "configs" / name / "model-config.yaml"
        source = model.handler_path.read_text()
        assert re.search(rf"^class {model.handler_class}\b", source, re.MULTILINE), name
        assert set(model.variants) == set(models.TIERS), name
        for ref in (model.random_weights, model.fetcher, model.example, model.footprint_request):
            assert callable(resolve(ref)), (name, ref)


def test_an_unknown_model_names_the_known_ones():
    with pytest.raises(KeyError, match="unknown model 'sdxl'; known: sam, lama, sd"):
        spec("sdxl")


def test_a_spec_must_be_consistent_and_its_name_unique():
    fields = {"handler_file": "x.py", "handler_class": "X", "random_weights": print}
    fields |= {"example": print, "curl_output": "x.png"}
    with pytest.raises(ValueError, match="a full tier needs a fetcher"):
        ModelSpec(name="x", variants={"tiny": "t", "full": "f"}, **fields)
    with pytest.raises(ValueError, match="no tier huge"):
        ModelSpec(name="x", variants={"huge": "h"}, **fields)
    with pytest.raises(ValueError, match="already registered"):
        models.register(ModelSpec(name="sam", variants={"tiny": "t"}, **fields))
    with pytest.raises(ValueError, match="one of the project's models"):
        models.unregister("sam")


# ---------------------------------------------------------------------------------------------
# A fourth model: multiplies the request's numbers by the factor its weights hold

SCALE = "scale"
SCALE_FACTOR = 3
SCALE_WEIGHTS_FILE = "scale.json"
BENCH_ROUNDS = 2

SCALE_HANDLER = '''"""Test only (tests/test_models.py): numbers times the weights' factor."""

import json
from pathlib import Path

from ts.torch_handler.base_handler import BaseHandler


class ScaleHandler(BaseHandler):
    def initialize(self, context):
        settings = context.model_yaml_config["handler"]
        folder = Path(context.system_properties["model_dir"]) / settings["weights_dir"]
        self.factor = json.loads((folder / "scale.json").read_text())["factor"]
        self.initialized = True

    def handle(self, data, context):
        replies = []
        for row in data:
            body = row.get("body") or row.get("data")
            # a dict when TorchServe decoded the JSON, bytes when it did not (SageMaker's way)
            request = json.loads(body) if isinstance(body, (bytes, bytearray)) else body
            replies.append(json.dumps({"values": [v * self.factor for v in request["values"]]}))
        return replies
'''

SCALE_CONFIG = """minWorkers: 1
maxWorkers: 1
batchSize: 1
responseTimeout: 30
handler:
  weights_dir: weights
"""


def write_scale_weights(variant: str, seed: int, folder: Path) -> None:
    (folder / SCALE_WEIGHTS_FILE).write_text(json.dumps({"factor": SCALE_FACTOR}))


def scale_example(image: str, mask: str, steps: int) -> dict:
    return {"values": [1, 2, steps]}


def scaled(request: dict) -> dict:
    return {"values": [value * SCALE_FACTOR for value in request["values"]]}


@pytest.fixture
def scale_model(tmp_path: Path) -> Iterator[ModelSpec]:
    """The fourth model's handler and config in tmp_path, its entry registered meanwhile."""
    handlers = tmp_path / "handlers"
    handlers.mkdir()
    (handlers / "scale_handler.py").write_text(SCALE_HANDLER)
    config = tmp_path / "configs" / SCALE
    config.mkdir(parents=True)
    (config / "model-config.yaml").write_text(SCALE_CONFIG)
    entry = ModelSpec(
        name=SCALE,
        handler_file="scale_handler.py",
        handler_class="ScaleHandler",
        variants={"tiny": "tiny"},
        random_weights=write_scale_weights,
        example=scale_example,
        curl_output="scaled.json",
        handlers_dir=handlers,
        config_dir=config,
    )
    yield models.register(entry)
    models.unregister(SCALE)


def test_a_fourth_model_is_archived_served_and_benchmarked_from_its_entry_alone(
    scale_model: ModelSpec, tmp_path: Path
):
    weights_root, store = tmp_path / "weights", tmp_path / "store"
    entry = archive.archive_models((SCALE,), "tiny", store, weights_root)[SCALE]
    assert (entry["tier"], entry["variant"]) == ("tiny", "tiny")
    assert SCALE not in MODELS  # registered for this test only: `make archive` never sees it
    with tarfile.open(store / entry["file"]) as tarball:
        packed = set(tarball.getnames())
    assert {f"{SCALE}/scale_handler.py", f"{SCALE}/weights/{SCALE_WEIGHTS_FILE}"} <= packed

    request = examples.requests(sd_steps=4)[SCALE]
    folder = make_model_dir(
        tmp_path / "in-process", SCALE, weights_dir(weights_root, "tiny", SCALE)
    )
    assert ServedModel(folder).predict(request).json() == scaled(request)

    serving = [SCALE, bench.echo_model(store)]
    with bench.torchserve(tmp_path / "run", store, "local", serving) as served:
        reply = served.predict(SCALE, json.dumps(request).encode())
        assert reply.status_code == 200 and reply.json() == scaled(request)
        overhead = bench.bench_overhead(
            served, tmp_path / "bench", [SCALE], weights_root, BENCH_ROUNDS
        )
    for side in ("http", "in_process", "echo_http"):
        assert overhead[SCALE][side]["n"] == BENCH_ROUNDS
    assert isinstance(overhead[SCALE]["goal_met"], bool)


@pytest.mark.parametrize("module", ["scripts.promote", "scripts.client", "scripts.archive"])
def test_tools_that_only_read_names_and_digests_do_not_import_torch(module: str):
    """make promote DRY_RUN=1, make iam-policy and the mmekit client start without torch."""
    import subprocess
    import sys

    check = f"import sys, {module}; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", check], cwd=PROJECT_ROOT).returncode == 0


def test_installed_the_harness_is_mmekit_and_claims_no_generic_name(tmp_path):
    # outside the checkout, as a user runs the `mmekit` command: the editable install provides
    # `mmekit` (this folder, scripts/), never a top-level `scripts`
    check = (
        "import importlib.util, sys\n"
        "import mmekit.client, mmekit.models as models\n"
        "assert importlib.util.find_spec('scripts') is None, 'scripts is importable'\n"
        "assert models.resolve(models.spec('sam').example).__module__ == 'mmekit.examples'\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", check], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    command = Path(sys.executable).with_name("mmekit")
    usage = subprocess.run(
        [str(command), "--help"], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert usage.returncode == 0 and "segment" in usage.stdout, usage.stderr
