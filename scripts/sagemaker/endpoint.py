"""Steps 1 and 4, image and endpoint: the image by digest (built and pushed where Docker runs,
or IMAGE_URI), then the model and endpoint config named by content hash, and the endpoint
created, or updated and checked that the update really took."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from typing import Any

from .errors import error_code, is_not_found
from .naming import config_name, model_name
from .settings import PromoteError, Settings

TRANSITIONAL = {"Creating", "Updating", "SystemUpdating", "RollingBack", "Deleting"}
ECR_IMAGE = re.compile(
    r"^(?P<registry>\d{12})\.dkr\.ecr\.(?P<region>[a-z0-9-]+)\.amazonaws\.com(\.cn)?/"
    r"(?P<repository>[a-z0-9._/-]+):(?P<tag>[\w.-]+)$"
)
DIGEST_IMAGE = re.compile(r"^[^@\s]+@sha256:[0-9a-f]{64}$")


def build_and_push_image(
    settings: Settings, environ: Mapping[str, str], promoter: EndpointSteps
) -> str:
    """IMAGE_URI when given; else the image of this commit: reused when ECR already has it (a
    rebuild could change the digest, and with it the endpoint), built and pushed otherwise,
    where an engine runs. Never from uncommitted changes: the tag names a commit."""
    from .. import image

    if environ.get("IMAGE_URI"):
        return environ["IMAGE_URI"]
    if not image.engine_reachable():
        raise PromoteError(
            "no image: pass IMAGE_URI=<account>.dkr.ecr.<region>.amazonaws.com/<repository>:<tag>"
            " of a pushed image, or run `make promote` where a Docker engine runs to build and "
            "push one"
        )
    if image.working_tree_dirty():
        raise PromoteError(
            "uncommitted changes: the image is tagged with the commit, so commit first "
            "(or pass IMAGE_URI= of an image you built yourself)"
        )
    repository = environ.get("IMAGE_REPOSITORY") or (
        f"{settings.account_id}.dkr.ecr.{settings.region}.amazonaws.com/{settings.image_repository}"
    )
    existing = f"{repository}:{image.git_sha()}"
    try:
        promoter.resolve_image(existing)
        promoter.say(f"image: {existing} is already in ECR; not rebuilt")
        return existing
    except PromoteError:
        pass  # not pushed yet
    remote = image.build_and_push(repository, dict(environ))
    if remote is None:
        raise PromoteError("building or pushing the image failed (see the docker output above)")
    return remote


class EndpointSteps:
    """The Promoter's image and endpoint steps (a mixin of scripts.sagemaker.promoter.Promoter)."""

    # from the Promoter (scripts/sagemaker/promoter.py)
    settings: Settings
    say: Callable[[str], None]
    client: Callable[[str], Any]
    sleep: Callable[[float], None]
    release_scaling_if_instance_type_changes: Callable[[str], bool]  # scaling.Scaling
    scale: Callable[[], dict]  # scaling.Scaling

    # -- 1. image --------------------------------------------------------------------------------

    def resolve_image(self, image_uri: str) -> str:
        """The image by digest: IMAGE_URI as given when it has one, else its ECR tag resolved."""
        if DIGEST_IMAGE.match(image_uri):
            return image_uri
        match = ECR_IMAGE.match(image_uri)
        if not match:
            raise PromoteError(
                f"IMAGE_URI={image_uri}: give an ECR image, <account>.dkr.ecr.<region>."
                "amazonaws.com/<repository>:<tag>, or any image @sha256:<digest>"
            )
        try:
            described = self.client("ecr").describe_images(
                registryId=match["registry"],
                repositoryName=match["repository"],
                imageIds=[{"imageTag": match["tag"]}],
            )
        except Exception as error:
            if error_code(error) in ("ImageNotFoundException", "RepositoryNotFoundException"):
                raise PromoteError(f"{image_uri} is not in ECR: push it first") from None
            raise
        digest = described["imageDetails"][0]["imageDigest"]
        repository = image_uri.rsplit(":", 1)[0]
        self.say(f"image: {image_uri} is {digest}")
        return f"{repository}@{digest}"

    # -- 4. endpoint -----------------------------------------------------------------------------

    def describe(self, operation: str, **arguments: Any) -> dict | None:
        try:
            return getattr(self.client("sagemaker"), operation)(**arguments)
        except Exception as error:
            if is_not_found(error):
                return None
            raise

    def ensure_model(self, image: str) -> str:
        name = model_name(self.settings, image)
        if self.describe("describe_model", ModelName=name) is None:
            self.say(f"endpoint: creating model {name}")
            self.client("sagemaker").create_model(
                ModelName=name,
                ExecutionRoleArn=self.settings.role_arn,
                PrimaryContainer={
                    "Image": image,
                    "Mode": "MultiModel",
                    "ModelDataUrl": self.settings.model_data_url,
                    "Environment": dict(self.settings.container_environment),
                },
                Tags=[{"Key": "mmekit:endpoint", "Value": self.settings.endpoint_name}],
            )
        return name

    def ensure_config(self, model: str, ami: str) -> str:
        name = config_name(self.settings, model, ami)
        if self.describe("describe_endpoint_config", EndpointConfigName=name) is None:
            self.say(f"endpoint: creating endpoint config {name}")
            self.client("sagemaker").create_endpoint_config(
                EndpointConfigName=name,
                ProductionVariants=[
                    {
                        "VariantName": self.settings.variant_name,
                        "ModelName": model,
                        "InstanceType": self.settings.instance_type,
                        "InitialInstanceCount": self.settings.instance_count,
                        # the driver the image's CUDA needs (the host default may be 470)
                        "InferenceAmiVersion": ami,
                    }
                ],
                Tags=[{"Key": "mmekit:endpoint", "Value": self.settings.endpoint_name}],
            )
        return name

    def ensure_endpoint(self, image: str, ami: str) -> dict:
        """Create the endpoint, or move it to the config these inputs name (`ami`: the
        InferenceAmiVersion from choose_ami). The config in service is never deleted here; a
        rollback, silent or not, fails the promotion."""
        model = self.ensure_model(image)
        config = self.ensure_config(model, ami)
        name = self.settings.endpoint_name
        current = self.describe("describe_endpoint", EndpointName=name)
        if current is None:
            self.say(f"endpoint: creating {name} on {config}")
            self.client("sagemaker").create_endpoint(
                EndpointName=name,
                EndpointConfigName=config,
                Tags=[{"Key": "mmekit:endpoint", "Value": name}],
            )
            previous = None
        else:
            if current["EndpointStatus"] in TRANSITIONAL:
                self.say(f"endpoint: {name} is {current['EndpointStatus']}; waiting first")
                current = self.wait(name, expected_config=None)
            if current["EndpointStatus"] != "InService":  # Failed, UpdateRollbackFailed, ...
                raise PromoteError(
                    f"endpoint {name} is {current['EndpointStatus']} "
                    f"({current.get('FailureReason', 'no reason given')}): fix it in the "
                    "console or `make teardown`, then promote again"
                )
            previous = current["EndpointConfigName"]
            if previous == config:
                self.say(f"endpoint: {name} already serves {config}")
                return {"endpoint": name, "config": config, "model": model, "changed": False}
            released = self.release_scaling_if_instance_type_changes(previous)
            self.say(f"endpoint: updating {name} from {previous} to {config}")
            try:
                self.client("sagemaker").update_endpoint(
                    EndpointName=name, EndpointConfigName=config
                )
                self.wait(name, expected_config=config, previous_config=previous)
            except BaseException:
                if released:  # the old config still serves: give it its autoscaling back
                    self.say("scale: restoring autoscaling on the config still in service")
                    self.scale()
                raise
            return {"endpoint": name, "config": config, "model": model, "changed": True}
        self.wait(name, expected_config=config, previous_config=previous)
        return {"endpoint": name, "config": config, "model": model, "changed": True}

    def wait(
        self, name: str, expected_config: str | None, previous_config: str | None = None
    ) -> dict:
        """Poll until the endpoint settles, printing each status change with the time taken."""
        started = time.monotonic()
        deadline = started + self.settings.wait_timeout_s
        last = None
        while True:
            try:
                current = self.client("sagemaker").describe_endpoint(EndpointName=name)
            except Exception as error:
                if "Throttl" not in error_code(error):
                    raise
                current = {"EndpointStatus": last or "Updating"}  # retried after the sleep
            status = current["EndpointStatus"]
            if status != last:
                self.say(f"endpoint: {name} {status} ({time.monotonic() - started:.0f} s)")
                last = status
            if status in ("Failed", "UpdateRollbackFailed"):
                raise PromoteError(
                    f"endpoint {name} is {status}: {current.get('FailureReason', 'no reason')}"
                )
            if status == "InService" and expected_config is None:
                return current
            if status == "InService":
                serving = current.get("EndpointConfigName")
                if serving != expected_config:
                    reason = current.get("FailureReason") or "no FailureReason given"
                    raise PromoteError(
                        f"endpoint {name} rolled back: InService on {serving}, not "
                        f"{expected_config} ({reason}); the previous config "
                        f"{previous_config or serving} still serves"
                    )
                return current
            if time.monotonic() > deadline:
                raise PromoteError(
                    f"endpoint {name} still {status} after {self.settings.wait_timeout_s:.0f} s"
                )
            self.sleep(self.settings.poll_s)
