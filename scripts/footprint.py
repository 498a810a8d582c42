"""Model footprints: load time, parameters, CPU and GPU memory of each model, as served.

Each model is measured in a fresh child process (this module again, with a hidden --child
flag), so one model's allocations never show in another's figures. The child loads the model
through its TorchServe handler, exactly as a worker does (handler.initialize with the archive's
model-config.yaml settings, weights through mmekit_models' loaders), then answers one small
request through handler.process:

- sam: one click on a 128x128 image (SAM resizes every image to 1024 px on its long side);
- lama: a 256x256 image and a mask;
- sd: a 1-step edit of a 64x64 window on a CPU, of the production 512x512 window on a GPU
  (--sd-window sets it): GPU figures are for planning, so they carry production activations.

Recorded per model: load and inference seconds, parameter count, peak RSS before loading,
after loading and after the request (VmHWM; peak_rss_mib says why not ru_maxrss), and on
CUDA torch's max_memory_allocated and memory_reserved after each step, plus
`gpu_footprint_mib`: the device's memory in use after the request, CUDA context included
(what nvidia-smi shows, as the blog measured). `make plan` reads that figure; it is null on a
CPU. Measure on an otherwise idle GPU: the figure is device-wide.

Weights are memory-mapped (safetensors): pages count towards RSS once touched, so RSS after
loading can sit far below a model's size until its first request reads every weight.

    python -m scripts.footprint                       # synthetic tier, built offline if missing
    python -m scripts.footprint --tier tiny --models sam,lama --output /tmp/footprint.json

The synthetic tier is full size (SAM vit_b, big-lama, SD2 inpainting with random weights). On
a 2-core CPU with 24 GiB: building it once, about 35 s (5.4 GB on disk); measuring all three,
about 25 s, SAM's 1024 px encoder the slowest request; peak RSS about 5.6 GiB (SD in fp32).

Why one module of ~530 lines: the parent and the child it starts are the same file (the child
is this module with --child), so what the child measures and how the parent reads it change
together; the sections are the requests, the child's measurement and the parent's command.
"""

from __future__ import annotations

import argparse
import base64
import importlib
import io
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from . import PROJECT_ROOT
from .cli import OneLineParser, positive_int, tool_parser
from .models import MODELS, TIERS, resolve, spec
from .weights import DEFAULT_ROOT, build_tier, read_info, weights_dir

PROG = "python -m scripts.footprint"
DEFAULT_OUTPUT = PROJECT_ROOT / "model_store" / "footprint.json"
FORMAT_VERSION = 1
MIB = 1 << 20
PROC_STATUS = Path("/proc/self/status")
# ru_maxrss is in KiB on Linux and in bytes on macOS
RSS_UNIT_BYTES = 1 if sys.platform == "darwin" else 1024
# A stuck child must not hang `make footprint`; one model takes seconds (synthetic SD: 8 s on
# a 2-core CPU, 25 s on a GPU host), so this only bounds a slow disk or a swapping machine.
DEFAULT_TIMEOUT_S = 1800
# The SD window a CPU measures (seconds, not minutes); on a GPU the handler's own window_size.
CPU_SD_WINDOW = 64
SAM_IMAGE_SIDE = 128
LAMA_IMAGE_SIDE = 256
SEED = 0


class FootprintError(ValueError):
    """Bad input: one line that says what to fix."""


# ---------------------------------------------------------------------------------------------
# Requests: built in memory, in the JSON the handlers take (each model's entry in
# scripts/models.py names its own)


def png_b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def random_image(side: int) -> Image.Image:
    rng = np.random.default_rng(SEED)
    return Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))


def centre_mask(side: int) -> Image.Image:
    """A square over the middle half: something to erase or replace."""
    mask = np.zeros((side, side), dtype=np.uint8)
    mask[side // 4 : 3 * side // 4, side // 4 : 3 * side // 4] = 255
    return Image.fromarray(mask)


def sam_request(_: Any) -> tuple[dict, str]:
    side = SAM_IMAGE_SIDE
    payload = {
        "image": png_b64(random_image(side)),
        "gen_args": {"point_coords": [side // 2, side // 2]},
    }
    return payload, f"one click on a {side}x{side} image"


def lama_request(_: Any) -> tuple[dict, str]:
    side = LAMA_IMAGE_SIDE
    payload = {"image": png_b64(random_image(side)), "mask_image": png_b64(centre_mask(side))}
    return payload, f"a {side}x{side} image and mask"


def sd_request(handler: Any) -> tuple[dict, str]:
    """An image the size of the handler's window, so SD runs at that size (the handler scales
    every window to window_size)."""
    window = handler.settings.window_size
    payload = {
        "image": png_b64(random_image(window)),
        "mask_image": png_b64(centre_mask(window)),
        "prompt": "a red vase",
        "gen_args": {"seed": SEED, "num_inference_steps": 1},
    }
    return payload, f"1 step on a {window}x{window} window"


# ---------------------------------------------------------------------------------------------
# The child: one model, one fresh process


@dataclass
class ServingContext:
    """The two attributes of TorchServe's context that EditHandler.initialize reads."""

    system_properties: dict
    model_yaml_config: dict


def handler_class(model: str) -> type:
    """The model's handler class, imported as TorchServe imports it (a flat module)."""
    model_spec = spec(model)
    if str(model_spec.handlers_dir) not in sys.path:
        sys.path.append(str(model_spec.handlers_dir))
    module = importlib.import_module(Path(model_spec.handler_file).stem)
    return getattr(module, model_spec.handler_class)


def handler_settings(model: str, weights_folder_name: str, sd_window: int | None) -> dict:
    """The archive's handler settings, pointed at the tier's weights folder."""
    model_spec = spec(model)
    settings = model_spec.handler_settings()
    settings["weights_dir"] = weights_folder_name
    if model_spec.window_setting is not None and sd_window is not None:
        settings[model_spec.window_setting] = sd_window
    return settings


def model_modules(model: str, handler: Any) -> list:
    """The torch modules a loaded handler holds (for the parameter count), found by the
    attribute paths its spec names; a mapping there (a pipeline's components) counts the
    modules among its values."""
    import torch

    modules = []
    for path in spec(model).torch_modules:
        found = handler
        for name in path.split("."):
            found = getattr(found, name)
        candidates = found.values() if isinstance(found, Mapping) else [found]
        modules += [part for part in candidates if isinstance(part, torch.nn.Module)]
    return modules


def peak_rss_mib() -> float:
    """This process's peak resident set. On Linux, ru_maxrss carries over the parent's peak
    through fork and exec (the kernel keeps the old address space's high-water mark), so a
    child would report at least its parent's size; /proc's VmHWM belongs to the current
    address space alone, which exec starts afresh. ru_maxrss where /proc is missing."""
    if PROC_STATUS.is_file():
        for line in PROC_STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / MIB  # reported in kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * RSS_UNIT_BYTES / MIB


def peak_rss_source() -> str:
    return "/proc/self/status VmHWM" if PROC_STATUS.is_file() else "getrusage ru_maxrss"


def cuda_figures(device: Any) -> dict[str, float]:
    """torch's peak allocated and current reserved MiB, and the device's MiB in use."""
    import torch

    torch.cuda.synchronize(device)
    free, total = torch.cuda.mem_get_info(device)
    return {
        "max_allocated": torch.cuda.max_memory_allocated(device) / MIB,
        "reserved": torch.cuda.memory_reserved(device) / MIB,
        "device_used": (total - free) / MIB,
    }


# a model's report fields that only a GPU fills (null on a CPU)
CUDA_FIELDS = (
    "cuda_context_mib",
    "cuda_max_allocated_mib_after_load",
    "cuda_max_allocated_mib_after_inference",
    "cuda_reserved_mib_after_load",
    "cuda_reserved_mib_after_inference",
    "gpu_footprint_mib",
    "gpu_name",
    "gpu_total_mib",
)


def cuda_fields(
    device: Any, context_mib: float | None, after_load: dict | None, after_request: dict | None
) -> dict[str, Any]:
    """The report's CUDA fields: all null on a CPU."""
    fields = dict.fromkeys(CUDA_FIELDS)
    if device is None or context_mib is None or after_load is None or after_request is None:
        return fields
    import torch

    properties = torch.cuda.get_device_properties(device)
    return {
        "cuda_context_mib": round(context_mib, 1),
        "cuda_max_allocated_mib_after_load": round(after_load["max_allocated"], 1),
        "cuda_max_allocated_mib_after_inference": round(after_request["max_allocated"], 1),
        "cuda_reserved_mib_after_load": round(after_load["reserved"], 1),
        "cuda_reserved_mib_after_inference": round(after_request["reserved"], 1),
        "gpu_footprint_mib": round(after_request["device_used"], 1),
        "gpu_name": properties.name,
        "gpu_total_mib": round(properties.total_memory / MIB, 1),
    }


def serving_context(model: str, folder: Path, on_gpu: bool, sd_window: int | None) -> Any:
    """What TorchServe hands a worker: the model folder (the tier, whose `model` subfolder is
    the weights), GPU 0 or none, and the archive's handler settings."""
    return ServingContext(
        system_properties={"model_dir": str(folder.parent), "gpu_id": 0 if on_gpu else None},
        model_yaml_config={"handler": handler_settings(model, folder.name, sd_window)},
    )


def parameter_summary(model: str, handler: Any) -> dict[str, Any]:
    parameters = [p for module in model_modules(model, handler) for p in module.parameters()]
    return {
        "parameters": sum(p.numel() for p in parameters),
        "dtype": str(parameters[0].dtype).removeprefix("torch.") if parameters else None,
    }


def measure_in_child(
    model: str, folder: Path, use_cuda: bool, sd_window: int | None
) -> dict[str, Any]:
    """Load `model` from `folder` through its handler and answer one request; the figures."""
    import torch

    device = torch.device("cuda:0") if use_cuda else None
    context_mib = None
    if device is not None:
        torch.cuda.init()
        context_mib = cuda_figures(device)["device_used"]  # the CUDA context, before any model
    elif sd_window is None:
        sd_window = CPU_SD_WINDOW  # a GPU keeps the handler's production window
    handler = handler_class(model)()
    rss_before = peak_rss_mib()

    started = time.perf_counter()
    handler.initialize(serving_context(model, folder, device is not None, sd_window))
    after_load = cuda_figures(device) if device is not None else None
    load_seconds = time.perf_counter() - started
    rss_after_load = peak_rss_mib()

    payload, description = resolve(spec(model).footprint_request)(handler)
    started = time.perf_counter()
    response = json.loads(handler.process({"body": json.dumps(payload).encode()}))
    after_request = cuda_figures(device) if device is not None else None
    inference_seconds = time.perf_counter() - started
    if "generated_image" not in response:
        raise RuntimeError(f"{model} answered without an image: {sorted(response)}")

    return {
        "variant": handler.weights_info.get("variant"),
        "inference": description,
        "load_seconds": round(load_seconds, 3),
        "inference_seconds": round(inference_seconds, 3),
        **parameter_summary(model, handler),
        "cpu_peak_rss_mib_before_load": round(rss_before, 1),
        "cpu_peak_rss_mib_after_load": round(rss_after_load, 1),
        "cpu_peak_rss_mib_after_inference": round(peak_rss_mib(), 1),
        "device": str(device or "cpu"),
        **cuda_fields(device, context_mib, after_load, after_request),
    }


def child_main(args: argparse.Namespace) -> int:
    folder = weights_dir(args.weights_root, args.tier, args.child)
    result = measure_in_child(args.child, folder, args.device == "cuda", args.sd_window)
    Path(args.result).write_text(json.dumps(result))
    return 0


# ---------------------------------------------------------------------------------------------
# The parent: weights, one child per model, the file and the table


def resolve_device(choice: str) -> str:
    """auto -> cuda where torch sees a GPU. The parent never allocates on it: only the
    children do, so each one's device-wide figures are its own."""
    if choice != "auto":
        return choice
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def ensure_weights(tier: str, models: tuple[str, ...], root: Path) -> None:
    """Random tiers are built offline when missing; the full tier must have been fetched."""
    if tier in ("tiny", "synthetic"):
        build_tier(tier, root, models)
        return
    for model in models:
        folder = weights_dir(root, tier, model)
        if read_info(folder) is None:
            raise FileNotFoundError(
                f"no {tier} weights for {model} in {folder}: run `make fetch-weights` first"
            )


def child_command(args: argparse.Namespace, model: str, device: str, result: Path) -> list[str]:
    command = [sys.executable, "-m", "scripts.footprint", "--child", model]
    command += ["--tier", args.tier, "--weights-root", str(Path(args.weights_root).resolve())]
    command += ["--device", device, "--result", str(result)]
    if args.sd_window is not None:
        command += ["--sd-window", str(args.sd_window)]
    return command


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def run_child(args: argparse.Namespace, model: str, device: str) -> dict[str, Any]:
    """One model in a fresh process; its figures, or {"error": ...}."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mmekit-footprint-") as scratch:
        result = Path(scratch) / "result.json"
        try:
            process = subprocess.run(
                child_command(args, model, device, result),
                cwd=PROJECT_ROOT,
                capture_output=True,
                text=True,
                timeout=args.timeout,
            )
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {args.timeout} s"}
        if process.returncode != 0 or not result.is_file():
            return {"error": f"exit status {process.returncode}: {last_line(process.stderr)}"}
        figures = json.loads(result.read_text())
    figures["wall_seconds"] = round(time.perf_counter() - started, 1)
    return figures


def machine_info(results: dict[str, dict]) -> dict[str, Any]:
    import psutil
    import torch

    measured = [entry for entry in results.values() if "error" not in entry]
    gpu = next((entry for entry in measured if entry.get("gpu_name")), {})
    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / (1 << 30), 1),
        "gpu": gpu.get("gpu_name"),
        "gpu_memory_mib": gpu.get("gpu_total_mib"),
        "peak_rss_from": peak_rss_source(),
    }


def write_json(path: Path, content: dict) -> None:
    """Written next to its place, then moved in: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(path.name + ".partial")
    staging.write_text(json.dumps(content, indent=2) + "\n")
    staging.replace(path)


def cell(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


TABLE_COLUMNS = (
    ("model", None, 0),
    ("variant", "variant", 0),
    ("params", "parameters", 0),
    ("load s", "load_seconds", 1),
    ("infer s", "inference_seconds", 1),
    ("RSS base", "cpu_peak_rss_mib_before_load", 0),
    ("RSS load", "cpu_peak_rss_mib_after_load", 0),
    ("RSS infer", "cpu_peak_rss_mib_after_inference", 0),
    ("CUDA alloc", "cuda_max_allocated_mib_after_inference", 0),
    ("CUDA resv", "cuda_reserved_mib_after_inference", 0),
    ("GPU used", "gpu_footprint_mib", 0),
)
TABLE_LEGEND = (
    "memory in MiB: RSS = peak resident set before loading, after loading, after one request;"
    " CUDA = torch's peak allocated and reserved after it; GPU used = the device's memory in"
    " use after it (what make plan reads)"
)


def format_table(report: dict) -> str:
    rows = [tuple(title for title, _, _ in TABLE_COLUMNS)]
    failures = []
    for model, entry in report["models"].items():
        if "error" in entry:
            failures.append(f"{model}: failed: {entry['error']}")
            continue
        rows.append(
            (model,) + tuple(cell(entry.get(key), digits) for _, key, digits in TABLE_COLUMNS[1:])
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = [
        f"{report['tier']} tier on {report['device']}, {report['measured_at']}",
        *(
            "  ".join(
                [row[0].ljust(widths[0]), row[1].ljust(widths[1])]
                + [value.rjust(width) for value, width in zip(row[2:], widths[2:], strict=True)]
            ).rstrip()
            for row in rows
        ),
    ]
    return "\n".join(lines + [TABLE_LEGEND] + failures)


def parse_models(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in MODELS]
    if not names or unknown:
        raise FootprintError(
            f"--models takes a comma-separated list of {', '.join(MODELS)}, got {text!r}"
        )
    return tuple(dict.fromkeys(names))  # each once, in the order given


def build_parser() -> OneLineParser:
    parser = tool_parser(PROG, __doc__, OneLineParser)
    parser.add_argument("--tier", choices=TIERS, default="synthetic")
    parser.add_argument("--models", default=",".join(MODELS), help="e.g. sam,lama,sd (default)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--weights-root", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument(
        "--sd-window",
        type=positive_int,
        help=f"SD's window in px (default: {CPU_SD_WINDOW} on a CPU, the handler's on a GPU)",
    )
    parser.add_argument(
        "--timeout", type=positive_int, default=DEFAULT_TIMEOUT_S, help="seconds per model"
    )
    parser.add_argument("--child", choices=MODELS, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.child:
        return child_main(args)
    try:
        models = parse_models(args.models)
    except FootprintError as error:
        parser.error(str(error))
    device = resolve_device(args.device)
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda, but torch sees no CUDA device")
    try:
        ensure_weights(args.tier, models, args.weights_root)
    except FileNotFoundError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 1
    results = {}
    for model in models:
        print(f"measuring {model} ({args.tier}) on {device} in a fresh process", flush=True)
        results[model] = run_child(args, model, device)
    report = {
        "format": FORMAT_VERSION,
        "tier": args.tier,
        "device": next(
            (entry["device"] for entry in results.values() if "device" in entry), device
        ),
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(results),
        "models": results,
    }
    write_json(args.output, report)
    print(format_table(report))
    print(f"wrote {args.output}")
    return 1 if any("error" in entry for entry in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
