"""Promote the tested archives to a SageMaker GPU multi-model endpoint: `make promote`.

    python -m scripts.promote run [--dry-run] [--force] [--allow-tiny] [--no-smoke]
    python -m scripts.promote gate | upload | endpoint | scale | smoke   # one step on its own
    python -m scripts.promote models                 # the endpoint's models (TargetModel names)
    python -m scripts.promote teardown [--yes]       # endpoint, configs, models (not S3)
    python -m scripts.promote iam-policy             # least-privilege policies to attach

`run` does, in order: image (IMAGE_URI, or build and push where Docker runs; always used by
digest), driver (the InferenceAmiVersion whose NVIDIA driver runs the image's torch CUDA build,
from configs/inference-amis.yaml; a combination that cannot run stops here), gate (only
tarballs the local tests passed), upload (content-addressed keys, never overwritten, verified by
SHA-256), endpoint (model and config named by content hash; create, or update and check the
update really took), scale (Application Auto Scaling), smoke (every model through
sagemaker-runtime, each reporting a CUDA device), then writes promotion.json. A re-run with the
same inputs makes no mutating call. `--dry-run` prints the plan and creates no AWS client.

Settings: configs/promote.yaml, overridden by MMEKIT_<KEY> variables and then by flags.
"""

# The command line only: each step lives in its module of scripts/sagemaker/ (its docstring
# lists them), and `run` calls them in order.

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

from .archive import DEFAULT_STORE
from .cli import tool_parser
from .sagemaker.ami import AmiChoice, load_ami_table, plan_ami
from .sagemaker.debug import debug_logging
from .sagemaker.endpoint import build_and_push_image
from .sagemaker.gate import gate, read_artifacts
from .sagemaker.iam import iam_policies
from .sagemaker.promoter import Promoter
from .sagemaker.promotion import plan_lines, write_promotion
from .sagemaker.settings import (
    PROMOTION_FILE,
    SETTINGS_FILE,
    TESTED_RECORD,
    PromoteError,
    Settings,
    check_settings,
    load_settings,
)
from .sagemaker.teardown import list_models, teardown


def run(args: argparse.Namespace, settings: Settings, promoter: Promoter) -> int:
    artifacts = read_artifacts(args.store)
    image_uri = os.environ.get("IMAGE_URI", "")
    if args.dry_run:  # offline: what would happen, and what would stop it
        problems = []
        ami: AmiChoice | None = None
        for check in (
            lambda: check_settings(settings),
            lambda: gate(artifacts, args.record, args.force, args.allow_tiny, promoter.say),
        ):
            try:
                check()
            except PromoteError as error:
                problems.append(str(error))
        try:
            ami = plan_ami(settings, image_uri or None)
        except PromoteError as error:
            problems.append(str(error))
        for line in plan_lines(settings, artifacts, image_uri or None, ami):
            promoter.say(line)
        for problem in problems:
            promoter.say(f"would stop: {problem}")
        return 1 if problems else 0
    check_settings(settings)
    # the gate first: nothing is built, pushed or uploaded for archives that may not go out
    gate(artifacts, args.record, args.force, args.allow_tiny, promoter.say)
    amis = load_ami_table()
    early = None
    if image_uri or settings.image_cuda:  # the CUDA may be known already: refuse before building
        early = plan_ami(settings, image_uri or None, amis)
    image_ref = build_and_push_image(settings, os.environ, promoter)
    # an image built (or found in ECR) just now: its own label decides
    ami = early if early and image_ref == image_uri else plan_ami(settings, image_ref, amis)
    promoter.say(f"driver: InferenceAmiVersion {ami.ami.name}: {ami.reason}")
    image = promoter.resolve_image(image_ref)
    promoter.upload(artifacts)
    endpoint = promoter.ensure_endpoint(image, ami.ami.name)
    promoter.scale()
    if not args.no_smoke:
        from .examples import requests as example_requests

        promoter.smoke(artifacts, example_requests(sd_steps=2))
    write_promotion(args.output, settings, image, endpoint, artifacts, ami)
    changed = len(promoter.mutating_operations)
    promoter.say(f"promoted: {args.output} ({changed} mutating calls)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    def shared(suppress: bool) -> argparse.ArgumentParser:
        """The global flags, accepted before or after the subcommand (`run --dry-run`)."""
        flags = argparse.ArgumentParser(add_help=False)

        def default(value: object) -> object:
            return argparse.SUPPRESS if suppress else value

        flags.add_argument("--config", type=Path, default=default(SETTINGS_FILE))
        for name in (
            "region", "bucket", "prefix", "role-arn", "endpoint-name", "instance-type",
            "image-cuda", "inference-ami-version",
        ):  # fmt: skip
            flags.add_argument(f"--{name}", default=default(None))
        flags.add_argument("--instance-count", type=int, default=default(None))
        flags.add_argument("--store", type=Path, default=default(DEFAULT_STORE))
        flags.add_argument(
            "--record", type=Path, default=default(TESTED_RECORD), help=argparse.SUPPRESS
        )
        flags.add_argument("--output", type=Path, default=default(PROMOTION_FILE))
        flags.add_argument(
            "--dry-run",
            action="store_true",
            default=default(os.environ.get("DRY_RUN", "") not in ("", "0")),
            help="print the plan; create no AWS client (DRY_RUN=1)",
        )
        flags.add_argument("--debug", action="store_true", default=default(False),
                           help="log every AWS call (botocore; credentials redacted)")  # fmt: skip
        return flags

    parser = tool_parser(
        "python -m scripts.promote",
        __doc__,
        parents=[shared(suppress=False)],
    )
    after = [shared(suppress=True)]
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="every step, in order", parents=after)
    gate_parser = commands.add_parser("gate", help="check the tested record", parents=after)
    for sub in (run_parser, gate_parser):
        sub.add_argument("--force", action="store_true", help="promote untested archives")
        sub.add_argument("--allow-tiny", action="store_true", help="promote random weights")
    run_parser.add_argument("--no-smoke", action="store_true", help="skip the smoke test")
    commands.add_parser("upload", help="upload the archives (verified)", parents=after)
    endpoint_parser = commands.add_parser(
        "endpoint", help="create or update the endpoint", parents=after
    )
    endpoint_parser.add_argument("--image", default=None, help="default: IMAGE_URI")
    commands.add_parser("scale", help="register autoscaling as configured", parents=after)
    commands.add_parser("smoke", help="invoke every model through sagemaker-runtime", parents=after)
    commands.add_parser("models", help="list the endpoint's models", parents=after)
    teardown_parser = commands.add_parser(
        "teardown", help="delete endpoint, configs, models", parents=after
    )
    teardown_parser.add_argument("--yes", action="store_true", help="no confirmation prompt")
    commands.add_parser("iam-policy", help="print least-privilege IAM policies", parents=after)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        overrides = {
            "region": args.region,
            "bucket": args.bucket,
            "prefix": args.prefix,
            "role_arn": args.role_arn,
            "endpoint_name": args.endpoint_name,
            "instance_type": args.instance_type,
            "instance_count": args.instance_count,
            "image_cuda": args.image_cuda,
            "inference_ami_version": args.inference_ami_version,
        }
        settings = load_settings(args.config, overrides=overrides)
        with debug_logging(args.debug and not args.dry_run):
            if args.debug:  # environment values are the user's: names only
                shown = asdict(settings)
                shown["container_environment"] = sorted(settings.container_environment)
                print(f"settings: {json.dumps(shown, sort_keys=True)}", file=sys.stderr)
            return dispatch(args, settings, Promoter(settings))
    except PromoteError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except Exception as error:  # AWS refused: one line, with the code AWS gave
        from botocore.exceptions import BotoCoreError, ClientError

        if isinstance(error, ClientError | BotoCoreError):
            print(f"error: AWS: {error}", file=sys.stderr)
            return 1
        raise


def dispatch(args: argparse.Namespace, settings: Settings, promoter: Promoter) -> int:
    command = args.command
    if command == "run":
        return run(args, settings, promoter)
    if command == "iam-policy":
        print(json.dumps(iam_policies(settings), indent=2))
        return 0
    artifacts = read_artifacts(args.store) if command in ("gate", "upload", "smoke") else []
    if command == "gate":
        gate(artifacts, args.record, args.force, args.allow_tiny, promoter.say)
        return 0
    if args.dry_run:
        promoter.say(f"dry run: `{command}` would call AWS; nothing done")
        return 0
    check_settings(settings)
    if command == "upload":
        promoter.upload(artifacts)
    elif command == "endpoint":
        image = args.image or os.environ.get("IMAGE_URI", "")
        if not image:
            raise PromoteError("endpoint: pass --image or IMAGE_URI=<image>")
        ami = plan_ami(settings, image)  # before any call: a mismatch creates nothing
        promoter.say(f"driver: InferenceAmiVersion {ami.ami.name}: {ami.reason}")
        promoter.ensure_endpoint(promoter.resolve_image(image), ami.ami.name)
    elif command == "scale":
        promoter.scale()
    elif command == "smoke":
        from .examples import requests as example_requests

        promoter.smoke(artifacts, example_requests(sd_steps=2))
    elif command == "models":
        for item in list_models(promoter):
            print(f"{item['target_model']}\t{item['size']}\t{item['last_modified']}")
    elif command == "teardown":
        if not args.yes:
            answer = input(
                f"Delete endpoint {settings.endpoint_name}, its configs and models in "
                f"{settings.region}? Type the endpoint name to confirm: "
            )
            if answer.strip() != settings.endpoint_name:
                print("not confirmed: nothing deleted")
                return 1
        for line in teardown(promoter) or ["nothing to delete"]:
            print(f"deleted {line}" if line != "nothing to delete" else line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
