"""Which NVIDIA driver a CUDA build needs, and which driver a host has: torch-free, so both the
handlers (inside every archive) and `make promote` (which must not import torch) read the one
rule from here.

CUDA minor-version compatibility: a build for CUDA 12.x runs on any driver >= 525, a 13.x build
needs >= 580 (11.x: >= 450). SageMaker's default driver on ml.g4dn, ml.g5 and ml.p4d is 470.
"""

from __future__ import annotations

import re
from pathlib import Path

# CUDA major version -> the oldest driver branch that runs every minor release of it
MIN_DRIVER_BY_CUDA_MAJOR = {11: 450, 12: 525, 13: 580}
PROC_DRIVER_VERSION = Path("/proc/driver/nvidia/version")
NO_DRIVER = "no NVIDIA driver found"
# A torch built for an older CUDA, for hosts whose driver cannot be changed
OLDER_TORCH_HINT = (
    "TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 make image (a CUDA 12 torch runs "
    "on driver >= 525)"
)


def cuda_major(cuda: str) -> int:
    """'13.0' -> 13; ValueError for anything that is not '<major>.<minor>'."""
    match = re.fullmatch(r"(\d+)\.(\d+)", str(cuda).strip())
    if match is None:
        raise ValueError(f"CUDA version {cuda!r}: expected <major>.<minor>, e.g. 13.0")
    return int(match[1])


def min_driver(cuda: str) -> int:
    """The oldest driver branch a build for `cuda` runs on; ValueError for an unknown major."""
    major = cuda_major(cuda)
    if major not in MIN_DRIVER_BY_CUDA_MAJOR:
        known = ", ".join(f"{m}.x" for m in sorted(MIN_DRIVER_BY_CUDA_MAJOR))
        raise ValueError(f"CUDA {cuda}: no driver rule for it (known: {known})")
    return MIN_DRIVER_BY_CUDA_MAJOR[major]


def driver_branch(version: str) -> int:
    """'535.183.01' -> 535."""
    return int(version.split(".", 1)[0])


def driver_version(proc_file: Path = PROC_DRIVER_VERSION) -> str | None:
    """The host's NVIDIA driver version ('535.183.01'), from the kernel module's /proc file,
    else from NVML where its Python binding is installed; None when neither knows one."""
    try:
        text = proc_file.read_text(errors="replace")
        match = re.search(r"Kernel Module\s+(?:for\s+\S+\s+)?(\d+\.\d+(?:\.\d+)?)", text)
        if match:
            return match[1]
    except OSError:
        pass
    try:
        import pynvml  # nvidia-ml-py, where present

        pynvml.nvmlInit()
        try:
            value = pynvml.nvmlSystemGetDriverVersion()
        finally:
            pynvml.nvmlShutdown()
        return value.decode() if isinstance(value, bytes) else str(value)
    except Exception:  # not installed, or no driver for NVML to talk to
        return None


def driver_supports(driver: str | int, cuda: str) -> bool:
    branch = driver if isinstance(driver, int) else driver_branch(driver)
    return branch >= min_driver(cuda)
