"""The driver: an InferenceAmiVersion whose NVIDIA driver runs the image's torch CUDA build,
chosen from configs/inference-amis.yaml (each name checked against botocore) before any AWS
call; a combination that cannot run stops here, saying what to change."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

import mmekit_cuda  # the driver/CUDA rule the handlers also use (torch-free)

from .settings import AMI_TABLE, PromoteError, Settings


@dataclass(frozen=True)
class InferenceAmi:
    name: str
    driver: int  # the NVIDIA driver branch
    cuda: str
    instance_families: tuple[str, ...]
    families_documented: bool  # False: the table's assumption, not AWS's documentation


@dataclass(frozen=True)
class AmiChoice:
    ami: InferenceAmi
    image_cuda: str
    cuda_source: str  # where the image's CUDA came from
    reason: str  # one line: why this AMI (--dry-run and the run print it)


def botocore_ami_versions() -> tuple[str, ...]:
    """The InferenceAmiVersion values botocore's SageMaker model knows (no client is made)."""
    import botocore.session

    model = botocore.session.get_session().get_service_model("sagemaker")
    return tuple(model.shape_for("ProductionVariant").members["InferenceAmiVersion"].enum)


def load_ami_table(path: Path = AMI_TABLE) -> list[InferenceAmi]:
    """configs/inference-amis.yaml, in order of preference; each name checked against botocore."""
    raw = (yaml.safe_load(path.read_text()) or {}).get("amis") or {}
    known = botocore_ami_versions()
    amis = []
    for name, entry in raw.items():
        if name not in known:
            raise PromoteError(
                f"{path.name}: {name} is not an InferenceAmiVersion botocore knows "
                f"({', '.join(known)})"
            )
        try:
            mmekit_cuda.cuda_major(entry["cuda"])
            amis.append(
                InferenceAmi(
                    name=name,
                    driver=int(entry["driver"]),
                    cuda=str(entry["cuda"]),
                    instance_families=tuple(str(f) for f in entry["instance_families"]),
                    families_documented=bool(entry["families_documented"]),
                )
            )
        except (KeyError, TypeError, ValueError) as error:
            raise PromoteError(f"{path.name}: {name}: {error}") from None
    if not amis:
        raise PromoteError(f"{path.name}: no AMIs under `amis:`")
    return amis


def instance_family(instance_type: str) -> str:
    """ml.g5.2xlarge -> g5."""
    match = re.fullmatch(r"ml\.([a-z0-9-]+)\.[a-z0-9-]+", instance_type)
    if match is None:
        raise PromoteError(f"instance_type {instance_type!r}: expected ml.<family>.<size>")
    return match[1]


def image_cuda(settings: Settings, image_ref: str | None) -> tuple[str, str]:
    """torch.version.cuda of the image, and where it came from: the image's label (read with
    `docker image inspect` where the image is local), else image_cuda from the settings. The
    venv's torch is never taken for it: the image may be built from another wheel index."""
    from .. import image

    label = image.image_torch_cuda(image_ref) if image_ref else None
    setting = settings.image_cuda.strip()
    if label is not None:
        if label in ("", "None"):
            raise PromoteError(
                f"{image_ref}: its torch is a CPU-only build ({image.CUDA_LABEL}="
                f"{label!r}); a GPU endpoint needs a CUDA build of torch in the image"
            )
        if setting and setting != label:
            raise PromoteError(
                f"image_cuda {setting!r} in the settings, but {image_ref} says CUDA {label} "
                f"(label {image.CUDA_LABEL}): remove image_cuda or correct it"
            )
        return label, f"label {image.CUDA_LABEL} of {image_ref}"
    if setting:
        return setting, "the image_cuda setting"
    raise PromoteError(
        "the image's CUDA is unknown (no local image here carries the label "
        f"{image.CUDA_LABEL}): set image_cuda "
        'in configs/promote.yaml to its torch.version.cuda, e.g. image_cuda: "13.0" (or '
        "MMEKIT_IMAGE_CUDA=13.0, --image-cuda 13.0); `docker run --rm --entrypoint python "
        '<image> -c "import torch; print(torch.version.cuda)"` prints it'
    )


def choose_ami(
    amis: list[InferenceAmi], cuda: str, cuda_source: str, settings: Settings
) -> AmiChoice:
    """The first AMI of the table whose driver runs `cuda` and that lists the instance type's
    family, or the explicit inference_ami_version if it does both; otherwise PromoteError,
    before any AWS call, saying what to change."""
    try:
        needed = mmekit_cuda.min_driver(cuda)
    except ValueError as error:
        raise PromoteError(f"image CUDA from {cuda_source}: {error}") from None
    family = instance_family(settings.instance_type)
    rule = (
        f"the image's torch is built for CUDA {cuda} ({cuda_source}), which needs driver "
        f">= {needed}"
    )

    def fits(ami: InferenceAmi) -> bool:
        return ami.driver >= needed and family in ami.instance_families

    fitting = [ami for ami in amis if fits(ami)]
    suggestion = (
        f"use inference_ami_version {fitting[0].name} (driver {fitting[0].driver})"
        if fitting
        else f"no AMI in {AMI_TABLE.name} fits ml.{family} with driver >= {needed}"
    )
    older = f"or build the image with a CUDA 12 torch: {mmekit_cuda.OLDER_TORCH_HINT}"
    wanted = settings.inference_ami_version.strip()
    if wanted:
        by_name = {ami.name: ami for ami in amis}
        if wanted not in by_name:
            known = botocore_ami_versions()
            where = "botocore knows it" if wanted in known else f"botocore knows {', '.join(known)}"
            raise PromoteError(
                f"inference_ami_version {wanted!r} is not in configs/{AMI_TABLE.name} ({where}): "
                "add its driver, CUDA and instance families there, or use one listed"
            )
        ami = by_name[wanted]
        if ami.driver < needed:
            raise PromoteError(
                f"inference_ami_version {ami.name} has NVIDIA driver {ami.driver}, but {rule}: "
                f"{suggestion}, {older}"
            )
        if family not in ami.instance_families:
            raise PromoteError(
                f"inference_ami_version {ami.name} does not list ml.{family} (it lists "
                f"{', '.join(ami.instance_families)}): {suggestion}, or change instance_type"
            )
        chosen, how = ami, "inference_ami_version in the settings"
    elif fitting:
        chosen, how = fitting[0], f"the first in {AMI_TABLE.name} that fits"
    else:
        supported = sorted(
            {f for ami in amis if ami.driver >= needed for f in ami.instance_families}
        )
        raise PromoteError(
            f"no InferenceAmiVersion in configs/{AMI_TABLE.name} runs this: {rule}, and none "
            f"with such a driver lists ml.{family} ({', '.join(supported) or 'none'} do): change "
            f"instance_type, {older}"
        )
    listed = "as documented" if chosen.families_documented else "the table's assumption"
    reason = (
        f"{rule}; {chosen.name} has driver {chosen.driver} (CUDA {chosen.cuda}) and lists "
        f"ml.{family} ({listed}); {how}"
    )
    return AmiChoice(chosen, cuda, cuda_source, reason)


def plan_ami(
    settings: Settings, image_ref: str | None, amis: list[InferenceAmi] | None = None
) -> AmiChoice:
    cuda, source = image_cuda(settings, image_ref)
    return choose_ami(load_ami_table() if amis is None else amis, cuda, source, settings)
