"""The Promoter: one object with a method for every step (image, upload, endpoint, scale,
smoke; each from its step's module), every AWS call through clients from one factory
(scripts.aws.make_client), and the log of the operations it called."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .endpoint import EndpointSteps
from .s3 import Uploads
from .scaling import Scaling
from .settings import Settings
from .smoke import Smoke

# Operations that change nothing: everything else counts as a mutating call.
READ_ONLY = re.compile(r"^(Describe|List|Get|Head|Invoke)")


@dataclass
class Promoter(Uploads, EndpointSteps, Scaling, Smoke):
    """One object for every step: its AWS clients come from one factory
    (scripts.aws.make_client, or client_factory), and it logs every operation it calls."""

    settings: Settings
    client_factory: Callable[[str], Any] | None = None
    say: Callable[[str], None] = print
    sleep: Callable[[float], None] = time.sleep
    operations: list[str] = field(default_factory=list)
    _clients: dict[str, Any] = field(default_factory=dict)

    # -- clients -------------------------------------------------------------------------------

    def client(self, service: str) -> Any:
        if service not in self._clients:
            if self.client_factory is None:
                from ..aws import make_client

                client = make_client(service, self.settings.region)
            else:
                client = self.client_factory(service)
            client.meta.events.register("before-parameter-build.*.*", self._log_operation)
            self._clients[service] = client
        return self._clients[service]

    def _log_operation(self, model: Any, **_: Any) -> None:
        self.operations.append(model.name)

    @property
    def mutating_operations(self) -> list[str]:
        return [name for name in self.operations if not READ_ONLY.match(name)]
