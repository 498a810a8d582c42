"""Capacity and cost: how many GPU instances a mix of models needs as single-model endpoints
and behind a SageMaker multi-model endpoint (MME), and what each costs a month.

    python -m scripts.plan                                    # 100 SD models, packed by memory
    python -m scripts.plan --models sd=100 --models-per-instance 4 --price-per-hour 1.52
    python -m scripts.plan --models sam=1,lama=1,sd=1 --instance-type ml.g5.xlarge --json
    python -m scripts.plan --footprint sd=4200 --headroom 0.2

The second line is the blog's cost table, to the dollar. Footprints (GPU MiB a model takes,
CUDA context included) come from --footprint, else model_store/footprint.json's GPU figures
(`make footprint` on a GPU host), else the blog's measurements (configs/instances.yaml).

With N models in the mix and R instances per endpoint (replicas, for availability):
- single-model endpoints: one endpoint per model with R instances: N x R instances;
- MME: models are packed onto GPUs by memory (first-fit decreasing, each GPU keeping
  `--headroom` of its memory free), or K to an instance with --models-per-instance K. The
  GPUs needed, rounded up to whole instances, make instance groups; each group is R
  instances, so every model stays resident on R instances, as on its own endpoint;
- a month costs instances x price per hour x hours; the saving is 1 - MME / single-model.
The blog: 100 SD models, K = 4, R = 2, $1.52/h, 720 h: 200 instances, $218,880 a month, as
single-model endpoints; 25 groups of 2 = 50 instances, $54,720, behind MMEs: 75 % saved.

Why one module of ~590 lines: it is one calculation read top to bottom in four sections
(inputs, packing and cost, the table, the command line), each used only by the next; none is
imported elsewhere, and the tests drive it through make_plan and main.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections import Counter
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import yaml

from . import PROJECT_ROOT
from .cli import OneLineParser, positive_int, tool_parser

PROG = "python -m scripts.plan"
INSTANCES_FILE = PROJECT_ROOT / "configs" / "instances.yaml"
FOOTPRINT_FILE = PROJECT_ROOT / "model_store" / "footprint.json"
MIB_PER_GIB = 1024
CENT = Decimal("0.01")
_MODEL_NAME = re.compile(r"^[a-z][a-z0-9_.-]*$")


class PlanError(ValueError):
    """Bad input: one line that says what to fix."""


@dataclass(frozen=True)
class Instance:
    name: str
    gpu: str  # the GPU's model
    gpus: int
    gpu_memory_gib: float  # all GPUs together, as AWS lists it
    vcpu: int
    memory_gib: float
    price_per_hour: Decimal

    @property
    def gpu_mib(self) -> float:
        """One GPU's memory: a model runs on one GPU (TorchServe gives each worker one)."""
        return self.gpu_memory_gib * MIB_PER_GIB / self.gpus


@dataclass(frozen=True)
class Footprint:
    mib: float
    source: str  # "--footprint", the footprint.json path, or "blog"


# ---------------------------------------------------------------------------------------------
# Inputs


def load_table(path: Path = INSTANCES_FILE) -> dict:
    return yaml.safe_load(Path(path).read_text())


def to_decimal(value: Any, what: str) -> Decimal:
    # via str: 1.52 stays 1.52, not the binary float nearest to it
    try:
        number = Decimal(str(value))
    except InvalidOperation:
        raise PlanError(f"{what} must be a number, got {value!r}") from None
    if not number.is_finite() or number < 0:
        raise PlanError(f"{what} must be a non-negative number, got {value!r}")
    return number


def instance_from_table(table: dict, name: str, price: Decimal | None = None) -> Instance:
    known = table["instances"]
    if name not in known:
        raise PlanError(f"unknown instance type {name!r}; known: {', '.join(known)}")
    row = known[name]
    return Instance(
        name=name,
        gpu=str(row["gpu"]),
        gpus=int(row["gpus"]),
        gpu_memory_gib=float(row["gpu_memory_gib"]),
        vcpu=int(row["vcpu"]),
        memory_gib=float(row["memory_gib"]),
        price_per_hour=price if price is not None else to_decimal(row["price_per_hour"], name),
    )


def parse_pairs(texts: list[str], flag: str, value_help: str) -> list[tuple[str, str]]:
    """["sam=1,lama=2", "sd=3"] -> [("sam", "1"), ("lama", "2"), ("sd", "3")]."""
    pairs = []
    for text in texts:
        for item in text.split(","):
            name, equals, value = item.strip().partition("=")
            name, value = name.strip(), value.strip()
            if not equals or not _MODEL_NAME.match(name) or not value:
                raise PlanError(
                    f"{flag} takes NAME={value_help}[,NAME={value_help}...] "
                    f"(e.g. {flag} sd=100), got {item.strip()!r}"
                )
            pairs.append((name, value))
    return pairs


def parse_models(texts: list[str]) -> dict[str, int]:
    """--models sam=1,lama=1,sd=1 (repeatable) -> {"sam": 1, "lama": 1, "sd": 1}."""
    counts: Counter[str] = Counter()
    for name, value in parse_pairs(texts, "--models", "COUNT"):
        if not (value.isascii() and value.isdigit()) or int(value) < 1:
            raise PlanError(f"--models {name}={value}: the count must be a positive integer")
        counts[name] += int(value)
    return dict(counts)


def parse_footprints(texts: list[str]) -> dict[str, Footprint]:
    """--footprint sd=3910 (repeatable, MiB) -> {"sd": Footprint(3910, "--footprint")}."""
    footprints = {}
    for name, value in parse_pairs(texts, "--footprint", "MiB"):
        try:
            footprints[name] = Footprint(positive_mib(value), "--footprint")
        except ValueError:
            raise PlanError(f"--footprint {name}={value}: MiB must be a positive number") from None
    return footprints


def display_path(path: Path) -> str:
    """Relative to the project where it lies inside it: short enough for the table."""
    try:
        return str(Path(path).resolve().relative_to(PROJECT_ROOT))
    except ValueError:
        return str(path)


def positive_mib(value: Any) -> float:
    mib = float(value)
    if not math.isfinite(mib) or mib <= 0:
        raise ValueError(f"{value!r} is no positive number of MiB")
    return mib


def read_footprint_file(path: Path) -> tuple[dict[str, Footprint], list[str]]:
    """model_store/footprint.json's GPU figures (`gpu_footprint_mib`, null when measured on a
    CPU), as scripts/footprint.py writes them, and notes on what was left out. A missing file
    gives nothing."""
    path = Path(path)
    if not path.is_file():
        return {}, []
    label = display_path(path)
    try:
        measured = json.loads(path.read_text())
        footprints = {
            name: Footprint(positive_mib(entry["gpu_footprint_mib"]), label)
            for name, entry in measured["models"].items()
            if isinstance(entry, dict) and entry.get("gpu_footprint_mib") is not None
        }
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        message = f"{label} is not a footprint file (make footprint writes one): {error}"
        raise PlanError(message) from None
    notes = []
    if not footprints:
        notes.append(
            f"{label} holds no GPU figures (measured on {measured.get('device')}): "
            "other footprints used"
        )
    return footprints, notes


def choose_footprints(
    flags: dict[str, Footprint], measured: dict[str, Footprint], blog: dict[str, float]
) -> dict[str, Footprint]:
    """Per model: a flag wins, then a GPU measurement, then the blog's table."""
    chosen = {name: Footprint(float(mib), "blog") for name, mib in blog.items()}
    chosen.update(measured)
    chosen.update(flags)
    return chosen


# ---------------------------------------------------------------------------------------------
# The arithmetic: small pure functions


def usable_gpu_mib(instance: Instance, headroom: float) -> float:
    return instance.gpu_mib * (1 - headroom)


def check_fits(models: dict[str, int], footprints: dict[str, Footprint], capacity: float) -> None:
    for name in models:
        if name not in footprints:
            raise PlanError(f"no GPU footprint for model {name!r}: give --footprint {name}=MiB")
        if footprints[name].mib > capacity:
            raise PlanError(
                f"{name} needs {footprints[name].mib:,.0f} MiB of GPU memory but one GPU has "
                f"{capacity:,.0f} MiB usable (after headroom): it fits on no GPU of this "
                "instance type; choose another type or lower --headroom"
            )


@dataclass(frozen=True)
class GpuRun:
    """`count` GPUs in a row that hold the same models and have the same memory free."""

    free_mib: float
    contents: tuple[tuple[str, int], ...]  # ((model, count), ...), by name
    count: int

    def plus(self, name: str, each: int, size: float, count: int) -> GpuRun:
        """`count` of these GPUs with `each` more of model `name` (of `size` MiB) on each."""
        contents = Counter(dict(self.contents))
        contents[name] += each
        return GpuRun(self.free_mib - each * size, tuple(sorted(contents.items())), count)


def place(runs: list[GpuRun], name: str, size: float, left: int) -> tuple[list[GpuRun], int]:
    """First fit of `left` models of `size` onto existing GPUs, in order; what is left over.

    A run of equal GPUs splits into the GPUs that fill up, at most one that takes the rest,
    and those untouched, in that order, which is where first fit puts equal items one by one.
    """
    placed: list[GpuRun] = []
    for run in runs:
        each = int(run.free_mib // size)
        if not left or not each:
            placed.append(run)
            continue
        full = min(run.count, left // each)
        if full:
            placed.append(run.plus(name, each, size, full))
            left -= full * each
        untouched = run.count - full
        if untouched and left:  # fewer than `each` are left: one GPU takes them all
            placed.append(run.plus(name, left, size, 1))
            left, untouched = 0, untouched - 1
        if untouched:
            placed.append(GpuRun(run.free_mib, run.contents, untouched))
    return placed, left


def pack_gpus(
    models: dict[str, int], footprints: dict[str, Footprint], capacity: float
) -> list[GpuRun]:
    """First-fit decreasing bin packing of the models onto GPUs of `capacity` MiB each.

    Models of one kind are equal in size, so FFD places them one after another: each kind is
    placed in bulk onto runs of equal GPUs, which keeps the work proportional to the number
    of kinds, not of models (a mix of millions packs as fast as one of three).
    """
    runs: list[GpuRun] = []
    for name in sorted(models, key=lambda n: (-footprints[n].mib, n)):
        size = footprints[name].mib
        runs, left = place(runs, name, size, models[name])
        per_gpu = int(capacity // size)  # >= 1: check_fits ran first
        empty = GpuRun(capacity, (), 0)
        if left // per_gpu:
            runs.append(empty.plus(name, per_gpu, size, left // per_gpu))
        if left % per_gpu:
            runs.append(empty.plus(name, left % per_gpu, size, 1))
    return runs


def gpu_layouts(runs: list[GpuRun]) -> list[dict]:
    """Runs with the same models merged: [{"models": {"sd": 5}, "gpus": 20}, ...]."""
    counted: Counter[tuple[tuple[str, int], ...]] = Counter()
    for run in runs:
        counted[run.contents] += run.count
    return [{"models": dict(contents), "gpus": count} for contents, count in counted.items()]


def instance_groups_by_memory(gpus_needed: int, instance: Instance) -> int:
    return math.ceil(gpus_needed / instance.gpus)


def instance_groups_by_count(total_models: int, models_per_instance: int) -> int:
    return math.ceil(total_models / models_per_instance)


def monthly_cost(instances: int, price_per_hour: Decimal, hours_per_month: int) -> Decimal:
    return instances * price_per_hour * hours_per_month


def saving_percent(single: Decimal, mme: Decimal) -> Decimal:
    return (1 - mme / single) * 100 if single else Decimal(0)


def money(amount: Decimal) -> float:
    return float(amount.quantize(CENT, rounding=ROUND_HALF_UP))


def make_plan(
    table: dict,
    models: dict[str, int],
    footprints: dict[str, Footprint],
    instance: Instance,
    instances_per_endpoint: int,
    headroom: float,
    hours_per_month: int,
    models_per_instance: int | None = None,
    notes: list[str] | None = None,
) -> dict:
    """Everything `make plan` prints, as one JSON-ready dict."""
    if not models:
        raise PlanError("--models names no model (e.g. --models sd=100)")
    capacity = usable_gpu_mib(instance, headroom)
    check_fits(models, footprints, capacity)
    total = sum(models.values())
    runs = pack_gpus(models, footprints, capacity)
    gpus_needed = sum(run.count for run in runs)
    groups_by_memory = instance_groups_by_memory(gpus_needed, instance)
    if models_per_instance is None:
        groups = groups_by_memory
    else:
        groups = instance_groups_by_count(total, models_per_instance)
    single_instances = total * instances_per_endpoint
    mme_instances = groups * instances_per_endpoint
    single_cost = monthly_cost(single_instances, instance.price_per_hour, hours_per_month)
    mme_cost = monthly_cost(mme_instances, instance.price_per_hour, hours_per_month)
    notes = list(notes or [])
    if models_per_instance is not None and groups < groups_by_memory:
        notes.append(
            f"--models-per-instance {models_per_instance} packs more than GPU memory holds: "
            f"by memory the mix needs {groups_by_memory} instance groups"
        )
    return {
        "instance_type": instance.name,
        "instance": {
            "gpu": instance.gpu,
            "gpus": instance.gpus,
            "gpu_memory_gib": instance.gpu_memory_gib,
            "vcpu": instance.vcpu,
            "memory_gib": instance.memory_gib,
            "price_per_hour": float(instance.price_per_hour),
        },
        "region": table.get("region"),
        "price_source": table.get("source"),
        "price_as_of": str(table.get("as_of")),
        "hours_per_month": hours_per_month,
        "instances_per_endpoint": instances_per_endpoint,
        "headroom": headroom,
        "models": dict(models),
        "total_models": total,
        "footprints": {
            name: {"mib": footprints[name].mib, "source": footprints[name].source}
            for name in models
        },
        "packing": {
            "basis": "memory" if models_per_instance is None else "--models-per-instance",
            "models_per_instance": models_per_instance,
            "usable_gpu_mib": round(capacity, 1),
            "gpus_by_memory": gpus_needed,
            "instance_groups_by_memory": groups_by_memory,
            "gpu_layouts": gpu_layouts(runs),
        },
        "single_model": {
            "endpoints": total,
            "instances": single_instances,
            "monthly_cost": money(single_cost),
        },
        "mme": {"endpoints": groups, "instances": mme_instances, "monthly_cost": money(mme_cost)},
        "saving": {
            "instances": single_instances - mme_instances,
            "monthly_cost": money(single_cost - mme_cost),
            "percent": float(saving_percent(single_cost, mme_cost).quantize(CENT)),
        },
        "notes": notes,
    }


# ---------------------------------------------------------------------------------------------
# Output


def describe_mix(models: dict[str, int]) -> str:
    return ", ".join(f"{name}={count}" for name, count in models.items())


def describe_layouts(layouts: list[dict]) -> str:
    """[{"models": {"sd": 5}, "gpus": 20}] -> "5 sd on each of 20 GPUs"."""
    parts = []
    for layout in layouts:
        contents = " + ".join(f"{count} {name}" for name, count in layout["models"].items())
        gpus = layout["gpus"]
        parts.append(f"{contents} on each of {gpus} GPUs" if gpus > 1 else f"{contents} on 1 GPU")
    return "; ".join(parts)


def align(rows: list[tuple[str, ...]]) -> list[str]:
    """Plain-text columns: the first left-aligned, the rest right-aligned."""
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [row[0].ljust(widths[0])]
        cells += [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
        lines.append("  " + "  ".join(cells).rstrip())
    return lines


def format_table(plan: dict) -> str:
    instance, packing, saving = plan["instance"], plan["packing"], plan["saving"]
    footprints = ", ".join(
        f"{name} {entry['mib']:,.0f} MiB ({entry['source']})"
        for name, entry in plan["footprints"].items()
    )
    if packing["models_per_instance"] is None:
        packed = "by GPU memory"
    else:
        packed = f"{packing['models_per_instance']} models per instance (--models-per-instance)"
    lines = [
        f"{plan['total_models']} models ({describe_mix(plan['models'])}) "
        f"on {plan['instance_type']}",
        f"  instance      {instance['gpus']} x {instance['gpu']}, "
        f"{instance['gpu_memory_gib']:g} GiB GPU memory, {instance['vcpu']} vCPU, "
        f"{instance['memory_gib']:g} GiB RAM",
        f"  price         ${instance['price_per_hour']:g}/h on demand, {plan['region']}, "
        f"as of {plan['price_as_of']}",
        f"  footprints    {footprints}",
        f"  by memory     {describe_layouts(packing['gpu_layouts'])}",
        f"                ({packing['usable_gpu_mib']:,.0f} MiB usable per GPU, "
        f"{plan['headroom']:.0%} headroom)",
        f"  packing       {packed}",
        f"  availability  {plan['instances_per_endpoint']} instances per endpoint, "
        f"{plan['hours_per_month']} h a month",
        "",
    ]
    single, mme = plan["single_model"], plan["mme"]
    lines += align(
        [
            ("", "endpoints", "instances", "$ / month", ""),
            (
                "single-model endpoints",
                f"{single['endpoints']:,}",
                f"{single['instances']:,}",
                f"{single['monthly_cost']:,.2f}",
                "",
            ),
            (
                "multi-model endpoints (MME)",
                f"{mme['endpoints']:,}",
                f"{mme['instances']:,}",
                f"{mme['monthly_cost']:,.2f}",
                "",
            ),
            (
                "saving",
                "",
                f"{saving['instances']:,}",
                f"{saving['monthly_cost']:,.2f}",
                f"{saving['percent']:g} %",
            ),
        ]
    )
    lines += [
        "",
        f"  MME endpoints here are groups of {plan['instances_per_endpoint']} instances; "
        "one endpoint of them all costs the same.",
    ]
    lines += [f"  note: {note}" for note in plan["notes"]]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line


def headroom_fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value < 1:  # NaN fails too
        raise argparse.ArgumentTypeError(f"must be a fraction from 0 to below 1, got {text!r}")
    return value


def build_parser(defaults: dict) -> OneLineParser:
    parser = tool_parser(PROG, __doc__, OneLineParser)
    parser.add_argument(
        "--models",
        action="append",
        metavar="NAME=COUNT,...",
        help=f"the model mix (repeatable; default {describe_mix(defaults['models'])})",
    )
    parser.add_argument(
        "--footprint", action="append", default=[], metavar="NAME=MiB", help="GPU MiB per model"
    )
    parser.add_argument(
        "--footprint-file",
        type=Path,
        default=FOOTPRINT_FILE,
        help="measured footprints (make footprint); its GPU figures are used when present",
    )
    parser.add_argument("--instances-file", type=Path, default=INSTANCES_FILE)
    parser.add_argument("--instance-type", default=defaults["instance_type"])
    parser.add_argument("--price-per-hour", help="override the table's on-demand price (USD)")
    parser.add_argument(
        "--instances-per-endpoint", type=positive_int, default=defaults["instances_per_endpoint"]
    )
    parser.add_argument(
        "--headroom",
        type=headroom_fraction,
        default=defaults["headroom"],
        help="fraction of each GPU's memory kept free (default %(default)s)",
    )
    parser.add_argument("--hours-per-month", type=positive_int, default=defaults["hours_per_month"])
    parser.add_argument(
        "--models-per-instance",
        type=positive_int,
        help="pack this many models per instance instead of packing by memory (the blog: 4)",
    )
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    return parser


def instances_file_from(argv: list[str]) -> Path:
    """--instances-file holds the defaults the parser shows, so it is read before parsing."""
    early = OneLineParser(prog=PROG, add_help=False)
    early.add_argument("--instances-file", type=Path, default=INSTANCES_FILE)
    known, _ = early.parse_known_args(argv)
    return known.instances_file


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        table = load_table(instances_file_from(argv))
    except (OSError, yaml.YAMLError) as error:
        print(
            f"python -m scripts.plan: error: cannot read the instance table: {error}",
            file=sys.stderr,
        )
        return 2
    defaults = table["defaults"]
    args = build_parser(defaults).parse_args(argv)
    try:
        models = parse_models(args.models) if args.models else dict(defaults["models"])
        price = None
        if args.price_per_hour is not None:
            price = to_decimal(args.price_per_hour, "--price-per-hour")
        instance = instance_from_table(table, args.instance_type, price)
        measured, notes = read_footprint_file(args.footprint_file)
        footprints = choose_footprints(
            parse_footprints(args.footprint), measured, defaults["footprints_mib"]
        )
        plan = make_plan(
            table,
            models,
            footprints,
            instance,
            args.instances_per_endpoint,
            args.headroom,
            args.hours_per_month,
            args.models_per_instance,
            notes,
        )
    except PlanError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(plan, indent=2) if args.json else format_table(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
