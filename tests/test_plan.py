"""make plan: the blog's cost table to the dollar, memory packing, bad input, JSON output."""

from __future__ import annotations

import json
from collections import Counter
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scripts import plan

NO_FILE = ["--footprint-file", "/nonexistent/footprint.json"]
BLOG = [
    "--models",
    "sd=100",
    "--instance-type",
    "ml.g5.2xlarge",
    "--price-per-hour",
    "1.52",
    "--instances-per-endpoint",
    "2",
    "--models-per-instance",
    "4",
    "--hours-per-month",
    "720",
]


def run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    try:
        code = plan.main(list(argv))
    except SystemExit as stop:  # argparse's own checks exit, as on the command line
        code = stop.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_json(capsys: pytest.CaptureFixture, *argv: str) -> dict:
    code, out, err = run(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


@pytest.fixture(scope="module")
def table() -> dict:
    return plan.load_table()


def a10g(table: dict, name: str = "ml.g5.2xlarge") -> plan.Instance:
    return plan.instance_from_table(table, name)


BLOG_FOOTPRINTS = {
    name: plan.Footprint(mib, "blog")
    for name, mib in {"sd": 3910, "sam": 3362, "lama": 852}.items()
}


# ---------------------------------------------------------------------------------------------
# The blog's table


def test_the_blogs_cost_table_is_reproduced_exactly(capsys):
    result = run_json(capsys, *BLOG, *NO_FILE)
    assert result["single_model"] == {"endpoints": 100, "instances": 200, "monthly_cost": 218880.0}
    assert result["mme"] == {"endpoints": 25, "instances": 50, "monthly_cost": 54720.0}
    assert result["saving"] == {"instances": 150, "monthly_cost": 164160.0, "percent": 75.0}


def test_the_arithmetic_is_exact_in_decimal():
    price = Decimal("1.52")
    single = plan.monthly_cost(100 * 2, price, 720)
    mme = plan.monthly_cost(plan.instance_groups_by_count(100, 4) * 2, price, 720)
    assert (single, mme) == (Decimal("218880"), Decimal("54720"))
    assert plan.saving_percent(single, mme) == 75


def test_the_table_prints_the_blogs_figures_in_aligned_columns(capsys):
    code, out, _ = run(capsys, *BLOG, *NO_FILE)
    assert code == 0
    rows = [line for line in out.splitlines() if line.strip().startswith(("single", "multi"))]
    assert "218,880.00" in rows[0] and "54,720.00" in rows[1]
    assert rows[0].index("218,880.00") + len("218,880.00") == rows[1].index("54,720.00") + len(
        "54,720.00"
    )
    assert "75 %" in out


# ---------------------------------------------------------------------------------------------
# Packing by memory


def layouts(models: dict[str, int], capacity: float) -> list[dict]:
    return plan.gpu_layouts(plan.pack_gpus(models, BLOG_FOOTPRINTS, capacity))


def test_a_24_gib_a10g_with_10_percent_headroom_holds_five_sd_models(table):
    capacity = plan.usable_gpu_mib(a10g(table), 0.1)
    assert capacity == pytest.approx(24 * 1024 * 0.9)
    assert layouts({"sd": 5}, capacity) == [{"models": {"sd": 5}, "gpus": 1}]
    assert layouts({"sd": 6}, capacity) == [
        {"models": {"sd": 5}, "gpus": 1},
        {"models": {"sd": 1}, "gpus": 1},
    ]


@pytest.mark.parametrize(
    ("headroom", "per_gpu"),
    [(0.0, 6), (0.1, 5), (0.2, 5), (0.25, 4), (0.5, 3)],
)
def test_headroom_decides_how_many_fit(table, headroom, per_gpu):
    capacity = plan.usable_gpu_mib(a10g(table), headroom)
    assert layouts({"sd": per_gpu}, capacity) == [{"models": {"sd": per_gpu}, "gpus": 1}]
    assert (
        sum(run.count for run in plan.pack_gpus({"sd": per_gpu + 1}, BLOG_FOOTPRINTS, capacity))
        == 2
    )


def first_fit_decreasing(sizes: list[tuple[str, float]], capacity: float) -> list[dict]:
    """The textbook algorithm, one model at a time: the reference for pack_gpus."""
    gpus: list[tuple[list[float], Counter]] = []
    for name, size in sorted(sizes, key=lambda item: (-item[1], item[0])):
        for free, contents in gpus:
            if free[0] >= size:
                free[0] -= size
                contents[name] += 1
                break
        else:
            gpus.append(([capacity - size], Counter({name: 1})))
    merged: Counter = Counter(tuple(sorted(contents.items())) for _, contents in gpus)
    return [{"models": dict(key), "gpus": count} for key, count in merged.items()]


@settings(max_examples=200, deadline=None)
@given(
    counts=st.dictionaries(
        st.sampled_from(["a", "b", "c", "d"]), st.integers(1, 40), min_size=1, max_size=4
    ),
    sizes=st.lists(st.integers(100, 9000), min_size=4, max_size=4),
)
def test_bulk_packing_matches_one_by_one_first_fit_decreasing(counts, sizes):
    footprints = {
        name: plan.Footprint(float(mib), "t") for name, mib in zip("abcd", sizes, strict=True)
    }
    capacity = 22118.4
    runs = plan.pack_gpus(counts, footprints, capacity)
    items = [(name, footprints[name].mib) for name, count in counts.items() for _ in range(count)]
    assert plan.gpu_layouts(runs) == first_fit_decreasing(items, capacity)
    for run in runs:
        assert run.free_mib >= -1e-6
        assert sum(footprints[n].mib * c for n, c in run.contents) <= capacity + 1e-6


def test_a_huge_mix_packs_at_once(table):
    capacity = plan.usable_gpu_mib(a10g(table), 0.1)
    # the three LaMa models go into the first SD GPU's last 2,568 MiB
    assert layouts({"sd": 10**12, "lama": 3}, capacity) == [
        {"models": {"lama": 3, "sd": 5}, "gpus": 1},
        {"models": {"sd": 5}, "gpus": 2 * 10**11 - 1},
    ]


def test_memory_packing_sizes_the_mme(capsys):
    result = run_json(capsys, "--models", "sd=100", "--headroom", "0.1", *NO_FILE)
    assert result["packing"]["basis"] == "memory"
    assert result["packing"]["gpu_layouts"] == [{"models": {"sd": 5}, "gpus": 20}]
    assert result["mme"]["instances"] == 40  # 20 GPUs, 2 instances each
    assert result["single_model"]["instances"] == 200


def test_multi_gpu_instances_hold_a_model_per_gpu_slot(capsys):
    result = run_json(capsys, "--models", "sd=100", "--instance-type", "ml.g5.12xlarge", *NO_FILE)
    assert result["packing"]["gpus_by_memory"] == 20
    assert result["mme"] == {
        "endpoints": 5,  # 4 GPUs per instance
        "instances": 10,
        "monthly_cost": pytest.approx(10 * 7.09 * 720),
    }


def test_a_mix_is_packed_largest_first(table):
    capacity = plan.usable_gpu_mib(a10g(table), 0.1)
    # 5 SD fill the first GPU but for 2,568 MiB, which still takes the two LaMa models
    assert layouts({"sam": 3, "lama": 2, "sd": 7}, capacity) == [
        {"models": {"lama": 2, "sd": 5}, "gpus": 1},
        {"models": {"sam": 3, "sd": 2}, "gpus": 1},
    ]


def test_the_blogs_three_models_share_one_gpu(capsys):
    result = run_json(capsys, "--models", "sam=1,lama=1,sd=1", *NO_FILE)
    assert result["models"] == {"sam": 1, "lama": 1, "sd": 1}
    assert result["packing"]["gpus_by_memory"] == 1
    assert result["mme"]["instances"] == 2
    assert result["single_model"]["instances"] == 6


def test_an_override_that_exceeds_memory_is_noted(capsys):
    result = run_json(capsys, "--models", "sd=100", "--models-per-instance", "10", *NO_FILE)
    assert result["mme"]["endpoints"] == 10
    assert any("packs more than GPU memory holds" in note for note in result["notes"])


def test_repeated_models_flags_add_up(capsys):
    result = run_json(capsys, "--models", "sd=2", "--models", "sd=3,sam=1", *NO_FILE)
    assert result["models"] == {"sd": 5, "sam": 1}


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit 2


def assert_one_line_error(code: int, out: str, err: str, *fragments: str) -> None:
    assert code == 2
    assert out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("python -m scripts.plan: error: ")
    for fragment in fragments:
        assert fragment in err


def test_a_model_larger_than_the_gpu_is_a_clear_error(capsys):
    code, out, err = run(capsys, "--models", "sd=1", "--footprint", "sd=30000", *NO_FILE)
    assert_one_line_error(code, out, err, "sd needs 30,000 MiB", "fits on no GPU")


@pytest.mark.parametrize(
    "models",
    ["sd:100", "sd=abc", "sd=0", "sd=-1", "sd=1.5", "sd=²", "=3", "sd", "sd=1,,lama=1", "SD=1", ""],
)
def test_bad_models_syntax_is_a_one_line_error(capsys, models):
    code, out, err = run(capsys, "--models", models, *NO_FILE)
    assert_one_line_error(code, out, err, "--models")


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--models", "foo=1"], "no GPU footprint for model 'foo'"),
        (["--instance-type", "ml.p9.huge"], "unknown instance type"),
        (["--footprint", "sd=big"], "--footprint"),
        (["--footprint", "sd=-5"], "--footprint"),
        (["--headroom", "1.5"], "--headroom"),
        (["--headroom", "nan"], "--headroom"),
        (["--instances-per-endpoint", "0"], "--instances-per-endpoint"),
        (["--models-per-instance", "x"], "--models-per-instance"),
        (["--price-per-hour", "cheap"], "--price-per-hour"),
        (["--no-such-flag"], "unrecognized arguments"),
    ],
)
def test_other_bad_input_is_a_one_line_error(capsys, argv, fragment):
    code, out, err = run(capsys, *argv, *NO_FILE)
    assert_one_line_error(code, out, err, fragment)


def test_a_model_unknown_to_the_blog_is_planned_from_its_footprint(capsys):
    result = run_json(capsys, "--models", "mymodel=8", "--footprint", "mymodel=10000", *NO_FILE)
    assert result["packing"]["gpu_layouts"] == [{"models": {"mymodel": 2}, "gpus": 4}]
    assert result["footprints"]["mymodel"] == {"mib": 10000.0, "source": "--footprint"}


# ---------------------------------------------------------------------------------------------
# JSON, defaults, footprint.json


def test_json_output_schema(capsys):
    result = run_json(capsys, *BLOG, *NO_FILE)
    assert set(result) == {
        "instance_type",
        "instance",
        "region",
        "price_source",
        "price_as_of",
        "hours_per_month",
        "instances_per_endpoint",
        "headroom",
        "models",
        "total_models",
        "footprints",
        "packing",
        "single_model",
        "mme",
        "saving",
        "notes",
    }
    assert set(result["instance"]) == {
        "gpu",
        "gpus",
        "gpu_memory_gib",
        "vcpu",
        "memory_gib",
        "price_per_hour",
    }
    assert set(result["packing"]) == {
        "basis",
        "models_per_instance",
        "usable_gpu_mib",
        "gpus_by_memory",
        "instance_groups_by_memory",
        "gpu_layouts",
    }
    for side in ("single_model", "mme"):
        assert set(result[side]) == {"endpoints", "instances", "monthly_cost"}
        assert isinstance(result[side]["instances"], int)
        assert isinstance(result[side]["monthly_cost"], float)
    assert set(result["saving"]) == {"instances", "monthly_cost", "percent"}
    assert result["instance"]["price_per_hour"] == 1.52
    assert result["footprints"] == {"sd": {"mib": 3910.0, "source": "blog"}}
    assert result["packing"]["basis"] == "--models-per-instance"
    assert result["price_source"].startswith("https://")
    assert isinstance(result["notes"], list)


def test_defaults_come_from_the_config(capsys, table):
    result = run_json(capsys, *NO_FILE)
    defaults = table["defaults"]
    assert result["instance_type"] == defaults["instance_type"]
    assert result["models"] == defaults["models"]
    assert result["instances_per_endpoint"] == defaults["instances_per_endpoint"]
    assert result["hours_per_month"] == defaults["hours_per_month"]
    assert result["headroom"] == defaults["headroom"]
    assert result["instance"]["price_per_hour"] == 1.515  # the table's price, not the blog's


def write_footprint_file(path: Path, device: str, models: dict[str, float | None]) -> Path:
    """A footprint.json in scripts/footprint.py's format, by hand."""
    path.write_text(
        json.dumps(
            {
                "format": 1,
                "tier": "full",
                "device": device,
                "measured_at": "2026-11-26T00:00:00+00:00",
                "machine": {"gpu": "NVIDIA A10G" if device != "cpu" else None},
                "models": {
                    name: {"variant": "x", "parameters": 1, "gpu_footprint_mib": mib}
                    for name, mib in models.items()
                },
            }
        )
    )
    return path


def test_plan_reads_gpu_figures_from_footprint_json(capsys, tmp_path):
    path = write_footprint_file(tmp_path / "footprint.json", "cuda:0", {"sd": 5000.0, "sam": None})
    result = run_json(capsys, "--models", "sd=10,sam=1", "--footprint-file", str(path))
    assert result["footprints"]["sd"] == {"mib": 5000.0, "source": str(path)}  # outside the project
    assert result["footprints"]["sam"] == {"mib": 3362.0, "source": "blog"}  # null: not measured
    assert result["packing"]["gpu_layouts"][0] == {
        "models": {"sd": 4},
        "gpus": 2,
    }  # 22,118 // 5,000


def test_a_footprint_flag_beats_footprint_json(capsys, tmp_path):
    path = write_footprint_file(tmp_path / "footprint.json", "cuda:0", {"sd": 5000.0})
    result = run_json(
        capsys, "--models", "sd=1", "--footprint-file", str(path), "--footprint", "sd=4000"
    )
    assert result["footprints"]["sd"] == {"mib": 4000.0, "source": "--footprint"}


def test_a_cpu_footprint_json_falls_back_to_the_blog_with_a_note(capsys, tmp_path):
    path = write_footprint_file(tmp_path / "footprint.json", "cpu", {"sd": None, "sam": None})
    result = run_json(capsys, "--models", "sd=1", "--footprint-file", str(path))
    assert result["footprints"]["sd"]["source"] == "blog"
    assert any("no GPU figures" in note and "cpu" in note for note in result["notes"])


@pytest.mark.parametrize(
    "content",
    ['{"models": [1, 2]}', "[]", "not json", '{"models": {"sd": {"gpu_footprint_mib": -5}}}'],
)
def test_a_broken_footprint_json_is_a_one_line_error(capsys, tmp_path, content):
    path = tmp_path / "footprint.json"
    path.write_text(content)
    code, out, err = run(capsys, "--footprint-file", str(path))
    assert_one_line_error(code, out, err, "is not a footprint file")


def test_the_instance_table_is_complete(table):
    assert table["source"].startswith("https://") and table["as_of"]
    sizes = ("xlarge", "2xlarge", "4xlarge", "8xlarge", "12xlarge", "16xlarge", "24xlarge")
    assert set(table["instances"]) == {f"ml.g5.{size}" for size in (*sizes, "48xlarge")}
    for name in table["instances"]:
        instance = plan.instance_from_table(table, name)
        assert instance.gpus in (1, 4, 8)
        assert instance.gpu_mib == 24 * 1024  # every G5 GPU is a 24 GiB A10G
        assert instance.vcpu > 0 and instance.memory_gib > 0 and instance.price_per_hour > 0
