"""Set up a machine for mmekit: Java 17 for TorchServe, and .venv with the pinned packages.

Runs with the system's python3 and the standard library only (nothing is installed yet).
Idempotent and fast when nothing changed: the venv records a hash of what it was built from.

    python3 -m scripts.bootstrap            # what every `make` target runs first
    python3 -m scripts.bootstrap --check    # say what is missing, change nothing
    python3 -m scripts.bootstrap --with-browser  # also Debian's chromium (make test)
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from .cli import tool_parser

PROJECT_ROOT = Path(__file__).resolve().parent.parent
VENV = PROJECT_ROOT / ".venv"
PYPROJECT = PROJECT_ROOT / "pyproject.toml"
LOCK = PROJECT_ROOT / "requirements.lock"
STAMP = VENV / ".mmekit-installed"
JAVA_PACKAGE = "openjdk-17-jre-headless"
CHROMIUM = "/usr/bin/chromium"  # Debian's; Playwright drives it (no browser download)
# torch and torchvision wheels for this pin exist for CPython 3.11 (and lie on local disk here)
PYTHON_VERSION = (3, 11)


class SetupError(Exception):
    pass


def say(message: str) -> None:
    print(f"[setup] {message}", flush=True)


def run(command: list[str], **kwargs) -> None:
    say("$ " + " ".join(command))
    subprocess.run(command, check=True, **kwargs)


# ---------------------------------------------------------------------------------------------
# Java


def java_major_version() -> int | None:
    java = shutil.which("java")
    if java is None:
        return None
    result = subprocess.run([java, "-version"], capture_output=True, text=True)
    match = re.search(r'version "(\d+)(?:\.(\d+))?', result.stderr + result.stdout)
    if not match:
        return None
    major = int(match.group(1))
    return int(match.group(2)) if major == 1 and match.group(2) else major


def apt_install(package: str, why: str) -> None:
    """Install one Debian package (root, or passwordless sudo); one line on failure."""
    if shutil.which("apt-get") is None:
        raise SetupError(f"{why}, and this machine has no apt-get: install {package} yourself")
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    say(f"{why}: installing {package} with apt")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        run([*sudo, "apt-get", "update", "-q"], env=env)
        run([*sudo, "apt-get", "install", "-y", "-q", "--no-install-recommends", package], env=env)
    except subprocess.CalledProcessError as error:
        raise SetupError(
            f"installing {package} failed (exit {error.returncode}): install it yourself "
            f"(`sudo apt-get install {package}`) and run again"
        ) from None


def ensure_java(check_only: bool) -> None:
    version = java_major_version()
    if version is not None and version >= 17:
        return
    found = "no java" if version is None else f"java {version}"
    if check_only:
        raise SetupError(f"TorchServe needs Java 17+ ({found} found): run `make setup`")
    apt_install(JAVA_PACKAGE, f"TorchServe needs Java 17+ ({found} found)")
    if (java_major_version() or 0) < 17:
        raise SetupError(f"{JAVA_PACKAGE} installed but `java -version` still is not 17+")


def ensure_browser(check_only: bool) -> None:
    """Debian's chromium, which the editor's browser test drives through Playwright."""
    if Path(CHROMIUM).exists():
        return
    if check_only:
        raise SetupError(f"the browser test needs {CHROMIUM}: run `make test` once")
    apt_install("chromium", f"the editor's browser test needs {CHROMIUM}")
    if not Path(CHROMIUM).exists():
        raise SetupError(f"chromium installed but {CHROMIUM} is missing")


# ---------------------------------------------------------------------------------------------
# Python packages


def requirements() -> list[str]:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    return [*project["dependencies"], *project["optional-dependencies"]["dev"]]


def install_fingerprint() -> str:
    digest = hashlib.sha256()
    for path in (PYPROJECT, LOCK):
        digest.update(path.read_bytes() if path.exists() else b"")
    digest.update(sys.version.encode())
    return digest.hexdigest()


def venv_python() -> Path:
    return VENV / "bin" / "python"


def ensure_venv(check_only: bool) -> None:
    fingerprint = install_fingerprint()
    if venv_python().exists() and STAMP.exists() and STAMP.read_text().strip() == fingerprint:
        return
    if check_only:
        raise SetupError(".venv is missing or out of date: run `make setup`")
    if sys.version_info[:2] != PYTHON_VERSION:
        raise SetupError(
            f"mmekit's pinned torch needs Python {PYTHON_VERSION[0]}.{PYTHON_VERSION[1]}; this is "
            f"{sys.version.split()[0]}. Run with python3.11 (make PYTHON=python3.11 ...)"
        )
    if not venv_python().exists():
        say(f"creating {VENV.relative_to(PROJECT_ROOT)}")
        run([sys.executable, "-m", "venv", str(VENV)])
    pip = [str(venv_python()), "-m", "pip", "--disable-pip-version-check"]
    constraints = ["-c", str(LOCK)] if LOCK.exists() else []
    say("installing pinned packages (torch comes from local disk where it lies there)")
    run([*pip, "install", "-q", *constraints, *requirements()])
    # the project itself, editable: its console command (`mmekit`) on the venv's PATH
    run([*pip, "install", "-q", "--no-deps", "--no-build-isolation", "-e", str(PROJECT_ROOT)])
    STAMP.write_text(fingerprint + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = tool_parser("python3 -m scripts.bootstrap", __doc__)
    parser.add_argument("--check", action="store_true", help="report only, change nothing")
    parser.add_argument("--skip-java", action="store_true", help="only the Python side")
    parser.add_argument("--with-browser", action="store_true", help="chromium too (make test)")
    args = parser.parse_args(argv)
    try:
        if not args.skip_java:
            ensure_java(args.check)
        if args.with_browser:
            ensure_browser(args.check)
        ensure_venv(args.check)
    except (SetupError, subprocess.CalledProcessError) as error:
        print(f"[setup] error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
