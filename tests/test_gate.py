"""make promote's gate (tests/gate.py): which serving sessions record their archives as tested."""

from __future__ import annotations

import pytest

from tests import gate


def run(passed: tuple[str, ...] = (), failed: int = 0, deselected: int = 0) -> gate.ServingRun:
    serving = gate.ServingRun()
    for flow in passed:
        serving.passed_flows[flow] += 1
    serving.failed, serving.deselected = failed, deselected
    return serving


def test_a_session_is_complete_only_when_every_gate_flow_passed():
    assert run(tuple(gate.GATE_FLOWS)).complete()
    for missing in gate.GATE_FLOWS:
        assert not run(tuple(gate.GATE_FLOWS - {missing})).complete(), missing


@pytest.mark.parametrize(("failed", "deselected"), [(1, 0), (0, 1)])
def test_a_failed_or_deselected_serving_test_records_nothing(failed, deselected):
    assert not run(tuple(gate.GATE_FLOWS), failed, deselected).complete()


def test_the_gate_tests_name_their_flows_by_marker():
    """Every flow is proven by a collected serving test's marker, not by a list of names."""
    import ast
    from pathlib import Path

    flows = set()
    for path in (Path(__file__).parent / "serving").glob("test_*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "gate":
                flows.add(node.args[0].value)
    assert flows == set(gate.GATE_FLOWS)
