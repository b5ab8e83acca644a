"""The Todo contract against examples/quart (served by hypercorn), plus a websocket case."""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from types import ModuleType
from typing import Any, ClassVar

from websockets.asyncio.client import connect

from ..servers import hypercorn_server
from .contract import TodoContract


class DeeplyNestedWebsocketMessage:
    """A websocket case the contract does not cover yet (also used for examples/litestar)."""

    serve: ClassVar[Callable[[Any], AbstractAsyncContextManager[str]]]

    async def test_a_websocket_message_nested_too_deeply_is_answered(
        self, todo_app: ModuleType
    ) -> None:
        """A message nested too deeply to decode gets a detail; the connection stays open."""
        deep = '{"title": "x", "deep": ' + "[" * 50_000 + "]" * 50_000 + "}"
        async with (
            self.serve(todo_app.app) as url,
            connect(url.replace("http://", "ws://") + "/todos/ws") as socket,
        ):
            await socket.send(deep)
            assert isinstance(json.loads(await socket.recv())["detail"], str)
            await socket.send(json.dumps({"title": "after"}))
            assert json.loads(await socket.recv())["title"] == "after"


class TestQuartExample(DeeplyNestedWebsocketMessage, TodoContract):
    example = "quart"
    serve = staticmethod(hypercorn_server)
