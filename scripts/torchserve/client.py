"""TorchServe's HTTP APIs: the one client every tool and test calls them with, and the one place
their URLs are built. Torch-free (requests only): the `mmekit` client and the emulator use it.

Inference calls (ping, predict, and invoke: `/models/<name>/invoke` as SageMaker calls it) go
to `url`; management calls (models, describe, register, unregister, set_default,
scale_workers, new_key) to `management_url`, the same URL where a profile serves both APIs on
one port (`sagemaker`). Keys: none, fixed ones (`token`, `management_token`), or the server's
key_file.json read on every call (`key_dir`: KeyFileAuth); any call may name its own key
instead (`token=`; None sends none).

ping and predict answer requests' Response: their callers read the model's answer from it
(JSON, headers, status). The management calls and invoke answer a Reply, read in full: what
SageMaker's agent sees, which the emulator passes on and its tests stand in for.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import requests

from . import ServeError

PREDICT_TIMEOUT_S = 120.0
MANAGEMENT_TIMEOUT_S = 60.0  # register, unregister, set-default, scale: TorchServe waits too
QUERY_TIMEOUT_S = 30.0  # describe, list, token
PING_TIMEOUT_S = 2.0


def loopback_url(port: int | str) -> str:
    """A TorchServe API on this machine's loopback, where every profile here binds it."""
    return f"http://127.0.0.1:{port}"


def read_token(run_dir: Path, api: str = "inference") -> str:
    """A key from TorchServe's key_file.json in `run_dir` (`inference`, `management`, `API`)."""
    key_file = run_dir / "key_file.json"
    if not key_file.is_file():
        raise ServeError(
            f"no {key_file}: is its server running? (`make serve-local` or `make dev`)"
        )
    return json.loads(key_file.read_text())[api]["key"]


@dataclass
class Reply:
    status: int
    body: bytes
    content_type: str = "application/json"

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")

    @property
    def ok(self) -> bool:
        return self.status < 400

    def json(self) -> Any:
        return json.loads(self.body)

    @classmethod
    def of(cls, response: requests.Response) -> Reply:
        return cls(response.status_code, response.content, response.headers.get("content-type", ""))


class KeyFileAuth:
    """TorchServe's keys, read from its key_file.json for every call: the management key on the
    management API, the inference key on the other. None there yet (TorchServe is starting): no
    header, and TorchServe refuses the call."""

    def __init__(self, key_dir: Path) -> None:
        self.key_dir = key_dir

    def key(self, api: str) -> str | None:
        try:
            return read_token(self.key_dir, api)
        except (ServeError, ValueError, KeyError):  # not written yet, or half written
            return None


@dataclass(frozen=True)
class FixedKeys:
    """Keys known up front (a server whose keys do not change while it is called)."""

    inference: str | None = None
    management: str | None = None

    def key(self, api: str) -> str | None:
        return {"inference": self.inference, "management": self.management}.get(api)


class OwnKey:
    """The default of every call's `token`: the client's own key for that API."""

    def __repr__(self) -> str:
        return "OWN_KEY"


OWN_KEY = OwnKey()
Token = str | None | OwnKey


class TorchServeClient:
    """TorchServe's inference and management APIs. One port and no key in SageMaker's own
    profile; in the emulator's (`mme`, scripts/sagemaker/backends.py start_torchserve), `make
    dev`'s and the `local` profile two ports and a key on each."""

    def __init__(
        self,
        url: str,
        management_url: str | None = None,
        key_dir: Path | None = None,
        *,
        token: str | None = None,
        management_token: str | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.management_url = (management_url or url).rstrip("/")
        self.keys: KeyFileAuth | FixedKeys = (
            KeyFileAuth(key_dir) if key_dir is not None else FixedKeys(token, management_token)
        )
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._lock = threading.Lock()

    @property
    def session(self) -> requests.Session:
        # keep-alive per thread: requests' Session is not meant to be shared between threads
        if not hasattr(self._local, "session"):
            session = requests.Session()
            with self._lock:
                self._sessions.append(session)
            self._local.session = session
        return self._local.session

    def close(self) -> None:
        """Close every thread's connections (a later call opens new ones)."""
        with self._lock:
            sessions, self._sessions = self._sessions, []
        for session in sessions:
            session.close()
        self._local = threading.local()

    def send(
        self,
        api: str,
        method: str,
        path: str,
        *,
        token: Token = OWN_KEY,
        key: str | None = None,
        headers: dict[str, str] | None = None,
        **options: Any,
    ) -> requests.Response:
        """One call: `path` on `api`'s URL (inference or management), with `key` (the key
        file's name for it; `api` by default) or `token`. The one place a URL is built."""
        base = self.management_url if api == "management" else self.url
        if isinstance(token, OwnKey):
            token = self.keys.key(key or api)
        sent = dict(headers or {})
        if token:
            sent["Authorization"] = f"Bearer {token}"
        return self.session.request(method, base + path, headers=sent, **options)

    # -- inference ----------------------------------------------------------------------------
    def predictions_url(self, model: str, version: str | int | None = None) -> str:
        """Where `model` (one version of it, if given) answers requests."""
        return self.url + predictions_path(model, version)

    def ping(self, timeout: float = PING_TIMEOUT_S, token: Token = OWN_KEY) -> requests.Response:
        return self.send("inference", "GET", "/ping", token=token, timeout=timeout)

    def predict(
        self,
        model: str,
        body: bytes | str,
        *,
        version: str | int | None = None,
        content_type: str = "application/json",
        timeout: float = PREDICT_TIMEOUT_S,
        token: Token = OWN_KEY,
    ) -> requests.Response:
        """`POST /predictions/<model>[/<version>]`."""
        return self.send(
            "inference", "POST", predictions_path(model, version), token=token, data=body,
            headers={"Content-Type": content_type}, timeout=timeout,
        )  # fmt: skip

    def invoke(
        self, name: str, target: str, body: bytes, content_type: str, timeout: float
    ) -> Reply:
        """The sagemaker profile's invocation, as SageMaker's agent sends it."""
        reply = self.send(
            "inference", "POST", f"/models/{name}/invoke", data=body, timeout=timeout,
            headers={"Content-Type": content_type, "X-Amzn-SageMaker-Target-Model": target},
        )  # fmt: skip
        return Reply.of(reply)

    # -- management ---------------------------------------------------------------------------
    def models(self, timeout: float = QUERY_TIMEOUT_S, token: Token = OWN_KEY) -> Reply:
        """`GET /models`: the registered models."""
        return Reply.of(self.send("management", "GET", "/models", token=token, timeout=timeout))

    def describe(
        self,
        name: str,
        version: str | int | None = None,
        timeout: float = QUERY_TIMEOUT_S,
        token: Token = OWN_KEY,
    ) -> Reply:
        """`GET /models/<name>[/<version>]`: its versions, workers and queue."""
        path = model_path(name, version)
        return Reply.of(self.send("management", "GET", path, token=token, timeout=timeout))

    def register(
        self,
        name: str,
        url: str | Path | PurePosixPath,
        *,
        query: bool = False,
        timeout: float = MANAGEMENT_TIMEOUT_S,
        token: Token = OWN_KEY,
        **options: str | int,
    ) -> Reply:
        """`POST /models`: `url` (an archive in the model store, or a folder, as SageMaker
        registers an extracted model) as `name`, with `options` (initial_workers, synchronous,
        ...). In a JSON body, as SageMaker's agent sends it; with `query`, as query parameters,
        as TorchServe's documentation (and `make dev`) sends them."""
        fields = {"model_name": name, "url": str(url), **options}
        arguments: dict[str, Any] = {"params": fields} if query else {"json": fields}
        reply = self.send(
            "management", "POST", "/models", token=token, timeout=timeout, **arguments
        )
        return Reply.of(reply)

    def unregister(
        self,
        name: str,
        version: str | int | None = None,
        timeout: float = MANAGEMENT_TIMEOUT_S,
        token: Token = OWN_KEY,
    ) -> Reply:
        """`DELETE /models/<name>[/<version>]`."""
        path = model_path(name, version)
        return Reply.of(self.send("management", "DELETE", path, token=token, timeout=timeout))

    def set_default(
        self,
        name: str,
        version: str | int,
        timeout: float = MANAGEMENT_TIMEOUT_S,
        token: Token = OWN_KEY,
    ) -> Reply:
        """`PUT /models/<name>/<version>/set-default`."""
        path = model_path(name, version) + "/set-default"
        return Reply.of(self.send("management", "PUT", path, token=token, timeout=timeout))

    def scale_workers(
        self,
        name: str,
        min_worker: int,
        max_worker: int | None = None,
        synchronous: bool = True,
        timeout: float = MANAGEMENT_TIMEOUT_S,
        token: Token = OWN_KEY,
    ) -> Reply:
        """`PUT /models/<name>?min_worker=...`: as many workers as asked (waited for, unless
        not `synchronous`)."""
        params: dict[str, Any] = {"min_worker": min_worker, "synchronous": str(synchronous).lower()}
        if max_worker is not None:
            params["max_worker"] = max_worker
        path = model_path(name)
        reply = self.send("management", "PUT", path, token=token, params=params, timeout=timeout)
        return Reply.of(reply)

    def new_key(self, api: str, timeout: float = QUERY_TIMEOUT_S, token: Token = OWN_KEY) -> Reply:
        """`GET /token?type=<api>`: TorchServe writes a fresh key for `api` to key_file.json.
        Authorised by the API key (the key file's `API`), not the management key."""
        reply = self.send(
            "management", "GET", "/token", token=token, key="API",
            params={"type": api}, timeout=timeout,
        )  # fmt: skip
        return Reply.of(reply)


def predictions_path(model: str, version: str | int | None = None) -> str:
    return f"/predictions/{model}" + (f"/{version}" if version is not None else "")


def model_path(name: str, version: str | int | None = None) -> str:
    return f"/models/{name}" + (f"/{version}" if version is not None else "")
