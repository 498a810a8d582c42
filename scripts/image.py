"""Build the serving image: `make image`.

    python -m scripts.image build [--push]

Drives the engine scripts/engine.py finds (a Docker engine, else the project's podman, set up
as needed). Tags the image `mmekit:<short git sha>` and `mmekit:ctx-<digest>`, the digest of
everything the build reads (the Dockerfile, the build context the .dockerignore admits, the
build arguments), so tests and compose reuse an image built from the same inputs. Prints one
line per Dockerfile step (the engine's full output goes to .mmekit/image/build.log), then the
image's size, the build time and torch's CUDA build, which it also records in the image label
`org.mmekit.torch.cuda`. `--push` also tags and pushes it as `$IMAGE_REPOSITORY:<sha>`.
`BASE_IMAGE` and `TORCH_INDEX_URL`, when set, are passed on as build arguments.

The build runs through the engine's CLI (`podman build`, or `docker build` with BuildKit):
the Docker API's classic builder cannot pass a build secret, and the host's CA bundle must
reach pip as one, never as a file in a layer. Everything else goes through the Docker API.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from . import PROJECT_ROOT, engine
from .cli import tool_parser

NO_ENGINE = (
    "no Docker engine reachable here (none answers, and podman could not be set up): use "
    "`make serve-local` natively, or build on a machine with Docker; or pass IMAGE_URI= to "
    "promote an existing image"
)
BUILD_ARGS = ("BASE_IMAGE", "TORCH_INDEX_URL")
DOCKERFILE = PROJECT_ROOT / "Dockerfile"
REPOSITORY = "mmekit"
BUILD_LOG = PROJECT_ROOT / ".mmekit" / "image" / "build.log"
CA_SECRET = "ca_bundle"  # the Dockerfile's `RUN --mount=type=secret,id=ca_bundle`
# torch.version.cuda of the image's torch, read from inside the built image: promote matches the
# endpoint's driver (InferenceAmiVersion) to it.
CUDA_LABEL = "org.mmekit.torch.cuda"
TORCH_LABEL = "org.mmekit.torch.version"
DIGEST_LABEL = "org.mmekit.context.digest"
# the engine's step lines: podman's `STEP 3/12: RUN ...`, BuildKit's `#7 [3/9] RUN ...`
STEP_LINE = re.compile(r"^(STEP \d+/\d+: .*|#\d+ \[[^\]]+\] .*)$")


def engine_reachable() -> bool:
    """An engine answers now (Docker's, or the project's podman once started); changes nothing."""
    return engine.find() is not None


def available() -> bool:
    """An engine whose runtimes include NVIDIA's: what the compose runtime needs for a GPU."""
    runtimes = engine.ask(lambda client: client.info().get("Runtimes"), timeout=10)
    return isinstance(runtimes, dict) and any("nvidia" in name for name in runtimes)


def image_torch_cuda(ref: str) -> str | None:
    """The CUDA_LABEL of a local image; None when no engine answers, or the image or its label
    is missing (an image only in a registry: set image_cuda in configs/promote.yaml)."""
    labels = engine.ask(lambda client: client.images.get(ref).labels, timeout=10)
    value = labels.get(CUDA_LABEL) if isinstance(labels, dict) else None
    return str(value).strip() if value is not None else None


def git(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["git", *arguments], cwd=PROJECT_ROOT, capture_output=True, text=True, check=False
    )


def git_sha() -> str:
    result = git("rev-parse", "--short", "HEAD")
    if result.returncode != 0:
        raise RuntimeError(f"`git rev-parse` failed: {result.stderr.strip()}")
    return result.stdout.strip()


def working_tree_dirty() -> bool:
    """Uncommitted changes to tracked files (the image would not be what its tag says)."""
    result = git("status", "--porcelain", "--untracked-files=no")
    return result.returncode != 0 or bool(result.stdout.strip())


# ---------------------------------------------------------------------------------------------
# What the build reads


def default_base_image() -> str:
    """The Dockerfile's own `ARG BASE_IMAGE=` default: the one place it is written."""
    match = re.search(r"^ARG BASE_IMAGE=(\S+)", DOCKERFILE.read_text(), re.MULTILINE)
    if not match:
        raise RuntimeError("the Dockerfile has no `ARG BASE_IMAGE=<default>`")
    return match.group(1)


def context_files(root: Path = PROJECT_ROOT) -> list[str]:
    """The build context's files, as the engine sees them (.dockerignore applied by the SDK's
    own implementation of Docker's rules)."""
    from docker.utils.build import exclude_paths

    patterns = []
    ignore = root / ".dockerignore"
    if ignore.exists():
        patterns = [
            line.strip()
            for line in ignore.read_text().splitlines()
            if line.strip() and not line.strip().startswith("#")
        ]
    included = exclude_paths(str(root), patterns, dockerfile="Dockerfile")
    return sorted(path for path in included if (root / path).is_file())


def build_args(environ: dict[str, str]) -> dict[str, str]:
    return {name: environ[name] for name in BUILD_ARGS if environ.get(name)}


def context_digest(environ: dict[str, str], root: Path = PROJECT_ROOT) -> str:
    """12 hex digits over every input of the build: same digest, same image."""
    digest = hashlib.sha256()
    for relative in dict.fromkeys(["Dockerfile", *context_files(root)]):
        digest.update(relative.encode() + b"\0" + (root / relative).read_bytes() + b"\0")
    for name, value in sorted(build_args(environ).items()):
        digest.update(f"{name}={value}\0".encode())
    return digest.hexdigest()[:12]


def ca_bundle(environ: dict[str, str]) -> Path | None:
    """The CA bundle pip on this host trusts (PIP_CERT, pip's configured `cert`, the system's),
    for the build's pip; None where pip's own certifi bundle will do."""
    candidates = [environ.get("PIP_CERT", "")]
    configured = subprocess.run(
        [sys.executable, "-m", "pip", "config", "get", "global.cert"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if configured.returncode == 0:
        candidates.append(configured.stdout.strip())
    candidates.append(environ.get("SSL_CERT_FILE", ""))
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


# ---------------------------------------------------------------------------------------------
# Building


@dataclass(frozen=True)
class Built:
    image_id: str
    tags: list[str]
    size_bytes: int
    seconds: float
    torch: str
    cuda: str
    cached: bool  # an image from the same inputs was already there: nothing was built


def build_command(
    found: engine.Engine, tags: list[str], environ: dict[str, str], root: Path = PROJECT_ROOT
) -> list[str]:
    command = [*found.cli(), "build", "--file", str(root / DOCKERFILE.name)]
    if found.kind == "docker":
        command += ["--progress", "plain"]  # BuildKit: one line per event, no TTY redraws
    else:  # podman's default, OCI, drops SHELL (and HEALTHCHECK): Docker's format keeps them
        command += ["--format", "docker"]
    for tag in tags:
        command += ["--tag", tag]
    for name, value in build_args(environ).items():
        command += ["--build-arg", f"{name}={value}"]
    bundle = ca_bundle(environ)
    if bundle is not None:
        command += ["--secret", f"id={CA_SECRET},src={bundle}"]
    return [*command, str(root)]


def run_build(command: list[str], env: dict[str, str], log_path: Path) -> int:
    """The engine's build, one printed line per step with the time the previous one took; its
    whole output in `log_path` (the tail is printed when it fails)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = last = time.monotonic()
    tail: list[str] = []
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(command) + "\n")
        process = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            cwd=PROJECT_ROOT, bufsize=1,
        )  # fmt: skip
        assert process.stdout is not None
        for line in process.stdout:
            log.write(line)
            tail = [*tail[-39:], line.rstrip()]
            text = line.strip()
            if STEP_LINE.match(text):
                now = time.monotonic()
                print(f"[image] +{now - last:6.1f} s  {text[:110]}", flush=True)
                last = now
            elif "Using cache" in text or text.endswith(" CACHED"):
                print("[image]            (cached)", flush=True)
        status = process.wait()
    print(f"[image] +{time.monotonic() - last:6.1f} s  (end of build, "
          f"{time.monotonic() - started:.0f} s in all)", flush=True)  # fmt: skip
    if status != 0:
        print("\n".join(tail), file=sys.stderr)
    return status


def torch_build(found: engine.Engine, image_id: str) -> tuple[str, str]:
    """(torch.__version__, torch.version.cuda or "none"), asked of the image itself."""
    client = found.client()
    try:
        output = client.containers.run(
            image_id,
            entrypoint=["/opt/mmekit/venv/bin/python", "-c",
                        "import torch; print(torch.__version__, torch.version.cuda or 'none')"],
            remove=True, network_disabled=True,
        )  # fmt: skip
    finally:
        client.close()
    version, cuda = output.decode().split()[-2:]
    return version, cuda


def label(
    found: engine.Engine, image_id: str, tags: list[str], labels: dict[str, str], env: dict
) -> None:
    """Add labels to a built image: a one-line build `FROM` it (no new file-system layer)."""
    with tempfile.TemporaryDirectory(prefix="mmekit-label-") as folder:
        (Path(folder) / "Dockerfile").write_text(f"FROM {image_id}\n")
        command = [*found.cli(), "build", "--quiet"]
        if found.kind == "podman":
            command += ["--format", "docker"]
        for key, value in labels.items():
            command += ["--label", f"{key}={value}"]
        for tag in tags:
            command += ["--tag", tag]
        result = subprocess.run(
            [*command, folder], env=env, capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(f"labelling the image failed: {result.stderr.strip()[-500:]}")


def find_built(found: engine.Engine, tag: str) -> Built | None:
    import docker

    client = found.client()
    try:
        image = client.images.get(tag)
    except docker.errors.ImageNotFound:
        return None
    finally:
        client.close()
    labels = image.labels or {}
    if CUDA_LABEL not in labels:
        return None  # a build that was interrupted before it was labelled
    return Built(
        image.id, list(image.tags), int(image.attrs.get("Size") or 0), 0.0,
        labels.get(TORCH_LABEL, "?"), labels[CUDA_LABEL], cached=True,
    )  # fmt: skip


def build_image(
    environ: dict[str, str] | None = None,
    extra_tags: list[str] | None = None,
    reuse: bool = False,
    root: Path = PROJECT_ROOT,
    log_path: Path = BUILD_LOG,
) -> Built:
    """Build (or, with `reuse`, find one built from the same inputs) and label the image.
    `root`: the build context (a copy of the project, in tests)."""
    environ = dict(os.environ if environ is None else environ)
    found = engine.ensure()
    digest = context_digest(environ, root)
    tags = [f"{REPOSITORY}:ctx-{digest}", *(extra_tags or [])]
    if reuse:
        built = find_built(found, tags[0])
        if built is not None:
            print(f"[image] {tags[0]} is built from these very inputs: reused", flush=True)
            return built
    base = environ.get("BASE_IMAGE") or default_base_image()
    print(f"[image] base {base}: {engine.base_image(base, found)}", flush=True)
    env = found.environment(environ)
    if found.kind == "docker":
        env["DOCKER_BUILDKIT"] = "1"
    started = time.monotonic()
    # The engine's own output, before labelling. The tag is kept (and moved by the next build):
    # removing an image's last tag makes podman delete it with its untagged parents, which are
    # the layer cache the next build reuses.
    unlabelled = f"{REPOSITORY}:unlabelled"
    print(f"[image] building on {found.kind} ({found.host}); log "
          f"{os.path.relpath(log_path, PROJECT_ROOT)}", flush=True)  # fmt: skip
    if run_build(build_command(found, [unlabelled], environ, root), env, log_path) != 0:
        raise RuntimeError(f"the build failed; the whole log is in {log_path}")
    torch_version, cuda = torch_build(found, unlabelled)
    labels = {CUDA_LABEL: cuda, TORCH_LABEL: torch_version, DIGEST_LABEL: digest}
    label(found, unlabelled, tags, labels, env)
    client = found.client()
    try:
        image = client.images.get(tags[0])
    finally:
        client.close()
    seconds = time.monotonic() - started
    return Built(image.id, tags, int(image.attrs.get("Size") or 0), seconds, torch_version,
                 cuda, cached=False)  # fmt: skip


def report(built: Built) -> str:
    took = "reused" if built.cached else f"built in {built.seconds:.0f} s"
    return (
        f"[image] {', '.join(built.tags)}: {built.size_bytes / 1e9:.2f} GB, {took}; "
        f"torch {built.torch}, CUDA {built.cuda} (label {CUDA_LABEL})"
    )


def build_and_push(repository: str, environ: dict[str, str]) -> str | None:
    """Build, tag as `<repository>:<sha>`, push; the pushed URI, or None after a failure.
    `make promote` calls this when no IMAGE_URI is given."""
    try:
        tag = f"{REPOSITORY}:{git_sha()}"
        built = build_image(environ, extra_tags=[tag])
    except (RuntimeError, engine.EngineError) as error:
        print(f"error: {error}", file=sys.stderr)
        return None
    print(report(built), flush=True)
    if not repository:
        return tag
    remote_tag = tag.split(":", 1)[1]
    client = engine.ensure().client()
    try:
        client.images.get(tag).tag(repository, remote_tag)
        for event in client.api.push(repository, remote_tag, stream=True, decode=True):
            if event.get("error"):
                print(f"error: pushing {repository}:{remote_tag}: {event['error']}",
                      file=sys.stderr)  # fmt: skip
                return None
    finally:
        client.close()
    return f"{repository}:{remote_tag}"


def build(push: bool, environ: dict[str, str] | None = None) -> int:
    environ = dict(os.environ if environ is None else environ)
    repository = environ.get("IMAGE_REPOSITORY", "")
    if push and not repository:
        print("error: --push needs IMAGE_REPOSITORY=<registry>/<name>", file=sys.stderr)
        return 1
    try:
        engine.ensure()
    except engine.EngineError as error:
        print(f"{NO_ENGINE} ({error})", file=sys.stderr)
        return 2
    built = build_and_push(repository if push else "", environ)
    if built is None:
        return 1
    if push:
        print(f"IMAGE_URI={built}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = tool_parser("python -m scripts.image", __doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    build_parser = commands.add_parser("build", help="build, tagged mmekit:<git sha>")
    build_parser.add_argument("--push", action="store_true", help="push to $IMAGE_REPOSITORY")
    args = parser.parse_args(argv)
    return build(args.push)


if __name__ == "__main__":
    sys.exit(main())
