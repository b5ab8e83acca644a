"""A pure-ASGI middleware that gives every request and websocket connection its own scope."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from ._core import Scope, _current_scope, logger

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
        if scope["type"] != "http" and scope["type"] != "websocket":
            await self.app(scope, receive, send)
            return
        current = Scope(serialize=self.serialize)
        token = _current_scope.set(current)

        async def send_in_scope(message: Message) -> None:
            if (current._opened or current._replaced_response) and not await _before_send(
                current, message, send
            ):
                return
            await send(message)

        try:
            await self.app(scope, receive, send_in_scope)
        except BaseException:
            current.failed = True
            raise
        finally:
            try:
                await current._end()
            finally:
                _current_scope.reset(token)


async def _before_send(current: Scope, message: Message, send: Send) -> bool:
    """Commit where the policy says so before the client learns the outcome.

    Returns:
        Whether ``message`` should still be forwarded.
    """
    if current._replaced_response:
        return False
    kind = message["type"]
    if kind == "http.response.start":
        current.status = message["status"]
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
