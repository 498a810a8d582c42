"""Build the serving image where a Docker engine is reachable.

    python -m scripts.image build [--push]

Tags the image `mmekit:<short git sha>`. `--push` also tags and pushes it as
`$IMAGE_REPOSITORY:<sha>` (e.g. <account>.dkr.ecr.<region>.amazonaws.com/mmekit, logged in
beforehand). `BASE_IMAGE` and `TORCH_INDEX_URL`, when set, are passed on as build arguments.
Where no engine is reachable it says so in one line and exits 2.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from scripts import PROJECT_ROOT

NO_ENGINE = (
    "no Docker engine reachable here (`docker info` failed): use `make serve-local` natively, "
    "or build on a machine with Docker; or pass IMAGE_URI= to promote an existing image"
)
BUILD_ARGS = ("BASE_IMAGE", "TORCH_INDEX_URL")
# The image label holding torch.version.cuda of the image's torch, set at build time: promote
# matches the endpoint's driver (InferenceAmiVersion) to it.
TORCH_CUDA_LABEL = "io.mmekit.torch-cuda"


def docker(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str] | None:
    """`docker ARGS`, captured; None when there is no docker CLI or it hangs."""
    try:
        return subprocess.run(
            ["docker", *args], capture_output=True, text=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None


def engine_reachable() -> bool:
    result = docker("info")
    return result is not None and result.returncode == 0


def available() -> bool:
    """An engine whose runtimes include NVIDIA's: what the compose runtime needs for a GPU."""
    result = docker("info", "--format", "{{json .Runtimes}}")
    if result is None or result.returncode != 0:
        return False
    try:
        runtimes = json.loads(result.stdout)
    except json.JSONDecodeError:
        return False
    return isinstance(runtimes, dict) and any("nvidia" in name for name in runtimes)


def image_torch_cuda(ref: str) -> str | None:
    """The TORCH_CUDA_LABEL of a local image; None when docker, the image or the label is
    missing (an image only in a registry: set image_cuda in configs/promote.yaml)."""
    result = docker("image", "inspect", "--format", "{{json .Config.Labels}}", ref)
    if result is None or result.returncode != 0:
        return None
    try:
        labels = json.loads(result.stdout or "null") or {}
    except json.JSONDecodeError:
        return None
    value = labels.get(TORCH_CUDA_LABEL) if isinstance(labels, dict) else None
    return str(value).strip() if value is not None else None


def git_sha() -> str:
    result = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"`git rev-parse` failed: {result.stderr.strip()}")
    return result.stdout.strip()


def working_tree_dirty() -> bool:
    """Uncommitted changes to tracked files (the image would not be what its tag says)."""
    result = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    return result.returncode != 0 or bool(result.stdout.strip())


def build_command(tag: str, environ: dict[str, str]) -> list[str]:
    command = ["docker", "build", "--tag", tag]
    for name in BUILD_ARGS:
        if environ.get(name):
            command += ["--build-arg", f"{name}={environ[name]}"]
    return [*command, str(PROJECT_ROOT)]


def build_and_push(repository: str, environ: dict[str, str]) -> str | None:
    """Build, tag as `<repository>:<sha>`, push; the pushed URI, or None after a failure
    (docker's own output says why). `make promote` calls this when no IMAGE_URI is given."""
    try:
        tag = f"mmekit:{git_sha()}"
    except RuntimeError as error:
        print(f"error: {error}", file=sys.stderr)
        return None
    if subprocess.run(build_command(tag, environ), check=False).returncode != 0:
        print(f"error: `docker build` failed for {tag}", file=sys.stderr)
        return None
    print(f"built {tag}", flush=True)
    if not repository:
        return tag
    remote = f"{repository}:{tag.split(':', 1)[1]}"
    for command in (["docker", "tag", tag, remote], ["docker", "push", remote]):
        if subprocess.run(command, check=False).returncode != 0:
            print(f"error: `{' '.join(command)}` failed", file=sys.stderr)
            return None
    return remote


def build(push: bool, environ: dict[str, str] | None = None) -> int:
    environ = dict(os.environ if environ is None else environ)
    if not engine_reachable():
        print(NO_ENGINE, file=sys.stderr)
        return 2
    repository = environ.get("IMAGE_REPOSITORY", "")
    if push and not repository:
        print("error: --push needs IMAGE_REPOSITORY=<registry>/<name>", file=sys.stderr)
        return 1
    built = build_and_push(repository if push else "", environ)
    if built is None:
        return 1
    if push:
        print(f"IMAGE_URI={built}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.image",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    build_parser = commands.add_parser("build", help="docker build, tagged mmekit:<git sha>")
    build_parser.add_argument("--push", action="store_true", help="push to $IMAGE_REPOSITORY")
    args = parser.parse_args(argv)
    return build(args.push)


if __name__ == "__main__":
    sys.exit(main())
