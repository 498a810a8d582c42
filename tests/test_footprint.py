"""make footprint: each model measured in its own process, written where make plan reads it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scripts import PROJECT_ROOT, footprint, plan

MODEL_FIELDS = {
    "variant",
    "inference",
    "load_seconds",
    "inference_seconds",
    "parameters",
    "dtype",
    "cpu_peak_rss_mib_before_load",
    "cpu_peak_rss_mib_after_load",
    "cpu_peak_rss_mib_after_inference",
    "device",
    "wall_seconds",
    *footprint.CUDA_FIELDS,
}
CUDA_FIELDS = set(footprint.CUDA_FIELDS)


def run_tool(*argv: str) -> tuple[int, dict]:
    output = Path(argv[argv.index("--output") + 1])
    code = footprint.main(list(argv))
    return code, json.loads(output.read_text())


def run_tiny_cpu(weights_root: Path, output: Path, *extra: str) -> tuple[int, dict]:
    return run_tool(
        "--tier",
        "tiny",
        "--device",
        "cpu",
        "--weights-root",
        str(weights_root),
        "--output",
        str(output),
        *extra,
    )


@pytest.fixture(scope="module")
def tiny_cpu(tmp_path_factory, weights_root) -> tuple[int, dict, Path]:
    """The tool on the tiny tier, CPU only: three fresh processes, about 10 s."""
    output = tmp_path_factory.mktemp("footprint") / "footprint.json"
    code, report = run_tiny_cpu(weights_root, output)
    return code, report, output


def test_the_report_has_its_schema(tiny_cpu):
    code, report, _ = tiny_cpu
    assert code == 0
    assert set(report) == {"format", "tier", "device", "measured_at", "machine", "models"}
    assert (report["format"], report["tier"], report["device"]) == (1, "tiny", "cpu")
    assert {"platform", "python", "torch", "cpu_count", "memory_gib", "gpu"} <= set(
        report["machine"]
    )
    assert list(report["models"]) == ["sam", "lama", "sd"]
    for entry in report["models"].values():
        assert set(entry) == MODEL_FIELDS


def test_values_are_sane(tiny_cpu):
    _, report, _ = tiny_cpu
    for model, entry in report["models"].items():
        assert entry["variant"] == "tiny", model
        assert entry["parameters"] > 0
        assert entry["dtype"] == "float32"
        assert entry["load_seconds"] > 0 and entry["inference_seconds"] > 0
        before = entry["cpu_peak_rss_mib_before_load"]
        assert 0 < before <= entry["cpu_peak_rss_mib_after_load"]
        assert entry["cpu_peak_rss_mib_after_load"] <= entry["cpu_peak_rss_mib_after_inference"]
        assert entry["wall_seconds"] >= entry["load_seconds"] + entry["inference_seconds"]


def test_cuda_fields_are_null_without_cuda(tiny_cpu):
    _, report, _ = tiny_cpu
    assert report["machine"]["gpu"] is None
    for entry in report["models"].values():
        assert entry["device"] == "cpu"
        assert {field: entry[field] for field in CUDA_FIELDS} == dict.fromkeys(CUDA_FIELDS)


def test_the_requests_are_the_small_ones(tiny_cpu):
    _, report, _ = tiny_cpu
    models = report["models"]
    assert models["sam"]["inference"] == "one click on a 128x128 image"
    assert models["lama"]["inference"] == "a 256x256 image and mask"
    assert models["sd"]["inference"] == "1 step on a 64x64 window"


def test_each_model_is_measured_in_its_own_process(tiny_cpu):
    # one process would carry SAM's peak into LaMa's baseline; and the peak is the child's own,
    # not the pytest process's it was started from (ru_maxrss would report that one)
    _, report, _ = tiny_cpu
    import psutil

    models = report["models"]
    assert (
        models["lama"]["cpu_peak_rss_mib_before_load"]
        < models["sam"]["cpu_peak_rss_mib_after_inference"]
    )
    parent_rss_mib = psutil.Process().memory_info().rss / (1 << 20)
    baselines = [entry["cpu_peak_rss_mib_before_load"] for entry in models.values()]
    assert max(baselines) < parent_rss_mib
    assert report["machine"]["peak_rss_from"] == "/proc/self/status VmHWM"


def test_plan_reads_a_cpu_report_and_falls_back_to_the_blog(tiny_cpu, capsys):
    _, _, output = tiny_cpu
    code = plan.main(["--models", "sd=1", "--footprint-file", str(output), "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0
    assert result["footprints"]["sd"]["source"] == "blog"
    assert any("no GPU figures" in note for note in result["notes"])


def test_the_table_names_every_model(tiny_cpu, capsys):
    _, report, _ = tiny_cpu
    table = footprint.format_table(report)
    lines = table.splitlines()
    assert lines[0].startswith("tiny tier on cpu")
    assert [line.split()[0] for line in lines[2:5]] == ["sam", "lama", "sd"]


def test_a_failing_model_is_reported_and_the_rest_kept(tmp_path, weights_root, monkeypatch):
    real_command = footprint.child_command

    def broken(args, model, device, result):
        command = real_command(args, model, device, result)
        return command if model != "lama" else [sys.executable, "-c", "raise SystemExit('boom')"]

    monkeypatch.setattr(footprint, "child_command", broken)
    output = tmp_path / "footprint.json"
    code, report = run_tiny_cpu(weights_root, output, "--models", "lama,sam")
    assert code == 1
    assert report["models"]["lama"] == {"error": "exit status 1: boom"}
    assert report["models"]["sam"]["parameters"] > 0


@pytest.mark.parametrize("models", ["sam,foo", "", "SAM"])
def test_bad_models_are_a_one_line_error(models, tmp_path):
    process = subprocess.run(
        [sys.executable, "-m", "scripts.footprint", "--models", models, "--output", "x.json"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert process.returncode == 2
    assert process.stdout == ""
    assert process.stderr.startswith("python -m scripts.footprint: error: --models")
    assert len(process.stderr.strip().splitlines()) == 1


def test_missing_full_weights_say_how_to_get_them(tmp_path, capsys):
    code = footprint.main(
        ["--tier", "full", "--weights-root", str(tmp_path), "--output", str(tmp_path / "f.json")]
    )
    assert code == 1
    assert "make fetch-weights" in capsys.readouterr().err
    assert not (tmp_path / "f.json").exists()


@pytest.mark.slow
def test_synthetic_tier_has_the_real_architectures_sizes(tmp_path):
    # builds the full-size random weights (about 35 s, 5.4 GB), measures them (about 25 s),
    # then removes them: pytest keeps its last three runs' temporary folders
    output = tmp_path / "footprint.json"
    try:
        code, report = run_tool(
            "--weights-root", str(tmp_path / "weights"), "--device", "cpu", "--output", str(output)
        )
    finally:
        shutil.rmtree(tmp_path / "weights", ignore_errors=True)
    assert code == 0
    models = report["models"]
    assert models["sam"]["parameters"] == 93_735_472  # vit_b
    assert models["lama"]["parameters"] == 50_975_875  # big-lama's generator
    assert models["sd"]["parameters"] == 1_289_966_827  # SD2 inpainting: UNet, VAE, OpenCLIP
    assert models["sd"]["cpu_peak_rss_mib_after_inference"] > 4 * 1024  # fp32 weights, touched


@pytest.mark.gpu
def test_cuda_figures_on_a_gpu(tmp_path, weights_root):
    output = tmp_path / "footprint.json"
    code, report = run_tool(
        "--tier",
        "tiny",
        "--device",
        "cuda",
        "--weights-root",
        str(weights_root),
        "--output",
        str(output),
    )
    assert code == 0
    assert report["device"] == "cuda:0"
    assert report["machine"]["gpu"] == torch.cuda.get_device_name(0)
    for entry in report["models"].values():
        assert entry["cuda_max_allocated_mib_after_load"] > 0
        assert (
            entry["cuda_max_allocated_mib_after_inference"]
            >= entry["cuda_max_allocated_mib_after_load"]
        )
        assert (
            entry["cuda_reserved_mib_after_inference"] >= entry["cuda_max_allocated_mib_after_load"]
        )
        assert entry["gpu_footprint_mib"] > entry["cuda_context_mib"] > 0
