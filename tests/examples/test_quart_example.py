"""The Todo contract against examples/quart, served by hypercorn."""

from __future__ import annotations

from ..servers import hypercorn_server
from .contract import TodoContract


class TestQuartExample(TodoContract):
    example = "quart"
    serve = staticmethod(hypercorn_server)
