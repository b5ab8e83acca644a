"""The Todo contract against examples/litestar, plus a websocket case."""

from __future__ import annotations

from .contract import TodoContract
from .test_quart_example import DeeplyNestedWebsocketMessage


class TestLitestarExample(DeeplyNestedWebsocketMessage, TodoContract):
    example = "litestar"
