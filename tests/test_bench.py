"""`make bench --quick`, as a smoke check: the tool runs end to end (real TorchServe, the MME
emulator, a fresh process) and writes what it promises. It asserts the output's shape, never
speed: timings on a shared CPU are noise, and speed is what `make bench` reports."""

from __future__ import annotations

import json
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
    assert clicks["image"] == "1024x768" and clicks["repeat_click"]["n"] == 6
    assert clicks["first_click_ms"] > 0 and clicks["repeat_speedup"] > 0
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
