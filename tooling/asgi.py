"""An in-process ASGI driver: an app's lifespan, then requests as plain calls of the app.

Our own rather than ``httpx.ASGITransport`` or a test client: those build a request object,
parse the response and run the app in a task per request, and that per-request cost would
be measured with the app's. Here a request is a scope dict (with a copy of the lifespan
state, as uvicorn and hypercorn give), a ``receive`` that hands over the body and then waits
for the response to end before it reports a disconnect (as a server does), and a ``send``
that keeps the status and the body.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, MutableMapping
from contextlib import asynccontextmanager
from typing import Any

Message = MutableMapping[str, Any]


@asynccontextmanager
async def lifespan(app: Any) -> AsyncIterator[dict[str, Any]]:
    """Run ``app``'s startup, yield its lifespan state, run its shutdown."""
    state: dict[str, Any] = {}
    to_app: asyncio.Queue[Message] = asyncio.Queue()
    from_app: asyncio.Queue[Message] = asyncio.Queue()
    scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": state}
    task = asyncio.create_task(app(scope, to_app.get, from_app.put))

    async def exchange(event: str) -> None:
        await to_app.put({"type": event})
        answer = await from_app.get()
        if answer["type"] != f"{event}.complete":
            raise RuntimeError(f"{event} failed: {answer}")

    await exchange("lifespan.startup")
    try:
        yield state
    finally:
        await exchange("lifespan.shutdown")
        await task


class Request:
    """One HTTP request, built once, sent to an app as often as wanted."""

    def __init__(self, method: str, target: str, body: bytes = b"") -> None:
        path, _, query = target.partition("?")
        headers = [(b"host", b"127.0.0.1:8000"), (b"user-agent", b"alchemy-scope-tooling")]
        if body or method in ("POST", "PUT", "PATCH"):
            headers += [
                (b"content-type", b"application/json"),
                (b"content-length", b"%d" % len(body)),
            ]
        self.body = body
        self.template: dict[str, Any] = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.4"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "root_path": "",
            "query_string": query.encode(),
            "headers": headers,
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 8000),
            "extensions": {},
        }

    async def __call__(self, app: Any, state: dict[str, Any]) -> tuple[int, bytes]:
        """Send the request to ``app`` once; return the status and the body."""
        scope = self.template.copy()
        scope["state"] = state.copy()
        received = responded = False
        ended: asyncio.Future[None] | None = None
        status, chunks = 0, []

        async def receive() -> Message:
            nonlocal received, ended
            if not received:
                received = True
                return {"type": "http.request", "body": self.body, "more_body": False}
            if not responded:  # a framework listening for a disconnect while it responds
                if ended is None:
                    ended = asyncio.get_running_loop().create_future()
                await ended
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            nonlocal status, responded
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    responded = True
                    if ended is not None:
                        ended.set_result(None)

        await app(scope, receive, send)
        return status, b"".join(chunks)
