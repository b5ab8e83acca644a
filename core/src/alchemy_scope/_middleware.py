"""A pure-ASGI middleware that gives every request and websocket connection its own scope."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from ._core import Scope, _current_scope, logger, policies

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[MutableMapping[str, Any], Receive, Send], Awaitable[None]]

_ERROR_BODY = b"Internal Server Error"
_ERROR_START: Message = {
    "type": "http.response.start",
    "status": 500,
    "headers": [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(_ERROR_BODY)).encode()),
    ],
}
_ERROR_END: Message = {"type": "http.response.body", "body": _ERROR_BODY, "more_body": False}


class ScopeMiddleware:
    """Open a scope around each HTTP request and websocket connection of an ASGI app.

    The scope stays open until the app returns: after the response body (streamed or not) and
    the framework's background tasks. Then every session opened in it is committed or rolled
    back by its ``Database``'s policy, closed, and removed from the registry, also when the
    app raised or was cancelled. ``lifespan`` passes through untouched.

    With an ``autocommit`` database, the commit happens before ``http.response.start`` is
    forwarded; if it fails, the client gets a plain 500 instead of the app's response.

    Args:
        app: The ASGI app to wrap.
        serialize: Let tasks of one request that share its session wait for each other
            instead of raising ``ConcurrentSessionUseError``.
    """

    def __init__(self, app: ASGIApp, *, serialize: bool = False) -> None:
        self.app = app
        self.serialize = serialize

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        current = Scope()  # cheap: no session and no connection until db.session is read
        current._request = scope
        if self.serialize:
            current.serialize = True
        token = current._token = _current_scope.set(current)
        watching = policies.autocommit
        raised = False
        try:
            if watching:
                await self.app(scope, receive, _watching_send(current, send))
            else:  # manual commits only: nothing to do before the response is sent
                await self.app(scope, receive, send)
        except BaseException as exc:
            current.failed = raised = True
            if isinstance(exc, asyncio.CancelledError):
                current._cancel(exc)
            raise
        else:
            if watching and current.status is None and kind == "http":
                current.failed = True  # the app returned without a response: not a success
        finally:
            current.closed = True
            if current._opened:
                await current._leave(token, raised)
            else:
                _current_scope.reset(token)


def _watching_send(current: Scope, send: Send) -> Send:
    """Wrap ``send`` to learn the response status and commit before the client hears of it."""

    async def send_in_scope(message: Message) -> None:
        if message["type"] == "http.response.start":
            current.status = message["status"]
        if current._opened and not await _before_send(current, message, send):
            return
        await send(message)

    return send_in_scope


async def _before_send(current: Scope, message: Message, send: Send) -> bool:
    """Commit where the policy says so before the client learns the outcome.

    Returns:
        Whether ``message`` should still be forwarded.
    """
    if current._replaced_response:
        return False
    kind = message["type"]
    if kind == "http.response.start":
        try:
            await current._commit_due()
        except Exception:
            logger.exception("Commit failed before the response started; sending a 500 instead")
            current.failed = True
            current._replaced_response = True
            await send(_ERROR_START)
            await send(_ERROR_END)
            return False
    elif (
        kind == "http.response.body" and not message.get("more_body", False)
    ) or kind == "http.response.pathsend":
        # Writes made while the body streamed are committed before its last chunk: if that
        # fails the exception aborts the response, so the client never sees it complete.
        await current._commit_due()
    return True
