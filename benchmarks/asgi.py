"""A minimal in-process ASGI client: the app's lifespan, then requests as plain calls.

No HTTP parsing, no sockets, no test client: a scope dict, a ``receive`` that hands over the
request body (then waits for the response to end and reports a disconnect), and a ``send``
that records the status. What is left is the framework, the integration and the database.
"""

from __future__ import annotations

import asyncio
from collections.abc import MutableMapping
from typing import Any

from benchmarks.routes import BenchRoute

Message = MutableMapping[str, Any]


class BenchError(RuntimeError):
    """A benchmarked app answered something else than the route's expected response."""


class LifespanRunner:
    """Run an ASGI app's lifespan: startup on :meth:`start`, shutdown on :meth:`stop`."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.state: dict[str, Any] = {}
        self._to_app: asyncio.Queue[Message] = asyncio.Queue()
        self._from_app: asyncio.Queue[Message] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Send ``lifespan.startup`` and wait until the app has completed it."""
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}}
        scope["state"] = self.state
        self._task = asyncio.create_task(
            self.app(scope, self._to_app.get, self._from_app.put), name="lifespan"
        )
        await self._exchange("lifespan.startup")

    async def stop(self) -> None:
        """Send ``lifespan.shutdown`` and wait until the app has completed it."""
        await self._exchange("lifespan.shutdown")
        assert self._task is not None
        await self._task

    async def _exchange(self, event: str) -> None:
        await self._to_app.put({"type": event})
        answer = await self._from_app.get()
        if answer["type"] != f"{event}.complete":
            raise BenchError(f"{event} failed: {answer}")


class ASGIClient:
    """Send one route's request to an app, again and again, as fast as the app answers."""

    def __init__(self, app: Any, route: BenchRoute, lifespan_state: dict[str, Any]) -> None:
        self.app = app
        self.route = route
        self.lifespan_state = lifespan_state
        headers = [(b"host", b"127.0.0.1:8000"), (b"user-agent", b"alchemy-scope-bench")]
        if route.body:
            headers += [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(route.body)).encode()),
            ]
        self.template: dict[str, Any] = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.4"},
            "http_version": "1.1",
            "method": route.method,
            "scheme": "http",
            "path": route.path,
            "raw_path": route.path.encode(),
            "root_path": "",
            "query_string": b"",
            "headers": headers,
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 8000),
        }

    async def request(self) -> bytes:
        """Send the request once; return the response body.

        Raises:
            BenchError: The response has another status than the route's.
        """
        scope = self.template.copy()
        scope["state"] = self.lifespan_state.copy()  # as uvicorn and hypercorn do
        request = {"type": "http.request", "body": self.route.body, "more_body": False}
        received = responded = False
        ended: asyncio.Future[None] | None = None
        status = 0
        body = b""

        async def receive() -> Message:
            nonlocal received, ended
            if not received:
                received = True
                return request
            if not responded:  # a framework listening for a disconnect while it responds
                if ended is None:
                    ended = asyncio.get_running_loop().create_future()
                await ended
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            nonlocal status, body, responded
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                body += message.get("body", b"")
                if not message.get("more_body", False):
                    responded = True
                    if ended is not None:
                        ended.set_result(None)

        await self.app(scope, receive, send)
        if status != self.route.status:
            raise BenchError(
                f"{self.route.method} {self.route.path} answered {status}, not "
                f"{self.route.status}: {body[:300]!r}"
            )
        return body

    async def run(self, requests: int, concurrency: int) -> int:
        """Send ``requests`` requests, ``concurrency`` at a time; return how many were sent."""
        if concurrency == 1:
            for _ in range(requests):
                await self.request()
            return requests
        each = max(1, requests // concurrency)

        async def worker() -> None:
            for _ in range(each):
                await self.request()

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return each * concurrency
