"""A handler that does nothing: `make bench` serves it beside the models to measure the floor
(HTTP, TorchServe's frontend, the worker's socket) for a request of the same size."""

import json

from ts.torch_handler.base_handler import BaseHandler


class EchoHandler(BaseHandler):
    def initialize(self, context: object) -> None:
        self.initialized = True

    def handle(self, data: list[dict], context: object) -> list[str]:
        return [json.dumps({"bytes": len(row.get("body") or b"")}) for row in data]
