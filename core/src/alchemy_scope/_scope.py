"""The current scope: the ContextVar every other module reads, and the ``Scope`` it holds.

This is the bottom layer: it imports nothing of alchemy-scope but its exceptions. A scope
here is state only (what is open in it, how its work went); what happens to its sessions
when it ends is decided in ``_lifecycle``.
"""

from __future__ import annotations

import asyncio
import traceback
from collections.abc import Mapping
from contextvars import ContextVar, Token
from typing import Any, Protocol

from sqlalchemy.ext.asyncio import AsyncSession

from ._errors import NoScopeError, ScopeClosedError

_current_scope: ContextVar[Scope | None] = ContextVar("alchemy_scope.current_scope", default=None)


class SessionOwner(Protocol):
    """What a scope knows of the ``Database`` that opened one of its sessions."""

    @property
    def autocommits(self) -> bool:
        """Whether the policy commits the work when it succeeds."""

    @property
    def commit_on_redirect(self) -> bool:
        """Whether, committing on success, a 3xx response counts as one."""

    def _forget(self, scope: Scope, /) -> None:
        """Drop the registry entry of ``scope``."""


class Scope:
    """One unit of work (a request, a websocket connection, a job) and the sessions opened in it.

    A scope is cheap: it holds no session and no connection until code in it first reads
    ``db.session``. Its identity is the key of every ``Database``'s session registry, so one
    scope gives one session per ``Database``, and ending it ends them all.

    Attributes:
        closed: ``True`` once the scope has ended; its sessions refuse further use.
        status: The HTTP status of the response, once the middleware has seen it.
        failed: ``True`` when the work raised or its commit failed; nothing will be committed.
        cancelled: ``True`` when the work was cancelled: its connections are discarded.
        serialize: When ``True``, tasks that share this scope's session wait for each other
            instead of raising ``ConcurrentSessionUseError``.
    """

    # Class-level defaults keep opening a scope to one small allocation: a request that never
    # touches the database sets no attribute beyond these.
    _opened: list[tuple[SessionOwner, AsyncSession]] | tuple[()] = ()
    _token: Token[Scope | None] | None = None  # how it was entered: its .old_value is the parent
    _replaced_response = False  # a failed commit's 500 went out in place of the app's response
    _request: Mapping[str, Any] | None = None  # the ASGI scope, when the middleware opened it
    # Opened by a middleware that does not watch responses (its app's databases all commit
    # manually): an autocommit database's session cannot be committed before the response.
    _unwatched = False
    # What each engine with insight on cost this scope: {EngineWatch: ScopeFigures} (_insight).
    _figures: dict[Any, Any] | None = None
    closed = False
    failed = False
    cancelled = False
    serialize = False
    status: int | None = None

    @property
    def parent(self) -> Scope | None:
        """The scope that was current where this one was opened, if any."""
        token = self._token
        parent: object = None if token is None else token.old_value
        return parent if isinstance(parent, Scope) else None

    @property
    def sessions(self) -> tuple[AsyncSession, ...]:
        """The sessions opened in this scope so far, in the order they were opened."""
        return tuple(session for _, session in self._opened)

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        request = self._request
        if request is None:
            what = f"{id(self):#x}"
        elif request["type"] == "http":
            what = f"{request.get('method', '?')} {request.get('path', '?')}"
        else:
            what = f"{request['type']} {request.get('path', '?')}"
        return f"<Scope {what} {state}, {len(self._opened)} session(s)>"

    def _add(self, owner: SessionOwner, session: AsyncSession) -> None:
        """Record a session opened in this scope."""
        if self._opened:
            self._opened.append((owner, session))
        else:
            self._opened = [(owner, session)]

    def _fail(self, error: BaseException) -> None:
        """The work raised ``error``: commit nothing; if it was cancelled, free what it held.

        A statement cancelled half-way leaves its cursor in the frames of the cancellation's
        traceback; on SQLite that cursor keeps its read lock, even on a discarded connection,
        until the traceback is garbage-collected. The frames' locals are of no use to anyone
        reading a cancellation, so they are cleared now.
        """
        self.failed = True
        if isinstance(error, asyncio.CancelledError):
            self.cancelled = True
            traceback.clear_frames(error.__traceback__)


class UnwatchedScope(Scope):
    """A scope opened by a middleware that does not watch responses (see ``Scope._unwatched``)."""

    _unwatched = True


def open_scope_key() -> Scope:
    """Return the current scope: the registry key of ``db.session``. Raise if there is none."""
    current = _current_scope.get()
    if current is None:
        raise NoScopeError()
    if current.closed:
        raise ScopeClosedError()
    return current


def fail_current_scope() -> None:
    """Mark the current scope as failed, if one is open: nothing in it will be committed.

    Integrations call it where the framework answers an exception itself (an exception
    handler, a websocket it closes), so that work which raised is never committed by policy,
    whatever response the client got.
    """
    current = _current_scope.get()
    if current is not None:
        current.failed = True


def current_scope() -> Scope:
    """Return the scope this code runs in.

    Raises:
        NoScopeError: No scope is open here.
    """
    current = _current_scope.get()
    if current is None:
        raise NoScopeError()
    return current
