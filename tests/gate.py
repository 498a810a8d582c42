"""`make promote`'s gate, as a pytest plugin: the archives a session served are recorded as
tested (scripts/sagemaker/gate.py `record_tested`) only when every flow the gate names passed
against them, and no serving test failed or was left out.

A test proves a flow by its marker, `@pytest.mark.gate("erase")`, not by its name: renaming or
moving a test keeps the gate, and a flow with no test passing in the session records nothing.
"""

from __future__ import annotations

from collections import defaultdict

import pytest

# The flows a promoted archive must have passed: local erase and replace, SageMaker's
# registration and invoke path, and boto3 through the multi-model endpoint emulator.
GATE_FLOWS = frozenset({"erase", "replace", "sagemaker_profile", "emulator"})
SERVING_TESTS = "tests/serving/"


class ServingRun:
    """What the serving tests did with which store, in this session."""

    def __init__(self) -> None:
        self.store = None  # set by the served_store fixture (tests/servers.py)
        self.digests: dict = {}
        self.passed_flows: dict[str, int] = defaultdict(int)
        self.passed = 0
        self.failed = 0
        self.deselected = 0

    def complete(self) -> bool:
        proven = {flow for flow, count in self.passed_flows.items() if count}
        return GATE_FLOWS <= proven and not self.failed and not self.deselected


serving_run = ServingRun()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"gate(flow): proves a flow make promote requires ({', '.join(sorted(GATE_FLOWS))})",
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        marker = item.get_closest_marker("gate")
        if marker is not None and (len(marker.args) != 1 or marker.args[0] not in GATE_FLOWS):
            raise pytest.UsageError(f"{item.nodeid}: gate(flow) takes one of {sorted(GATE_FLOWS)}")


def is_serving(item: pytest.Item) -> bool:
    return SERVING_TESTS in item.nodeid.replace("\\", "/")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> object:
    report = yield
    if is_serving(item):
        if report.failed:
            serving_run.failed += 1
        elif report.when == "call" and report.passed:
            serving_run.passed += 1
            marker = item.get_closest_marker("gate")
            if marker is not None:
                serving_run.passed_flows[marker.args[0]] += 1
    return report


def pytest_deselected(items: list[pytest.Item]) -> None:
    serving_run.deselected += sum(is_serving(item) for item in items)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Every gate flow passed and nothing failed: record the served archives' SHA-256."""
    if exitstatus != 0 or serving_run.store is None or not serving_run.complete():
        return
    from scripts.sagemaker.gate import record_tested

    summary = f"{serving_run.passed} serving tests passed"
    recorded = record_tested(serving_run.store, summary, digests=serving_run.digests)
    print(
        f"\nrecorded {len(recorded)} tested archive(s) from {serving_run.store} for `make promote`"
    )
