"""Hardening tests (`make test-hardening`): faults, load, malformed input, exposure, artifacts.

Every test here is bounded in time and count and talks to 127.0.0.1 only. Each records what it
did with the `figures` fixture; the session ends with one table of them (inputs tried, faults
injected, requests sent, lost, 5xx), which is also written to .mmekit/hardening.json for the
README. `--hardening-full` (HARDENING_FULL=1) runs the heavy sizes.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest

from scripts import PROJECT_ROOT

FIGURES = ("inputs_tried", "faults_injected", "requests_sent", "lost", "server_errors")
FIGURES_FILE = PROJECT_ROOT / ".mmekit" / "hardening.json"
_figures: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(FIGURES, 0))
_measured: dict[str, list[str]] = defaultdict(list)  # area -> lines, in the order measured


class Figures:
    """What a test did, added to its area's row of the session's summary table."""

    def __init__(self, area: str) -> None:
        self.area = area

    def add(self, **counts: int) -> None:
        for name, value in counts.items():
            if name not in FIGURES:
                raise KeyError(f"unknown figure {name!r}: one of {FIGURES}")
            _figures[self.area][name] += int(value)

    def measured(self, line: str) -> None:
        """A measurement (a recovery time, a latency, an RSS change) for the session's summary,
        printed after the table: timings are reported, never asserted beyond behaviour bounds."""
        _measured[self.area].append(line)


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Figures:
    """figures.add(requests_sent=..., lost=..., server_errors=...), per test module's area."""
    return Figures(Path(request.node.fspath).stem.removeprefix("test_"))


@pytest.fixture(scope="session")
def full(pytestconfig: pytest.Config) -> bool:
    """True with --hardening-full: heavy sizes (2,000 requests, every fault)."""
    return bool(pytestconfig.getoption("--hardening-full"))


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if not _figures:
        return
    rows = [[area, *(str(counts[name]) for name in FIGURES)] for area, counts in _figures.items()]
    totals = ["total", *(str(sum(c[name] for c in _figures.values())) for name in FIGURES)]
    headers = ["area", "inputs tried", "faults injected", "requests sent", "lost", "5xx"]
    cells = [headers, *rows, totals]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    terminalreporter.section("hardening figures")
    for row in cells:
        terminalreporter.write_line("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
    if _measured:
        terminalreporter.section("hardening measurements")
        for area, lines in _measured.items():
            for line in lines:
                terminalreporter.write_line(f"{area}: {line}")
    FIGURES_FILE.parent.mkdir(parents=True, exist_ok=True)
    summary = {**_figures, "measurements": dict(_measured)}
    FIGURES_FILE.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
