"""Measure it: `make bench` writes bench/results.json and bench/chart.png and prints tables.

    python -m scripts.bench [--quick] [--models sam,lama,sd] [--tier synthetic|tiny]

1. Serving overhead: per model, HTTP through a real TorchServe against the same handler called
   in-process (TorchServe's own loader and Service), interleaved A/B in one run, and a handler
   that does nothing served the same way (the floor).
2. SAM clicks end to end: the first click on an image (encoder + decoder) against repeat clicks
   (the embedding cache) and against re-encoding every click (the reference's behaviour).
3. Cold load: extract + register + first inference through the MME emulator against a fresh
   process loading the same folder in-process, for each tarball compression level.
4. Payload: base64 JSON against raw bytes, and the largest image that fits SageMaker's body.
5. Photos: erase (LaMa) and replace (SD) a fixed-size object on 1 MP to 24 MP photos, in the
   AWS sample's payload shape; time and peak memory of one request, each in a fresh process.

Absolute times on a shared CPU are noise; the ratios, measured side by side in one run, are the
result. With CUDA, absolute latencies of the full-size models are added. `--quick` is CI-sized
(tiny weights, few rounds) and proves the tool works, not how fast anything is.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import requests
from PIL import Image

from scripts import PROJECT_ROOT
from scripts.archive import archive_models
from scripts.examples import requests as example_requests
from scripts.weights import MODELS, weights_dir

OUTPUT_DIR = PROJECT_ROOT / "bench"
MAX_BODY_BYTES = 6_291_456
GOALS = {
    "overhead_p50_ms": 2.0,  # HTTP + frontend + worker over the in-process call
    "repeat_click_speedup": 100.0,  # first click / repeat click, end to end
    "repeat_click_p50_ms": 80.0,  # 1024x768, CPU, synthetic vit_b
    "cold_load_ratio": 1.3,  # through the emulator / in a fresh process
}
CLICK_IMAGE_SIZE = (1024, 768)


# ---------------------------------------------------------------------------------------------
# Numbers


def summary(seconds: list[float]) -> dict:
    """p50/p95/mean in milliseconds."""
    ms = sorted(value * 1000 for value in seconds)
    p95 = ms[min(len(ms) - 1, round(0.95 * (len(ms) - 1)))]
    return {
        "n": len(ms),
        "p50_ms": round(statistics.median(ms), 3),
        "p95_ms": round(p95, 3),
        "mean_ms": round(statistics.fmean(ms), 3),
    }


def timed(call: Callable[[], object]) -> tuple[float, object]:
    started = time.perf_counter()
    result = call()
    return time.perf_counter() - started, result


def machine() -> dict:
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


# ---------------------------------------------------------------------------------------------
# Servers


@dataclass
class Served:
    url: str
    token: str | None
    session: requests.Session

    def post(self, path: str, body: bytes) -> requests.Response:
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return self.session.post(f"{self.url}{path}", data=body, headers=headers, timeout=600)


@contextmanager
def torchserve(run_dir: Path, store: Path, profile: str, models: list[str]) -> Iterator[Served]:
    """A native TorchServe on free loopback ports, ready when every model has answered."""
    from scripts.examples import write_requests
    from scripts.serve import launch_native, shut_down, wait_for_token, wait_until_ready

    log_path = run_dir / "torchserve.log"
    runtime, process, ports = launch_native(run_dir, store, profile, models, log_path)
    served = Served(f"http://127.0.0.1:{ports.inference}", None, requests.Session())
    try:
        if profile == "local":
            served.token = wait_for_token(run_dir, process)
        probes = write_requests(run_dir / "probes", sd_steps=1)
        probes = {model: path for model, path in probes.items() if model in models}
        wait_until_ready(served.url, served.token, probes, process, timeout=900)
        if not probes:  # no model yet: /ping is what ready means
            wait_for_ping(served.url, process)
        yield served
    except BaseException:
        print(log_path.read_text(errors="replace")[-3000:], file=sys.stderr)
        raise
    finally:
        served.session.close()
        shut_down(runtime, process)


def wait_for_ping(url: str, process: subprocess.Popen, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("TorchServe exited at start")
        try:
            if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"TorchServe did not answer /ping within {timeout:.0f} s")


def echo_model(store: Path) -> str:
    """The do-nothing handler, archived like the models (echo.tar.gz in the store)."""
    from scripts.archive import GZIP_LEVEL, write_deterministic_tar

    folder = store.parent / "echo-build"
    (folder / "MAR-INF").mkdir(parents=True, exist_ok=True)
    shutil.copy(PROJECT_ROOT / "scripts" / "bench_echo_handler.py", folder / "echo_handler.py")
    manifest = {
        "runtime": "python",
        "model": {"modelName": "echo", "handler": "echo_handler.py", "modelVersion": "1.0"},
        "archiverVersion": "0.12.0",
    }
    (folder / "MAR-INF" / "MANIFEST.json").write_text(json.dumps(manifest))
    write_deterministic_tar(folder, store / "echo.tar.gz", "echo", GZIP_LEVEL)
    return "echo"


def in_process(work: Path, model: str, tier: str, weights_root: Path, **settings: object):
    from scripts.inprocess import ServedModel, make_model_dir

    folder = make_model_dir(
        work / f"in-process-{model}", model, weights_dir(weights_root, tier, model), settings
    )
    return ServedModel(folder)


# ---------------------------------------------------------------------------------------------
# 1. Serving overhead


def bench_overhead(
    served: Served, work: Path, models: list[str], weights_root: Path, rounds: int
) -> dict:
    bodies = {m: json.dumps(r).encode() for m, r in example_requests(sd_steps=2).items()}
    local = {model: in_process(work, model, "tiny", weights_root) for model in models}
    samples: dict[str, dict[str, list[float]]] = {
        model: {"http": [], "in_process": [], "echo_http": []} for model in models
    }

    def over_http(model: str) -> None:
        reply = served.post(f"/predictions/{model}", bodies[model])
        assert reply.status_code == 200, reply.text[:300]

    def here(model: str) -> None:
        reply = local[model].predict(bodies[model], raw=True)
        assert reply.status == 200, reply.body[:300]

    def echo(model: str) -> None:
        assert served.post("/predictions/echo", bodies[model]).status_code == 200

    for model in models:  # warm-up: first calls pay for lazy initialisation on both sides
        for call in (over_http, here, echo):
            call(model)
            call(model)
    for round_index in range(rounds):
        for model in models:
            order = [("http", over_http), ("in_process", here), ("echo_http", echo)]
            if round_index % 2:  # alternate the order: neither side always runs first
                order.reverse()
            for name, call in order:
                samples[model][name].append(timed(lambda c=call, m=model: c(m))[0])
    results = {}
    for model, by_side in samples.items():
        stats = {side: summary(values) for side, values in by_side.items()}
        overhead = stats["http"]["p50_ms"] - stats["in_process"]["p50_ms"]
        results[model] = {
            **stats,
            "overhead_p50_ms": round(overhead, 3),
            "goal_met": overhead <= GOALS["overhead_p50_ms"],
        }
    return results


# ---------------------------------------------------------------------------------------------
# 2. SAM clicks


def click_image() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.chelsea()).resize(CLICK_IMAGE_SIZE, Image.Resampling.LANCZOS)


def png_b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def bench_clicks(served: Served, rounds: int, reference_rounds: int, tier: str) -> dict:
    image = click_image()
    width, height = image.size

    def click(encoded: str, index: int) -> tuple[float, dict]:
        x, y = (width * (index % 7 + 1)) // 8, (height * (index % 5 + 1)) // 6
        body = {"image": encoded, "gen_args": {"point_coords": [x, y], "point_labels": 1}}
        seconds, reply = timed(lambda: served.post("/predictions/sam", json.dumps(body).encode()))
        assert reply.status_code == 200, reply.text[:300]
        return seconds, reply.json()

    first_seconds, first = click(png_b64(image), 0)
    repeats = [click(png_b64(image), i + 1) for i in range(rounds)]
    assert first["embedding_cache"] == "miss"
    assert all(reply["embedding_cache"] == "hit" for _, reply in repeats)
    reference = []
    for index in range(reference_rounds):
        changed = image.copy()
        changed.putpixel((index, 0), (index % 256, 0, 0))  # another image: no cache to hit
        seconds, reply = click(png_b64(changed), index)
        assert reply["embedding_cache"] == "miss"
        reference.append(seconds)
    repeat = summary([seconds for seconds, _ in repeats])
    speedup = first_seconds * 1000 / repeat["p50_ms"]
    return {
        "tier": tier,
        "image": f"{width}x{height}",
        "first_click_ms": round(first_seconds * 1000, 3),
        "repeat_click": repeat,
        "reference_no_cache": summary(reference),
        "repeat_speedup": round(speedup, 1),
        "goal_met": speedup >= GOALS["repeat_click_speedup"]
        and repeat["p50_ms"] <= GOALS["repeat_click_p50_ms"],
    }


# ---------------------------------------------------------------------------------------------
# 3. Cold load


def cold_child(model_dir: Path, body_file: Path) -> None:
    """In a fresh process: load the handler folder and answer one request (--cold-child)."""
    from scripts.inprocess import ServedModel

    reply = ServedModel(model_dir).predict(body_file.read_bytes(), raw=True)
    if reply.status != 200:
        raise SystemExit(f"first inference failed: {reply.status} {reply.body[:300]!r}")


def bench_cold(
    work: Path,
    models: list[str],
    tier: str,
    levels: list[int],
    weights_root: Path,
    repeats: int = 1,
) -> dict:
    """Medians over `repeats`, levels in a rotated order each time, after one untimed load (the
    first load of a fresh server also pays for its page cache and its first worker)."""
    from scripts.mme import Endpoint, LocalSource, TorchServeClient

    bodies = {m: json.dumps(r).encode() for m, r in example_requests(sd_steps=1).items()}
    stores = {}
    for level in levels:
        stores[level] = work / f"store-gzip{level}"
        archive_models(tuple(models), tier, stores[level], weights_root, gzip_level=level)
    samples: dict[int, dict[str, list[float]]] = {lv: {m: [] for m in models} for lv in levels}
    models_root = work / "opt-ml-models"
    models_root.mkdir(parents=True, exist_ok=True)
    with torchserve(work / "sagemaker-run", models_root, "sagemaker", []) as served:
        endpoints = {
            level: Endpoint(
                name="bench",
                source=LocalSource(stores[level]),
                models_dir=models_root,
                downloads_dir=work / f"downloads-{level}",
                torchserve=TorchServeClient(served.url),
                not_ready_after_s=3600,
            )
            for level in levels
        }

        def cold_load(level: int, model: str) -> float:
            target = f"{model}.tar.gz"
            endpoint = endpoints[level]
            seconds, reply = timed(
                lambda: endpoint.invoke("bench", target, bodies[model], "application/json")
            )
            assert reply.status == 200, reply.body[:300]
            endpoint.unload(target)
            return seconds

        cold_load(levels[0], models[0])  # warm-up, not recorded
        for repeat in range(repeats):
            shift = repeat % len(levels)
            for level in levels[shift:] + levels[:shift]:
                for model in models:
                    samples[level][model].append(cold_load(level, model))
        for endpoint in endpoints.values():
            endpoint.close()
    results: dict = {"tier": tier, "repeats": repeats, "levels": {}, "in_process_ms": {}}
    for level in levels:
        results["levels"][str(level)] = {
            model: {
                "ms": round(statistics.median(values) * 1000, 1),
                "tarball_mb": round((stores[level] / f"{model}.tar.gz").stat().st_size / 1e6, 2),
            }
            for model, values in samples[level].items()
        }
    for model in models:  # the same folder, loaded by a fresh process
        folder = work / "extracted" / model
        with tarfile.open(stores[levels[0]] / f"{model}.tar.gz") as archive:
            archive.extractall(folder, filter="data")
        (root,) = list(folder.iterdir())
        body_file = work / f"{model}-request.json"
        body_file.write_bytes(bodies[model])
        command = [sys.executable, "-m", "scripts.bench", "--cold-child", str(root), str(body_file)]
        runs = []
        for _ in range(repeats):
            seconds, done = timed(
                lambda c=command: subprocess.run(
                    c, cwd=PROJECT_ROOT, capture_output=True, text=True
                )
            )
            if done.returncode != 0:
                raise RuntimeError(f"in-process cold load of {model} failed: {done.stderr[-2000:]}")
            runs.append(seconds)
        results["in_process_ms"][model] = round(statistics.median(runs) * 1000, 1)
    ratios = {}
    for level, per_model in results["levels"].items():
        ratios[level] = {
            model: round(entry["ms"] / results["in_process_ms"][model], 2)
            for model, entry in per_model.items()
        }
    results["ratio_vs_in_process"] = ratios
    totals = {level: sum(e["ms"] for e in pm.values()) for level, pm in results["levels"].items()}
    results["fastest_level"] = int(min(totals, key=totals.get))
    worst = max(max(r.values()) for r in ratios.values())
    results["goal_met"] = worst <= GOALS["cold_load_ratio"]
    return results


# ---------------------------------------------------------------------------------------------
# 4. Payload


def photo(width: int) -> Image.Image:
    from skimage import data

    height = width * 3 // 4
    return Image.fromarray(data.astronaut()).resize((width, height), Image.Resampling.LANCZOS)


def encoded(image: Image.Image, image_format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **({"quality": 90} if image_format == "JPEG" else {}))
    return buffer.getvalue()


def request_bytes(raw: bytes) -> int:
    return len(json.dumps({"image": base64.b64encode(raw).decode(), "gen_args": {}}).encode())


def largest_fitting(image_format: str) -> int:
    """The widest 4:3 photo whose SAM request fits SageMaker's body (binary search)."""
    low, high = 64, 8192
    for _ in range(20):  # bounded: converges well before
        if high - low <= 16:
            break
        middle = (low + high) // 2
        if request_bytes(encoded(photo(middle), image_format)) <= MAX_BODY_BYTES:
            low = middle
        else:
            high = middle
    return low


def bench_payload(sizes: list[int], repeats: int) -> dict:
    results: dict = {"sizes": {}, "largest_fitting_width": {}}
    for width in sizes:
        raw = encoded(photo(width), "PNG")
        body = json.dumps({"image": base64.b64encode(raw).decode()})

        def encode_once(data: bytes = raw) -> str:
            return json.dumps({"image": base64.b64encode(data).decode()})

        def decode_once(text: str = body) -> bytes:
            return base64.b64decode(json.loads(text)["image"])

        encode = [timed(encode_once)[0] for _ in range(repeats)]
        decode = [timed(decode_once)[0] for _ in range(repeats)]
        results["sizes"][f"{width}x{width * 3 // 4}"] = {
            "raw_bytes": len(raw),
            "json_base64_bytes": len(body.encode()),
            "inflation": round(len(body.encode()) / len(raw), 3),
            "encode": summary(encode),
            "decode": summary(decode),
            "fits_body": len(body.encode()) <= MAX_BODY_BYTES,
        }
    for image_format in ("PNG", "JPEG"):
        width = largest_fitting(image_format)
        results["largest_fitting_width"][image_format] = f"{width}x{width * 3 // 4}"
    return results


# ---------------------------------------------------------------------------------------------
# 5. Photos

PHOTO_SIZES = {"1MP": (1152, 864), "3MP": (2048, 1536), "12MP": (4032, 3024), "24MP": (6000, 4000)}
PHOTO_OBJECT = (600, 500)  # the object erased or replaced: the same size on every photo


def photo_body(model: str, size: str) -> bytes:
    from scripts.examples import photo_like, photo_request

    width, height = PHOTO_SIZES[size]
    left, top = width * 5 // 8, height // 2 - PHOTO_OBJECT[1] // 2
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, (left, top, left + PHOTO_OBJECT[0], top + PHOTO_OBJECT[1]))
    body = {**photo_request(photo_like(width, height), mask), "dilate_kernel_size": 15}
    if model == "sd":
        body.update(prompt="a red vase", gen_args=json.dumps({"seed": 1, "num_inference_steps": 2}))
    return json.dumps(body).encode()


def photo_child(model_dir: Path, body_file: Path, out_file: Path) -> None:
    """In a fresh process, so its peak RSS is this model's: load, warm up on the small example,
    then answer one photo request (--photo-child)."""
    import resource

    import psutil
    import torch

    from scripts.inprocess import ServedModel

    served = ServedModel(model_dir, gpu_id=0 if torch.cuda.is_available() else None)
    model = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())["model"]
    warm = example_requests(sd_steps=2)[model["modelName"]]
    assert served.predict(json.dumps(warm).encode(), raw=True).status == 200
    body = body_file.read_bytes()
    rss_before = psutil.Process().memory_info().rss
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    seconds, reply = timed(lambda: served.predict(body, raw=True))
    if reply.status != 200:
        raise SystemExit(f"photo request failed: {reply.status} {reply.body[:300]!r}")
    result = {
        "ms": round(seconds * 1000, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rss_before_mib": round(rss_before / 2**20, 1),
        "request_bytes": len(body),
        "response_bytes": len(reply.body),
        "format": reply.json()["format"],
    }
    if torch.cuda.is_available():
        result["cuda_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        result["cuda_reserved_mib"] = round(torch.cuda.max_memory_reserved() / 2**20, 1)
    out_file.write_text(json.dumps(result))


def bench_photos(work: Path, plan: dict[str, dict[str, list[str]]], weights_root: Path) -> dict:
    """plan: tier -> model -> sizes. Each row is one request in a fresh process."""
    from scripts.inprocess import make_model_dir
    from scripts.weights import build_tier

    results: dict = {"object": f"{PHOTO_OBJECT[0]}x{PHOTO_OBJECT[1]}", "rows": []}
    bodies: dict[tuple[str, str], Path] = {}
    for tier, by_model in plan.items():
        build_tier(tier, weights_root, tuple(by_model))
        for model, sizes in by_model.items():
            folder = make_model_dir(
                work / f"photo-{tier}-{model}", model, weights_dir(weights_root, tier, model)
            )
            for size in sizes:
                if (model, size) not in bodies:
                    bodies[model, size] = work / f"photo-{model}-{size}.json"
                    bodies[model, size].write_bytes(photo_body(model, size))
                out = work / f"photo-{tier}-{model}-{size}.out.json"
                command = [sys.executable, "-m", "scripts.bench", "--photo-child",
                           str(folder), str(bodies[model, size]), str(out)]  # fmt: skip
                subprocess.run(command, check=True, cwd=PROJECT_ROOT, timeout=1800)
                row = {"tier": tier, "model": model, "size": size, **json.loads(out.read_text())}
                results["rows"].append(row)
    return results


# ---------------------------------------------------------------------------------------------
# With CUDA: absolute latencies at full size


def bench_gpu(work: Path, weights_root: Path, rounds: int) -> dict | None:
    import torch

    if not torch.cuda.is_available():
        return None
    from scripts.inprocess import ServedModel, make_model_dir
    from scripts.weights import build_tier

    build_tier("synthetic", weights_root)
    results: dict = {"device": torch.cuda.get_device_name(0), "models": {}, "sd": {}}
    bodies = example_requests(sd_steps=25)
    for model in MODELS:
        folder = make_model_dir(
            work / f"gpu-{model}", model, weights_dir(weights_root, "synthetic", model)
        )
        served = ServedModel(folder, gpu_id=0)
        body = json.dumps(bodies[model]).encode()
        served.predict(body, raw=True)
        results["models"][model] = summary(
            [timed(lambda s=served, b=body: s.predict(b, raw=True))[0] for _ in range(rounds)]
        )
        del served
        torch.cuda.empty_cache()
    for dtype in ("float16", "float32"):
        folder = make_model_dir(
            work / f"gpu-sd-{dtype}", "sd", weights_dir(weights_root, "synthetic", "sd"),
            {"cuda_dtype": dtype},
        )  # fmt: skip
        pipeline = ServedModel(folder, gpu_id=0)
        for steps in (25, 50):
            request = {**bodies["sd"], "gen_args": {"seed": 1, "num_inference_steps": steps}}
            body = json.dumps(request).encode()
            pipeline.predict(body, raw=True)
            results["sd"][f"{dtype}_{steps}_steps"] = summary(
                [timed(lambda b=body, p=pipeline: p.predict(b, raw=True))[0] for _ in range(rounds)]
            )
        del pipeline
        torch.cuda.empty_cache()
    return results


# ---------------------------------------------------------------------------------------------
# Report


def table(headers: list[str], rows: list[list[object]]) -> str:
    cells = [headers, *[[str(value) for value in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
             for row in cells]  # fmt: skip
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def report(results: dict) -> str:
    parts = [f"mmekit bench — {results['machine']['cpu']} ({results['machine']['cores']} cores), "
             f"{results['machine']['date']}{' (quick)' if results['quick'] else ''}"]  # fmt: skip
    overhead = results["overhead"]
    parts += ["", "1. Serving overhead (p50/p95 ms; tiny weights)", table(
        ["model", "HTTP", "in-process", "added p50", "echo floor", "goal <= 2 ms"],
        [[m, f"{o['http']['p50_ms']:.1f}/{o['http']['p95_ms']:.1f}",
          f"{o['in_process']['p50_ms']:.1f}/{o['in_process']['p95_ms']:.1f}",
          f"{o['overhead_p50_ms']:.2f}", f"{o['echo_http']['p50_ms']:.2f}",
          "yes" if o["goal_met"] else "no"] for m, o in overhead.items()],
    )]  # fmt: skip
    clicks = results["sam_clicks"]
    parts += ["", f"2. SAM clicks end to end ({clicks['tier']}, {clicks['image']})", table(
        ["first click", "repeat p50", "no-cache p50", "speedup", "goal >= 100x, <= 80 ms"],
        [[f"{clicks['first_click_ms']:.1f} ms", f"{clicks['repeat_click']['p50_ms']:.1f} ms",
          f"{clicks['reference_no_cache']['p50_ms']:.1f} ms", f"{clicks['repeat_speedup']}x",
          "yes" if clicks["goal_met"] else "no"]],
    )]  # fmt: skip
    cold = results["cold_load"]
    rows = []
    for level, per_model in cold["levels"].items():
        for model, entry in per_model.items():
            ratio = cold["ratio_vs_in_process"][level][model]
            rows.append([level, model, entry["tarball_mb"], entry["ms"],
                         cold["in_process_ms"][model], ratio])  # fmt: skip
    parts += ["", f"3. Cold load ({cold['tier']}): emulator vs fresh process (ms)", table(
        ["gzip", "model", "MB", "emulator", "in-process", "ratio"], rows)]  # fmt: skip
    parts.append(f"fastest level: {cold['fastest_level']}; goal ratio <= 1.3: "
                 f"{'yes' if cold['goal_met'] else 'no'}")  # fmt: skip
    payload = results["payload"]
    parts += ["", "4. Payload (PNG photo in a JSON request)", table(
        ["image", "raw bytes", "JSON+base64", "x", "encode p50 ms", "decode p50 ms", "fits 6 MB"],
        [[size, e["raw_bytes"], e["json_base64_bytes"], e["inflation"], e["encode"]["p50_ms"],
          e["decode"]["p50_ms"], "yes" if e["fits_body"] else "no"]
         for size, e in payload["sizes"].items()],
    )]  # fmt: skip
    parts.append("largest photo that fits: " + ", ".join(
        f"{fmt} {size}" for fmt, size in payload["largest_fitting_width"].items()))  # fmt: skip
    photos = results["photos"]
    parts += ["", f"5. Photos: a {photos['object']} object erased/replaced (one request, fresh "
              "process; sd: 2 steps)", table(
        ["model", "tier", "photo", "ms", "peak RSS MiB", "RSS before", "response", "format"],
        [[r["model"], r["tier"], r["size"], r["ms"], r["peak_rss_mib"], r["rss_before_mib"],
          r["response_bytes"], r["format"]] for r in photos["rows"]],
    )]  # fmt: skip
    if results.get("gpu"):
        gpu = results["gpu"]
        parts += ["", f"GPU ({gpu['device']}), synthetic full-size, p50 ms", table(
            ["what", "p50", "p95"],
            [[name, s["p50_ms"], s["p95_ms"]] for name, s in
             [*gpu["models"].items(), *gpu["sd"].items()]])]  # fmt: skip
    return "\n".join(parts)


def chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no screen
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    overhead = results["overhead"]
    models = list(overhead)
    positions = range(len(models))
    for offset, side in ((-0.25, "http"), (0.0, "in_process"), (0.25, "echo_http")):
        axes[0].bar([p + offset for p in positions], [overhead[m][side]["p50_ms"] for m in models],
                    width=0.25, label=side.replace("_", " "))  # fmt: skip
    axes[0].set_xticks(list(positions), models)
    axes[0].set_ylabel("p50 ms")
    axes[0].set_title("Serving overhead")
    axes[0].legend()
    clicks = results["sam_clicks"]
    axes[1].bar(["first", "repeat (cache)", "no cache"],
                [clicks["first_click_ms"], clicks["repeat_click"]["p50_ms"],
                 clicks["reference_no_cache"]["p50_ms"]])  # fmt: skip
    axes[1].set_yscale("log")
    axes[1].set_ylabel("ms (log)")
    axes[1].set_title(f"SAM clicks ({clicks['tier']})")
    cold = results["cold_load"]
    levels = list(cold["levels"])
    for model in models:
        if model in cold["in_process_ms"]:
            axes[2].plot(levels, [cold["ratio_vs_in_process"][lv][model] for lv in levels],
                         marker="o", label=model)  # fmt: skip
    axes[2].axhline(GOALS["cold_load_ratio"], linestyle="--", color="gray")
    axes[2].set_xlabel("gzip level")
    axes[2].set_ylabel("emulator / in-process")
    axes[2].set_title("Cold load")
    axes[2].legend()
    figure.suptitle(f"mmekit bench, {results['machine']['date']}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


# ---------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict:
    from scripts.weights import build_tier

    models = [m for m in args.models.split(",") if m]
    unknown = set(models) - set(MODELS)
    if unknown:
        raise SystemExit(f"error: unknown models {', '.join(sorted(unknown))}: {MODELS}")
    click_tier = args.tier or ("tiny" if args.quick else "synthetic")
    rounds = 6 if args.quick else 30
    weights_root = args.weights
    build_tier("tiny", weights_root, tuple(MODELS))
    results: dict = {"machine": machine(), "quick": args.quick, "goals": GOALS}
    with tempfile.TemporaryDirectory(prefix="mmekit-bench-") as scratch:
        work = Path(scratch)
        store = work / "store"
        archive_models(tuple(MODELS), "tiny", store, weights_root)
        serving = [*models, echo_model(store)]
        with torchserve(work / "local-run", store, "local", serving) as served:
            print("[bench] 1/5 serving overhead", flush=True)
            results["overhead"] = bench_overhead(served, work, models, weights_root, rounds)
            if click_tier == "tiny":
                print("[bench] 2/5 SAM clicks (tiny)", flush=True)
                results["sam_clicks"] = bench_clicks(served, rounds, 2, "tiny")
        if click_tier != "tiny":
            print(f"[bench] 2/5 SAM clicks ({click_tier}; building it if needed)", flush=True)
            click_store = work / "click-store"
            archive_models(("sam",), click_tier, click_store, weights_root)
            with torchserve(work / "click-run", click_store, "local", ["sam"]) as served:
                results["sam_clicks"] = bench_clicks(served, rounds, 3, click_tier)
        print("[bench] 3/5 cold load", flush=True)
        levels = [0, 6] if args.quick else [0, 1, 6, 9]
        # full-size SD is ~5 GB per tarball and level: its cold loads are left to a GPU host
        cold_models = models if click_tier == "tiny" else [m for m in models if m != "sd"]
        results["cold_load"] = bench_cold(
            work, cold_models, click_tier, levels, weights_root, repeats=1 if args.quick else 3
        )
        print("[bench] 4/5 payload", flush=True)
        sizes = [512, 1024] if args.quick else [512, 1024, 2048]
        results["payload"] = bench_payload(sizes, 3 if args.quick else 10)
        print("[bench] 5/5 photos", flush=True)
        photo_plan = {"tiny": {"lama": ["1MP", "12MP"], "sd": ["1MP", "12MP"]}}
        if args.quick:  # CI-sized: one small photo each
            photo_plan = {"tiny": {"lama": ["1MP"], "sd": ["1MP"]}}
        elif click_tier == "synthetic":  # full-size LaMa too; full-size SD's CPU time is minutes
            photo_plan["tiny"]["lama"] = list(PHOTO_SIZES)
            photo_plan["synthetic"] = {"lama": list(PHOTO_SIZES)}
        results["photos"] = bench_photos(work, photo_plan, weights_root)
        results["gpu"] = None if args.quick else bench_gpu(work, weights_root, 5)
    return results


def main(argv: list[str] | None = None) -> int:
    from scripts.weights import DEFAULT_ROOT

    parser = argparse.ArgumentParser(
        prog="python -m scripts.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        default=os.environ.get("QUICK", "") not in ("", "0"),
        help="CI-sized: tiny weights, few rounds (QUICK=1)",
    )
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument(
        "--tier", choices=("tiny", "synthetic"), default=None,
        help="SAM clicks and cold loads (default: synthetic; tiny with --quick)",
    )  # fmt: skip
    parser.add_argument("--output-dir", type=Path, default=OUTPUT_DIR)
    parser.add_argument("--weights", type=Path, default=DEFAULT_ROOT, help=argparse.SUPPRESS)
    parser.add_argument("--cold-child", nargs=2, type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--photo-child", nargs=3, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.cold_child:
        cold_child(*args.cold_child)
        return 0
    if args.photo_child:
        photo_child(*args.photo_child)
        return 0
    results = run(args)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    chart(results, args.output_dir / "chart.png")
    print(report(results))
    print(f"\nwrote {args.output_dir / 'results.json'} and {args.output_dir / 'chart.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
