"""Where an edit is sent, and how it can fail: the targets the `mmekit` client and the editor
share, each `invoke(model, body) -> the model's JSON reply`.

- `local`: TorchServe's inference API (`make serve-local`, `make dev`), its key read from the
  key file and renewed once when TorchServe refuses an expired one;
- `mme` and `sagemaker`: boto3's sagemaker-runtime with a TargetModel, against the local
  multi-model endpoint (`make serve-mme`) or the endpoint `make promote` made.

Failures are one typed EditError each, carrying the command line's exit code and the editor's
HTTP status.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from . import PROJECT_ROOT

PROMOTION_FILE = PROJECT_ROOT / "promotion.json"
NOT_READY_RETRIES = 8  # ModelNotReadyException: a model still loading on an MME


class EditError(Exception):
    """What went wrong, in one line. Each kind is a subclass carrying its exit code (the
    command line's) and its HTTP status (the editor's); `code` is the model's own error code
    when it refused with one (e.g. unknown_image_id)."""

    exit_code = 1
    http_status = 500
    kind = "failed"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class CannotSend(EditError):
    """The request cannot be sent as given: the user's to change (a flag, a file, a size)."""

    exit_code, http_status, kind = 2, 400, "bad_request"


class Unreachable(EditError):
    """The target does not answer: start it, or check where it is."""

    exit_code, http_status, kind = 3, 502, "unreachable"


class Refused(EditError):
    """The model refused the request (a 4xx): its message says what to fix."""

    exit_code, http_status, kind = 4, 400, "refused"


class TargetFailed(EditError):
    """The target failed (a 5xx, a timeout, a reply outside the contract)."""

    exit_code, http_status, kind = 5, 502, "target_failed"


# ---------------------------------------------------------------------------------------------
# Targets: invoke(model, body) -> the model's JSON reply


class Target(Protocol):
    name: str

    def invoke(self, model: str, body: bytes) -> dict: ...

    def describe(self) -> str: ...


def refused(status: int, text: str) -> EditError:
    """A model's 4xx as one line: its JSON message when it has one, and its error code."""
    code = None
    try:
        reply = json.loads(text)
        message = reply.get("message") or reply.get("error") or text
        code = reply.get("error")
    except (ValueError, AttributeError):
        message = text.strip() or f"HTTP {status}"
    code = code if isinstance(code, str) else None  # TorchServe's own bodies: an int `code`
    if status >= 500:
        return TargetFailed(f"the target failed (HTTP {status}): {message}", code)
    return Refused(f"refused (HTTP {status}): {message}", code)


@dataclass
class LocalTarget:
    """TorchServe's inference API, as `make serve-local` or `make dev` runs it: the local
    server's record (scripts/torchserve/running.py) says where it is and where its key is."""

    url: str
    token: str | None = None
    timeout: float = 600.0
    name: str = "local"
    key_dir: Path | None = None  # where key_file.json is: a token that expired is renewed
    management_url: str | None = None
    records: Path | None = None  # the running-server records it was found by, to look again
    server: Any = None  # that record (a RunningServer), for messages
    _torchserve: Any = None

    @classmethod
    def from_environment(cls, url: str | None = None, records: Path | None = None) -> LocalTarget:
        """The running local server (its record); MMEKIT_TOKEN (with --url or INFERENCE_PORT)
        names another server's key instead, and a --url where no local server runs is tried
        without a key."""
        from .torchserve import ServeError
        from .torchserve.client import loopback_url
        from .torchserve.running import RECORDS_DIR, current

        records = records or RECORDS_DIR
        token = os.environ.get("MMEKIT_TOKEN")
        if token:
            return cls(url or loopback_url(os.environ.get("INFERENCE_PORT", "8080")), token)
        try:
            server = current(records)
        except ServeError as error:
            if url:  # a server of the user's own, maybe without token auth: try it as it is
                return cls(url)
            raise Unreachable(str(error)) from None
        target = cls(url or server.inference_url, records=records)
        target.follow(server)
        return target

    def follow(self, server: Any) -> None:
        """Talk to `server` (a RunningServer) with its current key."""
        from .torchserve import ServeError

        self.server, self.key_dir = server, Path(server.key_dir)
        self.management_url = server.management_url
        self._torchserve = None
        try:
            self.token = server.token()
        except (ServeError, OSError, ValueError, KeyError):
            self.token = None  # token auth off (sagemaker profile)

    def torchserve(self) -> Any:
        """TorchServe's client (scripts/torchserve/client.py), keyed per call with `token`."""
        if self._torchserve is None:
            from .torchserve.client import TorchServeClient

            self._torchserve = TorchServeClient(self.url, self.management_url)
        return self._torchserve

    def renew_token(self) -> bool:
        """A refused key, renewed once: the server was restarted (another key, maybe another
        server: the record is read again), or its key expired (token_expiration_min: its
        token API, with the API key from the same file, issues a fresh one)."""
        if self.records is not None:
            from .torchserve import ServeError
            from .torchserve.running import current

            try:
                server = current(self.records)
            except ServeError:
                return False
            if server != self.server:
                if self.server is None or self.url == self.server.inference_url:
                    self.url = server.inference_url  # not a --url of the user's: follow it
                self.follow(server)
                return True
        if self.key_dir is None or self.management_url is None:
            return False
        import requests

        key_file = self.key_dir / "key_file.json"
        try:
            keys = json.loads(key_file.read_text())
            if keys["inference"]["key"] != self.token:  # already renewed by someone else
                self.token = keys["inference"]["key"]
                return True
            reply = self.torchserve().new_key("inference", token=keys["API"]["key"], timeout=30)
            self.token = json.loads(key_file.read_text())["inference"]["key"]
        except (OSError, ValueError, KeyError, requests.RequestException):
            return False
        return reply.status == 200

    def describe(self) -> str:
        if self.server is None:
            return f"TorchServe at {self.url}"
        return f"TorchServe at {self.url}, `{self.server.command}`'s ({self.server.runtime})"

    def invoke(self, model: str, body: bytes) -> dict:
        reply = self.post(model, body)
        if self.refused_key(reply) and self.renew_token():
            reply = self.post(model, body)  # once, with the renewed key
        if self.refused_key(reply):
            running = (
                f"the local server running is {self.server.describe()}; "
                if self.server is not None
                else ""
            )
            raise Refused(
                f"the server at {self.url} refused the token: {running}`make -s token` prints "
                "its key (MMEKIT_TOKEN names another server's)"
            )
        if reply.status_code == 404:
            raise Refused(f"no model {model!r} at {self.url}")
        if reply.status_code != 200:
            raise refused(reply.status_code, reply.text)
        return parse_reply(reply.content)

    @staticmethod
    def refused_key(reply: Any) -> bool:
        return reply.status_code in (401, 400) and "InvalidKeyException" in reply.text

    def post(self, model: str, body: bytes) -> Any:
        import requests

        try:
            return self.torchserve().predict(model, body, token=self.token, timeout=self.timeout)
        except requests.ConnectionError:
            raise Unreachable(
                f"cannot reach {self.url}: start a local server with `make serve-local` or "
                "`make dev`"
            ) from None
        except requests.Timeout:
            raise TargetFailed(f"{model} did not answer within {self.timeout:.0f} s") from None


@dataclass
class RuntimeTarget:
    """A SageMaker multi-model endpoint, real or emulated: InvokeEndpoint with a TargetModel."""

    endpoint: str
    region: str
    endpoint_url: str | None = None  # the emulator's URL; None for the real service
    target_models: dict[str, str] = field(default_factory=dict)
    name: str = "sagemaker"
    _client: Any = None

    def describe(self) -> str:
        where = self.endpoint_url or f"SageMaker in {self.region}"
        return f"endpoint {self.endpoint} ({where})"

    def target_model(self, model: str) -> str:
        return self.target_models.get(model, f"{model}.tar.gz")

    def client(self) -> Any:
        if self._client is None:
            from .aws import make_client

            # the emulator ignores signatures: no AWS credentials needed to use it
            self._client = make_client(
                "sagemaker-runtime",
                self.region,
                read_timeout=600.0,
                endpoint_url=self.endpoint_url,
                unsigned=self.endpoint_url is not None,
            )
        return self._client

    def invoke(self, model: str, body: bytes, sleep=time.sleep) -> dict:
        from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError

        for attempt in range(NOT_READY_RETRIES + 1):
            try:
                reply = self.client().invoke_endpoint(
                    EndpointName=self.endpoint,
                    TargetModel=self.target_model(model),
                    ContentType="application/json",
                    Body=body,
                )
                return parse_reply(reply["Body"].read())
            except EndpointConnectionError:
                hint = "`make serve-mme`" if self.endpoint_url else "the region and network"
                raise Unreachable(f"cannot reach {self.describe()}: check {hint}") from None
            except ClientError as error:
                code = error.response.get("Error", {}).get("Code", "")
                if code == "ModelNotReadyException" and attempt < NOT_READY_RETRIES:
                    sleep(min(2**attempt, 30))  # the model is still loading: wait and retry
                    continue
                raise runtime_error(error, self.target_model(model)) from None
            except BotoCoreError as error:
                raise Unreachable(f"{self.describe()}: {error}") from None
        raise TargetFailed(f"{self.target_model(model)} did not finish loading")


def runtime_error(error: Any, target_model: str) -> EditError:
    """InvokeEndpoint's errors as one line: a container's 4xx shows the handler's message."""
    response = error.response
    code = response.get("Error", {}).get("Code", "")
    message = response.get("Error", {}).get("Message", "")
    if code == "ModelError":
        original = int(response.get("OriginalStatusCode") or 500)
        return refused(original, response.get("OriginalMessage") or message)
    if code == "ValidationError":
        return Refused(f"{target_model}: {message}")
    if code == "ModelNotReadyException":
        return TargetFailed(f"{target_model} is still loading; try again shortly")
    return TargetFailed(f"{code or 'error'}: {message}")


def read_promotion(path: Path = PROMOTION_FILE) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except ValueError as error:
        raise CannotSend(f"{path} is not valid JSON ({error})") from None


def make_target(
    kind: str,
    url: str | None = None,
    endpoint: str | None = None,
    region: str | None = None,
    promotion: Path = PROMOTION_FILE,
) -> Target:
    """`local`, `mme` or `sagemaker`, with the defaults `make serve-local`, `make serve-mme`
    and `make promote` (its promotion.json) leave behind."""
    if kind == "local":
        return LocalTarget.from_environment(url)
    if kind == "mme":
        port = os.environ.get("MME_PORT", "8090")
        return RuntimeTarget(
            endpoint or "mmekit-local",
            region or "us-east-1",
            endpoint_url=url or f"http://127.0.0.1:{port}",
            name="mme",
        )
    if kind == "sagemaker":
        record = read_promotion(promotion)
        endpoint = endpoint or record.get("endpoint")
        region = region or record.get("region") or os.environ.get("AWS_REGION")
        if not endpoint or not region:
            raise CannotSend(
                f"--target sagemaker needs an endpoint and a region: `make promote` writes them "
                f"to {promotion.name}, or pass --endpoint NAME --region REGION"
            )
        models = {name: entry["target_model"] for name, entry in record.get("models", {}).items()}
        return RuntimeTarget(endpoint, region, target_models=models, name="sagemaker")
    raise CannotSend(f"unknown target {kind!r}: local, mme or sagemaker")


def parse_reply(content: bytes) -> dict:
    try:
        reply = json.loads(content)
    except ValueError:
        raise TargetFailed(
            f"the target answered something other than JSON: {content[:200]!r}"
        ) from None
    if not isinstance(reply, dict) or "generated_image" not in reply:
        raise TargetFailed(f"the reply has no image: {json.dumps(reply)[:300]}")
    return reply
