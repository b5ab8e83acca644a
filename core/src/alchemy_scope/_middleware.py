"""A pure-ASGI middleware that gives every request and websocket connection its own scope."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from ._insight import EngineWatch, server_timing
from ._lifecycle import Message, Send, before_send, enter, leave
from ._replicas import ReplicaSet, bookmark_cookies, with_bookmark_cookies
from ._scope import Scope, SessionOwner, UnwatchedScope

Receive = Callable[[], Awaitable[Message]]
ASGIApp = Callable[[MutableMapping[str, Any], Receive, Send], Awaitable[None]]


class ScopeMiddleware:
    """Open a scope around each HTTP request and websocket connection of an ASGI app.

    The scope stays open until the app returns: after the response body (streamed or not) and
    the framework's background tasks. Then every session opened in it is committed or rolled
    back by its ``Database``'s policy, closed, and removed from the registry, also when the
    app raised or was cancelled. ``lifespan`` passes through untouched.

    With an ``autocommit`` database, the commit happens before ``http.response.start`` is
    forwarded; if it fails, the client gets a plain 500 instead of the app's response (a 503
    when the database is unavailable: connection lost, no pooled connection).

    Args:
        app: The ASGI app to wrap.
        databases: The databases the app uses, if known (integrations pass them). When none
            commits by policy, the middleware leaves ``send`` alone; an autocommit database
            left out of them then raises ``UnwatchedDatabaseError`` on first use in a
            request. ``None``: unknown, so every response is watched.
        serialize: Let tasks of one request that share its session wait for each other
            instead of raising ``ConcurrentSessionUseError``.

    A database created with ``insight=Insight(server_timing=True)`` among ``databases`` (or
    any such database the request used, with ``databases=None``) adds a ``Server-Timing``
    header to each HTTP response, as its figures stand when the response starts. A database
    with ``Replicas(..., bookmark_cookie=name)`` among ``databases`` has its bookmark read from
    that cookie of each request and set on the response of a request that committed a write
    (after the commit that precedes the response).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        databases: Iterable[SessionOwner] | None = None,
        serialize: bool = False,
    ) -> None:
        self.app = app
        self.serialize = serialize
        self.watching = databases is None or any(db.autocommits for db in databases)
        self.bookmarks = bookmark_cookies(databases)  # None: no database sets bookmark cookies
        # The figures a Server-Timing header shows; None: those of the request's scope.
        self.timed: list[EngineWatch] | None = None
        if databases is not None:
            watches = (getattr(db, "_insight", None) for db in databases)
            self.timed = [watch for watch in watches if watch and watch.server_timing]
            self.watching = self.watching or bool(self.timed) or self.bookmarks is not None
        self._scope_class = Scope if self.watching else UnwatchedScope
        self._decorate = _start_decorator(self.timed, self.bookmarks)

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        # Cheap: no session and no connection until db.session is read. A middleware that
        # does not watch responses opens scopes of a subclass that says so, at no cost.
        current = self._scope_class()
        current._request = scope
        if self.serialize:
            current.serialize = True
        watching = self.watching
        token = enter(current)
        try:
            if watching:
                await self.app(scope, receive, _watching_send(current, send, self._decorate))
            else:  # manual commits only: nothing to do before the response is sent
                await self.app(scope, receive, send)
        except BaseException as exc:
            ending = leave(current, token, exc)
            if ending is not None:
                await ending
            raise
        if watching and current.status is None and kind == "http":
            current.failed = True  # the app returned without a response: not a success
        ending = leave(current, token, None)
        if ending is not None:
            await ending


def _watching_send(current: Scope, send: Send, decorate: StartDecorator | None) -> Send:
    """Wrap ``send`` to learn the response status and commit before the client hears of it.

    ``decorate``: what adds headers to the response start (Server-Timing, bookmark cookies),
    once its commit is done; ``None`` when nothing does.
    """

    async def send_in_scope(message: Message) -> None:
        if message["type"] == "http.response.start":
            current.status = message["status"]
            if current._opened and not await before_send(current, message, send):
                return
            if decorate is not None:
                message = decorate(current, message)
        elif current._opened and not await before_send(current, message, send):
            return
        await send(message)

    return send_in_scope


StartDecorator = Callable[[Scope, Message], Message]


def _start_decorator(
    timed: list[EngineWatch] | None, bookmarks: list[ReplicaSet] | None
) -> StartDecorator | None:
    """What adds the response start's headers: ``Server-Timing`` and bookmark cookies.

    ``timed``: the engines whose figures go in a Server-Timing header (an empty list: no
    header; ``None``: those of the scope that ask for one).
    """
    timing = timed is None or bool(timed)
    if not timing and bookmarks is None:
        return None

    def decorate(current: Scope, message: Message) -> Message:
        if timing:
            message = _with_server_timing(current, message, timed)
        if bookmarks is not None:
            message = with_bookmark_cookies(current, message, bookmarks)
        return message

    return decorate


def _with_server_timing(
    current: Scope, message: Message, timed: list[EngineWatch] | None
) -> Message:
    """``message`` with the scope's ``Server-Timing`` header added, when it has one."""
    value = server_timing(current, timed)
    if value is None:
        return message
    return {**message, "headers": [*message.get("headers", ()), (b"server-timing", value)]}
