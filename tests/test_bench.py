"""`make bench --quick`, as a smoke check: the tool runs end to end (real TorchServe, the MME
emulator, a fresh process) and writes what it promises. It asserts the output's shape, never
speed: timings on a shared CPU are noise, and speed is what `make bench` reports."""

from __future__ import annotations

import json
import os
from pathlib import Path

from scripts import bench


def test_quick_bench_writes_results_chart_and_tables(tmp_path: Path, weights_root: Path, capsys):
    output = tmp_path / "bench"
    assert bench.main(["--quick", "--output-dir", str(output), "--weights", str(weights_root)]) == 0
    results = json.loads((output / "results.json").read_text())
    assert (output / "chart.png").read_bytes().startswith(b"\x89PNG")
    assert results["quick"] is True and results["machine"]["cores"] >= 1
    for model in ("sam", "lama", "sd"):
        sides = results["overhead"][model]
        for side in ("http", "in_process", "echo_http"):
            assert sides[side]["n"] == 6 and sides[side]["p50_ms"] > 0
        assert isinstance(sides["goal_met"], bool)
    clicks = results["sam_clicks"]
    assert clicks["image"] == "1024x768" and set(clicks["by_threads"]) == {"1", "2"}
    for row in clicks["by_threads"].values():  # the rows issue 17's goals are read from
        assert row["first_click_ms"] > 0 and row["repeat_speedup"] > 0
        for side in ("repeat_click", "repeat_click_image_resent"):
            assert row[side]["n"] == 6 and row[side]["p50_ms"] > 0
        assert row["reference_no_cache"]["n"] == 2
        assert isinstance(row["repeat_p50_met"], bool) and isinstance(row["speedup_met"], bool)
    assert clicks["goals_row"] in clicks["by_threads"] and isinstance(clicks["goal_met"], bool)
    cold = results["cold_load"]
    assert set(cold["levels"]) == {"0", "6"}
    assert set(cold["in_process_ms"]) == {"sam", "lama", "sd"}
    assert cold["fastest_level"] in (0, 6)
    payload = results["payload"]
    assert payload["sizes"]["512x384"]["inflation"] > 1.3  # base64's 4/3, plus JSON
    assert set(payload["largest_fitting_width"]) == {"PNG", "JPEG"}
    photos = {(row["model"], row["size"]): row for row in results["photos"]["rows"]}
    assert set(photos) == {("lama", "1MP"), ("sd", "1MP")}
    for row in photos.values():
        assert row["ms"] > 0 and row["peak_rss_mib"] > 0 and row["format"] == "jpeg"
    printed = capsys.readouterr().out
    headings = ("1. Serving overhead", "2. SAM clicks", "3. Cold load", "4. Payload", "5. Photos")
    for heading in headings:
        assert heading in printed
    assert "repeat: image_id p50/p95" in printed and "AWS sample: encoder every click" in printed
    assert "repeat p50 <= 35 ms" in printed and "first/repeat >= 200x" in printed
    assert "GPU:" in printed  # the GPU rows, or why there are none


def test_process_gpu_memory_is_read_from_nvidia_smi_for_this_process(tmp_path, monkeypatch):
    fake = tmp_path / "nvidia-smi"
    # the fake's parent is this process: a line for it, and one for another process
    fake.write_text('#!/bin/sh\necho "1, 999"\necho "$PPID, 3833"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    assert bench.process_gpu_mib() == 3833.0
    fake.write_text("#!/bin/sh\nexit 9\n")  # no GPU visible: no figure, not a crash
    assert bench.process_gpu_mib() is None


def test_gpu_report_marks_each_goal_met_or_not():
    timing = {"n": 5, "p50_ms": 1.0, "p95_ms": 2.0, "mean_ms": 1.0}
    memory = {"total_mib": 2400.0, "context_mib": 527.0, "reserved_mib": 1800.0}
    gpu = {
        "device": "NVIDIA H100",
        "torch": "2.14.1",
        "models": {"sam": timing},
        "sd": {},
        "sam_repeat_click_in_process": {**timing, "p50_ms": 12.5},
        "sam_vit_h_first_click": {
            "float32": {**timing, "p50_ms": 120.0},
            "bfloat16": {**timing, "p50_ms": 70.0},
            "float16": {**timing, "p50_ms": 75.0},
        },
        "memory": {
            "sam vit_h bfloat16": {**memory, "goal_mib": 2600, "goal_met": True},
            "sd (config)": {**memory, "total_mib": 4100.0, "goal_mib": 3900, "goal_met": False},
        },
    }
    text = "\n".join(bench.gpu_report(gpu))
    assert "repeat click in-process (image_id): 12.5 ms, goal <= 10 ms not met" in text
    assert "goal <= 80 ms in fp16/bf16 met" in text
    assert "<= 2600: met" in text and "<= 3900: not met" in text
    assert "of which CUDA context" in text and "527.0" in text
